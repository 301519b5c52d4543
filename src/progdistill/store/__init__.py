"""What is on disk: model cards, model folders, training states, atomic writes, loading, the diffusers reader."""
