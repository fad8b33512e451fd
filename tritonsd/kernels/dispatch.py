"""Which implementation an op runs: the Triton kernel or the plain PyTorch reference.

The mode comes from the environment variable TRITONSD_KERNELS ("auto" when unset) and can be
overridden for a block of code with `backend(mode)`:

- "auto":   Triton for CUDA tensors, and for CPU tensors when TRITON_INTERPRET=1 (Triton's
            interpreter); the reference otherwise, and always where Triton is not installed.
- "triton": Triton always; a CPU tensor without the interpreter, or no Triton at all, is an error.
- "torch":  the references everywhere.

The override is per context (a contextvars.ContextVar): a `with backend(...)` in one thread or task does not
reroute another's ops.
"""

import os
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from .compat import AVAILABLE, MISSING

MODES = ("auto", "triton", "torch")

# Triton reads this switch when a kernel is decorated, so it is read once, at import, here too.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_override: ContextVar[str | None] = ContextVar("tritonsd_kernel_backend", default=None)


def _check_mode(mode: str, source: str) -> str:
    if mode not in MODES:
        raise ValueError(f"{source} must be one of {', '.join(MODES)}; got {mode!r}")
    return mode


def current_mode() -> str:
    override = _override.get()
    if override is not None:
        return override
    return _check_mode(os.environ.get("TRITONSD_KERNELS", "auto"), "TRITONSD_KERNELS")


@contextmanager
def backend(mode: str):
    """Run the enclosed ops in `mode` ("auto", "triton" or "torch"), then restore the previous mode."""
    token = _override.set(_check_mode(mode, "kernel backend"))
    try:
        yield
    finally:
        _override.reset(token)


def use_triton(t: torch.Tensor) -> bool:
    """Whether an op given `t` takes the Triton path."""
    mode = current_mode()
    if mode == "torch":
        return False
    if not AVAILABLE:
        if mode == "triton":
            raise ValueError(f"kernel backend 'triton' requested, but {MISSING}")
        return False
    if t.is_cuda or INTERPRET:
        return True
    if mode == "triton":
        raise ValueError(
            f"kernel backend 'triton' needs CUDA tensors or TRITON_INTERPRET=1 set before import; got a {t.device} tensor"
        )
    return False
