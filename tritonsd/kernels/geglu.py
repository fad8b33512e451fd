"""GEGLU, the gated activation of the UNet's feed-forward layers: [h, gate] -> h * gelu(gate).

The projection before it writes h and gate side by side in one [..., 2I] tensor. Eager PyTorch splits it, runs
gelu over the gate (one read, one write), then the product (two reads, one write): five passes of [..., I]. The
kernel reads each half once and writes the product once: three passes. Each program takes one row's run of
BLOCK columns, so loads and stores are contiguous. gelu is the exact (erf) one, computed in float32.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .compat import tl, triton
from .dispatch import INTERPRET, use_triton
from .launch import check_dtype, launch


@triton.jit
def _geglu_kernel(X, Y, I, stride_x, stride_y, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    h = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(X + row * stride_x + I + cols, mask=mask, other=0.0).to(tl.float32)
    y = h * gate * 0.5 * (1.0 + tl.math.erf(gate * 0.7071067811865476))  # erf(gate / sqrt(2))
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


class GegluPlan(NamedTuple):
    block: int  # columns per program
    num_warps: int


def plan(inner: int) -> GegluPlan:
    """Up to 2048 columns of a row per program: contiguous runs long enough to keep the loads wide."""
    block = min(triton.next_power_of_2(inner), 256 if INTERPRET else 2048)
    return GegluPlan(block, 4 if block <= 1024 else 8)


def _check_inputs(x: torch.Tensor) -> None:
    if x.dim() < 1 or x.shape[-1] % 2:
        raise ValueError(f"geglu expects [..., 2*I] input (h and gate side by side); got shape {tuple(x.shape)}")


def geglu_triton(x: torch.Tensor, *, tiles: GegluPlan | None = None) -> torch.Tensor:
    """Launch the kernel; the output is contiguous [..., I] in x's dtype. `tiles` overrides `plan(I)`."""
    _check_inputs(x)
    check_dtype("geglu", x)
    inner = x.shape[-1] // 2
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows = x.reshape(-1, 2 * inner)  # a view whenever the leading dims merge, which they do for a Linear's output
    y = torch.empty((*x.shape[:-1], inner), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    cfg = plan(inner) if tiles is None else tiles
    launch(
        _geglu_kernel, (rows.shape[0], triton.cdiv(inner, cfg.block)),
        rows, y, inner, rows.stride(0), inner, BLOCK=cfg.block, num_warps=cfg.num_warps,
    )
    return y


def geglu_ref(x: torch.Tensor) -> torch.Tensor:
    """The eager split, gelu and product in (at least) float32, cast back to x's dtype."""
    _check_inputs(x)
    h, gate = x.to(torch.promote_types(x.dtype, torch.float32)).chunk(2, dim=-1)
    return (h * F.gelu(gate)).to(x.dtype)


def geglu(x: torch.Tensor) -> torch.Tensor:
    """h * gelu(gate) for x = [h, gate] along the last dim; [..., 2I] -> [..., I]."""
    if use_triton(x):
        return geglu_triton(x)
    return geglu_ref(x)
