"""What a checkpoint is, the ModelConfig its tensor shapes imply, whether a given config agrees with them, and
what its UNet predicts."""

import dataclasses
import re
from collections.abc import Callable

import torch

from tritonsd import kernels
from tritonsd.engine.config import (
    CONDITIONING, FAMILIES, SD2_V, SIZE_EMBEDDING_DIM, TIMESTEP_SPACINGS, ModelConfig,
)
from tritonsd.loader.convert import ORIGINAL_PREFIXES
from tritonsd.loader.formats import DIFFUSERS_SETTINGS, CheckpointError, tower_folders
from tritonsd.loader.lora import is_lora

# The architectures the engine runs, by the names ModelConfig.family gives them; architecture() names others so that
# they can be refused by name.
SUPPORTED = tuple(FAMILIES)
FAMILY_LIST = f"{', '.join(SUPPORTED[:-1])} and {SUPPORTED[-1]}"
_EOS = "<|endoftext|>"
_EVIDENCE = {
    "SD 1.x": "UNet, VAE and CLIP text encoder of Stable Diffusion 1.x",
    "SD 2.x": "UNet with Linear transformer projections, OpenCLIP text encoder: Stable Diffusion 2.x",
    "SDXL": "UNet with label_emb (pooled text and size conditioning), CLIP ViT-L and OpenCLIP ViT-bigG text "
            "encoders: SDXL",
    "SDXL refiner": "UNet with label_emb (pooled text, size and aesthetic-score conditioning), one OpenCLIP text "
                    "encoder: the SDXL refiner",
}


def _dim(state: dict, key: str, i: int) -> int | None:
    """Size of dimension i of tensor `key`, or None if there is no such tensor or dimension."""
    t = state.get(key)
    return t.shape[i] if t is not None and t.ndim > i else None


def conditioning(adm_in_channels: int, pooled: int) -> str | None:
    """What label_emb's input holds besides the pooled text embedding, told by its width alone:
    adm_in_channels = pooled + 256 * numbers (ModelConfig.CONDITIONING: 6 for SDXL base's sizes, 5 for the refiner's
    sizes and aesthetic score); None if the width fits neither. "none" without label_emb."""
    if not adm_in_channels:
        return "none"
    numbers, rest = divmod(adm_in_channels - pooled, SIZE_EMBEDDING_DIM)
    return next((name for name, n in CONDITIONING.items() if n and n == numbers and not rest and pooled), None)


def stated_conditioning(adm_in_channels: int, pooled: int, where: str) -> str:
    """conditioning(), or a CheckpointError saying where the width that fits no SDXL model was found."""
    found = conditioning(adm_in_channels, pooled)
    if found is None:
        raise CheckpointError(
            f"{where} {adm_in_channels} is the pooled text embedding's {pooled} plus neither {CONDITIONING['size']} "
            f"(SDXL) nor {CONDITIONING['aesthetic']} (SDXL refiner) conditioning numbers of {SIZE_EMBEDDING_DIM}")
    return found


def _last_tower(state: dict) -> str:
    return "text_encoder_2" if any(k.startswith("text_encoder_2.") for k in state) else "text_encoder"


def _conditioning(state: dict) -> str | None:
    return conditioning(_dim(state, "unet.label_emb.0.0.weight", 1) or 0,
                        _dim(state, f"{_last_tower(state)}.text_projection.weight", 0) or 0)


def family(state: dict[str, torch.Tensor]) -> str:
    """Which of FAMILIES engine-named tensors belong to, by their shapes: label_emb's width makes an SDXL base or
    refiner (a width that fits neither still reads as SDXL, for infer_config to refuse with the arithmetic)."""
    if "unet.label_emb.0.0.weight" in state:
        return "SDXL refiner" if _conditioning(state) == "aesthetic" else "SDXL"
    return "SD 2.x" if _sd2(state) else "SD 1.x"


def architecture(state: dict[str, torch.Tensor]) -> tuple[str, str]:
    """(name, evidence) for engine-named tensors: one of SUPPORTED, or what the checkpoint looks like instead."""
    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in state)

    if has("embedder.") or has("noise_augmentor.") or has("unet.class_embedding."):
        return "SD 2.x unCLIP", "it conditions on image embeddings (embedder.*, noise_augmentor.*, or class_embedding)"
    if has("depth_model."):
        return "SD 2.x depth", "it carries a MiDaS depth estimator (depth_model.*) and reads depth as a 5th latent channel"
    if has("low_scale_model."):
        return "SD 2.x x4 upscaler", "it conditions on a low-resolution image (low_scale_model.*)"
    if has("unet.joint_blocks."):
        return "SD3", "it is an MMDiT (joint_blocks), not a UNet"
    if has("double_blocks.") or has("unet.double_blocks."):
        return "Flux", "it is a transformer (double_blocks), not a UNet"
    if is_lora(state):
        return "a LoRA", "its tensors are low-rank adapters, which patch a model rather than being one"
    if not has("unet.") and (has("encoder.") and has("decoder.") or has("vae.encoder.") and has("vae.decoder.")):
        return "a VAE alone", "it has encoder.* and decoder.* but no UNet or text encoder"
    if "unet.input_blocks.0.0.weight" not in state:
        return "unknown", f"it has no UNet ({ORIGINAL_PREFIXES['unet'][0]}input_blocks.0.0.weight or unet/conv_in)"
    in_channels = _dim(state, "unet.input_blocks.0.0.weight", 1)
    name = family(state)
    if in_channels == 9:
        return f"{name} inpainting", "its UNet takes 9 input channels (latents, mask, masked image)"
    if in_channels == 5 and name == "SD 2.x":
        return "SD 2.x depth", "its UNet takes 5 input channels (latents and depth)"
    return name, _EVIDENCE[name]


def _sd2(state: dict[str, torch.Tensor]) -> bool:
    """SD 2.x's UNet projects in and out of its transformers with Linear layers (2-D weights) and attends to 1024-wide
    OpenCLIP features; SD 1.x's uses 1x1 convolutions and 768-wide CLIP features."""
    proj_in = state.get("unet.middle_block.1.proj_in.weight")
    context = state.get("unet.middle_block.1.transformer_blocks.0.attn2.to_k.weight")
    return (proj_in is not None and proj_in.ndim == 2) or (context is not None and context.shape[1] == 1024)


def _levels(state: dict, pattern: str) -> list[int]:
    """Sorted distinct values of the (\\d+) in pattern among the keys."""
    return sorted({int(m.group(1)) for k in state if (m := re.match(pattern, k))})


class _Unreadable(Exception):
    """A field the shapes cannot give: the tensor it is read from is missing or malformed."""


def _shape_readers(state: dict) -> dict[str, dict[str, Callable[[], object]]]:
    """For each config field the tensor shapes determine, how to read it off them."""
    def dim(key: str, i: int) -> int:
        if key not in state:
            raise _Unreadable(f"tensor {key} is missing")
        size = _dim(state, key, i)
        if not size:
            raise _Unreadable(f"tensor {key} has shape {list(state[key].shape)}")
        return size

    def multiples(keys: list[str], base: int) -> tuple[int, ...]:
        widths = [dim(key, 0) for key in keys]
        if any(w % base for w in widths):
            raise _Unreadable(f"the widths {widths} of {', '.join(keys)} are not multiples of the first, {base}")
        return tuple(w // base for w in widths)

    def unet_levels() -> tuple[list[int], int]:
        """(the first input step of each level, res blocks per level): each level is its res blocks, then a
        downsampler unless it is the last."""
        steps = _levels(state, r"unet\.input_blocks\.(\d+)\.")
        down = [i for i in steps if f"unet.input_blocks.{i}.0.op.weight" in state]
        levels = len(down) + 1
        res_blocks = (len(steps) - 1 - len(down)) // levels
        return [1 + level * (res_blocks + 1) for level in range(levels)], res_blocks

    def attention_resolutions() -> tuple[int, ...]:
        first, _ = unet_levels()
        attention = [f"unet.input_blocks.{i}.1.proj_in.weight" in state for i in first]
        # Largest first, as the CompVis YAML writes them (4, 2, 1).
        return tuple(2**level for level in reversed(range(len(first))) if attention[level])

    def transformer_depth() -> tuple[int, ...]:
        first, _ = unet_levels()
        depths = [len(_levels(state, rf"unet\.input_blocks\.{i}\.1\.transformer_blocks\.(\d+)\.")) for i in first]
        # The middle block's depth is the last level's (which has no attention in SD 1.x/2.x).
        depths[-1] = depths[-1] or count(r"unet\.middle_block\.1\.transformer_blocks\.(\d+)\.")
        return tuple(depths)

    def count(pattern: str) -> int:
        n = len(_levels(state, pattern))
        if not n:
            raise _Unreadable(f"no tensor matches {pattern}")
        return n

    def optional(key: str, i: int) -> int:
        """A width that is 0 when its tensor is absent (label_emb, text_projection)."""
        return dim(key, i) if key in state else 0

    def tower(part: str) -> dict[str, Callable[[], object]]:
        token_embedding = f"{part}.embeddings.token_embedding.weight"
        return {
            "vocab_size": lambda: dim(token_embedding, 0),
            "hidden_size": lambda: dim(token_embedding, 1),
            "num_hidden_layers": lambda: count(rf"{part}\.encoder\.layers\.(\d+)\."),
            "intermediate_size": lambda: dim(f"{part}.encoder.layers.0.mlp.fc1.weight", 0),
            "max_position_embeddings": lambda: dim(f"{part}.embeddings.position_embedding.weight", 0),
            "projection_dim": lambda: optional(f"{part}.text_projection.weight", 0),
        }

    conv_in = "unet.input_blocks.0.0.weight"
    vae_in = "vae.encoder.conv_in.weight"
    readers = {
        "unet": {
            "in_channels": lambda: dim(conv_in, 1),
            "out_channels": lambda: dim("unet.out.2.weight", 0),
            "model_channels": lambda: dim(conv_in, 0),
            "channel_mult": lambda: multiples(
                [f"unet.input_blocks.{i}.0.out_layers.3.weight" for i in unet_levels()[0]], dim(conv_in, 0)),
            "num_res_blocks": lambda: unet_levels()[1],
            "attention_resolutions": attention_resolutions,
            "transformer_depth": transformer_depth,
            "context_dim": lambda: dim("unet.middle_block.1.transformer_blocks.0.attn2.to_k.weight", 1),
            # SD 2.x projects into its transformers with Linear layers (2-D weights), SD 1.x with 1x1 convolutions.
            "use_linear_in_transformer": lambda: dim("unet.middle_block.1.proj_in.weight", 0) > 0
            and state["unet.middle_block.1.proj_in.weight"].ndim == 2,
            "adm_in_channels": lambda: optional("unet.label_emb.0.0.weight", 1),
        },
        "vae": {
            "in_channels": lambda: dim(vae_in, 1),
            "out_ch": lambda: dim("vae.decoder.conv_out.weight", 0),
            "ch": lambda: dim(vae_in, 0),
            "ch_mult": lambda: multiples([f"vae.encoder.down.{i}.block.0.conv1.weight"
                                          for i in _levels(state, r"vae\.encoder\.down\.(\d+)\.")], dim(vae_in, 0)),
            "num_res_blocks": lambda: count(r"vae\.encoder\.down\.0\.block\.(\d+)\."),
            "z_channels": lambda: dim("vae.decoder.conv_in.weight", 1),
            "embed_dim": lambda: dim("vae.post_quant_conv.weight", 1),
        },
        "text": tower("text_encoder"),
    }
    if any(k.startswith("text_encoder_2.") for k in state):
        readers["text_2"] = tower("text_encoder_2")
    return readers


def shape_fields(state: dict[str, torch.Tensor]) -> tuple[dict[str, dict], dict[str, str]]:
    """The config fields the tensors' shapes determine, {part: {field: value}} (text_2 only when there is a second
    text tower), and for those they cannot give, {"part.field": why}."""
    fields, unreadable = {}, {}
    for part, readers in _shape_readers(state).items():
        fields[part] = {}
        for name, read in readers.items():
            try:
                fields[part][name] = read()
            except _Unreadable as e:
                unreadable[f"{part}.{name}"] = str(e)
    return fields, unreadable


def infer_config(state: dict[str, torch.Tensor], prediction_type: str = "epsilon") -> ModelConfig:
    """The config whose model has these tensors' shapes, for a model of this prediction type. What shapes cannot
    tell (attention heads, GroupNorm groups, latent scaling and float16 safety, the text towers' activation, padding
    and which layer conditions, the default size) takes the value of the family the shapes belong to (FAMILIES);
    SD 2.x v-prediction models draw at 768 pixels. What label_emb receives follows from its width (conditioning())."""
    fields, unreadable = shape_fields(state)
    if unreadable:
        raise CheckpointError(f"cannot infer the model config: {next(iter(unreadable.values()))}")
    name = family(state)
    base = SD2_V if name == "SD 2.x" and prediction_type == "v_prediction" else FAMILIES[name]
    parts = base.to_dict()
    towers = [part for part in ("text", "text_2") if part in fields]
    if (parts["text_2"] is None) != ("text_2" not in fields):
        raise CheckpointError(f"cannot infer the model config: {name} has {1 + (parts['text_2'] is not None)} text "
                              f"encoder(s), the tensors {len(towers)}")
    for part in ("unet", "vae", *towers):
        parts[part].update(fields[part])
    for part in towers:
        hidden = fields[part]["hidden_size"]
        # CLIP ViT-L/14 has 12 heads of 64; the OpenCLIP towers (ViT-H/14: 16, ViT-bigG/14: 20) keep heads of 64.
        parts[part]["num_attention_heads"] = 12 if hidden == 768 else max(1, hidden // 64)
    adm, pooled = fields["unet"]["adm_in_channels"], fields[towers[-1]]["projection_dim"]
    parts["conditioning"] = stated_conditioning(adm, pooled, "cannot infer the model config: label_emb's input width")
    try:
        return ModelConfig.from_dict({**parts, "prediction_type": prediction_type})
    except ValueError as e:
        raise CheckpointError(f"the model config inferred from the tensor shapes is not valid: {e}") from None


def config_mismatches(config: ModelConfig, state: dict[str, torch.Tensor]) -> list[str]:
    """Each field the tensors' shapes determine on which `config` disagrees with them, as "part.field: config X,
    tensors Y". A config that passes describes a model no larger than the file's."""
    fields, _ = shape_fields(state)
    out = []
    if (config.text_2 is None) != ("text_2" not in fields):
        out.append(f"text_2 (a second text encoder) is {'absent' if config.text_2 is None else 'present'} in the "
                   f"config, {'present' if 'text_2' in fields else 'absent'} in the tensors")
        fields.pop("text_2", None)
    for part, values in fields.items():
        for name, from_shapes in values.items():
            given = getattr(getattr(config, part), name)
            if name == "attention_resolutions":  # a set of levels, in any order
                given, from_shapes = tuple(sorted(given)), tuple(sorted(from_shapes))
            if given != from_shapes:
                out.append(f"{part}.{name} is {_plain(given)} in the config, {_plain(from_shapes)} in the tensors")
    return out


def _plain(value) -> str:
    return str(list(value)) if isinstance(value, tuple) else str(value)


def _pad(hidden_act: str) -> str:
    """What a text tower pads prompts with when its tokenizer does not say: OpenCLIP's towers (GELU: SD 2.x's,
    SDXL's bigG) id 0 "!", OpenAI's CLIP (quick GELU) its end token."""
    return "!" if hidden_act == "gelu" else _EOS


def _heads(heads, block_out_channels) -> dict:
    """UNet head fields from diffusers' head count, one number or one per level: a count shared by every level
    (SD 1.x) or a width shared by every level (SD 2.x: 5, 10, 20, 20 heads of 64)."""
    if isinstance(heads, int):
        return dict(num_heads=heads, num_head_channels=-1)
    if not all(isinstance(h, int) and h > 0 for h in heads) or len(heads) != len(block_out_channels):
        raise CheckpointError(f"the UNet's head counts {heads!r} are not one positive count per level")
    if len(set(heads)) == 1:
        return dict(num_heads=heads[0], num_head_channels=-1)
    widths = {c // h for c, h in zip(block_out_channels, heads)}
    if len(widths) != 1 or any(c % h for c, h in zip(block_out_channels, heads)):
        raise CheckpointError(f"the UNet's heads {list(heads)} for channels {list(block_out_channels)} share neither "
                              "a count nor a width")
    return dict(num_heads=-1, num_head_channels=widths.pop())


def _pad_token(tokenizer: dict) -> str | None:
    """The pad token of a tokenizer folder's special_tokens_map.json: a string, or transformers' AddedToken dict."""
    pad = tokenizer.get("pad_token")
    return pad.get("content") if isinstance(pad, dict) else pad


def config_from_diffusers(configs: dict[str, dict]) -> ModelConfig:
    """ModelConfig from a diffusers folder's unet/, vae/, text_encoder/ and text_encoder_2/ config.json files (an SDXL
    refiner's text_encoder_2 is the engine's text), with the prediction type ("epsilon" without one) and timestep
    spacing of scheduler/scheduler_config.json and the pad tokens of tokenizer/ and tokenizer_2/. What label_emb receives follows from
    its width (conditioning()). Each entry read is checked before any arithmetic is done with it."""
    for part, source in configs.items():
        if not isinstance(source, dict):
            raise CheckpointError(f"{part}/config.json must hold a JSON object; it holds {type(source).__name__}")

    def get(part: str, key: str, kind: str, default=None):
        """configs[part][key] (or the default, if given, when absent), which must be of `kind`."""
        if key not in configs[part] and default is not None:
            return default
        file = DIFFUSERS_SETTINGS.get(part, f"{part}/config.json")
        if key not in configs[part]:
            raise CheckpointError(f"{file} has no {key!r}")
        value = configs[part][key]
        if not _DIFFUSERS_KINDS[kind][1](value):
            raise CheckpointError(f"{file}: {key} must be {_DIFFUSERS_KINDS[kind][0]}; got {repr(value)[:60]}")
        return value

    def per_level(part: str, key: str, default: int) -> int | tuple[int, ...]:
        """An int for every level, or one per level (SDXL's configs)."""
        if isinstance(configs[part].get(key), (list, tuple)):
            return tuple(get(part, key, "depths"))
        return get(part, key, "int", default)

    def widths(part: str) -> tuple[int, tuple[int, ...]]:
        """(base channels, multipliers) from block_out_channels."""
        channels = get(part, "block_out_channels", "ints")
        if any(c % channels[0] for c in channels):
            raise CheckpointError(f"{part}/config.json: block_out_channels {channels} are not multiples of the first")
        return channels[0], tuple(c // channels[0] for c in channels)

    mc, channel_mult = widths("unet")
    down_blocks = get("unet", "down_block_types", "strs")
    if len(down_blocks) != len(channel_mult):
        raise CheckpointError(f"unet/config.json: {len(down_blocks)} down_block_types for "
                              f"{len(channel_mult)} block_out_channels")
    # diffusers names the UNet's head count attention_head_dim, a known misnomer kept for compatibility.
    heads = "num_attention_heads" if configs["unet"].get("num_attention_heads") else "attention_head_dim"
    heads = get("unet", heads, "ints" if isinstance(configs["unet"].get(heads), (list, tuple)) else "int")
    # SDXL adds its pooled text embedding and its size (and aesthetic-score) embeddings to the timestep embedding
    # ("text_time"); other additions are other models'.
    addition = configs["unet"].get("addition_embed_type")
    if addition not in (None, "text_time"):
        raise CheckpointError(f"unet/config.json: addition_embed_type {addition!r} is not supported (SDXL's "
                              "'text_time', or none)")
    sdxl = addition == "text_time"
    if sdxl and get("unet", "addition_time_embed_dim", "int") != SIZE_EMBEDDING_DIM:
        raise CheckpointError(f"unet/config.json: addition_time_embed_dim {configs['unet']['addition_time_embed_dim']} "
                              f"is not SDXL's {SIZE_EMBEDDING_DIM}")
    if configs["unet"].get("reverse_transformer_layers_per_block") is not None:
        raise CheckpointError("unet/config.json: reverse_transformer_layers_per_block (up blocks deeper or shallower "
                              "than the down blocks) is not supported")
    unet = dict(
        in_channels=get("unet", "in_channels", "int"),
        out_channels=get("unet", "out_channels", "int"),
        model_channels=mc,
        channel_mult=channel_mult,
        num_res_blocks=get("unet", "layers_per_block", "int"),
        attention_resolutions=tuple(2**i for i, b in reversed(list(enumerate(down_blocks))) if b.startswith("CrossAttn")),
        **_heads(heads, [mc * m for m in channel_mult]),
        transformer_depth=per_level("unet", "transformer_layers_per_block", 1),
        context_dim=get("unet", "cross_attention_dim", "int"),
        use_linear_in_transformer=get("unet", "use_linear_projection", "bool", False),
        norm_groups=get("unet", "norm_num_groups", "int", 32),
        sample_size=get("unet", "sample_size", "int", 64),
        adm_in_channels=get("unet", "projection_class_embeddings_input_dim", "int") if sdxl else 0,
    )
    ch, ch_mult = widths("vae")
    vae = dict(
        in_channels=get("vae", "in_channels", "int"),
        out_ch=get("vae", "out_channels", "int"),
        ch=ch,
        ch_mult=ch_mult,
        num_res_blocks=get("vae", "layers_per_block", "int"),
        z_channels=get("vae", "latent_channels", "int"),
        embed_dim=get("vae", "latent_channels", "int"),
        scaling_factor=get("vae", "scaling_factor", "number", 0.18215),
        norm_groups=get("vae", "norm_num_groups", "int", 32),
        # diffusers' SDXL pipelines decode in float32 unless the VAE's config says force_upcast false (its default is
        # true); its SD 1.x/2.x pipelines never read it.
        force_upcast=get("vae", "force_upcast", "bool", True) if sdxl else False,
    )
    parts = {"unet": unet, "vae": vae}
    for part, folder in zip(("text", "text_2"), tower_folders(configs)):
        parts[part] = _diffusers_tower(configs, folder, get, sdxl)
    adm, pooled = unet["adm_in_channels"], parts["text_2" if "text_2" in parts else "text"].get("projection_dim", 0)
    parts["conditioning"] = stated_conditioning(adm, pooled, "unet/config.json: projection_class_embeddings_input_dim")
    settings = {}
    if "scheduler" in configs:
        settings["prediction_type"] = get("scheduler", "prediction_type", "str", "epsilon")
        # A scheduler config without one leaves each scheduler its own (SD 1.x's and 2.x's); SDXL's says "leading".
        settings["timestep_spacing"] = get("scheduler", "timestep_spacing", "spacing", "default")
    try:
        config = ModelConfig.from_dict({**parts, **settings})
    except ValueError as e:
        raise CheckpointError(f"the diffusers config.json files describe an unsupported model: {e}") from None
    # A folder without a scheduler config samples as its family's released one does.
    return config if "scheduler" in configs else dataclasses.replace(
        config, timestep_spacing=FAMILIES[config.family].timestep_spacing)


# Each text tower's tokenizer folder in a diffusers model.
_TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}


def _diffusers_tower(configs: dict, folder: str, get, sdxl: bool) -> dict:
    """A text tower's config from its config.json (transformers' CLIPTextConfig, whose names the engine uses) and its
    tokenizer's pad token. SDXL's towers condition with their penultimate layer; a CLIPTextModelWithProjection's
    text_projection gives the pooled embedding."""
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings", "hidden_act", "layer_norm_eps")
    text = {k: configs[folder][k] for k in keys if k in configs[folder]}
    text["pad_token"] = _pad_token(configs.get(_TOKENIZERS[folder], {})) or _pad(text.get("hidden_act", "quick_gelu"))
    if sdxl:
        text["hidden_layer"] = "penultimate"
    if "CLIPTextModelWithProjection" in (configs[folder].get("architectures") or ()):
        text["projection_dim"] = get(folder, "projection_dim", "int")
    return text


def _positive(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


# What config_from_diffusers accepts for each kind of entry: (description, test).
_DIFFUSERS_KINDS = {
    "int": ("a positive integer", _positive),
    # Lists in config.json; tuples in a config diffusers holds in memory.
    "ints": ("a non-empty list of positive integers",
             lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(map(_positive, v))),
    # Per-level transformer depths: 0 where a level has no attention.
    "depths": ("a non-empty list of integers >= 0",
               lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(_positive(d) or d == 0 for d in v)
               and not any(isinstance(d, bool) for d in v)),
    "strs": ("a list of strings", lambda v: isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v)),
    "number": ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
    # diffusers' own values: "default" is the engine's word for a config that names none.
    "spacing": (f"one of {', '.join(TIMESTEP_SPACINGS[1:])}", lambda v: v in TIMESTEP_SPACINGS[1:]),
}


def stated_prediction_type(metadata: dict) -> str | None:
    """What a single file's own metadata says its UNet predicts: Stability's ModelSpec field
    modelspec.prediction_type ("epsilon" or "v"; kohya's sd-scripts write it), or ComfyUI's v_pred marker tensor."""
    spec = metadata.get("modelspec.prediction_type")
    if spec is not None:
        named = {"epsilon": "epsilon", "eps": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction"}
        if spec not in named:
            raise CheckpointError(f"its metadata gives modelspec.prediction_type {spec!r}, which is neither "
                                  "epsilon nor v; pass the prediction type explicitly")
        return named[spec]
    return "v_prediction" if "v_pred" in metadata else None


def probe_prediction_type(unet: torch.nn.Module, config: ModelConfig) -> tuple[str, float]:
    """AUTOMATIC1111's test for an SD 2.x file that does not say what its UNet predicts: one evaluation at the last
    training timestep (999) of an 8x8 latent of 0.5s under a 2-token context of 0.5s. There the latent is nearly all
    noise, so a noise-predicting model returns about its input, while a v-predicting one returns about minus its
    guess of the clean latent; AUTOMATIC1111 takes a mean of (output - input) below -1 for v-prediction. Runs the
    reference ops (nothing to compile for one call). Returns the decision and that mean."""
    weight = unet.out[2].weight
    with torch.inference_mode(), kernels.backend("torch"):
        x = torch.full((1, config.unet.in_channels, 8, 8), 0.5, dtype=weight.dtype, device=weight.device)
        context = torch.full((1, 2, config.unet.context_dim), 0.5, dtype=weight.dtype, device=weight.device)
        out = unet(x, torch.tensor([999.0], device=weight.device), context)
        statistic = (out.float() - x.float()).mean().item()
    return ("v_prediction" if statistic < -1 else "epsilon"), statistic
