"""The package version, in a leaf module that imports nothing (so no module imports the package itself)."""

__version__ = "0.1.0"
