"""What a checkpoint is, the ModelConfig its tensor shapes imply, and whether a given config agrees with them."""

import re
from collections.abc import Callable

import torch

from tritonsd.engine.config import ModelConfig
from tritonsd.loader.convert import ORIGINAL_PREFIXES
from tritonsd.loader.formats import CheckpointError


def _dim(state: dict, key: str, i: int) -> int | None:
    """Size of dimension i of tensor `key`, or None if there is no such tensor or dimension."""
    t = state.get(key)
    return t.shape[i] if t is not None and t.ndim > i else None


def architecture(state: dict[str, torch.Tensor]) -> tuple[str, str]:
    """(name, evidence) for engine-named tensors: ("SD1.x", ...) or what the checkpoint looks like instead."""
    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in state)

    if has("conditioner.embedders."):
        return "SDXL", "its text encoders are conditioner.embedders.*"
    if "unet.label_emb.0.0.weight" in state:
        return "SDXL", "its UNet has label_emb (size conditioning)"
    if has("cond_stage_model.model."):
        return "SD2.x", "its text encoder is OpenCLIP (cond_stage_model.model.*)"
    if has("unet.joint_blocks."):
        return "SD3", "it is an MMDiT (joint_blocks), not a UNet"
    if has("double_blocks.") or has("unet.double_blocks."):
        return "Flux", "it is a transformer (double_blocks), not a UNet"
    if any("lora_" in k for k in state):
        return "a LoRA", "its tensors are low-rank adapters (lora_*), which patch a model rather than being one"
    if not has("unet.") and has("encoder.") and has("decoder."):
        return "a VAE alone", "it has encoder.* and decoder.* but no UNet or text encoder"
    if "unet.input_blocks.0.0.weight" not in state:
        return "unknown", f"it has no UNet ({ORIGINAL_PREFIXES['unet'][0]}input_blocks.0.0.weight or unet/conv_in)"
    context = _dim(state, "unet.middle_block.1.transformer_blocks.0.attn2.to_k.weight", 1)
    proj_in = state.get("unet.middle_block.1.proj_in.weight")
    if context == 2048:
        return "SDXL", "its UNet attends to 2048-wide text features"
    if context == 1024:
        return "SD2.x", "its UNet attends to 1024-wide text features"
    if proj_in is not None and proj_in.ndim == 2:
        return "SD2.x", "its UNet transformers project in with Linear layers"
    if _dim(state, "unet.input_blocks.0.0.weight", 1) == 9:
        return "SD1.x inpainting", "its UNet takes 9 input channels (latents, mask, masked image)"
    return "SD1.x", "UNet, VAE and CLIP text encoder of Stable Diffusion 1.x"


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

    def count(pattern: str) -> int:
        n = len(_levels(state, pattern))
        if not n:
            raise _Unreadable(f"no tensor matches {pattern}")
        return n

    conv_in = "unet.input_blocks.0.0.weight"
    vae_in = "vae.encoder.conv_in.weight"
    token_embedding = "text_encoder.embeddings.token_embedding.weight"
    return {
        "unet": {
            "in_channels": lambda: dim(conv_in, 1),
            "out_channels": lambda: dim("unet.out.2.weight", 0),
            "model_channels": lambda: dim(conv_in, 0),
            "channel_mult": lambda: multiples(
                [f"unet.input_blocks.{i}.0.out_layers.3.weight" for i in unet_levels()[0]], dim(conv_in, 0)),
            "num_res_blocks": lambda: unet_levels()[1],
            "attention_resolutions": attention_resolutions,
            "transformer_depth": lambda: count(r"unet\.middle_block\.1\.transformer_blocks\.(\d+)\."),
            "context_dim": lambda: dim("unet.middle_block.1.transformer_blocks.0.attn2.to_k.weight", 1),
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
        "text": {
            "vocab_size": lambda: dim(token_embedding, 0),
            "hidden_size": lambda: dim(token_embedding, 1),
            "num_hidden_layers": lambda: count(r"text_encoder\.encoder\.layers\.(\d+)\."),
            "intermediate_size": lambda: dim("text_encoder.encoder.layers.0.mlp.fc1.weight", 0),
            "max_position_embeddings": lambda: dim("text_encoder.embeddings.position_embedding.weight", 0),
        },
    }


def shape_fields(state: dict[str, torch.Tensor]) -> tuple[dict[str, dict], dict[str, str]]:
    """The config fields the tensors' shapes determine, {part: {field: value}}, and for those they cannot give,
    {"part.field": why}."""
    fields, unreadable = {}, {}
    for part, readers in _shape_readers(state).items():
        fields[part] = {}
        for name, read in readers.items():
            try:
                fields[part][name] = read()
            except _Unreadable as e:
                unreadable[f"{part}.{name}"] = str(e)
    return fields, unreadable


def infer_config(state: dict[str, torch.Tensor]) -> ModelConfig:
    """The config whose model has these tensors' shapes. What shapes cannot tell (attention heads, GroupNorm groups,
    latent scaling) takes the SD1.x value."""
    fields, unreadable = shape_fields(state)
    if unreadable:
        raise CheckpointError(f"cannot infer the model config: {next(iter(unreadable.values()))}")
    hidden = fields["text"]["hidden_size"]
    # CLIP ViT-L/14 has 12 heads of 64; other CLIP text towers keep heads of 64.
    fields["text"]["num_attention_heads"] = 12 if hidden == 768 else max(1, hidden // 64)
    try:
        return ModelConfig.from_dict(fields)
    except ValueError as e:
        raise CheckpointError(f"the model config inferred from the tensor shapes is not valid: {e}") from None


def config_mismatches(config: ModelConfig, state: dict[str, torch.Tensor]) -> list[str]:
    """Each field the tensors' shapes determine on which `config` disagrees with them, as "part.field: config X,
    tensors Y". A config that passes describes a model no larger than the file's."""
    fields, _ = shape_fields(state)
    out = []
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


def config_from_diffusers(configs: dict[str, dict]) -> ModelConfig:
    """ModelConfig from a diffusers folder's unet/, vae/ and text_encoder/ config.json files. Each entry read is
    checked before any arithmetic is done with it."""
    for part, source in configs.items():
        if not isinstance(source, dict):
            raise CheckpointError(f"{part}/config.json must hold a JSON object; it holds {type(source).__name__}")

    def get(part: str, key: str, kind: str, default=None):
        """configs[part][key] (or the default, if given, when absent), which must be of `kind`."""
        if key not in configs[part] and default is not None:
            return default
        if key not in configs[part]:
            raise CheckpointError(f"{part}/config.json has no {key!r}")
        value = configs[part][key]
        if not _DIFFUSERS_KINDS[kind][1](value):
            raise CheckpointError(f"{part}/config.json: {key} must be {_DIFFUSERS_KINDS[kind][0]}; "
                                  f"got {repr(value)[:60]}")
        return value

    def first(part: str, key: str, default=None) -> int:
        """An int, or the first of a per-level list (SDXL-style configs)."""
        if isinstance(configs[part].get(key), (list, tuple)):
            return get(part, key, "ints")[0]
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
    # SD1.x's diffusers config names its head count attention_head_dim, a known misnomer kept for compatibility.
    heads = "num_attention_heads" if configs["unet"].get("num_attention_heads") else "attention_head_dim"
    unet = dict(
        in_channels=get("unet", "in_channels", "int"),
        out_channels=get("unet", "out_channels", "int"),
        model_channels=mc,
        channel_mult=channel_mult,
        num_res_blocks=get("unet", "layers_per_block", "int"),
        attention_resolutions=tuple(2**i for i, b in reversed(list(enumerate(down_blocks))) if b.startswith("CrossAttn")),
        num_heads=first("unet", heads),
        transformer_depth=first("unet", "transformer_layers_per_block", 1),
        context_dim=get("unet", "cross_attention_dim", "int"),
        norm_groups=get("unet", "norm_num_groups", "int", 32),
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
    )
    # The text encoder's config.json uses the engine's field names; from_dict checks them.
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings", "hidden_act", "layer_norm_eps")
    text = {k: configs["text_encoder"][k] for k in keys if k in configs["text_encoder"]}
    try:
        return ModelConfig.from_dict({"unet": unet, "vae": vae, "text": text})
    except ValueError as e:
        raise CheckpointError(f"the diffusers config.json files describe an unsupported model: {e}") from None


def _positive(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


# What config_from_diffusers accepts for each kind of entry: (description, test).
_DIFFUSERS_KINDS = {
    "int": ("a positive integer", _positive),
    # Lists in config.json; tuples in a config diffusers holds in memory.
    "ints": ("a non-empty list of positive integers",
             lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(map(_positive, v))),
    "strs": ("a list of strings", lambda v: isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v)),
    "number": ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
}
