"""The Triton kernels against float64 references, and the dispatch between kernels and references.

Without CUDA the kernels run in Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1),
so shapes are small. Errors are norm-relative over the whole tensor: ||out - ref|| / ||ref||, with ref
computed in float64 by plain PyTorch written out here. Launchers allocate with torch.empty/empty_like;
every test here runs with those allocations filled with NaN, so an element a kernel never writes fails.
"""

import importlib
import inspect
import os
import threading
import typing

import pytest
import torch

from tritonsd import kernels
from tritonsd.kernels import dispatch
from tritonsd.kernels.attention import attention_triton, plan as attention_plan
from tritonsd.kernels.geglu import geglu_triton
from tritonsd.kernels.group_norm import MIN_CHUNK_ELEMENTS, TARGET_PROGRAMS, group_norm_triton, plan
from tritonsd.kernels.guided_step import StepCoefficients, guided_step_triton
from tritonsd.kernels.layer_norm import layer_norm_triton

pytestmark = [
    pytest.mark.skipif(not (dispatch.INTERPRET or torch.cuda.is_available()), reason="needs CUDA or TRITON_INTERPRET=1"),
    pytest.mark.usefixtures("poisoned"),
]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# tl.dot on bfloat16 gives wrong results in Triton's interpreter: bfloat16 runs on CUDA only.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    bad = (~torch.isfinite(out)).sum().item()
    assert bad == 0, f"{what}: {bad} of {out.numel()} elements unwritten (NaN poison) or not finite"
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err <= TOL[dtype], f"{what}: relative error {err:.2e} > {TOL[dtype]:.0e}"


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE).to(dtype)


# ---------------------------------------------------------------------------------------- attention


def attention_f64(q, k, v, causal=False, scale=None):
    q, k, v = (t.double() for t in (q, k, v))
    scores = q @ k.transpose(-2, -1) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    return scores.softmax(-1) @ v


ATTENTION_SHAPES = [
    # (B, H, Lq, Lk, D, causal)
    (2, 2, 64, 64, 40, False),  # SD1.x head dims 40 / 80 / 160, SD2's 64
    (1, 2, 64, 64, 80, False),
    (1, 1, 48, 48, 160, False),
    (2, 2, 64, 64, 64, False),
    (1, 2, 64, 77, 40, False),  # cross-attention to 77 text tokens
    (1, 1, 16, 77, 160, False),
    (1, 2, 77, 77, 64, True),  # CLIP text encoder
    (1, 2, 37, 53, 40, False),  # odd lengths
    (1, 1, 45, 29, 64, True),  # causal with Lq > Lk and Lq < Lk: top-left aligned
    (1, 1, 20, 50, 32, True),
    (1, 1, 37, 29, 40, True),  # causal over a split head dim
    (1, 2, 1, 1, 64, False),
    (1, 1, 1, 77, 40, False),
    (1, 2, 33, 33, 20, False),  # head dims off the multiple-of-8 grid
    (1, 1, 33, 40, 33, False),
    (1, 1, 20, 20, 256, False),  # largest supported head dim
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=lambda s: "B{}H{}Lq{}Lk{}D{}{}".format(*s[:5], "c" * s[5]))
def test_attention_matches_float64(shape, dtype):
    B, H, Lq, Lk, D, causal = shape
    q, k, v = randn(B, H, Lq, D, dtype=dtype), randn(B, H, Lk, D, dtype=dtype), randn(B, H, Lk, D, dtype=dtype)
    out = attention_triton(q, k, v, causal=causal)
    assert out.dtype == dtype
    assert_close(out, attention_f64(q, k, v, causal), dtype, f"attention {shape} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_reads_strided_views(dtype):
    # The engine splits heads as views: [B, L, H*D] -> [B, L, H, D].transpose(1, 2); here q, k, v
    # also come out of one fused projection, so none of them is contiguous.
    B, L, H, D = 2, 50, 2, 40
    qkv = randn(B, L, 3 * H * D, dtype=dtype)
    q, k, v = (t.unflatten(-1, (H, D)).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    out = attention_triton(q, k, v)
    assert_close(out, attention_f64(q, k, v), dtype, f"attention on strided views {dtype}")


def test_attention_scores_beyond_float16_range():
    """SD 2.1 in float16 overflows where attention scores are formed in float16 (diffusers upcasts them for it):
    the kernel forms them in float32, so scores past 65504 give the float64 result."""
    q = randn(1, 2, 64, 64) * 100
    k = 0.9 * q + 30 * randn(1, 2, 64, 64)
    v = randn(1, 2, 64, 64)
    q, k, v = (t.half() for t in (q, k, v))
    scores = (q @ k.transpose(-2, -1)) * 64**-0.5
    assert torch.isinf(scores).any(), "the test's scores should overflow float16"
    out = attention_triton(q, k, v)
    assert_close(out, attention_f64(q, k, v), torch.float16, "attention with scores beyond float16's range")


def test_attention_explicit_scale():
    q, k, v = randn(1, 2, 30, 64), randn(1, 2, 45, 64), randn(1, 2, 45, 64)
    out = attention_triton(q, k, v, scale=0.3)
    assert_close(out, attention_f64(q, k, v, scale=0.3), torch.float32, "attention with scale=0.3")


def test_attention_output_merges_heads_for_free():
    q = k = v = randn(2, 4, 16, 32)
    out = attention_triton(q, k, v)
    assert out.transpose(1, 2).is_contiguous(), f"output strides {out.stride()} are not a [B, L, H, D] buffer"


def test_attention_rejects_bad_inputs():
    q = randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="one dtype"):
        attention_triton(q, q.half(), q)
    with pytest.raises(ValueError, match="Lk, D"):
        attention_triton(q, randn(1, 2, 8, 32), randn(1, 2, 8, 32))
    with pytest.raises(ValueError, match="head dims up to 256"):
        big = randn(1, 1, 4, 512)
        attention_triton(big, big, big)
    with pytest.raises(ValueError, match=r"\[B, H, L, D\]"):
        attention_triton(q[0], q[0], q[0])


@pytest.mark.parametrize("head_dim,tiles", [
    (40, (32, 16)), (80, (64, 16)), (160, (128, 32)), (33, (32, 16)),  # split: at most 15 padded columns
    (64, (64, 0)), (256, (256, 0)), (8, (16, 0)),  # one tile covers it
    (20, (32, 0)), (100, (128, 0)),  # a split would pad as much as one wider tile
])
def test_attention_head_dim_tiles(head_dim, tiles):
    cfg = attention_plan(head_dim, 77, torch.float16)
    assert (cfg.block_d, cfg.tail_d) == tiles, f"D={head_dim}: tiles {(cfg.block_d, cfg.tail_d)}, expected {tiles}"


@pytest.mark.parametrize("head_dim,align", [(40, 8), (80, 8), (160, 8), (33, 1), (20, 1)])
def test_attention_proves_alignment_only_when_strides_allow(monkeypatch, head_dim, align):
    """Head-strided [B, L, H, D] views get ALIGN = 8 (16-byte loads on GPU) when every batch, head and row stride is
    a multiple of 8 elements, and ALIGN = 1 otherwise; either way the kernel sees the true strides."""
    attention_module = importlib.import_module("tritonsd.kernels.attention")
    launched = {}

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.update(kwargs, strides=args[4:20])
            return launch

    monkeypatch.setattr(attention_module, "_attention_fwd_kernel", Spy())
    q = randn(2, 16, 8, head_dim).transpose(1, 2)
    attention_triton(q, q, q)
    assert launched["ALIGN"] == align, f"D={head_dim}: ALIGN {launched['ALIGN']}, expected {align}"
    true = [*q.stride(), *q.stride(), *q.stride(), 16 * 8 * head_dim, head_dim, 8 * head_dim, 1]
    seen = [st * (align if i % 4 < 3 else 1) for i, st in enumerate(launched["strides"])]
    assert seen == true, f"D={head_dim}: strides times ALIGN {seen} != the tensors' strides {true}"


# --------------------------------------------------------------------------------------- group norm


def group_norm_f64(x, num_groups, weight, bias, eps, silu):
    N, C = x.shape[:2]
    xg = x.double().reshape(N, num_groups, -1)
    mean = xg.mean(-1, keepdim=True)
    var = xg.var(-1, unbiased=False, keepdim=True)
    affine_shape = (1, C) + (1,) * (x.dim() - 2)
    y = ((xg - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    y = y * weight.double().view(affine_shape) + bias.double().view(affine_shape)
    return y * torch.sigmoid(y) if silu else y


def group_norm_tiles(x, num_groups, num_chunks):
    """The default tiles for x with the spatial range split into num_chunks."""
    return plan(x.shape[0], x.shape[1], x[0, 0].numel(), num_groups, x.stride(1) == 1, num_chunks)


def run_group_norm(shape, num_groups, dtype, channels_last=False, silu=True, offset=0.0, num_chunks=None):
    x = (randn(*shape) * 2 + offset).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight, bias = randn(shape[1], dtype=dtype), randn(shape[1], dtype=dtype)
    tiles = None if num_chunks is None else group_norm_tiles(x, num_groups, num_chunks)
    y = group_norm_triton(x, num_groups, weight, bias, 1e-5, silu, tiles=tiles)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=memory_format), f"output strides {y.stride()} lost the input's memory format"
    assert y.dtype == dtype
    what = f"group_norm {shape} G={num_groups} {dtype} channels_last={channels_last} silu={silu} chunks={num_chunks}"
    assert_close(y, group_norm_f64(x, num_groups, weight, bias, 1e-5, silu), dtype, what)


GROUP_NORM_SHAPES = [
    # (shape, groups): SD's 32 groups with 10 / 20 / 40 channels each (UNet) and 4 / 16 (VAE)
    ((1, 320, 8, 8), 32),
    ((1, 640, 6, 6), 32),
    ((1, 1280, 4, 4), 32),
    ((1, 128, 9, 9), 32),
    ((1, 512, 4, 4), 32),
    ((1, 40, 13, 7), 4),  # odd spatial size
    ((1, 24, 5, 5), 8),  # 3 channels per group
    ((1, 6, 9, 9), 1),  # a single group
]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,groups", GROUP_NORM_SHAPES, ids=lambda v: str(v))
def test_group_norm_silu_matches_float64(shape, groups, dtype, channels_last):
    run_group_norm(shape, groups, dtype, channels_last, silu=True, offset=3.0)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,groups", [((2, 64, 6, 6), 32), ((1, 40, 13, 7), 4)], ids=lambda v: str(v))
def test_group_norm_plain_matches_float64(shape, groups, dtype, channels_last):
    run_group_norm(shape, groups, dtype, channels_last, silu=False, offset=3.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_group_norm_3d_input(dtype):
    run_group_norm((2, 64, 50), 8, dtype)


@pytest.mark.parametrize("num_chunks", [2, 3, 7])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_group_norm_split_reduction(dtype, channels_last, num_chunks):
    shape, groups = (2, 20, 37, 41), 2  # 10 channels per group; odd spatial size leaves a tail chunk
    used = plan(shape[0], shape[1], shape[2] * shape[3], groups, channels_last, num_chunks).num_chunks
    assert used > 1, f"num_chunks={num_chunks} did not split the reduction (used {used})"
    run_group_norm(shape, groups, dtype, channels_last, num_chunks=num_chunks)


def test_group_norm_splits_large_groups_by_default():
    shape, groups = (1, 4, 96, 96), 2
    assert plan(1, 4, 96 * 96, groups, channels_last=False).num_chunks > 1
    run_group_norm(shape, groups, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape,groups,per_sample", [
    ((2, 320, 8, 8), 32, True),  # UNet ResBlock: conv bias + timestep embedding, one row per sample
    ((2, 64, 12, 12), 32, False),  # VAE ResnetBlock: the conv bias alone, broadcast over the batch
    ((1, 24, 40, 40), 8, True),  # groups split into several chunks
], ids=str)
def test_group_norm_with_shift_matches_float64(shape, groups, per_sample, channels_last, dtype):
    """GroupNorm(x + shift[n, c]): the shift moves each channel before the statistics are taken."""
    x = (randn(*shape) * 2).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight, bias = randn(shape[1], dtype=dtype), randn(shape[1], dtype=dtype)
    shift = randn(shape[0], shape[1], dtype=dtype) * 3 if per_sample else (randn(shape[1], dtype=dtype) * 3).expand(shape[0], -1)
    tiles = group_norm_tiles(x, groups, num_chunks=3) if shape[0] == 1 else None
    y = group_norm_triton(x, groups, weight, bias, 1e-5, True, shift, tiles=tiles)
    ref = group_norm_f64(x.double() + shift.double()[:, :, None, None], groups, weight, bias, 1e-5, True)
    assert_close(y, ref, dtype, f"group_norm with shift {shape} G={groups} per_sample={per_sample} {dtype}")


def test_group_norm_rejects_bad_shift():
    x, w = randn(2, 8, 4, 4), randn(8)
    with pytest.raises(ValueError, match=r"shift of shape \(2, 8\)"):
        group_norm_triton(x, 2, w, w, shift=randn(8))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_group_norm_statistics_are_centred(channels_last):
    # Here E[x^2] - E[x]^2 in float32 is off by about 1e-4 of the variance, ten times the tolerance.
    run_group_norm((1, 32, 40, 40), 4, torch.float32, channels_last, offset=100.0)


def test_group_norm_channels_last_merges_more_chunk_statistics_than_one_block():
    # One group of 64 channels in 25 chunks: 1600 per-channel chunk statistics, merged 1024 at a time.
    shape, groups = (1, 64, 40, 40), 1
    assert plan(1, 64, 1600, groups, channels_last=True, num_chunks=25).num_chunks == 25
    run_group_norm(shape, groups, torch.float32, channels_last=True, offset=3.0, num_chunks=25)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [(1, 512, 512, 512), (1, 128, 512, 512), (1, 512, 64, 64), (2, 320, 64, 64)])
def test_group_norm_plan_fills_the_gpu(shape, channels_last):
    N, C, H, W = shape
    cfg = plan(N, C, H * W, 32, channels_last)
    if channels_last:
        programs, elements_per_program = N * (C // cfg.block_c) * cfg.num_chunks, cfg.block_c * cfg.s_chunk
    else:
        programs, elements_per_program = N * 32 * cfg.num_chunks, C // 32 * cfg.s_chunk
    assert cfg.num_chunks * cfg.s_chunk >= H * W > (cfg.num_chunks - 1) * cfg.s_chunk, f"chunks do not tile {shape}"
    assert programs >= TARGET_PROGRAMS or elements_per_program < 2 * MIN_CHUNK_ELEMENTS, (
        f"{shape}: {programs} programs of {elements_per_program} elements each"
    )


def test_group_norm_non_dense_input():
    x = randn(1, 16, 20, 40)[..., ::2]
    weight, bias = randn(16), randn(16)
    y = group_norm_triton(x, 4, weight, bias)
    assert_close(y, group_norm_f64(x, 4, weight, bias, 1e-5, False), torch.float32, "group_norm on a strided slice")


def test_group_norm_rejects_bad_inputs():
    x, w = randn(1, 10, 4, 4), randn(10)
    with pytest.raises(ValueError, match="not divisible into 3 groups"):
        group_norm_triton(x, 3, w, w)
    with pytest.raises(ValueError, match=r"shape \(10,\)"):
        group_norm_triton(x, 2, randn(5), w)
    with pytest.raises(ValueError, match="num_chunks"):
        group_norm_triton(x, 2, w, w, tiles=group_norm_tiles(x, 2, num_chunks=0))


# -------------------------------------------------------------------------------------- guided step


def guided_step_f64(model_out, x, coef, guidance_scale, extra, noise):
    a, b, c, s, d, e = (dict(zip(StepCoefficients._fields, coef.double().tolist()))[k] for k in "abcsde")
    eps = model_out.double()
    if guidance_scale is not None:
        uncond, cond = eps.chunk(2)
        eps = uncond + float(guidance_scale) * (cond - uncond)
    x_next = a * x.double() + b * eps
    if extra is not None:
        x_next += c * extra.double()
    if noise is not None:
        x_next += s * noise.double()
    extra_next = d * x.double() + e * eps if extra is not None else None
    return x_next, extra_next


@pytest.mark.parametrize("shape", [(2, 4, 8, 8), (1, 3, 5, 7)], ids=str)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("with_noise", [False, True], ids=["", "noise"])
@pytest.mark.parametrize("with_extra", [False, True], ids=["", "extra"])
@pytest.mark.parametrize("guidance_scale", [None, 7.5, "tensor"], ids=["unguided", "cfg7.5", "cfg-on-device"])
def test_guided_step_matches_float64(guidance_scale, with_extra, with_noise, x_dtype, shape):
    # A captured CUDA graph reads the guidance scale from device memory, so it may change between replays.
    if guidance_scale == "tensor":
        guidance_scale = torch.tensor([3.25], device=DEVICE)
    B = shape[0]
    model_out = randn(2 * B if guidance_scale is not None else B, *shape[1:], dtype=torch.float16)
    x = randn(*shape, dtype=x_dtype)
    extra = randn(*shape) if with_extra else None
    noise = randn(*shape) if with_noise else None
    # One row of a per-step table, as a sampler passes it: read at an offset into device memory.
    coef = (torch.rand(10, 6, device=DEVICE) + 0.5)[3]
    x_next, extra_next = guided_step_triton(model_out, x, coef, guidance_scale, extra, noise)
    ref_x, ref_extra = guided_step_f64(model_out, x, coef, guidance_scale, extra, noise)
    what = f"guided_step {shape} g={guidance_scale} extra={with_extra} noise={with_noise} x {x_dtype}"
    assert x_next.dtype == x_dtype
    assert_close(x_next, ref_x, x_dtype, what + ": x_next")
    if with_extra:
        assert extra_next.dtype == extra.dtype
        assert_close(extra_next, ref_extra, torch.float32, what + ": extra_next")
    else:
        assert extra_next is None


def test_guided_step_rejects_bad_inputs():
    x, coef = randn(2, 4, 8, 8), torch.ones(6, device=DEVICE)
    with pytest.raises(ValueError, match=r"\(4, 4, 8, 8\)"):
        guided_step_triton(randn(2, 4, 8, 8), x, coef, 7.5)
    with pytest.raises(ValueError, match="no guidance"):
        guided_step_triton(randn(4, 4, 8, 8), x, coef, None)
    with pytest.raises(ValueError, match="6 float32 values"):
        guided_step_triton(x, x, coef.double(), None)
    with pytest.raises(ValueError, match="noise"):
        guided_step_triton(x, x, coef, None, noise=randn(2, 4, 8, 9))
    with pytest.raises(ValueError, match="one float32 value"):
        guided_step_triton(randn(4, 4, 8, 8), x, coef, torch.tensor([7.5, 1.0], device=DEVICE))


# -------------------------------------------------------------------------------------------- geglu


def geglu_f64(x):
    h, gate = x.double().chunk(2, dim=-1)
    return h * 0.5 * gate * (1 + torch.erf(gate / 2**0.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [
    (2, 64, 2 * 1280),  # SD1.x: I = 4 * channels, channels 320 / 640 / 1280
    (1, 16, 2 * 5120),  # wider than one block
    (3, 7, 2 * 40),  # I neither a power of two nor a multiple of 16
    (5, 13, 2),  # I = 1; many rows, as a single element deep in gelu's tail is below any relative tolerance
], ids=str)
def test_geglu_matches_float64(shape, dtype):
    x = randn(*shape, dtype=dtype) * 3  # gates well into gelu's negative tail too
    assert_close(geglu_triton(x), geglu_f64(x), dtype, f"geglu {shape} {dtype}")


def test_geglu_reads_strided_rows():
    # Every other row of a larger tensor: the row stride is not 2*I.
    x = randn(2, 12, 2 * 48)[:, ::2]
    assert_close(geglu_triton(x), geglu_f64(x), torch.float32, "geglu on a row-strided view")


def test_geglu_rejects_odd_width():
    with pytest.raises(ValueError, match="2\\*I"):
        geglu_triton(randn(2, 5))


# --------------------------------------------------------------------------------------- layer norm


def layer_norm_f64(x, weight, bias, eps=1e-5):
    x = x.double()
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight.double() + bias.double()


LAYER_NORM_SHAPES = [
    (2, 64, 320), (1, 16, 1280),  # the UNet's transformer rows
    (1, 77, 768),  # the text encoder's
    (3, 5, 40),  # a width that is not a power of two, rows that do not fill a program
    (1, 1, 1),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", LAYER_NORM_SHAPES, ids=str)
def test_layer_norm_matches_float64(shape, dtype):
    x = (randn(*shape) * 3 + 2).to(dtype)  # an offset mean: the variance must be taken centred
    weight, bias = (1 + 0.1 * randn(shape[-1])).to(dtype), (0.1 * randn(shape[-1])).to(dtype)
    y = layer_norm_triton(x, weight, bias)
    assert_close(y, layer_norm_f64(x, weight, bias), dtype, f"layer_norm {shape} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", LAYER_NORM_SHAPES, ids=str)
def test_layer_norm_after_residual_add(shape, dtype):
    x, r = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype)
    weight, bias = (1 + 0.1 * randn(shape[-1])).to(dtype), (0.1 * randn(shape[-1])).to(dtype)
    total, y = layer_norm_triton(x, weight, bias, residual=r)
    # The sum is the stream's next value, rounded to the dtype as an eager add rounds it; the norm is of that value.
    assert torch.equal(total, x + r), f"{shape} {dtype}: sum differs from x + r by {(total - (x + r)).abs().max():.2e}"
    assert_close(y, layer_norm_f64(x + r, weight, bias), dtype, f"layer_norm after residual {shape} {dtype}")


def test_layer_norm_reads_strided_rows():
    x, r = randn(4, 10, 64)[:, ::2], randn(4, 5, 64)  # x's rows are 128 apart, r's 64
    weight, bias = randn(64), randn(64)
    total, y = layer_norm_triton(x, weight, bias, 1e-6, residual=r)
    assert_close(y, layer_norm_f64(x + r, weight, bias, 1e-6), torch.float32, "layer_norm on row-strided x")


def test_layer_norm_rejects_mismatched_inputs():
    x = randn(2, 8)
    with pytest.raises(ValueError, match="weight and bias"):
        layer_norm_triton(x, randn(4), randn(8))
    with pytest.raises(ValueError, match="residual must match"):
        layer_norm_triton(x, randn(8), randn(8), residual=randn(2, 4))


# ----------------------------------------------------------------------------------------- dispatch


class Routed(Exception):
    pass


CALLS = {
    "attention": lambda: kernels.attention(*(randn(1, 2, 8, 16),) * 3),
    "group_norm": lambda: kernels.group_norm(randn(1, 8, 4, 4), 2, randn(8), randn(8)),
    "guided_step": lambda: kernels.guided_step(randn(2, 4, 4, 4), randn(1, 4, 4, 4), torch.ones(6, device=DEVICE), 7.5),
    "geglu": lambda: kernels.geglu(randn(2, 3, 8)),
    "layer_norm": lambda: kernels.layer_norm(randn(2, 8), randn(8), randn(8)),
}


def test_every_op_module_has_the_same_shape():
    assert set(CALLS) == set(kernels.OPS), f"dispatch tests cover {sorted(CALLS)}, kernels.OPS lists {kernels.OPS}"
    for op in kernels.OPS:
        module = importlib.import_module(f"tritonsd.kernels.{op}")
        plan_type = "".join(part.capitalize() for part in op.split("_")) + "Plan"
        names = (op, f"{op}_ref", f"{op}_triton", "plan", plan_type, "_check_inputs")
        missing = [name for name in names if not hasattr(module, name)]
        assert not missing, f"tritonsd/kernels/{op}.py lacks {missing}"
        returned = typing.get_type_hints(module.plan)["return"]
        assert returned is getattr(module, plan_type), f"{op}.plan returns {returned}, not {plan_type}"
        tiles = inspect.signature(getattr(module, f"{op}_triton")).parameters.get("tiles")
        assert tiles is not None and tiles.kind is tiles.KEYWORD_ONLY and tiles.default is None, (
            f"{op}_triton has no keyword-only tiles=None override: {tiles}")
        exported = [name for name in (op, f"{op}_ref") if getattr(kernels, name, None) is not getattr(module, name)]
        assert not exported, f"tritonsd.kernels does not export {exported} from {op}.py"


@pytest.mark.parametrize("op", [op for op in CALLS if op != "group_norm"])  # group_norm's split tests override tiles
def test_launchers_take_a_tiles_override(op):
    """Tiles smaller than the default leave tails in every direction; the result must not change."""
    if op == "attention":
        from tritonsd.kernels.attention import AttentionPlan

        q, k, v = randn(1, 2, 20, 40), randn(1, 2, 30, 40), randn(1, 2, 30, 40)
        out = attention_triton(q, k, v, tiles=AttentionPlan(64, 0, 16, 16, 4, 1))  # one padded head-dim tile
        assert_close(out, attention_f64(q, k, v), torch.float32, "attention with 16x16 tiles")
    elif op == "geglu":
        from tritonsd.kernels.geglu import GegluPlan

        x = randn(3, 2 * 10)
        assert_close(geglu_triton(x, tiles=GegluPlan(4, 1)), geglu_f64(x), torch.float32, "geglu in blocks of 4")
    elif op == "layer_norm":
        from tritonsd.kernels.layer_norm import LayerNormPlan

        x, w, b = randn(5, 12), randn(12), randn(12)
        out = layer_norm_triton(x, w, b, tiles=LayerNormPlan(2, 16, 1))
        assert_close(out, layer_norm_f64(x, w, b), torch.float32, "layer_norm two rows per program")
    else:
        from tritonsd.kernels.guided_step import GuidedStepPlan

        mo, x = randn(2, 5, 10), randn(1, 5, 10)
        coef = torch.rand(6, device=DEVICE) + 0.5
        out, _ = guided_step_triton(mo, x, coef, 2.0, tiles=GuidedStepPlan(16, 1))
        assert_close(out, guided_step_f64(mo, x, coef, 2.0, None, None)[0], torch.float32, "guided_step in blocks of 16")


@pytest.fixture
def launchers_raise(monkeypatch):
    """Replace every launcher by one that raises Routed, so a call tells which path it took."""
    for op in CALLS:
        module = importlib.import_module(f"tritonsd.kernels.{op}")

        def launcher(*args, _op=op, **kwargs):
            raise Routed(_op)

        monkeypatch.setattr(module, f"{op}_triton", launcher)


@pytest.mark.parametrize("op", CALLS)
def test_backend_routes_ops(op, launchers_raise):
    with kernels.backend("torch"):
        CALLS[op]()
    with kernels.backend("triton"), pytest.raises(Routed):
        CALLS[op]()


def test_backend_restores_previous_mode(launchers_raise):
    with kernels.backend("torch"):
        with kernels.backend("triton"):
            with pytest.raises(Routed):
                CALLS["group_norm"]()
        CALLS["group_norm"]()


def test_mode_comes_from_environment(monkeypatch, launchers_raise):
    monkeypatch.setenv("TRITONSD_KERNELS", "torch")
    CALLS["attention"]()
    monkeypatch.setenv("TRITONSD_KERNELS", "triton")
    with pytest.raises(Routed):
        CALLS["attention"]()


def test_bad_mode_is_rejected(monkeypatch):
    with pytest.raises(ValueError, match="auto, triton, torch"):
        with kernels.backend("cuda"):
            pass
    monkeypatch.setenv("TRITONSD_KERNELS", "fast")
    with pytest.raises(ValueError, match="TRITONSD_KERNELS must be one of auto, triton, torch; got 'fast'"):
        kernels.use_triton(randn(2))


def test_auto_mode_without_cuda_or_interpreter(monkeypatch):
    monkeypatch.setattr(dispatch, "INTERPRET", False)
    cpu = torch.ones(2)
    with kernels.backend("auto"):
        assert not kernels.use_triton(cpu)
    with kernels.backend("triton"), pytest.raises(ValueError, match="TRITON_INTERPRET"):
        kernels.use_triton(cpu)


def test_backend_override_stays_in_its_own_thread():
    """Two threads inside `backend` blocks at the same moment, one "torch" and one "triton": each sees its own mode,
    and the main thread, outside any block, sees neither."""
    both_inside, checked = threading.Barrier(3), threading.Barrier(3)
    seen = {}

    def run(mode):
        with kernels.backend(mode):
            both_inside.wait(timeout=10)
            seen[mode] = (kernels.current_mode(), kernels.use_triton(randn(2)))
            checked.wait(timeout=10)

    threads = [threading.Thread(target=run, args=(mode,)) for mode in ("torch", "triton")]
    for t in threads:
        t.start()
    both_inside.wait(timeout=10)
    main = kernels.current_mode()
    checked.wait(timeout=10)
    for t in threads:
        t.join()
    assert seen == {"torch": ("torch", False), "triton": ("triton", True)}, f"(mode, takes Triton) per thread: {seen}"
    assert main == os.environ.get("TRITONSD_KERNELS", "auto"), f"the main thread saw mode {main!r} from another thread"


def test_auto_mode_takes_triton_in_the_interpreter_or_on_cuda():
    with kernels.backend("auto"):
        assert kernels.use_triton(randn(2))


def test_wide_heads_take_the_reference(launchers_raise):
    # The VAE's mid-block attention: one head of width 512.
    q, k, v = randn(1, 1, 10, 512), randn(1, 1, 10, 512), randn(1, 1, 10, 512)
    with kernels.backend("triton"):
        out = kernels.attention(q, k, v)
    assert_close(out, attention_f64(q, k, v), torch.float32, "attention with D = 512")


@pytest.mark.parametrize("op", CALLS)
def test_references_match_float64(op):
    with kernels.backend("torch"):
        if op == "attention":
            q, k, v = randn(1, 2, 20, 40), randn(1, 2, 30, 40), randn(1, 2, 30, 40)
            assert_close(kernels.attention(q, k, v, causal=True), attention_f64(q, k, v, True), torch.float32, op)
        elif op == "group_norm":
            x = randn(2, 8, 5, 5).to(memory_format=torch.channels_last)
            w, b = randn(8), randn(8)
            y = kernels.group_norm(x, 4, w, b, silu=True)
            assert y.is_contiguous(memory_format=torch.channels_last)
            assert_close(y, group_norm_f64(x, 4, w, b, 1e-5, True), torch.float32, op)
        else:
            mo, x, extra, noise = randn(4, 4, 3, 3), randn(2, 4, 3, 3), randn(2, 4, 3, 3), randn(2, 4, 3, 3)
            coef = torch.rand(6, device=DEVICE) + 0.5
            out, out_extra = kernels.guided_step(mo, x, coef, 5.0, extra, noise)
            ref, ref_extra = guided_step_f64(mo, x, coef, 5.0, extra, noise)
            assert_close(out, ref, torch.float32, op)
            assert_close(out_extra, ref_extra, torch.float32, op)
