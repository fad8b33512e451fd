"""Triton where it is installed, stand-ins where it is not, so that every kernel module imports either way.

The reference path needs no Triton (pyproject installs it on Linux only). Without it, `triton.jit` turns each kernel
into a stub that raises if it is ever launched, `tl` holds only what a kernel module reads when it is imported (the
`tl.constexpr` of its signatures), and dispatch never picks a kernel (dispatch.use_triton).

Tested: Triton 3.6 compiling for the GPU and 3.9 in its interpreter on the CPU (TESTED). The kernels use only the
public language; launch.precompile also uses Triton internals and runs only within that range.
"""

import re
from types import SimpleNamespace

TESTED = ((3, 6), (3, 9))  # (major, minor), inclusive

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

AVAILABLE = triton is not None
MISSING = "Triton is not installed (pip install triton, on Linux); the PyTorch reference path runs without it"


def version() -> tuple[int, int] | None:
    """(major, minor) of the installed Triton, or None."""
    m = re.match(r"(\d+)\.(\d+)", triton.__version__) if AVAILABLE else None
    return (int(m.group(1)), int(m.group(2))) if m else None


def tested_range() -> str:
    (lo_major, lo_minor), (hi_major, hi_minor) = TESTED
    return f"{lo_major}.{lo_minor} to {hi_major}.{hi_minor}"


class _UnavailableKernel:
    """A @triton.jit function without Triton: importable, not launchable."""

    def __init__(self, fn):
        self.fn = fn
        self.__name__ = fn.__name__

    def __getitem__(self, grid):
        raise RuntimeError(f"cannot launch {self.__name__}: {MISSING}")

    def warmup(self, *args, **kwargs):
        self[None]


if not AVAILABLE:
    def _jit(fn=None, **options):
        return _UnavailableKernel(fn) if fn is not None else _UnavailableKernel

    triton = SimpleNamespace(
        __version__=None,
        jit=_jit,
        cdiv=lambda a, b: -(-a // b),
        next_power_of_2=lambda n: 1 << max(0, n - 1).bit_length(),
    )
    tl = SimpleNamespace(constexpr=lambda value=None: value)
