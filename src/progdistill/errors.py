"""The one exception type a user should ever see: a one-line message naming problem and fix."""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """Bad input or an impossible request; the CLI prints `error: <message>` and exits 2."""


def one_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when empty)."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def require_path(spec: str, path: Path, *, is_dir: bool) -> None:
    if not path.exists():
        raise UserError(f"{spec}: {path} does not exist; check the path")
    if is_dir and not path.is_dir():
        raise UserError(f"{spec}: {path} is not a folder; give a folder of images")
    if not is_dir and not path.is_file():
        raise UserError(f"{spec}: {path} is not a file; give the path of a file")
