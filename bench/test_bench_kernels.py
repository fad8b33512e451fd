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
from tools.sd15_shapes import SD15

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def bench(benchmark, fn):
    fn()  # compile outside the timing
    torch.cuda.synchronize()

    def synced():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(synced, rounds=50, warmup_rounds=5)


@pytest.mark.parametrize("shape", [SD15.attention[i] for i in (0, 1, 2, 4)], ids=str)
def test_attention(benchmark, shape):
    b, h, lq, lk, d = shape
    q = torch.randn(b, lq, h, d, device="cuda", dtype=torch.float16).transpose(1, 2)
    k, v = (torch.randn(b, lk, h, d, device="cuda", dtype=torch.float16).transpose(1, 2) for _ in range(2))
    bench(benchmark, lambda: attention_triton(q, k, v))


@pytest.mark.parametrize("shape", [SD15.unet_group_norm[0], SD15.unet_group_norm[2], SD15.vae_group_norm[-1]], ids=str)
def test_group_norm_silu(benchmark, shape):
    x = torch.randn(shape, device="cuda", dtype=torch.float16)
    weight, bias = (torch.randn(shape[1], device="cuda", dtype=torch.float16) for _ in range(2))
    bench(benchmark, lambda: group_norm_triton(x, 32, weight, bias, 1e-5, silu=True))


def test_guided_step(benchmark):
    x, extra = torch.randn(SD15.step, device="cuda"), torch.randn(SD15.step, device="cuda")
    model_out = torch.randn(2 * SD15.step[0], *SD15.step[1:], device="cuda", dtype=torch.float16)
    coef, g = torch.rand(6, device="cuda") + 0.5, torch.full((1,), 7.5, device="cuda")
    bench(benchmark, lambda: guided_step_triton(model_out, x, coef, g, extra))


@pytest.mark.parametrize("shape", SD15.geglu[::2], ids=str)
def test_geglu(benchmark, shape):
    x = torch.randn(shape, device="cuda", dtype=torch.float16)
    bench(benchmark, lambda: geglu_triton(x))


@pytest.mark.parametrize("shape", SD15.layer_norm[::2], ids=str)
def test_layer_norm_after_residual_add(benchmark, shape):
    x, r = (torch.randn(shape, device="cuda", dtype=torch.float16) for _ in range(2))
    weight, bias = (torch.randn(shape[-1], device="cuda", dtype=torch.float16) for _ in range(2))
    bench(benchmark, lambda: layer_norm_triton(x, weight, bias, residual=r))
