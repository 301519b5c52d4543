"""Export to other libraries (diffusers pipelines)."""
