"""GroupNorm with affine parameters and an optional fused SiLU.

A group of sample n is C/G channels at every one of S spatial positions (S = product of the spatial dims).
SD's VAE has 32 groups of about a million elements each at 512x512, so one program per group would leave
most of the GPU idle: the spatial range is cut into chunks, each program reduces one chunk to Welford
statistics (count, mean, M2) in float32, and the chunks are merged with Chan's formula. How a program
walks its chunk follows the memory layout, so every load is a contiguous run:

- NCHW: a group is a contiguous [C/G, S] slab. `_group_norm_stats_kernel` takes one (n, group, chunk);
  `_group_norm_apply_kernel` merges the group's chunk statistics, then normalises its chunk.
- channels_last: a pixel's C channels are contiguous and a group is only 4-40 of them, so programs take
  whole pixels, [BLOCK_S, BLOCK_C] tiles across all groups. `_group_norm_nhwc_stats_kernel` writes
  per-channel chunk statistics, `_group_norm_nhwc_finalize_kernel` merges them per group into a
  per-channel centre and scale, and `_group_norm_nhwc_apply_kernel` normalises.

The output keeps the input's memory format. An optional per-(sample, channel) `shift` is added to x as it is
read, before the statistics: the UNet's ResBlock normalises conv(h) + conv bias + timestep embedding, and the
VAE's normalises conv(h) + conv bias, so the convolution runs without its bias and no separate pass adds them.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .compat import tl, triton
from .dispatch import INTERPRET, use_triton
from .launch import check_dtype, launch

# Aim for at least this many programs per launch, and at least this many elements per program.
TARGET_PROGRAMS = 1024
MIN_CHUNK_ELEMENTS = 8192


@triton.jit
def _group_norm_stats_kernel(
    X, SHIFT, PART, C, S, stride_shift_n, s_chunk,
    CG: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, HAS_SHIFT: tl.constexpr,
):
    ng = tl.program_id(0)
    chunk = tl.program_id(1)
    n = ng // (C // CG)
    g = ng % (C // CG)
    X += ng.to(tl.int64) * CG * S
    SHIFT += n * stride_shift_n + g * CG
    offs_c = tl.arange(0, BLOCK_C)
    offs_s = tl.arange(0, BLOCK_S)
    s_start = chunk * s_chunk
    s_end = tl.minimum(s_start + s_chunk, S)

    # Per-lane Welford. BLOCK_C divides CG, and only the last spatial block has a tail, so a lane valid
    # at step k was valid at every earlier step: the update weight 1/k is the same scalar for all valid lanes.
    mean = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    count = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    num_c_blocks = CG // BLOCK_C
    num_s_blocks = tl.cdiv(s_end - s_start, BLOCK_S)
    for i in range(0, num_s_blocks):
        s = s_start + i * BLOCK_S + offs_s
        s_mask = s < s_end
        for j in range(0, num_c_blocks):
            c = j * BLOCK_C + offs_c
            mask = (c < CG)[:, None] & s_mask[None, :]
            x = tl.load(X + c[:, None] * S + s[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_SHIFT:
                x += tl.load(SHIFT + c).to(tl.float32)[:, None]
            inv_step = 1.0 / (i * num_c_blocks + j + 1.0)
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
    X, Y, W, B, SHIFT, PART, C, S, stride_shift_n, s_chunk, eps,
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

    base = ng.to(tl.int64) * CG * S
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
            mask = s_mask[None, :]
            offs = c[:, None] * S + s[None, :]
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_SHIFT:
                x += tl.load(SHIFT + c).to(tl.float32)[:, None]
            w = tl.load(W + c).to(tl.float32)
            b = tl.load(B + c).to(tl.float32)
            y = (x - mean) * rstd * w[:, None] + b[:, None]
            if SILU:
                y = y * tl.sigmoid(y)
            tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _nhwc_program_tile(C, S, s_chunk, BLOCK_C: tl.constexpr):
    """The sample, channel block and spatial range of this program of a channels_last grid (n, chunk, c block)."""
    n = tl.program_id(0)
    s_start = tl.program_id(1) * s_chunk
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    return n, c, c < C, s_start, tl.minimum(s_start + s_chunk, S)


@triton.jit
def _group_norm_nhwc_stats_kernel(
    X, SHIFT, PART, C, S, stride_shift_n, s_chunk,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, HAS_SHIFT: tl.constexpr,
):
    n, c, c_mask, s_start, s_end = _nhwc_program_tile(C, S, s_chunk, BLOCK_C)
    offs_s = tl.arange(0, BLOCK_S)
    X += n.to(tl.int64) * S * C
    if HAS_SHIFT:
        shift = tl.load(SHIFT + n * stride_shift_n + c, mask=c_mask, other=0.0).to(tl.float32)

    # Per-lane Welford; only the last spatial block has a tail, so every valid lane has seen i + 1 values.
    mean = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    count = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    for i in range(0, tl.cdiv(s_end - s_start, BLOCK_S)):
        s = s_start + i * BLOCK_S + offs_s
        mask = (s < s_end)[:, None] & c_mask[None, :]
        x = tl.load(X + s.to(tl.int64)[:, None] * C + c[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_SHIFT:
            x += shift[None, :]
        inv_step = 1.0 / (i + 1.0)
        delta = x - mean
        mean += tl.where(mask, delta * inv_step, 0.0)
        m2 += tl.where(mask, delta * (x - mean), 0.0)
        count += mask.to(tl.float32)

    # Chan's merge over the pixels of each channel; channels past C have a count of 0 and are not stored.
    total = tl.sum(count, 0)
    chunk_mean = tl.sum(count * mean, 0) / tl.maximum(total, 1.0)
    d = mean - chunk_mean[None, :]
    chunk_m2 = tl.sum(m2 + count * d * d, 0)
    PART += (n * tl.num_programs(1) + tl.program_id(1)) * 3 * C + c
    tl.store(PART, total, mask=c_mask)
    tl.store(PART + C, chunk_mean, mask=c_mask)
    tl.store(PART + 2 * C, chunk_m2, mask=c_mask)


@triton.jit
def _group_norm_nhwc_finalize_kernel(
    PART, W, SHIFT, CENTRE, SCALE, C, num_chunks, stride_shift_n, eps,
    CG: tl.constexpr, BLOCK: tl.constexpr, HAS_SHIFT: tl.constexpr,
):
    ng = tl.program_id(0)
    n = ng // (C // CG)
    g = ng % (C // CG)
    PART += n * num_chunks * 3 * C + g * CG
    offs = tl.arange(0, BLOCK)
    items = num_chunks * CG

    # Two passes over the group's (chunk, channel) statistics: the mean first, then M2 around it.
    count_acc = tl.zeros([BLOCK], dtype=tl.float32)
    sum_acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, items, BLOCK):
        i = start + offs
        mask = i < items
        part = PART + (i // CG) * 3 * C + i % CG
        counts = tl.load(part, mask=mask, other=0.0)
        count_acc += counts
        sum_acc += counts * tl.load(part + C, mask=mask, other=0.0)
    total = tl.sum(count_acc, 0)
    mean = tl.sum(sum_acc, 0) / total
    m2_acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, items, BLOCK):
        i = start + offs
        mask = i < items
        part = PART + (i // CG) * 3 * C + i % CG
        d = tl.load(part + C, mask=mask, other=0.0) - mean
        m2_acc += tl.load(part + 2 * C, mask=mask, other=0.0) + tl.load(part, mask=mask, other=0.0) * d * d
    rstd = tl.rsqrt(tl.sum(m2_acc, 0) / total + eps)

    # y = (x - centre) * scale + bias, with the shift folded into the centre.
    for c0 in range(0, CG, BLOCK):
        c = g * CG + c0 + offs
        mask = c0 + offs < CG
        centre = tl.zeros([BLOCK], dtype=tl.float32) + mean
        if HAS_SHIFT:
            centre -= tl.load(SHIFT + n * stride_shift_n + c, mask=mask, other=0.0).to(tl.float32)
        tl.store(CENTRE + n * C + c, centre, mask=mask)
        tl.store(SCALE + n * C + c, rstd * tl.load(W + c, mask=mask, other=0.0).to(tl.float32), mask=mask)


@triton.jit
def _group_norm_nhwc_apply_kernel(
    X, Y, B, CENTRE, SCALE, C, S, s_chunk,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, SILU: tl.constexpr,
):
    n, c, c_mask, s_start, s_end = _nhwc_program_tile(C, S, s_chunk, BLOCK_C)
    offs_s = tl.arange(0, BLOCK_S)
    base = n.to(tl.int64) * S * C
    X += base
    Y += base
    centre = tl.load(CENTRE + n * C + c, mask=c_mask, other=0.0)[None, :]
    scale = tl.load(SCALE + n * C + c, mask=c_mask, other=0.0)[None, :]
    b = tl.load(B + c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    for s0 in range(s_start, s_end, BLOCK_S):
        s = s0 + offs_s
        mask = (s < s_end)[:, None] & c_mask[None, :]
        offs = s.to(tl.int64)[:, None] * C + c[None, :]
        y = (tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) - centre) * scale + b
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


class GroupNormPlan(NamedTuple):
    block_c: int
    block_s: int
    s_chunk: int
    num_chunks: int
    num_warps: int


def plan(n: int, c: int, s: int, num_groups: int, channels_last: bool, num_chunks: int | None = None) -> GroupNormPlan:
    """Tiles and split for x [n, c, s]. NCHW programs take [BLOCK_C, BLOCK_S] tiles of one group, BLOCK_C
    dividing C/G exactly (the stats kernel's Welford update relies on it). channels_last programs take
    [BLOCK_S, BLOCK_C] tiles of whole pixels, BLOCK_C a power of two that divides C when one of at least 16
    does (SD's channel counts are multiples of 64). By default the spatial range is split into enough chunks
    to give the GPU TARGET_PROGRAMS programs, but none under MIN_CHUNK_ELEMENTS."""
    tile = 1024 if INTERPRET else 4096
    if channels_last:
        block_c = min(c & -c if c & -c >= 16 else triton.next_power_of_2(c), 128)
        programs_per_chunk, chunk_width = n * triton.cdiv(c, block_c), block_c
    else:
        block_c = min((c // num_groups) & -(c // num_groups), 64)
        programs_per_chunk, chunk_width = n * num_groups, c // num_groups
    block_s = min(triton.next_power_of_2(s), max(tile // block_c, 1))
    s_blocks = triton.cdiv(s, block_s)
    if num_chunks is None:
        num_chunks = min(triton.cdiv(TARGET_PROGRAMS, programs_per_chunk), triton.cdiv(chunk_width * s, MIN_CHUNK_ELEMENTS))
    elif num_chunks < 1:
        raise ValueError(f"num_chunks must be at least 1; got {num_chunks}")
    s_chunk = triton.cdiv(s_blocks, max(1, min(num_chunks, s_blocks))) * block_s
    num_warps = min(8, max(1, block_c * block_s // 256))
    return GroupNormPlan(block_c, block_s, s_chunk, triton.cdiv(s, s_chunk), num_warps)


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
                      tiles: GroupNormPlan | None = None) -> torch.Tensor:
    """Launch the GroupNorm kernels for x's memory layout. `tiles` overrides `plan(N, C, S, num_groups,
    channels_last)`, which must be taken for x's sizes and layout (its `num_chunks` sets the split of the
    spatial range)."""
    _check_inputs(x, num_groups, weight, bias, shift)
    check_dtype("group_norm", x)
    if not (x.is_contiguous() or x.movedim(1, -1).is_contiguous()):
        x = x.contiguous()
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    N, C = x.shape[:2]
    S = x[0, 0].numel()
    cg = C // num_groups
    channels_last = x.stride(1) == 1 and C > 1
    cfg = plan(N, C, S, num_groups, channels_last) if tiles is None else tiles
    # Without a shift, weight stands in for its pointer; HAS_SHIFT keeps it unread.
    shift_arg, stride_shift = (shift, shift.stride(0)) if shift is not None else (weight, 0)
    has_shift = shift is not None

    if channels_last:
        grid = (N, cfg.num_chunks, triton.cdiv(C, cfg.block_c))
        part = torch.empty((N, cfg.num_chunks, 3, C), dtype=torch.float32, device=x.device)
        centre = torch.empty((N, C), dtype=torch.float32, device=x.device)
        scale = torch.empty_like(centre)
        launch(
            _group_norm_nhwc_stats_kernel, grid,
            x, shift_arg, part, C, S, stride_shift, cfg.s_chunk,
            BLOCK_S=cfg.block_s, BLOCK_C=cfg.block_c, HAS_SHIFT=has_shift, num_warps=cfg.num_warps,
        )
        launch(
            _group_norm_nhwc_finalize_kernel, (N * num_groups,),
            part, weight, shift_arg, centre, scale, C, cfg.num_chunks, stride_shift, eps,
            CG=cg, BLOCK=min(triton.next_power_of_2(cfg.num_chunks * cg), 1024), HAS_SHIFT=has_shift, num_warps=4,
        )
        launch(
            _group_norm_nhwc_apply_kernel, grid,
            x, y, bias, centre, scale, C, S, cfg.s_chunk,
            BLOCK_S=cfg.block_s, BLOCK_C=cfg.block_c, SILU=silu, num_warps=cfg.num_warps,
        )
        return y

    grid = (N * num_groups, cfg.num_chunks)
    part = torch.empty((N * num_groups, cfg.num_chunks, 3), dtype=torch.float32, device=x.device)
    launch(
        _group_norm_stats_kernel, grid,
        x, shift_arg, part, C, S, stride_shift, cfg.s_chunk,
        CG=cg, BLOCK_C=cfg.block_c, BLOCK_S=cfg.block_s, HAS_SHIFT=has_shift, num_warps=cfg.num_warps,
    )
    launch(
        _group_norm_apply_kernel, grid,
        x, y, weight, bias, shift_arg, part, C, S, stride_shift, cfg.s_chunk, eps,
        CG=cg, BLOCK_C=cfg.block_c, BLOCK_S=cfg.block_s, BLOCK_P=triton.next_power_of_2(cfg.num_chunks),
        SILU=silu, HAS_SHIFT=has_shift, num_warps=cfg.num_warps,
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
