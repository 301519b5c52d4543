"""The one exception type a user should ever see: a one-line message naming problem and fix."""


class UserError(Exception):
    """Bad input or an impossible request; the CLI prints `error: <message>` and exits 2."""
