"""Launching the kernels, and compiling a whole call's kernels in parallel before it first runs.

Triton compiles a kernel variant the first time it is launched, one after another on the calling thread, and on
Triton up to 3.6 also builds each kernel's C launcher with the system compiler. A first SD image needs a few dozen
variants, so that sequence is most of its start-up time. Under `precompile()`, `launch` does not run a kernel: it
hands the variant to a thread pool (through Triton's AsyncCompileMode), where compiling, building the launcher and
loading the binary onto the GPU run side by side. Running a call once under `precompile()` therefore compiles
everything it launches; the call's results from that run are garbage, since no kernel wrote its output.
"""

import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import triton

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


@contextmanager
def precompile():
    """Within the block, `launch` compiles instead of launching; leaving it waits for every compilation. Where there
    is nothing to compile ahead (Triton's interpreter, or a Triton without AsyncCompileMode), kernels launch as usual.
    A variant that fails to compile here is left to its first launch, which raises the error."""
    if INTERPRET or not torch.cuda.is_available() or not hasattr(triton, "AsyncCompileMode") or _compiling.get():
        yield
        return
    with _LoadingCompiler() as pool, triton.AsyncCompileMode(pool, ignore_errors=True):
        token = _compiling.set(True)
        try:
            yield
        finally:
            _compiling.reset(token)
