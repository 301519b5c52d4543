"""issue 15, item 12: a prepared held-out split cannot be trained on (eval would then score the model against the
data it trained on); evaluation still reads it as held-out, and training splits load as before."""

from __future__ import annotations

import pytest

from progdistill.data.datasets import load_data
from progdistill.data.prepare import prepare
from progdistill.errors import UserError

QUIET = dict(progress=False, log=lambda *_: None)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    return {split: prepare("digits", root / split, split=split, **QUIET) for split in ("train", "heldout", "all")}


def test_training_on_a_prepared_heldout_split_is_refused(folders):
    spec = f"prepared:{folders['heldout']}"
    with pytest.raises(UserError) as e:
        load_data(spec, split="train")            # what train and distill read
    msg = str(e.value)
    assert "held-out" in msg and "progdistill prepare --split train" in msg and "\n" not in msg


def test_heldout_still_reads_as_heldout_and_training_splits_still_train(folders):
    held = load_data(f"prepared:{folders['heldout']}", split="heldout")
    assert len(held) == 500
    assert len(load_data(f"prepared:{folders['heldout']}", split="test")) == 500
    # evaluation's reference statistics of the "train" split read the folder as it is
    assert len(load_data(f"prepared:{folders['heldout']}", split="train", reference=True)) == 500
    assert len(load_data(f"prepared:{folders['train']}", split="train")) == 1297
    assert len(load_data(f"prepared:{folders['all']}", split="train")) == 1797     # --split all: as before
    with pytest.raises(UserError, match="not 'heldout'"):
        load_data(f"prepared:{folders['train']}", split="heldout")


def test_prepare_log_of_a_heldout_split_does_not_say_train(tmp_path):
    lines: list[str] = []
    prepare("digits", tmp_path / "h", split="heldout", progress=False, log=lines.append)
    assert "train with" not in lines[-1] and f"--data prepared:{tmp_path / 'h'}" in lines[-1]
