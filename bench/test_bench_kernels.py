"""pytest-benchmark timings of the kernels at a few SD1.5 shapes (CUDA only; bench/kernels.py has the full table).

    python -m pytest bench/test_bench_kernels.py
"""

import pytest
import torch

from tritonsd.kernels.attention import attention_triton
from tritonsd.kernels.geglu import geglu_triton
from tritonsd.kernels.group_norm import group_norm_triton
from tritonsd.kernels.guided_step import guided_step_triton
from tritonsd.kernels.layer_norm import layer_norm_triton

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def bench(benchmark, fn):
    fn()  # compile outside the timing
    torch.cuda.synchronize()

    def synced():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(synced, rounds=50, warmup_rounds=5)


@pytest.mark.parametrize("lq,lk,d", [(4096, 4096, 40), (4096, 77, 40), (1024, 1024, 80), (256, 256, 160)])
def test_attention(benchmark, lq, lk, d):
    q = torch.randn(2, lq, 8, d, device="cuda", dtype=torch.float16).transpose(1, 2)
    k, v = (torch.randn(2, lk, 8, d, device="cuda", dtype=torch.float16).transpose(1, 2) for _ in range(2))
    bench(benchmark, lambda: attention_triton(q, k, v))


@pytest.mark.parametrize("shape", [(2, 320, 64, 64), (2, 1280, 16, 16), (1, 128, 512, 512)], ids=str)
def test_group_norm_silu(benchmark, shape):
    x = torch.randn(shape, device="cuda", dtype=torch.float16)
    weight, bias = (torch.randn(shape[1], device="cuda", dtype=torch.float16) for _ in range(2))
    bench(benchmark, lambda: group_norm_triton(x, 32, weight, bias, 1e-5, silu=True))


def test_guided_step(benchmark):
    x, extra = torch.randn(1, 4, 64, 64, device="cuda"), torch.randn(1, 4, 64, 64, device="cuda")
    model_out = torch.randn(2, 4, 64, 64, device="cuda", dtype=torch.float16)
    coef, g = torch.rand(6, device="cuda") + 0.5, torch.full((1,), 7.5, device="cuda")
    bench(benchmark, lambda: guided_step_triton(model_out, x, coef, g, extra))


@pytest.mark.parametrize("shape", [(2, 4096, 2 * 1280), (2, 256, 2 * 5120)], ids=str)
def test_geglu(benchmark, shape):
    x = torch.randn(shape, device="cuda", dtype=torch.float16)
    bench(benchmark, lambda: geglu_triton(x))


@pytest.mark.parametrize("shape", [(2, 4096, 320), (2, 256, 1280)], ids=str)
def test_layer_norm_after_residual_add(benchmark, shape):
    x, r = (torch.randn(shape, device="cuda", dtype=torch.float16) for _ in range(2))
    weight, bias = (torch.randn(shape[-1], device="cuda", dtype=torch.float16) for _ in range(2))
    bench(benchmark, lambda: layer_norm_triton(x, weight, bias, residual=r))
