"""issue 15, item 11: `export --force` swaps the new folder in atomically (Linux renameat2 RENAME_EXCHANGE), so
a kill at any moment leaves --out holding the old or the new complete export; where the exchange is not
available the old folder waits beside --out as `.old-NAME-*`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from forking import in_child

from progdistill.diffusion.schedules import Schedule
from progdistill.interop.export import META, export_model
from progdistill.nets.build import build_network
from progdistill.nets.presets import ModelConfig
from progdistill.store import atomic
from progdistill.store.card import ModelCard
from progdistill.store.folders import save_model_folder

pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
FILES = ["README.md", "model_index.json", META, "scheduler", "unet"]


def write_student(folder: Path, seed: int) -> Path:
    cfg = ModelConfig(resolution=8, channels=1, block_out_channels=(16, 32), attention_levels=(), norm_num_groups=8)
    card = ModelCard(model=cfg, param="v", schedule=Schedule(), iteration=7, kind="student", steps=4, weights="model",
                     data={"spec": "digits", "kind": "image", "shape": [1, 8, 8], "num_classes": 0},
                     provenance={"teacher": "runs/teacher", "round": 5, "teacher_steps": 8, "seed": 0})
    torch.manual_seed(seed)
    save_model_folder(folder, card, {"model": build_network(cfg, "v")})
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("swap")
    return write_student(root / "old", 0), write_student(root / "new", 1)


def export_source(folder: Path) -> str | None:
    """The source of the complete export at `folder` (None: nothing there)."""
    if not folder.exists():
        return None
    assert sorted(p.name for p in folder.iterdir()) == FILES, "an incomplete export"
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    return json.loads((folder / META).read_text())["source"]


def die_after_moving_away(out: Path):
    """A kill right after `out` is renamed away (between the two renames of a move-aside-then-rename swap)."""
    real = os.replace

    def replace(src, dst, *a, **k):
        real(src, dst, *a, **k)
        if Path(src) == out:
            os._exit(137)
    return replace


@pytest.fixture
def exported(models, tmp_path):
    old, new = models
    out = tmp_path / "out"
    export_model(old, out)
    assert export_source(out) == str(old)
    return out, str(old), str(new)


def test_exchange_swaps_two_folders(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "A").touch()
    if not atomic.exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip("this system or file system has no renameat2(RENAME_EXCHANGE)")
    assert os.listdir(tmp_path / "b") == ["A"] and os.listdir(tmp_path / "a") == []
    assert not atomic.exchange(tmp_path / "a", tmp_path / "missing")       # a failure changes nothing
    assert os.listdir(tmp_path / "a") == []


def test_exchange_through_the_raw_syscall_when_glibc_lacks_the_wrapper(tmp_path, monkeypatch):
    real = atomic.ctypes.CDLL

    class NoWrapper:
        def __init__(self, *a, **k):
            self.lib = real(*a, **k)

        def __getattr__(self, name):
            if name == "renameat2":
                raise AttributeError(name)
            return getattr(self.lib, name)

    monkeypatch.setattr(atomic.ctypes, "CDLL", NoWrapper)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "A").touch()
    if not atomic.exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip("this system or file system has no renameat2(RENAME_EXCHANGE)")
    assert os.listdir(tmp_path / "b") == ["A"]


def test_a_kill_during_export_force_leaves_the_old_or_the_new_export(exported):
    out, old, new = exported
    if not atomic.exchange(out, out):   # renameat2 on one name: supported here?
        pytest.skip("this system or file system has no renameat2(RENAME_EXCHANGE)")

    def run():
        export_model(new, out, force=True)

    # between moving the old folder away and renaming the new one in: the old scheme's gap
    def killed_between():
        os.replace = die_after_moving_away(out)
        run()
    assert in_child(killed_between) == 0
    assert export_source(out) == new
    export_model(old, out, force=True)
    for point, want in (("dir-written", old), ("dir-swapped", new)):
        assert in_child(run, f"die@{point}") == 137, point
        assert export_source(out) == want, point
        export_model(old, out, force=True)
        assert not list(out.parent.glob(".old-*")) and export_source(out) == old


def test_without_the_exchange_the_old_export_waits_beside_out(exported, monkeypatch):
    """The fallback (other systems, file systems without RENAME_EXCHANGE): what `export --help` tells users."""
    out, old, new = exported
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)

    def run():
        export_model(new, out, force=True)
    assert in_child(run, "die@moved-aside") == 137
    assert not out.exists()
    aside = list(out.parent.glob(f".old-{out.name}-*"))
    assert len(aside) == 1 and export_source(aside[0]) == old
    os.rename(aside[0], out)                                  # the restore step the help text gives
    assert export_source(out) == old
    export_model(new, out, force=True)
    assert export_source(out) == new and not list(out.parent.glob(".old-*"))
