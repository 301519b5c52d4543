"""What every command module shares: how a subcommand is declared, how a heavy import fails, which flags
were typed, and the flags common to training runs.

Every parser default is None, so a flag counts as given only when it was typed; handlers fill their own
defaults with `value(...)` and pass only typed flags into run configs with `given_fields(...)`.
"""

from __future__ import annotations

import argparse
import contextlib
import textwrap
from collections.abc import Callable, Iterator, Mapping

from progdistill.errors import UserError, one_line

SETUP = "bash scripts/setup.sh"

# Flags a `--resume` may change (speed and bookkeeping; train also --iters, to extend a teacher); every other
# flag that defines a run must match the saved run, which the training code enforces with the same rule
# (train.config.RESUME_MUTABLE; tests/unit/cli checks they agree). --no-progress is never recorded.
_MUTABLE = ("--time-limit", "--workers", "--compile", "--log-every", "--checkpoint-every", "--keep-last")
RESUME_MUTABLE = {"train": (*_MUTABLE, "--iters"), "distill": _MUTABLE}


def add_command(sub, name: str, help_: str, handler: Callable, epilog: str | None = None,
                description: str | None = None) -> argparse.ArgumentParser:
    """A subcommand whose parsed arguments carry their one handler as `func`."""
    p = sub.add_parser(name, help=help_, description=description or help_, epilog=epilog,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=handler)
    return p


@contextlib.contextmanager
def needs(command: str) -> Iterator[None]:
    """Wrap a handler's lazy imports: a module that fails to import is one line naming it, never a traceback."""
    try:
        yield
    except ImportError as e:
        module = getattr(e, "name", None) or "a module"
        raise UserError(f"progdistill {command} needs {module}: {one_line(e)}; reinstall with {SETUP}") from None


def value(v, default):
    """A flag's value, or the handler's default when it was not typed."""
    return default if v is None else v


def given_fields(args: argparse.Namespace, mapping: Mapping[str, str]) -> dict:
    """{config field: value} for the flags typed on the command line; `mapping` is {args dest: config field}."""
    return {field: getattr(args, dest) for dest, field in mapping.items() if getattr(args, dest, None) is not None}


def typed(args: argparse.Namespace, *dests: str) -> list[str]:
    """The options among `dests` that were typed, spelled as on the command line."""
    return ["--" + d.replace("_", "-") for d in dests if getattr(args, d, None) is not None]


def check_typed_seed(args: argparse.Namespace) -> int:
    """`--seed` in [0, 2^32) (one line otherwise); 0 when not typed."""
    from progdistill.seeds import check_seed  # numpy and torch: not needed to build the parser
    return check_seed(value(args.seed, 0), "--seed")


def int_list(text: str | None, option: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{option} takes a comma list of integers, got {text!r}") from None


def resume_help(kind: str) -> str:
    """The epilog paragraph saying what `--resume` may change."""
    text = (f"on --resume: the run's saved flags are used (no flag it records is needed); only "
            f"{', '.join(RESUME_MUTABLE[kind])} and --no-progress may change; every other flag that defines the "
            f"run must match the saved run")
    return "\n\n" + textwrap.fill(text, width=100)


def add_compile_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the network (backend: inductor when not named; aot_eager only traces). "
                        "Compiling costs seconds to minutes once; saved weights are the same plain files")


def add_run_args(p: argparse.ArgumentParser, checkpoint_every: int) -> None:
    """The flags of a training run (train, distill); defaults are the config's, named in the help."""
    p.add_argument("--seed", type=int, default=None, help="default 0")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16"], help="default fp32")
    p.add_argument("--grad-accum", type=int, default=None, help="default 1")
    p.add_argument("--checkpoint-every", type=int, default=None, help=f"default {checkpoint_every}")
    p.add_argument("--keep-last", type=int, default=None,
                   help="training states kept (model folders are never deleted); default 3")
    p.add_argument("--time-limit", type=float, default=None, help="minutes; saves and exits cleanly, ready to --resume")
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue the run in --out exactly where it stopped")
    p.add_argument("--workers", type=int, default=None, help="DataLoader worker processes reading streamed data "
                   "(prepared:, large folders); 0 (the default) reads in the training process, often fastest on CPU")
    p.add_argument("--log-every", type=int, default=None,
                   help="steps between metrics lines in metrics.jsonl; default 25")
    p.add_argument("--no-progress", action="store_true", default=None, help="no progress bar")
    add_compile_arg(p)


RUN_FIELDS = {name: name for name in ("seed", "precision", "grad_accum", "checkpoint_every", "keep_last",
                                      "time_limit", "log_every", "workers", "compile")}
