"""Model sizes. Field names follow the CompVis YAML (UNet, VAE) and HF's CLIPTextConfig (text encoder),
so a config can be read off the files people already have. `ModelConfig()` is Stable Diffusion 1.x; `SD2` and
`SD2_V` are SD 2.x's 512 (epsilon) and 768 (v-prediction) models; `SDXL` and `SDXL_REFINER` are SDXL 1.0's base and
refiner. FAMILIES names them all.

Every field is checked against its annotation and its row of LIMITS when a config is made, however it is made
(from_dict, from_json, the constructors, dataclasses.replace): a config that exists is one a model can be built from.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import reprlib
import typing
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
    # Transformer blocks per attention at each level; the middle block takes the last level's (as SDXL's sgm code).
    # An integer means the same at every level (SD 1.x/2.x YAMLs and configs). A level that builds no transformer
    # (no attention there, and not the last) reads 0, so that equal models have equal configs.
    transformer_depth: tuple[int, ...] | int = 1
    context_dim: int = 768
    # SD 2.x's transformers project in and out with Linear layers instead of 1x1 convolutions.
    use_linear_in_transformer: bool = False
    norm_groups: int = 32
    # Latent side the model was trained at; the default image side is this times the VAE's factor (512 for SD1.x).
    sample_size: int = 64
    # Width of the vector SDXL adds to the timestep embedding through label_emb (pooled text embedding and the
    # size/crop/aesthetic embeddings, ModelConfig.conditioning); 0: no label_emb (SD 1.x/2.x).
    adm_in_channels: int = 0

    def __post_init__(self):
        if _is_int(self.transformer_depth) and isinstance(self.channel_mult, (list, tuple)):
            object.__setattr__(self, "transformer_depth", (self.transformer_depth,) * len(self.channel_mult))
        _check_fields(self)
        last = len(self.channel_mult) - 1
        object.__setattr__(self, "transformer_depth", tuple(
            d if 2**level in self.attention_resolutions or level == last else 0
            for level, d in enumerate(self.transformer_depth)))

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
    # diffusers' name for a VAE whose activations overflow float16 (SDXL's): it is not decoded in float16.
    force_upcast: bool = False

    def __post_init__(self):
        _check_fields(self)


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
    # Which hidden states condition the UNet: "last" = the last layer built, then the final layer norm (SD 1.x;
    # SD 2.x, whose last block is not built); "penultimate" = the one before the last layer, without the final
    # layer norm (SDXL's two towers).
    hidden_layer: str = "last"
    # Width of text_projection, which maps the final-normed end-token state to the pooled embedding SDXL conditions
    # on; 0: the tower has none (or it is not used).
    projection_dim: int = 0

    def __post_init__(self):
        _check_fields(self)


# What the UNet predicts: the noise (epsilon) or v = sqrt(alphā)·noise - sqrt(1 - alphā)·x0 (SD 2.x's 768 models).
PREDICTION_TYPES = ("epsilon", "v_prediction")

# What the UNet's label_emb receives besides the pooled text embedding, each number as a 256-wide sinusoidal
# embedding (SDXL): "none" (no label_emb), "size" (base: original size, crop top-left, target size: 6 numbers),
# "aesthetic" (refiner: original size, crop top-left, aesthetic score: 5 numbers).
CONDITIONING = {"none": 0, "size": 6, "aesthetic": 5}
SIZE_EMBEDDING_DIM = 256

# How a run's timesteps are spread over the 1000 training steps: diffusers' timestep_spacing values, or "default",
# each sampler's own (SD 1.x's and 2.x's scheduler configs name none; SDXL's says "leading").
TIMESTEP_SPACINGS = ("default", "leading", "linspace", "trailing")

# text_2 is optional (SDXL base's second tower); the other parts every model has.
PARTS = {"unet": UNetConfig, "vae": VAEConfig, "text": TextConfig, "text_2": TextConfig}
# The config's fields that are one choice each, not a part.
SETTINGS = {"prediction_type": PREDICTION_TYPES, "conditioning": tuple(CONDITIONING),
            "timestep_spacing": TIMESTEP_SPACINGS}


@dataclass(frozen=True)
class Limit:
    """A field's accepted values: numbers in [low, high] or in `also` (a tuple's items, and its length in `length`),
    one of `choices` for a string (any string of 1 to `high` characters when there are no choices), or a bool."""
    low: float = 0
    high: float = 0
    length: tuple[int, int] | None = None
    choices: tuple[str, ...] = ()
    also: tuple[int, ...] = ()


# Far beyond every Stable Diffusion model (SD 1.x/2.x, SDXL), yet small enough that nothing a file says can make the
# engine build or allocate without bound.
LIMITS: dict[str, dict[str, Limit]] = {
    "unet": {
        "in_channels": Limit(1, 64),
        "out_channels": Limit(1, 64),
        "model_channels": Limit(1, 4096),
        "channel_mult": Limit(1, 64, length=(1, 8)),
        "num_res_blocks": Limit(1, 16),
        "attention_resolutions": Limit(1, 128, length=(0, 8)),
        # -1: the other one of the two sets the heads (ModelConfig.validate).
        "num_heads": Limit(1, 256, also=(-1,)),
        "num_head_channels": Limit(1, 4096, also=(-1,)),
        # 0 at a level without attention (SDXL's YAML says [0, 2, 10]).
        "transformer_depth": Limit(0, 64, length=(1, 8)),
        "context_dim": Limit(1, 8192),
        "use_linear_in_transformer": Limit(),
        "norm_groups": Limit(1, 1024),
        "sample_size": Limit(1, 512),
        "adm_in_channels": Limit(0, 65536),
    },
    "vae": {
        "in_channels": Limit(1, 64),
        "out_ch": Limit(1, 64),
        "ch": Limit(1, 4096),
        "ch_mult": Limit(1, 64, length=(1, 8)),
        "num_res_blocks": Limit(1, 16),
        "z_channels": Limit(1, 64),
        "embed_dim": Limit(1, 64),
        "scaling_factor": Limit(1e-6, 1e3),
        "norm_groups": Limit(1, 1024),
        "force_upcast": Limit(),
    },
    "text": {
        "vocab_size": Limit(1, 1_000_000),
        "hidden_size": Limit(1, 16384),
        "num_hidden_layers": Limit(1, 256),
        "num_attention_heads": Limit(1, 256),
        "intermediate_size": Limit(1, 65536),
        "max_position_embeddings": Limit(1, 4096),
        "hidden_act": Limit(choices=("quick_gelu", "gelu")),
        "layer_norm_eps": Limit(1e-12, 1.0),
        "pad_token": Limit(high=64),
        "hidden_layer": Limit(choices=("last", "penultimate")),
        "projection_dim": Limit(0, 16384),
    },
}
LIMITS["text_2"] = LIMITS["text"]
# The widest activation any level may have (channels): bounds the product of a base width and its multiplier.
MAX_CHANNELS = 16384

# Short and depth-limited, for any value a file may hold.
_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxlist, _repr.maxdict, _repr.maxstring, _repr.maxlong, _repr.maxother = 2, 8, 4, 40, 40, 40


def _describe(value) -> str:
    if _is_int(value) and abs(value) >= 10**40:  # repr of a huge int is slow, or refused past 4300 digits
        return f"an integer of {value.bit_length()} bits"
    return f"{_repr.repr(value)} ({type(value).__name__})"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@functools.cache
def _annotations(cls) -> dict:
    return typing.get_type_hints(cls)


def _check_fields(part) -> None:
    """Check each field of a part against its annotation and LIMITS; lists become tuples."""
    name = next(n for n, cls in PARTS.items() if isinstance(part, cls))
    for f, kind in _annotations(type(part)).items():
        value, limit, where = getattr(part, f), LIMITS[name][f], f"{name}.{f}"
        if kind is int:
            if not (_is_int(value) and (limit.low <= value <= limit.high or value in limit.also)):
                also = "".join(f" or {v}" for v in limit.also)
                raise ValueError(f"{where} must be an integer in [{limit.low}, {limit.high}]{also}; "
                                 f"got {_describe(value)}")
        elif kind is float:  # NaN and infinities fail the range test
            if not ((_is_int(value) or isinstance(value, float)) and limit.low <= value <= limit.high):
                raise ValueError(f"{where} must be a number in [{limit.low:g}, {limit.high:g}]; got {_describe(value)}")
        elif kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{where} must be true or false; got {_describe(value)}")
        elif kind is str and not limit.choices:
            if not (isinstance(value, str) and 1 <= len(value) <= limit.high):
                raise ValueError(f"{where} must be a string of 1 to {limit.high:g} characters; got {_describe(value)}")
        elif kind is str:
            if value not in limit.choices:  # `in` on a tuple of str: False for any non-str value
                raise ValueError(f"{where} must be one of {', '.join(limit.choices)}; got {_describe(value)}")
        else:  # tuple[int, ...]
            shortest, longest = limit.length
            if not (isinstance(value, (list, tuple)) and shortest <= len(value) <= longest
                    and all(_is_int(v) and limit.low <= v <= limit.high for v in value)):
                raise ValueError(f"{where} must be a list of {shortest} to {longest} integers in "
                                 f"[{limit.low}, {limit.high}]; got {_describe(value)}")
            object.__setattr__(part, f, tuple(value))


# A config file is a few kilobytes; a larger one is not a config.
MAX_JSON_BYTES = 1 << 20


def parse_json(text: str):
    """The value of a JSON text; a ValueError saying why it is not one (nesting too deep to parse included)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError; so is an integer of 5000 digits
        raise ValueError(f"not valid JSON: {'nested too deeply' if isinstance(e, RecursionError) else e}") from None


def read_json(path: str | Path, max_bytes: int = MAX_JSON_BYTES):
    """The value of a JSON file of at most max_bytes; a ValueError saying why it cannot be read (the caller names
    the file)."""
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise ValueError(e.strerror or str(e)) from None
    if len(data) > max_bytes:
        raise ValueError(f"larger than {max_bytes >> 20} MiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    return parse_json(text)


@dataclass(frozen=True)
class ModelConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    # SDXL base's second text tower (OpenCLIP ViT-bigG): its hidden states follow the first's along the width, and
    # its pooled embedding goes to label_emb. The refiner has bigG alone, as `text`.
    text_2: TextConfig | None = None
    prediction_type: str = "epsilon"
    conditioning: str = "none"
    timestep_spacing: str = "default"

    def __post_init__(self):
        self.validate()

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Build from a nested dict such as {"unet": {...}, "vae": {...}, "text": {...}, "prediction_type": "..."};
        missing fields keep SD1.x values, and a missing text_2 means none."""
        if not isinstance(d, dict):
            raise ValueError(f"model config must be a dict of parts ({', '.join(PARTS)}); got {_describe(d)}")
        unknown = [str(k) for k in d if k not in PARTS and k not in SETTINGS]
        if unknown:
            raise ValueError(f"unknown model config part(s) {sorted(unknown)}; expected {sorted(PARTS)} "
                             f"and {', '.join(SETTINGS)}")
        parts = {k: d[k] for k in SETTINGS if k in d}
        for name, part_cls in PARTS.items():
            values = d.get(name)
            if values is None and name == "text_2":
                continue
            values = {} if values is None else values
            if not isinstance(values, dict):
                raise ValueError(f"model config part {name!r} must be a dict of fields; got {_describe(values)}")
            bad = [str(k) for k in values if k not in LIMITS[name]]
            if bad:
                raise ValueError(f"unknown field(s) {sorted(bad)} in model config part {name!r}")
            parts[name] = part_cls(**values)
        return cls(**parts)

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        try:
            d = read_json(path)
        except ValueError as e:
            raise ValueError(f"cannot read model config {path}: {e}") from None
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"model config {path}: {e}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @property
    def towers(self) -> tuple[TextConfig, ...]:
        """The text towers, in the order their hidden states are concatenated."""
        return (self.text,) if self.text_2 is None else (self.text, self.text_2)

    @property
    def family(self) -> str:
        """The name people know the architecture by (a key of FAMILIES)."""
        if self.conditioning == "aesthetic":
            return "SDXL refiner"
        if self.conditioning == "size":
            return "SDXL"
        return "SD 2.x" if self.unet.use_linear_in_transformer or self.text.hidden_act == "gelu" else "SD 1.x"

    def validate(self) -> None:
        """The rules between fields (each field on its own is checked when its part is made)."""
        for name, part_cls in PARTS.items():
            if not isinstance(getattr(self, name), part_cls) and not (name == "text_2" and self.text_2 is None):
                raise ValueError(f"model config part {name!r} must be a {part_cls.__name__}; "
                                 f"got {_describe(getattr(self, name))}")
        for name, choices in SETTINGS.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}; got {_describe(getattr(self, name))}")
        u, v, t = self.unet, self.vae, self.text
        for where, base, mults in (("unet", u.model_channels, u.channel_mult), ("vae", v.ch, v.ch_mult)):
            if base * max(mults) > MAX_CHANNELS:
                raise ValueError(f"{where}'s widest level has {base * max(mults)} channels; at most {MAX_CHANNELS}")
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
            if ch % heads[1]:
                raise ValueError(f"unet channels {ch} not divisible by {heads[0]} {heads[1]}")
        levels = [2**i for i in range(len(u.channel_mult))]
        if any(r not in levels for r in u.attention_resolutions):
            raise ValueError(f"unet.attention_resolutions {list(u.attention_resolutions)} must be downsampling factors "
                             f"of the UNet's {len(levels)} levels, {levels}")
        if u.out_channels != u.in_channels:
            raise ValueError(f"unet.out_channels {u.out_channels} differs from in_channels {u.in_channels}: the UNet "
                             "predicts noise of the latents' shape")
        for m in v.ch_mult:
            if (m * v.ch) % v.norm_groups:
                raise ValueError(f"vae channels {m * v.ch} not divisible by norm_groups {v.norm_groups}")
        if len(u.transformer_depth) != len(u.channel_mult):
            raise ValueError(f"unet.transformer_depth {list(u.transformer_depth)} must give one depth for each of the "
                             f"UNet's {len(u.channel_mult)} levels")
        for level, depth in enumerate(u.transformer_depth):
            if depth == 0 and (2**level in u.attention_resolutions or level == len(levels) - 1):
                raise ValueError(f"unet.transformer_depth is 0 at level {level}, which has attention")
        for name, tower in zip(("text", "text_2"), self.towers):
            if tower.hidden_size % tower.num_attention_heads:
                raise ValueError(f"{name}.hidden_size {tower.hidden_size} is not divisible by num_attention_heads "
                                 f"{tower.num_attention_heads}")
            if tower.hidden_layer == "penultimate" and tower.num_hidden_layers < 2:
                raise ValueError(f"{name}.hidden_layer is penultimate, but the tower has one layer")
        width = sum(tower.hidden_size for tower in self.towers)
        if u.context_dim != width:
            raise ValueError(f"unet.context_dim {u.context_dim} differs from the text towers' width {width}")
        pooled = self.towers[-1].projection_dim
        wanted = 0 if self.conditioning == "none" else pooled + CONDITIONING[self.conditioning] * SIZE_EMBEDDING_DIM
        if self.conditioning != "none" and not pooled:
            raise ValueError(f"conditioning {self.conditioning!r} needs the last text tower's pooled embedding, "
                             "but it has projection_dim 0")
        if u.adm_in_channels != wanted:
            raise ValueError(f"unet.adm_in_channels {u.adm_in_channels} does not fit conditioning "
                             f"{self.conditioning!r}: it takes {wanted}")
        if u.in_channels != v.embed_dim:
            raise ValueError(f"unet.in_channels {u.in_channels} differs from vae.embed_dim {v.embed_dim}")


# SD 2.x: OpenCLIP ViT-H/14's text tower up to its penultimate block (23 of 24), GELU, padding with "!" (id 0);
# UNet heads 64 wide, Linear projections, 1024-wide context. SD2 is the 512 model, SD2_V the 768 v-prediction one.
SD2 = ModelConfig(
    unet=UNetConfig(num_heads=-1, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True),
    text=TextConfig(hidden_size=1024, num_hidden_layers=23, num_attention_heads=16, intermediate_size=4096,
                    hidden_act="gelu", pad_token="!"),
)
SD2_V = dataclasses.replace(SD2, unet=dataclasses.replace(SD2.unet, sample_size=96), prediction_type="v_prediction")

# SDXL 1.0: CLIP ViT-L (as SD 1.x) and OpenCLIP ViT-bigG/14 (32 layers; its text_projection gives the pooled
# embedding), both read at their penultimate layer; a 3-level UNet with 2 and 10 transformer blocks at its lower
# levels; a VAE that overflows float16. The refiner conditions on bigG alone and an aesthetic score.
_BIG_G = TextConfig(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20, intermediate_size=5120,
                    hidden_act="gelu", pad_token="!", hidden_layer="penultimate", projection_dim=1280)
_SDXL_VAE = VAEConfig(scaling_factor=0.13025, force_upcast=True)
SDXL = ModelConfig(
    unet=UNetConfig(channel_mult=(1, 2, 4), attention_resolutions=(4, 2), num_heads=-1, num_head_channels=64,
                    transformer_depth=(0, 2, 10), context_dim=2048, use_linear_in_transformer=True, sample_size=128,
                    adm_in_channels=2816),
    vae=_SDXL_VAE,
    text=TextConfig(hidden_layer="penultimate"),
    text_2=_BIG_G,
    conditioning="size",
    # Stability's scheduler config for both SDXL models (diffusers' from_config carries it to every scheduler).
    timestep_spacing="leading",
)
SDXL_REFINER = ModelConfig(
    unet=UNetConfig(model_channels=384, channel_mult=(1, 2, 4, 4), attention_resolutions=(4, 2), num_heads=-1,
                    num_head_channels=64, transformer_depth=4, context_dim=1280, use_linear_in_transformer=True,
                    sample_size=128, adm_in_channels=2560),
    vae=_SDXL_VAE,
    text=_BIG_G,
    conditioning="aesthetic",
    timestep_spacing="leading",
)

# Every family the engine runs, by the name ModelConfig.family gives it: the default config of each.
FAMILIES = {"SD 1.x": ModelConfig(), "SD 2.x": SD2, "SDXL": SDXL, "SDXL refiner": SDXL_REFINER}
# The family each width names, for files made for a model (LoRAs, embeddings), which show it in their shapes: the
# UNet's context (SDXL's two towers read together: 2048), and the text tower's width for the families with one tower
# (SDXL base's first tower is as wide as SD 1.x's, so it names nothing).
FAMILY_BY_CONTEXT = {config.unet.context_dim: name for name, config in FAMILIES.items()}
FAMILY_BY_TEXT_WIDTH = {config.text.hidden_size: name for name, config in FAMILIES.items() if config.text_2 is None}
