"""The Triton kernels on CUDA at SD1.5's full shapes (512x512 images, batch 2 for guidance, 8 heads).

Errors are norm-relative over the whole tensor, ||out - ref|| / ||ref||, against float64. Float32
must be within 1e-5. Float16 and bfloat16 must be within twice the error of PyTorch's own kernel run
in the same precision (SDPA, F.group_norm + F.silu, eager sampler arithmetic). Outputs are allocated
NaN-filled so an element a kernel never writes fails.
"""

import pytest
import torch
import torch.nn.functional as F

from tritonsd import kernels
from tritonsd.kernels.attention import attention_triton
from tritonsd.kernels.geglu import geglu_triton
from tritonsd.kernels.group_norm import group_norm_triton
from tritonsd.kernels.guided_step import guided_step_triton
from tritonsd.kernels.layer_norm import layer_norm_triton
from tools.sd15_shapes import GROUP_NORM_STRESS, SD15

pytestmark = [
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.usefixtures("poisoned"),
]

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def assert_close(out, ref, torch_out, dtype, what):
    """`torch_out` is PyTorch's own result in `dtype`; it sets the tolerance for half precision."""
    bad = (~torch.isfinite(out)).sum().item()
    assert bad == 0, f"{what}: {bad} of {out.numel()} elements unwritten (NaN poison) or not finite"
    err = rel_err(out, ref)
    tol = 1e-5 if dtype == torch.float32 else 2 * rel_err(torch_out, ref)
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.2e}"


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, device="cuda").to(dtype)


# ---------------------------------------------------------------------------------------- attention


def attention_f64(q, k, v, causal=False):
    q, k, v = (t.double() for t in (q, k, v))
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    if causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    return scores.softmax(-1) @ v


ATTENTION_SHAPES = [(*shape, False) for shape in SD15.attention] + [
    # (B, H, Lq, Lk, D, causal): SD 1.5's UNet above; SD 2's head dim, the text encoder, awkward sizes
    (2, 5, 4096, 4096, 64, False),
    (*SD15.text_attention, True),
    (1, 3, 333, 129, 33, True),  # awkward: odd lengths, odd head dim, causal with Lq > Lk
    (2, 4, 100, 77, 20, False),
    (1, 2, 1, 1, 64, False),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=lambda s: "B{}H{}Lq{}Lk{}D{}{}".format(*s[:5], "c" * s[5]))
def test_attention(shape, dtype):
    B, H, Lq, Lk, D, causal = shape
    # The engine's layout: heads split off [B, L, H*D] projections as strided views.
    q = randn(B, Lq, H, D, dtype=dtype).transpose(1, 2)
    k, v = (randn(B, Lk, H, D, dtype=dtype).transpose(1, 2) for _ in range(2))
    out = attention_triton(q, k, v, causal=causal)
    torch_out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert_close(out, attention_f64(q, k, v, causal), torch_out, dtype, f"attention {shape} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_attention_scores_beyond_float16_range_at_sd21_768(dtype):
    """SD 2.1's first-level self-attention at 768x768 (9216 tokens, 5 heads of 64) with scores past float16's
    65504, where diffusers has to upcast: the kernel's float32 scores and softmax give the float64 result."""
    q = randn(2, 9216, 5, 64).transpose(1, 2) * 100
    k = 0.9 * q + 30 * randn(2, 9216, 5, 64).transpose(1, 2)
    v = randn(2, 9216, 5, 64).transpose(1, 2)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    if dtype == torch.float16:
        assert torch.isinf(q[:, :, :256] @ k[:, :, :256].transpose(-2, -1)).any(), "scores should overflow float16"
    out = attention_triton(q, k, v)
    ref = attention_f64(q, k, v)
    bad = (~torch.isfinite(out)).sum().item()
    assert bad == 0, f"{bad} of {out.numel()} outputs not finite"
    tol = 2e-3 if dtype == torch.float16 else 1.6e-2
    assert rel_err(out, ref) <= tol, f"relative error {rel_err(out, ref):.2e} > {tol:.0e}"


def test_vae_attention_takes_sdpa_in_half_precision():
    b, h, lq, _, d = SD15.vae_attention
    q, k, v = (randn(b, lq, h, d, dtype=torch.float16).transpose(1, 2) for _ in range(3))
    with kernels.backend("auto"):
        out = kernels.attention(q, k, v)
    torch_out = F.scaled_dot_product_attention(q, k, v)
    assert_close(out, attention_f64(q, k, v), torch_out, torch.float16, "VAE mid-block attention, D = 512")


# --------------------------------------------------------------------------------------- group norm


def group_norm_f64(x, num_groups, weight, bias, eps=1e-5):
    N, C = x.shape[:2]
    xg = x.double().reshape(N, num_groups, -1)
    y = ((xg - xg.mean(-1, keepdim=True)) / torch.sqrt(xg.var(-1, unbiased=False, keepdim=True) + eps)).reshape(x.shape)
    y = y * weight.double().view(1, C, 1, 1) + bias.double().view(1, C, 1, 1)
    return y * torch.sigmoid(y)


# The UNet's levels (32 groups of 10 / 20 / 40 channels), its skip-concatenations' 30 / 60 / 80, the VAE decoder's
# groups of about a million elements at 512x512, and a larger one.
GROUP_NORM_SHAPES = SD15.unet_group_norm + SD15.unet_skip_group_norm + SD15.vae_group_norm + [GROUP_NORM_STRESS]


def check_group_norm(shape, dtype, channels_last):
    x = (randn(*shape) * 2 + 1).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight, bias = randn(shape[1], dtype=dtype), randn(shape[1], dtype=dtype)
    y = group_norm_triton(x, 32, weight, bias, 1e-5, silu=True)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=memory_format), f"output strides {y.stride()} lost the input's memory format"
    torch_out = F.silu(F.group_norm(x, 32, weight, bias, 1e-5))
    what = f"group_norm+silu {shape} {dtype} channels_last={channels_last}"
    assert_close(y, group_norm_f64(x, 32, weight, bias), torch_out, dtype, what)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GROUP_NORM_SHAPES, ids=str)
def test_group_norm_silu(shape, dtype):
    check_group_norm(shape, dtype, channels_last=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [SD15.unet_group_norm[0], SD15.unet_group_norm[-1], SD15.unet_skip_group_norm[1],
                                   SD15.vae_group_norm[1]], ids=str)
def test_group_norm_silu_channels_last(shape, dtype):
    check_group_norm(shape, dtype, channels_last=True)


# -------------------------------------------------------------------------------------------- geglu


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SD15.geglu, ids=str)
def test_geglu(shape, dtype):
    x = randn(*shape, dtype=dtype) * 3
    h, gate = x.double().chunk(2, dim=-1)
    ref = h * 0.5 * gate * (1 + torch.erf(gate / 2**0.5))
    th, tgate = x.chunk(2, dim=-1)
    assert_close(geglu_triton(x), ref, th * F.gelu(tgate), dtype, f"geglu {shape} {dtype}")


# --------------------------------------------------------------------------------------- layer norm


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [*SD15.layer_norm, SD15.text_layer_norm], ids=str)
def test_layer_norm_after_residual_add(shape, dtype):
    x, r = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype)
    weight, bias = (1 + 0.1 * randn(shape[-1])).to(dtype), (0.1 * randn(shape[-1])).to(dtype)
    total, y = layer_norm_triton(x, weight, bias, residual=r)
    assert torch.equal(total, x + r), f"layer_norm {shape} {dtype}: the sum differs from x + r"
    s = (x + r).double()
    ref = (s - s.mean(-1, keepdim=True)) / torch.sqrt(s.var(-1, unbiased=False, keepdim=True) + 1e-5)
    ref = ref * weight.double() + bias.double()
    torch_out = F.layer_norm(x + r, (shape[-1],), weight, bias)
    assert_close(y, ref, torch_out, dtype, f"layer_norm after residual add {shape} {dtype}")


# -------------------------------------------------------------------------------------- guided step


def eager_step(model_out, x, coef, guidance_scale, extra, noise):
    """The unfused sequence a sampler would run, in the tensors' own dtypes."""
    a, b, c, s, d, e = coef.to(x.dtype).unbind()
    uncond, cond = model_out.to(x.dtype).chunk(2)
    eps = uncond + guidance_scale * (cond - uncond)
    return a * x + b * eps + c * extra + s * noise, d * x + e * eps


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_guided_step(dtype):
    x, extra, noise = (randn(*SD15.step, dtype=dtype) for _ in range(3))
    model_out = randn(2 * SD15.step[0], *SD15.step[1:], dtype=torch.float16)
    coef = torch.rand(6, device="cuda") + 0.5
    x_next, extra_next = guided_step_triton(model_out, x, coef, 7.5, extra, noise)
    ref = [t.double() for t in (model_out, x, extra, noise)]
    a, b, c, s, d, e = coef.double().unbind()
    uncond, cond = ref[0].chunk(2)
    eps = uncond + 7.5 * (cond - uncond)
    torch_x, torch_extra = eager_step(model_out, x, coef, 7.5, extra, noise)
    assert_close(x_next, a * ref[1] + b * eps + c * ref[2] + s * ref[3], torch_x, dtype, f"guided_step x_next {dtype}")
    assert_close(extra_next, d * ref[1] + e * eps, torch_extra, dtype, f"guided_step extra_next {dtype}")


def test_guided_step_replays_in_a_cuda_graph():
    # The coefficients are read on the device, so a captured step picks up new values on replay.
    x, model_out = randn(*SD15.step), randn(2 * SD15.step[0], *SD15.step[1:], dtype=torch.float16)
    coef = torch.ones(6, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        guided_step_triton(model_out, x, coef, 7.5)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        x_next, _ = guided_step_triton(model_out, x, coef, 7.5)
    new_coef = torch.tensor([0.9, -0.3, 0.0, 0.0, 0.0, 0.0], device="cuda")
    coef.copy_(new_coef)
    graph.replay()
    torch.cuda.synchronize()
    uncond, cond = model_out.double().chunk(2)
    ref = 0.9 * x.double() - 0.3 * (uncond + 7.5 * (cond - uncond))
    err = rel_err(x_next, ref)
    assert err <= 1e-5, f"replayed step with new coefficients: relative error {err:.2e} > 1e-5"


# --------------------------------------------------------------------------------------- precompile


def compiled_variants() -> set:
    """(kernel name, Triton's specialisation key) of every variant compiled in this process for the current GPU."""
    import triton

    from tritonsd.kernels import attention, geglu, group_norm, guided_step, layer_norm

    device = torch.cuda.current_device()
    jitted = {obj for mod in (attention, geglu, group_norm, guided_step, layer_norm) for obj in vars(mod).values()
              if isinstance(obj, triton.runtime.JITFunction)}
    return {(k.fn.__name__, key) for k in jitted for key in k.device_caches[device][0]}


def test_precompile_compiles_what_the_call_then_launches():
    from tritonsd.kernels.launch import precompile

    # Head dim 24 and 9 channels per group are used nowhere else, so these variants are new to the process.
    q, k, v = (randn(2, 3, 70, 24, dtype=torch.float16) for _ in range(3))
    x, weight, bias = randn(2, 36, 10, 10), randn(36), randn(36)

    def call():
        return attention_triton(q, k, v), group_norm_triton(x, 4, weight, bias, silu=True)

    before = compiled_variants()
    with precompile():
        unlaunched = call()
    precompiled = compiled_variants() - before
    names = {name for name, _ in precompiled}
    assert {"_attention_fwd_kernel", "_group_norm_stats_kernel", "_group_norm_apply_kernel"} <= names, (
        f"precompile compiled only {sorted(names)}")
    for out in unlaunched:
        assert out.isnan().all(), "a kernel ran under precompile: its output is not the NaN-filled allocation"

    att, gn = call()
    late = compiled_variants() - before - precompiled
    assert not late, f"the call compiled {sorted(n for n, _ in late)} after precompile had compiled {sorted(names)}"
    assert_close(att, attention_f64(q, k, v), F.scaled_dot_product_attention(q, k, v), torch.float16, "attention after precompile")
    assert_close(gn, group_norm_f64(x, 4, weight, bias), F.silu(F.group_norm(x, 4, weight, bias)), torch.float32,
                 "group_norm after precompile")
