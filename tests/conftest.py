import os
import zlib

# Tiny test models gain nothing from intra-op threads, and two busy-waiting thread pools on a small machine
# (pytest beside a torchrun pair or another job) slow each other down many times over.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

# Without CUDA, the Triton kernels run in Triton's interpreter on CPU tensors. The switch is read when kernels
# are decorated, so it must be set before any kernel module is imported. The engine itself defaults to the
# PyTorch reference path in tests; tests that want the kernels ask for them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITONSD_KERNELS", "torch")


@pytest.fixture
def poisoned(monkeypatch):
    """torch.empty and empty_like return NaN-filled tensors, so an output element a kernel never writes fails."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_filled(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: nan_filled(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: nan_filled(empty_like(*a, **kw)))


@pytest.fixture(autouse=True)
def seeded(request):
    """Each test draws the same random inputs on every run and in any order: a failure reproduces."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(scope="session")
def tiny_diffusers(tmp_path_factory):
    """The tiny model (random weights, seed 0) as a diffusers folder with its tokenizer, written once by diffusers'
    own conversion; tests that need a variant link to it (tiny.linked_copy)."""
    from tiny import TINY, original_checkpoint, random_state, write_diffusers_folder

    path = tmp_path_factory.mktemp("diffusers") / "tiny"
    write_diffusers_folder(path, original_checkpoint(random_state(TINY, seed=0), extras=False), TINY, tokenizer=True)
    return path
