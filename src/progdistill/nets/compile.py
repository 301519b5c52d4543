"""torch.compile without compiled state: `compile_denoiser` (`--compile [BACKEND]`) compiles the network call
inside a Denoiser; the module that is saved, averaged (EMA), copied into students and loaded stays the
plain network (`Denoiser.net`), so no file progdistill writes holds torch.compile's `_orig_mod.` prefix;
`plain_state_dict` strips a stray prefix from weights compiled and saved elsewhere."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from progdistill.errors import UserError

COMPILE_PREFIX = "_orig_mod"   # what torch.compile's wrapper module puts before every state-dict key


# ------------------------------------------------------------------------------- torch.compile
def check_compile(backend: str | None) -> str | None:
    """The backend to compile with (None: no compile); a one-line UserError where torch.compile cannot run."""
    if backend is None:
        return None
    if not isinstance(backend, str) or not backend:
        raise UserError(f"--compile takes a torch.compile backend name (default inductor), got {backend!r}")
    if not hasattr(torch, "compile"):
        raise UserError(f"--compile needs torch.compile (torch >= 2.0; this is {torch.__version__}); drop --compile")
    import torch._dynamo as dynamo
    try:
        dynamo.eval_frame.check_if_dynamo_supported()
    except RuntimeError as e:
        raise UserError(f"--compile: torch.compile is unavailable here ({str(e).splitlines()[0]}); drop --compile") from None
    known = dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise UserError(f"--compile: unknown torch.compile backend {backend!r}; use inductor (the default), "
                        f"or one of {', '.join(known)}")
    return backend


@contextlib.contextmanager
def compile_errors(backend: str | None = None):
    """Turn a failure of torch.compile (tracing or the backend's compiler) into a one-line UserError.
    Compilation happens at the first call, so this wraps calls (forward, and backward in `optimize`)."""
    try:
        yield
    except Exception as e:
        from torch._dynamo.exc import TorchDynamoException
        if not isinstance(e, TorchDynamoException):
            raise
        lines = [x.strip() for x in str(e).splitlines() if x.strip() and not x.strip().endswith("raised:")
                 and not x.startswith(("Set TORCHDYNAMO", "For even more"))]   # the cause, not dynamo's framing
        first = lines[0] if lines else type(e).__name__
        raise UserError(f"--compile{f' {backend}' if backend else ''} failed: {first[:300]}; run without "
                        f"--compile (inductor needs a working C++ compiler on the CPU, Triton on the GPU)") from None


def compile_denoiser(denoiser, backend: str | None):
    """Make `denoiser` call a torch.compile'd `denoiser.net` (the same parameters); returns it.

    The compiled wrapper is kept out of the module tree (a plain function attribute), so state
    dicts, `save_pretrained`, EMA and DDP all see only the plain network."""
    backend = check_compile(backend)
    if backend is None:
        return denoiser
    compiled = torch.compile(denoiser.net, backend=backend)

    def call(*args, **kwargs):
        with compile_errors(backend):
            return compiled(*args, **kwargs)

    denoiser.call_net = call
    return denoiser


def unwrap(net: nn.Module) -> nn.Module:
    """The plain module behind a torch.compile wrapper (itself if not compiled)."""
    return getattr(net, COMPILE_PREFIX, net)


def plain_state_dict(state: dict) -> dict:
    """The state dict with every `_orig_mod.` component of its keys removed (weights saved from a
    torch.compile'd module, at the top or at any sub-module); other keys as they are."""
    return {".".join(p for p in k.split(".") if p != COMPILE_PREFIX): v for k, v in state.items()}
