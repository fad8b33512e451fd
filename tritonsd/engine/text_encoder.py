"""The CLIP text tower: OpenAI's ViT-L/14 in SD 1.x; in SD 2.x OpenCLIP's ViT-H/14 up to its penultimate block, whose
output takes the final layer norm (the last block is never run, so it is not built); in SDXL ViT-L and OpenCLIP's
ViT-bigG/14, each read at its penultimate layer without the final norm, bigG also giving a pooled embedding. Module
names follow HF's CLIPTextModel(WithProjection) without the text_model. prefix."""

import numbers

import torch
import torch.nn.functional as F
from torch import nn

from tritonsd.engine.config import ModelConfig, TextConfig
from tritonsd.engine.layers import LayerNorm, multihead_attention


def _embedding(n: int, dim: int) -> nn.Embedding:
    # nn.Embedding's own init calls normal_, which on the meta device first imports torch._dynamo (seconds of a
    # checkpoint load); CLIP's initialisation (std 0.02) is applied only where there is storage.
    weight = torch.empty(n, dim)
    if not weight.is_meta:
        nn.init.normal_(weight, std=0.02)
    return nn.Embedding(n, dim, _weight=weight)


class Embeddings(nn.Module):
    """Token and position embeddings. Ids past the vocabulary select rows of `extra`, the vectors of textual-inversion
    embeddings, so a prompt stays a tensor of ids whatever embeddings it names."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.token_embedding = _embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = _embedding(cfg.max_position_embeddings, cfg.hidden_size)
        # Not in the state dict: checkpoints never hold it, and the loader builds the model on the meta device.
        self.register_buffer("extra", None, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.extra is None:
            x = self.token_embedding(ids)
        else:
            vocab = self.token_embedding.num_embeddings
            words = self.token_embedding(ids.clamp(max=vocab - 1))
            x = torch.where((ids >= vocab)[..., None], F.embedding((ids - vocab).clamp(min=0), self.extra), words)
        return x + self.position_embedding.weight[: ids.shape[1]]


class SelfAttention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        d = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = multihead_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, causal=True)
        return self.out_proj(out)


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.quick = cfg.hidden_act == "quick_gelu"
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = h * torch.sigmoid(1.702 * h) if self.quick else F.gelu(h)
        return self.fc2(h)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.self_attn = SelfAttention(cfg)
        self.layer_norm1 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, h = self.layer_norm2(x, self.self_attn(self.layer_norm1(x)))
        return x + self.mlp(h)


class Encoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class TextEncoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.penultimate = cfg.hidden_layer == "penultimate"
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.text_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False) if cfg.projection_dim else None

    @property
    def clip_skip_range(self) -> int:
        """The largest clip_skip: the first layer's output is the earliest there is."""
        return len(self.encoder.layers) - self.penultimate

    def forward(self, ids: torch.Tensor, clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token ids [B, L] -> (the hidden states that condition the UNet [B, L, hidden_size], the pooled embedding
        [B, projection_dim] or None). clip_skip n > 1 reads the hidden states n - 1 layers earlier, as
        AUTOMATIC1111's "Clip skip" does, normalised where the tower's own output is; layers past them run only
        for the pooled embedding."""
        check_clip_skip(clip_skip, self.clip_skip_range)
        if ids.shape[1] > self.embeddings.position_embedding.num_embeddings:
            raise ValueError(f"{ids.shape[1]} tokens exceed the text encoder's {self.embeddings.position_embedding.num_embeddings} positions")
        layers = self.encoder.layers
        keep = self.clip_skip_range - clip_skip + 1
        x = self.embeddings(ids)
        for i, layer in enumerate(layers[: len(layers) if self.text_projection is not None else keep]):
            x = layer(x)
            if i + 1 == keep:
                hidden = x if self.penultimate else self.final_layer_norm(x)
        if self.text_projection is None:
            return hidden, None
        # At the end token: the first highest id, as CLIP finds it (ids past the vocabulary are textual-inversion
        # vectors, never the end token).
        vocab = self.embeddings.token_embedding.num_embeddings
        end = torch.where(ids < vocab, ids, -1).argmax(dim=-1)
        pooled = self.final_layer_norm(x)[torch.arange(ids.shape[0], device=ids.device), end]
        return hidden, self.text_projection(pooled)


def applies_clip_skip(config: ModelConfig) -> bool:
    """Whether prompts for this model take "Clip skip": AUTOMATIC1111 never reads the setting for SD 2.x's OpenCLIP
    tower, which already stops at its penultimate block; SD 1.x's CLIP and SDXL's towers (as diffusers' clip_skip)
    take it."""
    return config.family != "SD 2.x"


def check_clip_skip(clip_skip, layers: int | None = None) -> None:
    """clip_skip counts from the last layer (1); the first layer (clip_skip = layers) is the earliest there is.
    Without a layer count only the lower bound is checked (the command line, before a model is loaded)."""
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, numbers.Integral) or clip_skip < 1:
        raise ValueError(f"clip_skip must be an integer >= 1 (1 = the last layer), got {clip_skip!r}")
    if layers is not None and clip_skip > layers:
        raise ValueError(f"clip_skip {clip_skip} is past the text encoder's first layer: it has {layers} layers")
