"""Data sources, prepared (streamed) data, normalisation and image files."""
