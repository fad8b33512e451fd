"""The SD 1.x / 2.x / SDXL UNet. Module names mirror the original CompVis checkpoint (input_blocks.N.M, middle_block,
output_blocks), so an original single-file checkpoint maps onto it by prefix alone."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from tritonsd import kernels
from tritonsd.engine.config import UNetConfig
from tritonsd.engine.layers import GroupNorm, LayerNorm, conv_without_bias, multihead_attention, pointwise


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding, cos half first, in float32 whatever the model dtype."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, ch: int, out_ch: int, emb_ch: int, groups: int):
        super().__init__()
        # The empty slots stand where the checkpoint has SiLU/dropout layers: SiLU is fused into the GroupNorm
        # kernel, and keeping the slots keeps the checkpoint's key names (in_layers.2, out_layers.3, emb_layers.1).
        self.in_layers = nn.Sequential(GroupNorm(groups, ch, silu=True), nn.Identity(), nn.Conv2d(ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.Identity(), nn.Linear(emb_ch, out_ch))
        self.out_layers = nn.Sequential(
            GroupNorm(groups, out_ch, silu=True), nn.Identity(), nn.Identity(), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        )
        self.skip_connection = nn.Conv2d(ch, out_ch, 1) if ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb_act: torch.Tensor) -> torch.Tensor:
        conv = self.in_layers[2]
        h = conv_without_bias(conv, self.in_layers[0](x))
        # The conv's bias and the timestep embedding are per-(sample, channel) constants: the GroupNorm adds them
        # as it reads h, instead of two passes over h.
        h = self.out_layers[0](h, shift=self.emb_layers[1](emb_act) + conv.bias)
        return self.skip_connection(x) + self.out_layers[3](h)


class CrossAttention(nn.Module):
    """Multi-head attention whose projections of one input are one matrix product: q, k and v of x for
    self-attention (no context), k and v of the context for cross-attention. The fused weights are joined from the
    checkpoint's to_q / to_k / to_v when a state dict is loaded and split back when one is taken, so checkpoints and
    state-dict keys stay standard."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.heads = heads
        if context_dim is None:
            self.qkv = nn.Parameter(torch.empty(3 * dim, dim))
            self.fused = {"qkv": ("to_q", "to_k", "to_v")}
        else:
            self.to_q = nn.Linear(dim, dim, bias=False)
            self.kv = nn.Parameter(torch.empty(2 * dim, context_dim))
            self.fused = {"kv": ("to_k", "to_v")}
        for name in self.fused:
            # nn.Linear's initialisation: its bound depends only on the input width, which the parts share.
            nn.init.kaiming_uniform_(getattr(self, name), a=math.sqrt(5))
        self.to_out = nn.Sequential(nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        # The chunks are strided views of the fused product; the attention kernel reads strides.
        if context is None:
            q, k, v = F.linear(x, self.qkv).chunk(3, dim=-1)
        else:
            q = self.to_q(x)
            k, v = F.linear(context, self.kv).chunk(2, dim=-1)
        return self.to_out(multihead_attention(q, k, v, self.heads))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, parts in self.fused.items():
            weight = destination.pop(prefix + name)
            for part, chunk in zip(parts, weight.chunk(len(parts))):
                # Each its own tensor, as in a checkpoint, rather than views sharing the fused weight's storage.
                destination[f"{prefix}{part}.weight"] = chunk if keep_vars else chunk.clone()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name, parts in self.fused.items():
            keys = [f"{prefix}{part}.weight" for part in parts]
            if all(k in state_dict for k in keys):
                state_dict[prefix + name] = torch.cat([state_dict.pop(k) for k in keys])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.geglu(self.proj(x))


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, heads, context_dim)
        self.norm1 = LayerNorm(dim)
        self.norm2 = LayerNorm(dim)
        self.norm3 = LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # norm2 and norm3 also make the residual add before them: (x + branch, norm(x + branch)).
        x, h = self.norm2(x, self.attn1(self.norm1(x)))
        x, h = self.norm3(x, self.attn2(h, context))
        return x + self.ff(h)


class SpatialTransformer(nn.Module):
    def __init__(self, ch: int, context_dim: int, heads: int, depth: int, groups: int, linear: bool):
        super().__init__()
        self.norm = GroupNorm(groups, ch, eps=1e-6)
        # SD 1.x projects with 1x1 convolutions, SD 2.x with Linear layers: the same map on each pixel, stored with
        # or without the two unit dimensions.
        self.proj_in = nn.Linear(ch, ch) if linear else nn.Conv2d(ch, ch, 1)
        self.transformer_blocks = nn.ModuleList(TransformerBlock(ch, context_dim, heads) for _ in range(depth))
        self.proj_out = nn.Linear(ch, ch) if linear else nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # [B, C, H, W] -> [B, HW, C] rows; a free view when x is channels_last. The projections run on the rows.
        y = pointwise(self.proj_in, self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c))
        for block in self.transformer_blocks:
            y = block(y, context)
        y = pointwise(self.proj_out, y)
        return x + y.reshape(b, h, w, c).permute(0, 3, 1, 2)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor, size: torch.Size) -> torch.Tensor:
        # Upsample to the matching skip's size rather than 2x, so latents of odd size (width 520 -> 65) work.
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class Step(nn.ModuleList):
    """One entry of input_blocks/output_blocks: a ResBlock, maybe a SpatialTransformer, maybe a resampler."""

    def forward(self, x: torch.Tensor, emb_act: torch.Tensor, context: torch.Tensor, size: torch.Size | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb_act)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        mc, g = cfg.model_channels, cfg.norm_groups
        emb_ch = 4 * mc
        self.model_channels = mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        # SDXL's extra conditioning vector, added to the timestep embedding; nested as the checkpoint's label_emb.0.*.
        self.label_emb = None
        if cfg.adm_in_channels:
            self.label_emb = nn.Sequential(nn.Sequential(
                nn.Linear(cfg.adm_in_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch)))

        def attention(ch: int, level: int) -> SpatialTransformer:
            return SpatialTransformer(ch, cfg.context_dim, cfg.heads(ch), cfg.transformer_depth[level], g,
                                      cfg.use_linear_in_transformer)

        self.input_blocks = nn.ModuleList([Step([nn.Conv2d(cfg.in_channels, mc, 3, padding=1)])])
        skip_chs, ch, ds = [mc], mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, mult * mc, emb_ch, g)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(attention(ch, level))
                self.input_blocks.append(Step(layers))
                skip_chs.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(Step([Downsample(ch)]))
                skip_chs.append(ch)
                ds *= 2

        last = len(cfg.channel_mult) - 1
        self.middle_block = Step([ResBlock(ch, ch, emb_ch, g), attention(ch, last), ResBlock(ch, ch, emb_ch, g)])

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_chs.pop(), mult * mc, emb_ch, g)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(attention(ch, level))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(Step(layers))

        self.out = nn.Sequential(GroupNorm(g, ch, silu=True), nn.Identity(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor | None = None) -> torch.Tensor:
        """x: latents [B, C, H, W]; timesteps: [B] (or a scalar); context: text hidden states [B, 77·n, context_dim];
        y: SDXL's conditioning vector [B, adm_in_channels], given exactly when the model has label_emb."""
        if (y is None) != (self.label_emb is None):
            raise ValueError("this UNet takes a conditioning vector y" if y is None else
                             "this UNet has no label_emb to take a conditioning vector y")
        timesteps = timesteps.reshape(-1).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        if y is not None:
            emb = emb + self.label_emb(y.to(x.dtype))
        emb_act = F.silu(emb)
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb_act, context)
            skips.append(h)
        h = self.middle_block(h, emb_act, context)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb_act, context, skips[-1].shape[-2:] if skips else None)
        return self.out(h)
