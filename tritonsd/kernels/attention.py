"""Flash attention forward: softmax(q k^T * scale) v without materialising the score matrix.

Each program owns BLOCK_M query rows of one (batch, head) and streams over the keys in blocks of
BLOCK_N, keeping a running row maximum and row sum (online softmax, float32). Scores are scaled by
scale * log2(e) so the exponentials are exp2.

Tile sides are powers of two, so a head dim that is not one is covered by masked loads. Padding SD's 40,
80 and 160 to 64, 128 and 256 would spend 37.5% of every matrix product on zeros; instead the head dim
is covered by two tiles, the largest power of two that fits and a narrow tail (40 = 32 + 16, 80 = 64 + 16,
160 = 128 + 32, the tail padded to at least 16), and each product is the sum of, or split into, two.

Triton vectorises a load only as far as it can prove the addresses aligned, and it knows an integer
argument's alignment only when the argument is a multiple of 16. A [B, L, H, D] view has a head
stride of D, which for D = 40 or 80 is not, so every q/k/v/o address would count as 2-byte aligned
and the tiles would load element by element. When all batch, head and row strides are multiples of
8 elements, the launcher passes them divided by 8 (ALIGN = 8) and the kernel multiplies back, which
proves 16-byte alignment to the compiler.
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .compat import tl, triton
from .dispatch import INTERPRET, use_triton
from .launch import check_dtype, launch

MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634


@triton.jit
def _attention_fwd_kernel(
    Q, K, V, O,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    H, Lq, Lk, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, TAIL_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, EVEN_N: tl.constexpr, PRECISION: tl.constexpr,
    ALIGN: tl.constexpr,
):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    Q += (b * stride_qb + h * stride_qh) * ALIGN
    K += (b * stride_kb + h * stride_kh) * ALIGN
    V += (b * stride_vb + h * stride_vh) * ALIGN
    O += (b * stride_ob + h * stride_oh) * ALIGN
    stride_qm *= ALIGN
    stride_kn *= ALIGN
    stride_vn *= ALIGN
    stride_om *= ALIGN

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    m_mask = offs_m < Lq

    q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    # K is read as a [BLOCK_D, BLOCK_N] tile so that q @ k needs no transpose.
    k_ptrs = K + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    v_ptrs = V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if TAIL_D > 0:
        offs_t = BLOCK_D + tl.arange(0, TAIL_D)
        t_mask = offs_t < HEAD_DIM
        q_t = tl.load(Q + offs_m[:, None] * stride_qm + offs_t[None, :] * stride_qd,
                      mask=m_mask[:, None] & t_mask[None, :], other=0.0)
        k_t_ptrs = K + offs_n[None, :] * stride_kn + offs_t[:, None] * stride_kd
        v_t_ptrs = V + offs_n[:, None] * stride_vn + offs_t[None, :] * stride_vd
        acc_t = tl.zeros([BLOCK_M, TAIL_D], dtype=tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # Causal masking is top-left aligned, as in F.scaled_dot_product_attention: key j <= query i.
    hi = Lk
    if CAUSAL:
        hi = tl.minimum(Lk, (start_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        if EVEN_N:
            k = tl.load(k_ptrs + start_n * stride_kn, mask=d_mask[:, None], other=0.0)
            v = tl.load(v_ptrs + start_n * stride_vn, mask=d_mask[None, :], other=0.0)
            if TAIL_D > 0:
                k_t = tl.load(k_t_ptrs + start_n * stride_kn, mask=t_mask[:, None], other=0.0)
                v_t = tl.load(v_t_ptrs + start_n * stride_vn, mask=t_mask[None, :], other=0.0)
        else:
            n_mask = (start_n + offs_n) < Lk
            k = tl.load(k_ptrs + start_n * stride_kn, mask=d_mask[:, None] & n_mask[None, :], other=0.0)
            v = tl.load(v_ptrs + start_n * stride_vn, mask=n_mask[:, None] & d_mask[None, :], other=0.0)
            if TAIL_D > 0:
                k_t = tl.load(k_t_ptrs + start_n * stride_kn, mask=t_mask[:, None] & n_mask[None, :], other=0.0)
                v_t = tl.load(v_t_ptrs + start_n * stride_vn, mask=n_mask[:, None] & t_mask[None, :], other=0.0)
        qk = tl.dot(q, k, input_precision=PRECISION)
        if TAIL_D > 0:
            qk = tl.dot(q_t, k_t, qk, input_precision=PRECISION)
        qk = qk * qk_scale
        if not EVEN_N:
            qk = tl.where(n_mask[None, :], qk, float("-inf"))
        if CAUSAL:
            qk = tl.where(offs_m[:, None] >= (start_n + offs_n)[None, :], qk, float("-inf"))
        # Column 0 is never masked, so every row has a finite maximum after the first block.
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        if TAIL_D > 0:
            acc_t = tl.dot(p.to(v.dtype), v_t, acc_t * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    o_rows = O + offs_m[:, None] * stride_om
    tl.store(o_rows + offs_d[None, :] * stride_od, (acc / l_i[:, None]).to(O.dtype.element_ty),
             mask=m_mask[:, None] & d_mask[None, :])
    if TAIL_D > 0:
        tl.store(o_rows + offs_t[None, :] * stride_od, (acc_t / l_i[:, None]).to(O.dtype.element_ty),
                 mask=m_mask[:, None] & t_mask[None, :])


class AttentionPlan(NamedTuple):
    block_d: int  # head-dim columns of the first tile
    tail_d: int  # head-dim columns of the second tile; 0 when one tile covers the head dim
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def plan(head_dim: int, lk: int, dtype: torch.dtype) -> AttentionPlan:
    """Head-dim split and tiles for a launch. tl.dot needs every tile side >= 16 on GPU. The half-precision tiles
    come from a sweep at SD1.5's shapes on an H200 (bench/attention_sweep.py, bench/NOTES.md): cross-attention's
    77 keys take narrower key blocks. They are chosen by the padded width, which bounds the registers a tile needs."""
    padded = max(16, triton.next_power_of_2(head_dim))
    block_d = max(16, 1 << (head_dim.bit_length() - 1))
    tail_d = max(16, triton.next_power_of_2(head_dim - block_d)) if head_dim > block_d else 0
    if block_d + tail_d >= padded:
        block_d, tail_d = padded, 0
    return AttentionPlan(block_d, tail_d, *_tiles(padded, lk, dtype))


def _tiles(padded: int, lk: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages)."""
    if INTERPRET:
        return 32, 16, 4, 1
    if dtype == torch.float32:
        # IEEE float32 dots run on the FMA units with operands in registers: keep tiles small.
        return (64, 32, 8, 2) if padded <= 128 else (32, 16, 8, 2)
    if padded <= 128:
        if lk <= 128:
            return (128, 32, 4, 3) if padded <= 64 else (128, 32, 8, 3)
        return 128, 64, 8, 3
    return 64, 64, 4, 2


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects [B, H, L, D] tensors; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention expects q, k, v of one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            "attention expects q [B, H, Lq, D] and k, v [B, H, Lk, D]; "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape[2] == 0:
        raise ValueError("attention needs at least one key (Lk = 0)")


def attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                     scale: float | None = None, tiles: AttentionPlan | None = None) -> torch.Tensor:
    """Launch the flash-attention kernel. q [B, H, Lq, D], k and v [B, H, Lk, D]; any strides. `tiles` overrides
    `plan(D, Lk, dtype)` (for tile sweeps).

    The output is a [B, H, Lq, D] view of a contiguous [B, Lq, H, D] buffer (the layout SDPA's
    flash backend returns), so merging the heads afterwards is a free reshape.
    """
    _check_inputs(q, k, v)
    check_dtype("attention", q)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if D > MAX_HEAD_DIM:
        raise ValueError(f"attention_triton supports head dims up to {MAX_HEAD_DIM}; got {D}")
    out = torch.empty((B, Lq, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)
    if out.numel() == 0:
        return out
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    cfg = plan(D, Lk, q.dtype) if tiles is None else tiles
    # Batch, head and row strides (not the head-dim ones): divided by ALIGN when all allow it.
    outer = [st for t in (q, k, v, out) for st in t.stride()[:3]]
    align = 8 if all(st % 8 == 0 for st in outer) else 1
    strides = [st // align if i % 4 < 3 else st for i, st in enumerate(
        [*q.stride(), *k.stride(), *v.stride(), *out.stride()])]
    launch(
        _attention_fwd_kernel, (triton.cdiv(Lq, cfg.block_m), B * H),
        q, k, v, out, *strides,
        H, Lq, Lk, scale * LOG2E,
        HEAD_DIM=D, BLOCK_D=cfg.block_d, TAIL_D=cfg.tail_d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        CAUSAL=causal, EVEN_N=Lk % cfg.block_n == 0,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", ALIGN=align,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                  scale: float | None = None) -> torch.Tensor:
    """F.scaled_dot_product_attention in (at least) float32, cast back to the input dtype."""
    _check_inputs(q, k, v)
    acc = torch.promote_types(q.dtype, torch.float32)
    out = F.scaled_dot_product_attention(q.to(acc), k.to(acc), v.to(acc), is_causal=causal, scale=scale)
    return out.to(q.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              scale: float | None = None) -> torch.Tensor:
    """Scaled dot-product attention over [B, H, L, D] tensors, with F.scaled_dot_product_attention's
    semantics (default scale 1/sqrt(D), top-left aligned causal mask).

    Head dims above 256 (the VAE's single-head mid-block attention, D = 512) do not fit the kernel:
    it keeps a [BLOCK_M, D] float32 accumulator and a [BLOCK_M, D] query tile on chip, which at
    D = 512 no longer fits in registers. On CUDA they go to F.scaled_dot_product_attention in the
    input dtype (its memory-efficient backend takes D = 512); that layer runs once per decoded image.
    """
    if use_triton(q):
        if q.shape[-1] <= MAX_HEAD_DIM:
            return attention_triton(q, k, v, causal=causal, scale=scale)
        if q.is_cuda:
            _check_inputs(q, k, v)
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    return attention_ref(q, k, v, causal=causal, scale=scale)
