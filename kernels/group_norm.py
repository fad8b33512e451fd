"""GroupNorm with affine parameters and an optional fused SiLU.

A group of sample n is a [C/G, S] slab of x (S = product of the spatial dims). SD's VAE has 32
groups of about a million elements each at 512x512, so one program per group would leave most of
the GPU idle. The group's spatial range is therefore cut into chunks, and two kernels run:

1. `_group_norm_stats_kernel`, one program per (n, group, chunk): Welford statistics of the chunk
   (count, mean, M2) in float32, written to a small buffer.
2. `_group_norm_apply_kernel`, one program per (n, group, chunk): merges the group's chunk
   statistics (Chan et al.), then normalizes its chunk, applies weight and bias, and SiLU.

Both walk the slab in [BLOCK_C, BLOCK_S] tiles through strides, so NCHW-contiguous and
channels_last inputs are read in place and the output keeps the input's memory format.

An optional per-(sample, channel) `shift` is added to x as it is read, before the statistics: the
UNet's ResBlock normalises conv(h) + conv bias + timestep embedding, and the VAE's normalises
conv(h) + conv bias, so the convolution runs without its bias and no separate pass adds them.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .dispatch import INTERPRET, use_triton

# Aim for at least this many programs per launch, and at least this many elements per program.
TARGET_PROGRAMS = 1024
MIN_CHUNK_ELEMENTS = 8192


@triton.jit
def _group_norm_stats_kernel(
    X, SHIFT, PART,
    C, S, stride_n, stride_c, stride_s, stride_shift_n, s_chunk,
    CG: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, HAS_SHIFT: tl.constexpr,
):
    ng = tl.program_id(0)
    chunk = tl.program_id(1)
    n = ng // (C // CG)
    g = ng % (C // CG)
    X += n.to(tl.int64) * stride_n + (g * CG).to(tl.int64) * stride_c
    SHIFT += n * stride_shift_n + g * CG
    offs_c = tl.arange(0, BLOCK_C)
    offs_s = tl.arange(0, BLOCK_S)
    s_start = chunk * s_chunk
    s_end = tl.minimum(s_start + s_chunk, S)

    # Per-lane Welford. BLOCK_C divides CG or covers it in one block, and only the last spatial
    # block has a tail, so a lane valid at step k was valid at every earlier step: the update
    # weight 1/k is the same scalar for all valid lanes.
    mean = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    count = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    num_c_blocks = (CG + BLOCK_C - 1) // BLOCK_C
    num_s_blocks = tl.cdiv(s_end - s_start, BLOCK_S)
    for i in range(0, num_s_blocks):
        s = s_start + i * BLOCK_S + offs_s
        s_mask = s < s_end
        for j in range(0, num_c_blocks):
            c = j * BLOCK_C + offs_c
            mask = (c < CG)[:, None] & s_mask[None, :]
            x = tl.load(X + c[:, None] * stride_c + s[None, :] * stride_s, mask=mask, other=0.0).to(tl.float32)
            if HAS_SHIFT:
                x += tl.load(SHIFT + c, mask=c < CG, other=0.0).to(tl.float32)[:, None]
            inv_step = 1.0 / (i * num_c_blocks + j + 1).to(tl.float32)
            delta = x - mean
            mean += tl.where(mask, delta * inv_step, 0.0)
            m2 += tl.where(mask, delta * (x - mean), 0.0)
            count += mask.to(tl.float32)

    # Chan's merge of the lanes; lanes that saw nothing have count = mean = m2 = 0.
    total = tl.sum(tl.sum(count, 1), 0)
    chunk_mean = tl.sum(tl.sum(count * mean, 1), 0) / total
    d = mean - chunk_mean
    chunk_m2 = tl.sum(tl.sum(m2 + count * d * d, 1), 0)
    PART += (ng * tl.num_programs(1) + chunk) * 3
    tl.store(PART, total)
    tl.store(PART + 1, chunk_mean)
    tl.store(PART + 2, chunk_m2)


@triton.jit
def _group_norm_apply_kernel(
    X, Y, W, B, SHIFT, PART,
    C, S, stride_n, stride_c, stride_s, stride_shift_n, s_chunk, eps,
    CG: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr,
    SILU: tl.constexpr, HAS_SHIFT: tl.constexpr,
):
    ng = tl.program_id(0)
    chunk = tl.program_id(1)
    num_chunks = tl.num_programs(1)
    n = ng // (C // CG)
    g = ng % (C // CG)

    offs_p = tl.arange(0, BLOCK_P)
    p_mask = offs_p < num_chunks
    part = PART + (ng * num_chunks + offs_p) * 3
    counts = tl.load(part, mask=p_mask, other=0.0)
    means = tl.load(part + 1, mask=p_mask, other=0.0)
    m2s = tl.load(part + 2, mask=p_mask, other=0.0)
    total = tl.sum(counts, 0)
    mean = tl.sum(counts * means, 0) / total
    d = means - mean
    var = (tl.sum(m2s, 0) + tl.sum(counts * d * d, 0)) / total
    rstd = tl.rsqrt(var + eps)

    base = n.to(tl.int64) * stride_n + (g * CG).to(tl.int64) * stride_c
    X += base
    Y += base
    W += g * CG
    B += g * CG
    SHIFT += n * stride_shift_n + g * CG
    offs_c = tl.arange(0, BLOCK_C)
    offs_s = tl.arange(0, BLOCK_S)
    s_start = chunk * s_chunk
    s_end = tl.minimum(s_start + s_chunk, S)
    for s0 in range(s_start, s_end, BLOCK_S):
        s = s0 + offs_s
        s_mask = s < s_end
        for c0 in range(0, CG, BLOCK_C):
            c = c0 + offs_c
            c_mask = c < CG
            mask = c_mask[:, None] & s_mask[None, :]
            offs = c[:, None] * stride_c + s[None, :] * stride_s
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_SHIFT:
                x += tl.load(SHIFT + c, mask=c_mask, other=0.0).to(tl.float32)[:, None]
            w = tl.load(W + c, mask=c_mask, other=0.0).to(tl.float32)
            b = tl.load(B + c, mask=c_mask, other=0.0).to(tl.float32)
            y = (x - mean) * rstd * w[:, None] + b[:, None]
            if SILU:
                y = y * tl.sigmoid(y)
            tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


class Plan(NamedTuple):
    block_c: int
    block_s: int
    s_chunk: int
    num_chunks: int
    num_warps: int


def plan(n: int, c: int, s: int, num_groups: int, channels_last: bool, num_chunks: int | None = None) -> Plan:
    """Tiles and split for x [n, c, s]. The tile is [BLOCK_C, BLOCK_S]: BLOCK_C either covers the group's
    channels in one masked block (channels_last, where they are the contiguous run) or divides C/G
    exactly, which the stats kernel's Welford update relies on. By default each group is split into
    enough chunks to give the GPU TARGET_PROGRAMS programs, but none under MIN_CHUNK_ELEMENTS."""
    cg = c // num_groups
    tile = 1024 if INTERPRET else 4096
    if channels_last and cg <= 128:
        block_c = triton.next_power_of_2(cg)
    else:
        block_c = min(cg & -cg, 64)
    block_s = min(triton.next_power_of_2(s), max(tile // block_c, 1))
    s_blocks = triton.cdiv(s, block_s)
    if num_chunks is None:
        num_chunks = min(triton.cdiv(TARGET_PROGRAMS, n * num_groups), triton.cdiv(cg * s, MIN_CHUNK_ELEMENTS))
    elif num_chunks < 1:
        raise ValueError(f"num_chunks must be at least 1; got {num_chunks}")
    s_chunk = triton.cdiv(s_blocks, max(1, min(num_chunks, s_blocks))) * block_s
    num_warps = min(8, max(1, block_c * block_s // 256))
    return Plan(block_c, block_s, s_chunk, triton.cdiv(s, s_chunk), num_warps)


def _check_inputs(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor,
                  shift: torch.Tensor | None = None) -> None:
    if x.dim() < 2:
        raise ValueError(f"group_norm expects [N, C, *spatial] input; got shape {tuple(x.shape)}")
    C = x.shape[1]
    if num_groups < 1 or C % num_groups != 0:
        raise ValueError(f"group_norm: {C} channels are not divisible into {num_groups} groups")
    if weight is None or bias is None or weight.shape != (C,) or bias.shape != (C,):
        raise ValueError(
            f"group_norm expects weight and bias of shape ({C},); got "
            f"{None if weight is None else tuple(weight.shape)} and {None if bias is None else tuple(bias.shape)}"
        )
    if shift is not None and (shift.shape != (x.shape[0], C) or shift.stride(1) != 1):
        raise ValueError(
            f"group_norm expects shift of shape ({x.shape[0]}, {C}) with unit channel stride; got "
            f"{tuple(shift.shape)} with strides {shift.stride()}"
        )


def group_norm_triton(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor,
                      eps: float = 1e-5, silu: bool = False, shift: torch.Tensor | None = None, *,
                      num_chunks: int | None = None) -> torch.Tensor:
    """Launch the two GroupNorm kernels. `num_chunks` overrides the per-group split (it is capped at
    the number of spatial tiles); by default it is chosen from the group size."""
    _check_inputs(x, num_groups, weight, bias, shift)
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"group_norm_triton supports float16, bfloat16 and float32; got {x.dtype}")
    if not (x.is_contiguous() or x.movedim(1, -1).is_contiguous()):
        x = x.contiguous()
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    N, C = x.shape[:2]
    S = x[0, 0].numel()
    cg = C // num_groups
    # In both layouts the spatial dims merge into one: its stride is that of the innermost non-trivial one.
    channels_last = x.stride(1) == 1 and C > 1
    spatial_strides = [st for size, st in zip(x.shape[2:], x.stride()[2:]) if size > 1]
    stride_s = spatial_strides[-1] if spatial_strides else 1
    cfg = plan(N, C, S, num_groups, channels_last, num_chunks)

    part = torch.empty((N * num_groups, cfg.num_chunks, 3), dtype=torch.float32, device=x.device)
    grid = (N * num_groups, cfg.num_chunks)
    # Without a shift, weight stands in for its pointer; HAS_SHIFT keeps it unread.
    shift_arg, stride_shift = (shift, shift.stride(0)) if shift is not None else (weight, 0)
    _group_norm_stats_kernel[grid](
        x, shift_arg, part, C, S, x.stride(0), x.stride(1), stride_s, stride_shift, cfg.s_chunk,
        CG=cg, BLOCK_C=cfg.block_c, BLOCK_S=cfg.block_s, HAS_SHIFT=shift is not None, num_warps=cfg.num_warps,
    )
    _group_norm_apply_kernel[grid](
        x, y, weight, bias, shift_arg, part, C, S, x.stride(0), x.stride(1), stride_s, stride_shift, cfg.s_chunk, eps,
        CG=cg, BLOCK_C=cfg.block_c, BLOCK_S=cfg.block_s, BLOCK_P=triton.next_power_of_2(cfg.num_chunks),
        SILU=silu, HAS_SHIFT=shift is not None, num_warps=cfg.num_warps,
    )
    return y


def group_norm_ref(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float = 1e-5, silu: bool = False, shift: torch.Tensor | None = None) -> torch.Tensor:
    """F.group_norm (+ F.silu) in (at least) float32, cast back to the input dtype and memory format."""
    _check_inputs(x, num_groups, weight, bias, shift)
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    if shift is not None:
        xf = xf + shift.to(acc).reshape(*shift.shape, *(1,) * (x.dim() - 2))
    y = F.group_norm(xf, num_groups, weight.to(acc), bias.to(acc), eps)
    if silu:
        y = F.silu(y)
    return torch.empty_like(x).copy_(y)


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor,
               eps: float = 1e-5, silu: bool = False, shift: torch.Tensor | None = None) -> torch.Tensor:
    """GroupNorm over x [N, C, *spatial] (NCHW-contiguous or channels_last) with weight and bias [C],
    followed by SiLU when `silu`; `shift` [N, C] (a broadcast [C] expanded is fine) is added to x first.
    Statistics are float32; the output has x's dtype and memory format."""
    if use_triton(x):
        return group_norm_triton(x, num_groups, weight, bias, eps, silu, shift)
    return group_norm_ref(x, num_groups, weight, bias, eps, silu, shift)
