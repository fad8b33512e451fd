"""Launching the kernels, their shared dtype check, and compiling a whole call's kernels in parallel before it first
runs.

Triton compiles a kernel variant the first time it is launched, one after another on the calling thread, and on
Triton up to 3.6 also builds each kernel's C launcher with the system compiler. A first SD image needs a few dozen
variants, so that sequence is most of its start-up time. Under `precompile()`, `launch` does not run a kernel: it
hands the variant to a thread pool (through Triton's AsyncCompileMode), where compiling, building the launcher and
loading the binary onto the GPU run side by side. Running a call once under `precompile()` therefore compiles
everything it launches; the call's results from that run are garbage, since no kernel wrote its output.

AsyncCompileMode, JITFunction.warmup and CompiledKernel._init_handles are Triton internals: precompile runs only on
the Triton versions it was tested with (compat.TESTED) and otherwise leaves compilation to each kernel's first
launch, with one warning.
"""

import functools
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from . import compat
from .compat import triton
from .dispatch import INTERPRET

# Per thread, as Triton's own AsyncCompileMode is: launches from other threads are not affected.
_compiling: ContextVar[bool] = ContextVar("tritonsd_precompiling", default=False)


def launch(kernel, grid, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs), or, under `precompile()`, only its compilation."""
    if _compiling.get():
        kernel.warmup(*args, grid=grid, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


class _LoadingCompiler(ThreadPoolExecutor):
    """Runs Triton's compile jobs and readies each compiled kernel for launch on the same worker thread."""

    def __init__(self):
        super().__init__(max_workers=min(32, os.cpu_count() or 1), thread_name_prefix="tritonsd-compile")
        # Triton compiles for, and launches on, the calling thread's current device.
        self.device = torch.cuda.current_device()

    def submit(self, compile_fn, /, *args, **kwargs):
        return super().submit(self._compile_and_load, compile_fn, *args, **kwargs)

    def _compile_and_load(self, compile_fn, *args, **kwargs):
        kernel = compile_fn(*args, **kwargs)
        with torch.cuda.device(self.device):
            # The launcher build and the module load otherwise happen at the first launch, on the main thread.
            kernel._init_handles()
        return kernel


@functools.cache
def _internals_tested() -> bool:
    """Whether the installed Triton is one whose internals precompile was tested with; warns (once) if not."""
    if compat.version() is not None and compat.TESTED[0] <= compat.version() <= compat.TESTED[1]:
        return True
    warnings.warn(
        f"Triton {triton.__version__} is outside the tested range {compat.tested_range()}: kernels are not compiled "
        "ahead in parallel but one by one at their first launch", RuntimeWarning, stacklevel=3,
    )
    return False


@contextmanager
def precompile():
    """Within the block, `launch` compiles instead of launching; leaving it waits for every compilation. Where there
    is nothing to compile ahead (no Triton, Triton's interpreter, no CUDA, or an untested Triton version), kernels
    launch as usual. A variant that fails to compile here is left to its first launch, which raises the error."""
    if (not compat.AVAILABLE or INTERPRET or not torch.cuda.is_available() or _compiling.get()
            or not _internals_tested()):
        yield
        return
    with _LoadingCompiler() as pool, triton.AsyncCompileMode(pool, ignore_errors=True):
        token = _compiling.set(True)
        try:
            yield
        finally:
            _compiling.reset(token)


KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_dtype(op: str, t: torch.Tensor) -> None:
    """The kernels load and store these dtypes; the references take any floating dtype."""
    if t.dtype not in KERNEL_DTYPES:
        raise ValueError(f"{op}_triton supports float16, bfloat16 and float32; got {t.dtype}")
