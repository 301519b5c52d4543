"""progdistill: progressive distillation of diffusion models (Salimans & Ho, ICLR 2022)."""

__version__ = "0.1.0"
