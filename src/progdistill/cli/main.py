"""Command line: `progdistill {demo,prepare,train,distill,sample,eval,report,eval-guided,export,presets}`.

Every parser lives in this package (one module per group of commands) and every subcommand carries one
handler (`func`); handlers import the heavy modules lazily, so a module that fails to import makes its
command say so in one line instead of vanishing. Parses and calls; no maths here."""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from progdistill.cli import demo, evaluation, models, prepare, sample, training
from progdistill.errors import UserError

GROUPS = (demo, prepare, training, sample, evaluation, models)   # the order of `progdistill --help`


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="progdistill", description="Progressive distillation of diffusion models "
                                "(Salimans & Ho, ICLR 2022).")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: $PROGDISTILL_THREADS or torch's choice). On a small, busy "
                        "machine 1 can be several times faster than 2")
    sub = p.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        threads = args.threads or int(os.environ.get("PROGDISTILL_THREADS", "0") or 0)
        if threads:
            import torch
            torch.set_num_threads(threads)
        args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
