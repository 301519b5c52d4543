"""Networks: presets, builders, the w-conditioned wrapper, network specs, device and compile settings."""
