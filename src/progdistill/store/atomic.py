"""Publishing files and folders so that a kill at any moment leaves the previous or the new version, whole.

Everything is written beside its destination, fsynced (files, then their folders), and made visible by
one `os.replace`; the parent folder is fsynced after it.

* A file (`write_json`, `torch_save_atomic`): temp file, fsync, rename.
* A folder written once (`publish_dir`: distillation's `steps-NNNN/`): temp folder, fsync, one rename.
* A folder replaced as a whole (`replace_dir_atomic`: an export's `--out`): temp folder, fsync, then one
  atomic exchange of the two names where the OS offers it (Linux `renameat2(RENAME_EXCHANGE)`), so the
  path holds the old or the new folder at every moment; the old copy (now under the temp name) is then
  removed. Elsewhere (other systems, file systems without the exchange) the old folder is first
  renamed aside to `.old-NAME-<id>` beside it: a kill between that rename and the next leaves no
  folder at the path, only the complete old one at `.old-NAME-*` (rename it back to restore it).
* A folder replaced over and over (`publish_version`: a training run's `model/`, `ema/` and its card):
  each save is an immutable version folder `RUN/.v-<iteration>-<id>/` holding all of them; the one
  publishing rename swaps the relative symlink `RUN/current -> .v-...` (a new link made under a temp
  name, then renamed onto the old one). The public paths are relative links through it
  (`RUN/model -> current/model`, `RUN/ema`, `RUN/progdistill.json`), so card and weights always
  change together, and a run folder stays valid when copied (`cp -r`, `rsync -a`; a copy that
  follows links gets plain folders, which load and convert again) or moved. Readers pin one version
  (`version_folder`) before reading, so a swap cannot mix two. After a swap every version but the
  new one and the one it replaced is removed (a reader that pinned the previous one can finish);
  `clean_run_folder` (at start-up) removes unreferenced versions and temp leftovers of a killed save,
  and repairs the public links. Old run folders (plain `model/`, `ema/`, card) load as they are; the
  first save converts them: its version is published by the `current` swap first, readers prefer
  `current`, and only then do the plain paths become links.

`faults.reached(POINT)` marks each step, for tests that kill a save there.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable

import torch

from progdistill.store.faults import reached

CURRENT = "current"
VERSION_PREFIX = ".v-"
TEMP_PREFIX = ".tmp-"
ASIDE_PREFIX = ".old-"
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's data and entries to disk (a folder's: its names, incl. new links)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if os.path.isdir(path) else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file, then every folder, bottom-up (links are not followed)."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                fsync_path(Path(p))
        fsync_path(Path(dirpath))


def _temp_name(name: str) -> str:
    return f"{TEMP_PREFIX}{name.lstrip('.')}-{uuid.uuid4().hex[:8]}"


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically: a temp file in the same folder, fsync, rename, fsync the folder. A link is
    written through (`RUN/progdistill.json` edits the current version's card, as it reads)."""
    path = Path(os.path.realpath(path)) if os.path.islink(path) else Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        os.fchmod(fd, 0o666 & ~_UMASK)    # mkstemp's 0600 would hide cards from the rest of a lab
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def torch_save_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_UMASK)
    os.close(fd)
    torch.save(obj, tmp)
    fsync_path(Path(tmp))
    os.replace(tmp, path)
    fsync_path(path.parent)
    reached("file-written")


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


AT_FDCWD = -100
RENAME_EXCHANGE = 2
SYS_RENAMEAT2 = {"x86_64": 316, "amd64": 316, "aarch64": 276, "arm64": 276}


def _renameat2():
    """libc's renameat2, or a call of the raw syscall where glibc lacks the wrapper; None off Linux."""
    if platform.system() != "Linux":
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    fn = getattr(libc, "renameat2", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
        return fn
    number = SYS_RENAMEAT2.get(platform.machine().lower())
    syscall = getattr(libc, "syscall", None)
    if number is None or syscall is None:
        return None
    syscall.restype = ctypes.c_long
    return lambda *args: syscall(ctypes.c_long(number), *(ctypes.c_long(a) if isinstance(a, int) else a
                                                          for a in args))


def exchange(a: Path, b: Path) -> bool:
    """Swap the names `a` and `b` (both must exist) in one atomic step; False (nothing changed) where the
    OS or the file system cannot (ENOSYS, EINVAL, EOPNOTSUPP, ...: the caller falls back)."""
    fn = _renameat2()
    if fn is None:
        return False
    return fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0


@contextlib.contextmanager
def _built_beside(write_fn: Callable[[Path], None], target: Path):
    """A temp folder beside `target`, written by `write_fn` and fsynced (fault point dir-written); removed on
    exit unless the caller renamed it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / _temp_name(target.name)
    tmp.mkdir()
    try:
        write_fn(tmp)
        fsync_tree(tmp)
        reached("dir-written")
        yield tmp
    finally:
        _remove(tmp)


def replace_dir_atomic(write_fn: Callable[[Path], None], target: Path) -> None:
    """Build a folder with `write_fn(tmp_dir)`, fsync it, then swap it in place of `target` (for folders
    that nothing else points at, like an export): one atomic exchange where the OS offers it, else the
    existing target is moved aside to `.old-NAME-*` first (module docstring)."""
    target = Path(target)
    with _built_beside(write_fn, target) as tmp:
        if (target.exists() or target.is_symlink()) and exchange(tmp, target):
            fsync_path(target.parent)      # target is the new folder; tmp now holds the old one
            reached("dir-swapped")
            return
        aside = None
        if target.exists() or target.is_symlink():
            aside = target.parent / f"{ASIDE_PREFIX}{target.name}-{uuid.uuid4().hex[:8]}"
            os.replace(target, aside)
            reached("moved-aside")
        os.replace(tmp, target)
        fsync_path(target.parent)
        if aside is not None:
            _remove(aside)


def publish_dir(write_fn: Callable[[Path], None], target: Path, *, complete: str) -> bool:
    """Publish a folder written once: `write_fn(tmp)`, fsync, one rename onto `target`.

    A target that already holds `complete` (its last-written file) is kept and False returned: a
    resumed run re-publishing the same folder. One without it (a killed writer of an older
    progdistill) is replaced.
    """
    target = Path(target)
    if (target / complete).is_file():
        return False
    with _built_beside(write_fn, target) as tmp:
        if target.exists() or target.is_symlink():
            os.replace(target, target.parent / f"{ASIDE_PREFIX}{target.name}-{uuid.uuid4().hex[:8]}")
        os.replace(tmp, target)
        fsync_path(target.parent)
        reached("dir-published")
    return True


def _link(path: Path, target: str) -> None:
    """Make `path` a symlink to `target` with one rename (a plain folder there is moved aside first)."""
    if path.is_symlink() and os.readlink(path) == target:
        return
    tmp = path.parent / _temp_name(path.name)
    os.symlink(target, tmp)
    aside = None
    if path.is_dir() and not path.is_symlink():   # rename(2) cannot replace a folder by a link
        aside = path.parent / f"{ASIDE_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}"
        os.replace(path, aside)
        reached("moved-aside")
    os.replace(tmp, path)
    fsync_path(path.parent)
    if aside is not None:
        _remove(aside)


def current_version(folder: Path) -> str | None:
    """The version folder name `folder/current` points at, or None (no versions yet, or a copied run)."""
    cur = Path(folder) / CURRENT
    return os.readlink(cur) if cur.is_symlink() else None


def version_folder(folder: Path) -> Path:
    """Where to read `folder`'s files: its current version, pinned (realpath), or `folder` itself."""
    cur = Path(folder) / CURRENT
    return Path(os.path.realpath(cur)) if cur.is_dir() else Path(folder)


def _link_public(folder: Path, names: list[str]) -> None:
    for name in names:
        _link(folder / name, f"{CURRENT}/{name}")
        reached("public-linked")


def publish_version(folder: Path, write_fn: Callable[[Path], None], *, tag: str, public: list[str]) -> None:
    """Publish a new version of run folder `folder`: `write_fn(version_dir)` writes the `public` names."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{VERSION_PREFIX}{tag}-{uuid.uuid4().hex[:8]}"
    version = folder / name
    version.mkdir()
    try:
        write_fn(version)
    except BaseException:
        _remove(version)
        raise
    fsync_tree(version)
    fsync_path(folder)
    reached("version-written")
    old = current_version(folder)
    # Missing public paths can point through `current` before it exists; plain ones (an old run, or a
    # copy that followed the links) stay readable until `current` is swapped in, which readers prefer.
    _link_public(folder, [n for n in public if not (folder / n).exists() and not (folder / n).is_symlink()])
    _link(folder / CURRENT, name)                    # the one rename that publishes the version
    reached("current-swapped")
    _link_public(folder, public)
    for p in folder.glob(f"{VERSION_PREFIX}*"):
        if p.name not in (name, old):
            _remove(p)
    reached("old-removed")


def clean_run_folder(folder: Path, public: list[str]) -> None:
    """At start-up: remove what a killed save left (temp files and links, unreferenced versions) and
    repair the public links of a run that has a `current` version."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    cur = current_version(folder)
    for p in folder.iterdir():
        n = p.name
        if n.startswith((TEMP_PREFIX, ASIDE_PREFIX)) or (n.startswith(".") and n.endswith(".tmp")) \
                or (n.startswith(VERSION_PREFIX) and n != cur):
            _remove(p)
    if cur is not None and (folder / cur).is_dir():
        _link_public(folder, [n for n in public if (folder / cur / n).exists()])
