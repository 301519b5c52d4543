"""Command line: `progdistill COMMAND ...` (also `python -m progdistill.cli`, and under torchrun)."""

from progdistill.cli.main import main

__all__ = ["main"]
