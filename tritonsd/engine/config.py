"""Model sizes. Field names follow the CompVis YAML (UNet, VAE) and HF's CLIPTextConfig (text encoder),
so a config can be read off the files people already have. `ModelConfig()` is Stable Diffusion 1.x; `SD2` and
`SD2_V` are SD 2.x's 512 (epsilon) and 768 (v-prediction) models."""

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
    # Either a head count at every level (SD 1.x) or a fixed head width (SD 2.x: 64, so 5, 10 and 20 heads);
    # the other is -1, as in the CompVis YAML.
    num_heads: int = 8
    num_head_channels: int = -1
    transformer_depth: int = 1
    context_dim: int = 768
    # SD 2.x's transformers project in and out with Linear layers instead of 1x1 convolutions.
    use_linear_in_transformer: bool = False
    norm_groups: int = 32
    # Latent side the model was trained at; the default image side is this times the VAE's factor (512 for SD1.x).
    sample_size: int = 64

    def heads(self, channels: int) -> int:
        """The attention head count at a level of this many channels."""
        return self.num_heads if self.num_head_channels == -1 else channels // self.num_head_channels


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
    # What prompts are padded with: OpenAI's CLIP (SD 1.x) pads with its end token, OpenCLIP (SD 2.x) with id 0,
    # "!". The padded positions condition the UNet, so this belongs to the model as much as its weights do.
    pad_token: str = "<|endoftext|>"


# What the UNet predicts: the noise (epsilon) or v = sqrt(alphā)·noise - sqrt(1 - alphā)·x0 (SD 2.x's 768 models).
PREDICTION_TYPES = ("epsilon", "v_prediction")


_PARTS = {"unet": UNetConfig, "vae": VAEConfig, "text": TextConfig}


@dataclass(frozen=True)
class ModelConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    prediction_type: str = "epsilon"

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Build from a nested dict such as {"unet": {...}, "vae": {...}, "text": {...}, "prediction_type": "..."};
        missing fields keep SD1.x values."""
        if not isinstance(d, dict):
            raise ValueError(f"model config must be a dict of parts, got {type(d).__name__}")
        unknown = set(d) - set(_PARTS) - {"prediction_type"}
        if unknown:
            raise ValueError(f"unknown model config part(s) {sorted(unknown)}; expected {sorted(_PARTS)} and prediction_type")
        parts = {"prediction_type": d["prediction_type"]} if "prediction_type" in d else {}
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
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {self.prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}")
        if (u.num_heads == -1) == (u.num_head_channels == -1):
            raise ValueError(
                f"give the UNet's attention either num_heads or num_head_channels, the other -1; "
                f"got num_heads={u.num_heads}, num_head_channels={u.num_head_channels}"
            )
        heads = ("num_heads", u.num_heads) if u.num_head_channels == -1 else ("num_head_channels", u.num_head_channels)
        for m in u.channel_mult:
            ch = m * u.model_channels
            if ch % u.norm_groups:
                raise ValueError(f"unet channels {ch} not divisible by norm_groups {u.norm_groups}")
            if heads[1] <= 0 or ch % heads[1]:
                raise ValueError(f"unet channels {ch} not divisible by {heads[0]} {heads[1]}")
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
        if not isinstance(t.pad_token, str) or not t.pad_token:
            raise ValueError(f"text.pad_token must be a token of the vocabulary, got {t.pad_token!r}")


# SD 2.x: OpenCLIP ViT-H/14's text tower up to its penultimate block (23 of 24), GELU, padding with "!" (id 0);
# UNet heads 64 wide, Linear projections, 1024-wide context. SD2 is the 512 model, SD2_V the 768 v-prediction one.
SD2 = ModelConfig(
    unet=UNetConfig(num_heads=-1, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True),
    text=TextConfig(hidden_size=1024, num_hidden_layers=23, num_attention_heads=16, intermediate_size=4096,
                    hidden_act="gelu", pad_token="!"),
)
SD2_V = dataclasses.replace(SD2, unet=dataclasses.replace(SD2.unet, sample_size=96), prediction_type="v_prediction")
