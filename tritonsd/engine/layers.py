"""Building blocks shared by the UNet, VAE and text encoder: the places where the Triton kernels slot in."""

import torch
import torch.nn.functional as F
from torch import nn

from tritonsd import kernels


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters, same state-dict keys) through the fused kernel, with optional SiLU."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, silu: bool = False):
        super().__init__(num_groups, num_channels, eps=eps)
        self.silu = silu

    def forward(self, x: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
        """shift [N, C], if given, is added to x before normalising (see kernels.group_norm)."""
        return kernels.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, silu=self.silu, shift=shift)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters, same state-dict keys) through the kernel. Given the branch output that a
    residual add would sum into x, it makes the add too and returns (x + residual, its norm)."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return kernels.layer_norm(x, self.weight, self.bias, self.eps, residual)


def conv_without_bias(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """conv(x) minus its bias, for a GroupNorm that adds the bias as its shift."""
    return F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)


def pointwise(layer: nn.Conv2d | nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution (or a Linear layer) applied to [B, L, C] rows: one matrix product with the bias in its
    epilogue."""
    return F.linear(x, layer.weight.flatten(1), layer.bias)


def multihead_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, causal: bool = False) -> torch.Tensor:
    """[B, L, heads*D] projections in, [B, Lq, heads*D] out. The head split is a strided view; the kernel reads strides."""
    b, lq, _ = q.shape
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
    out = kernels.attention(q, k, v, causal=causal)
    return out.transpose(1, 2).reshape(b, lq, -1)
