"""`progdistill prepare`: parser and handler."""

from __future__ import annotations

import argparse

from progdistill.cli.common import add_command, needs, value

EXAMPLES = """examples:
  progdistill prepare --data cifar10:~/cifar-10-batches-py --out data/cifar10-train
  progdistill prepare --data cifar10:~/cifar-10-batches-py --split heldout --out data/cifar10-test
  progdistill prepare --data folder:~/pics --resolution 64 --channels 3 --out data/pics64
  progdistill train --data prepared:data/cifar10-train --preset cifar10 --out runs/c10   # read per batch

writes DIR/images.u8 (N x C x H x W uint8), DIR/labels.npy and DIR/header.json, built beside DIR
and renamed into place; training, distillation and evaluation read only the examples each batch needs."""


def cmd_prepare(a: argparse.Namespace) -> None:
    with needs("prepare"):
        from progdistill.data.prepare import prepare
    prepare(a.data, a.out, split=value(a.split, "train"), resolution=a.resolution, channels=a.channels,
            progress=not a.no_progress)


def add_parsers(sub) -> None:
    q = add_command(sub, "prepare", "convert image data once into uint8 on disk, read per batch with --data prepared:DIR",
                    cmd_prepare, EXAMPLES)
    q.add_argument("--data", required=True, help="digits | folder:PATH | npz:PATH | cifar10:PATH")
    q.add_argument("--out", required=True, help="folder to write (must not exist)")
    q.add_argument("--split", default=None, choices=["train", "heldout", "test", "all"], help="default train")
    q.add_argument("--resolution", type=int, help="image side (default: the data's own); said in one line")
    q.add_argument("--channels", type=int, choices=[1, 3], help="1 (grayscale) or 3 (RGB); default: the data's own")
    q.add_argument("--no-progress", action="store_true", default=None, help="no progress bar")
