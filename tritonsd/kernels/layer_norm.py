"""LayerNorm over the last dim, optionally after a residual add: (x + r, LayerNorm(x + r)) in one pass.

In the UNet's transformer blocks every LayerNorm but the first reads the residual stream right after an add
(x = x + attn(...); h = norm(x)). Eager PyTorch writes the sum, then reads it back to normalise it; the kernel adds,
writes the sum for the stream and normalises it from registers: two reads and two writes instead of three and two,
in one launch. The normalised value is that of the sum as stored (rounded to the input dtype), as in eager code.

Each program takes BLOCK_M whole rows (the UNet's rows are 320-1280 wide, the text encoder's 768), so the
statistics need no second pass over memory; they are taken in float32, centred before squaring.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .compat import tl, triton
from .dispatch import INTERPRET, use_triton
from .launch import check_dtype, launch


@triton.jit
def _layer_norm_kernel(
    X, R, S, Y, W, B, M, N, stride_x, stride_r, stride_s, stride_y, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    mask = (rows < M)[:, None] & col_mask[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x += tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
        tl.store(S + rows[:, None] * stride_s + cols[None, :], x, mask=mask)
    x = x.to(tl.float32)
    mean = tl.sum(x, axis=1) / N
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / N + eps)
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


class LayerNormPlan(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int


def plan(rows: int, width: int) -> LayerNormPlan:
    """Whole rows per program, about 4K elements a program (16 per thread at 8 warps): enough bytes in flight per
    SM without spilling, and still one program per SM or more at the UNet's smallest level (128 rows of 1280)."""
    block_n = triton.next_power_of_2(width)
    per_program = 1024 if INTERPRET else 4096
    block_m = max(1, min(per_program // block_n, triton.next_power_of_2(rows)))
    return LayerNormPlan(block_m, block_n, 4 if block_m * block_n <= 2048 else 8)


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None) -> None:
    n = x.shape[-1] if x.dim() else 0
    if x.dim() < 1 or weight.shape != (n,) or bias.shape != (n,):
        raise ValueError(f"layer_norm expects x [..., N] with weight and bias [N]; got x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}, bias {tuple(bias.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"layer_norm's residual must match x; got {tuple(residual.shape)} {residual.dtype} "
                         f"for x {tuple(x.shape)} {x.dtype}")


def layer_norm_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5,
                      residual: torch.Tensor | None = None, *, tiles: LayerNormPlan | None = None
                      ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel; outputs are contiguous, in x's dtype. `tiles` overrides `plan(rows, N)`."""
    _check_inputs(x, weight, bias, residual)
    check_dtype("layer_norm", x)
    n = x.shape[-1]
    rows = x.reshape(-1, n) if x.stride(-1) == 1 else x.contiguous().reshape(-1, n)
    res = rows if residual is None else (residual if residual.stride(-1) == 1 else residual.contiguous()).reshape(-1, n)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    total = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else y
    if y.numel():
        m = rows.shape[0]
        cfg = plan(m, n) if tiles is None else tiles
        # Without a residual, x and y stand in for its pointers; HAS_RESIDUAL keeps them unused.
        launch(
            _layer_norm_kernel, (triton.cdiv(m, cfg.block_m),),
            rows, res, total, y, weight, bias, m, n, rows.stride(0), res.stride(0), n, n, eps,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HAS_RESIDUAL=residual is not None, num_warps=cfg.num_warps,
        )
    return y if residual is None else (total, y)


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5,
                   residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The eager add (in x's dtype), then F.layer_norm in (at least) float32, cast back to x's dtype."""
    _check_inputs(x, weight, bias, residual)
    total = x if residual is None else x + residual
    acc = torch.promote_types(x.dtype, torch.float32)
    y = F.layer_norm(total.to(acc), (x.shape[-1],), weight.to(acc), bias.to(acc), eps).to(x.dtype)
    return y if residual is None else (total, y)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5,
               residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm(x) over the last dim; with `residual`, (x + residual, LayerNorm(x + residual))."""
    if use_triton(x):
        return layer_norm_triton(x, weight, bias, eps, residual)
    return layer_norm_ref(x, weight, bias, eps, residual)
