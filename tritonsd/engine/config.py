"""Model sizes. Field names follow the CompVis YAML (UNet, VAE) and HF's CLIPTextConfig (text encoder),
so a config can be read off the files people already have. `ModelConfig()` is Stable Diffusion 1.x."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_heads: int = 8
    transformer_depth: int = 1
    context_dim: int = 768
    norm_groups: int = 32
    # Latent side the model was trained at; the default image side is this times the VAE's factor (512 for SD1.x).
    sample_size: int = 64


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    scaling_factor: float = 0.18215
    norm_groups: int = 32


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5


_PARTS = {"unet": UNetConfig, "vae": VAEConfig, "text": TextConfig}


@dataclass(frozen=True)
class ModelConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Build from a nested dict such as {"unet": {...}, "vae": {...}, "text": {...}}; missing fields keep SD1.x values."""
        if not isinstance(d, dict):
            raise ValueError(f"model config must be a dict of parts, got {type(d).__name__}")
        unknown = set(d) - set(_PARTS)
        if unknown:
            raise ValueError(f"unknown model config part(s) {sorted(unknown)}; expected {sorted(_PARTS)}")
        parts = {}
        for name, part_cls in _PARTS.items():
            values = d.get(name) or {}
            names = {f.name for f in dataclasses.fields(part_cls)}
            bad = set(values) - names
            if bad:
                raise ValueError(f"unknown field(s) {sorted(bad)} in model config part {name!r}")
            values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
            parts[name] = part_cls(**values)
        config = cls(**parts)
        config.validate()
        return config

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read model config {path}: {e}") from None
        return cls.from_dict(d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def validate(self) -> None:
        u, v, t = self.unet, self.vae, self.text
        if u.model_channels % u.num_heads:
            raise ValueError(f"unet.model_channels {u.model_channels} is not divisible by num_heads {u.num_heads}")
        for m in u.channel_mult:
            if (m * u.model_channels) % u.norm_groups:
                raise ValueError(f"unet channels {m * u.model_channels} not divisible by norm_groups {u.norm_groups}")
        for m in v.ch_mult:
            if (m * v.ch) % v.norm_groups:
                raise ValueError(f"vae channels {m * v.ch} not divisible by norm_groups {v.norm_groups}")
        if t.hidden_size % t.num_attention_heads:
            raise ValueError(f"text.hidden_size {t.hidden_size} is not divisible by num_attention_heads {t.num_attention_heads}")
        if t.hidden_act not in ("quick_gelu", "gelu"):
            raise ValueError(f"text.hidden_act {t.hidden_act!r} is not supported (quick_gelu, gelu)")
        if u.context_dim != t.hidden_size:
            raise ValueError(f"unet.context_dim {u.context_dim} differs from text.hidden_size {t.hidden_size}")
        if u.in_channels != v.embed_dim:
            raise ValueError(f"unet.in_channels {u.in_channels} differs from vae.embed_dim {v.embed_dim}")
