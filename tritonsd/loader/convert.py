"""Tensor names of the formats people have, mapped onto the engine's.

The engine's names are the original CompVis checkpoint's under three prefixes, so an original single file maps by
prefix alone, except the OpenCLIP text towers (SD 2.x's, SDXL's ViT-bigG), which original files keep in OpenCLIP's
layout. That layout and diffusers' rename blocks and count them differently; their mappings are tables of rules, each
a block pattern whose indices are rewritten by a little arithmetic, plus the renamed leaf modules inside such a block.
"""

import re
from collections.abc import Callable

import torch

from tritonsd.loader.formats import TEXT_PARTS, tower_folders

# Each part's prefix in an original SD 1.x/2.x checkpoint: the one place that knows them. The text encoder's names
# come in two forms; files are written with the first, and both are read.
ORIGINAL_PREFIXES = {
    "unet": ("model.diffusion_model.",),
    "vae": ("first_stage_model.",),
    # The second: older files, written before transformers' CLIPTextModel had text_model.
    "text_encoder": ("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."),
}

# SD 2.x's text tower in OpenCLIP's layout.
OPEN_CLIP_PREFIX = "cond_stage_model.model."

# SDXL's text towers, sgm's conditioner embedders, by family: {engine part: (prefix, OpenCLIP layout?)}. CLIP ViT-L
# keeps transformers' names; OpenCLIP ViT-bigG is in OpenCLIP's layout. The refiner has bigG alone, as embedder 0.
SDXL_TOWERS = {
    "SDXL": {"text_encoder": ("conditioner.embedders.0.transformer.text_model.", False),
             "text_encoder_2": ("conditioner.embedders.1.model.", True)},
    "SDXL refiner": {"text_encoder": ("conditioner.embedders.0.model.", True)},
}

# OpenCLIP towers by prefix: (engine part, whole). SD 2.x runs its tower up to the penultimate block (layer=
# "penultimate" in its YAML) and never its text_projection, so both are left out; SDXL takes the penultimate layer's
# states too, but runs every block for the pooled embedding, which text_projection makes.
_OPEN_CLIP_TOWERS = {OPEN_CLIP_PREFIX: ("text_encoder", False)} | {
    prefix: (part, True) for towers in SDXL_TOWERS.values() for part, (prefix, open_clip) in towers.items() if open_clip}
# Parts mapped by prefix alone: {prefix: engine part}, the longer of two nested prefixes first.
_BY_PREFIX = dict(sorted(
    [(prefix, part) for part, prefixes in ORIGINAL_PREFIXES.items() for prefix in prefixes]
    + [(prefix, part) for towers in SDXL_TOWERS.values() for part, (prefix, open_clip) in towers.items()
       if not open_clip], key=lambda item: -len(item[0])))

# Entries that are not weights of the networks: EMA copies, the training noise schedule at top level, the VAE's
# training loss, CLIP's position_ids (an arange, rebuilt by the engine), ComfyUI's v_pred marker (read as metadata).
IGNORED = re.compile(
    rf"model_ema\..*|{re.escape(ORIGINAL_PREFIXES['vae'][0])}loss\..*|.*position_ids|v_pred"
    r"|betas|alphas_cumprod(_prev)?|sqrt_\w+|log_one_minus_alphas_cumprod|posterior_\w+|logvar"
)


def _engine_name(key: str) -> str:
    for prefix, part in _BY_PREFIX.items():
        if key.startswith(prefix):
            return f"{part}.{key[len(prefix):]}"
    return key


def from_original(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original single-file names -> engine names. Unknown names pass through, to be reported as unexpected."""
    state, open_clip = {}, {prefix: {} for prefix in _OPEN_CLIP_TOWERS}
    for key, t in raw.items():
        if IGNORED.fullmatch(key):
            continue
        prefix = next((p for p in _OPEN_CLIP_TOWERS if key.startswith(p)), None)
        if prefix is not None:
            open_clip[prefix][key[len(prefix):]] = t
        else:
            state[_engine_name(key)] = t
    for prefix, tower in open_clip.items():
        part, whole = _OPEN_CLIP_TOWERS[prefix]
        state.update((f"{part}.{k}", t) for k, t in from_open_clip(tower, whole).items())
    return state


def to_original(state: dict[str, torch.Tensor], old_text_names: bool = False) -> dict[str, torch.Tensor]:
    """Engine names -> an original single file's: SDXL's towers (a second tower, or a first with text_projection:
    the refiner's) where its files keep them, bigG in OpenCLIP's layout; SD 1.x's and 2.x's tower in transformers'
    names. old_text_names writes those as files before text_model. had them."""
    if any(k.startswith("text_encoder_2.") for k in state):
        towers = SDXL_TOWERS["SDXL"]
    elif "text_encoder.text_projection.weight" in state:
        towers = SDXL_TOWERS["SDXL refiner"]
    else:
        towers = {"text_encoder": (ORIGINAL_PREFIXES["text_encoder"][-1 if old_text_names else 0], False)}
    out, open_clip = {}, {}
    for name, t in state.items():
        part, rest = name.split(".", 1)
        prefix, in_open_clip = towers.get(part) or (ORIGINAL_PREFIXES[part][0], False)
        if in_open_clip:
            open_clip.setdefault(prefix, {})[rest] = t
        else:
            out[prefix + rest] = t
    for prefix, tower in open_clip.items():
        out.update((prefix + k, t) for k, t in to_open_clip(tower).items())
    return out


# Leaf modules that diffusers renames inside a block; everything else in a block keeps its name.
UNET_RESNET = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
OPEN_CLIP_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                   "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
VAE_ATTENTION = {  # current diffusers names, then the older ones
    "group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
    "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out",
}

Rule = tuple[str, Callable[..., str], dict[str, str]]


def unet_rules(res_blocks: int, up_attention: set[int]) -> list[Rule]:
    """Diffusers groups the UNet by level (down_blocks.i.resnets.j); the original numbers its steps in one sequence:
    input_blocks.0 is conv_in, then each level's res_blocks steps and a downsampler; each up level has one step more."""
    r = res_blocks
    return [
        (r"conv_in", lambda: "input_blocks.0.0", {}),
        (r"time_embedding\.linear_(\d)", lambda n: f"time_embed.{2 * (n - 1)}", {}),
        # SDXL's size and pooled-text conditioning, added to the timestep embedding the same way.
        (r"add_embedding\.linear_(\d)", lambda n: f"label_emb.0.{2 * (n - 1)}", {}),
        (r"down_blocks\.(\d+)\.resnets\.(\d+)", lambda i, j: f"input_blocks.{1 + i * (r + 1) + j}.0", UNET_RESNET),
        (r"down_blocks\.(\d+)\.attentions\.(\d+)", lambda i, j: f"input_blocks.{1 + i * (r + 1) + j}.1", {}),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv", lambda i: f"input_blocks.{(i + 1) * (r + 1)}.0.op", {}),
        (r"mid_block\.resnets\.(\d)", lambda j: f"middle_block.{2 * j}", UNET_RESNET),
        (r"mid_block\.attentions\.0", lambda: "middle_block.1", {}),
        (r"up_blocks\.(\d+)\.resnets\.(\d+)", lambda i, j: f"output_blocks.{i * (r + 1) + j}.0", UNET_RESNET),
        (r"up_blocks\.(\d+)\.attentions\.(\d+)", lambda i, j: f"output_blocks.{i * (r + 1) + j}.1", {}),
        # The upsampler shares the level's last step, after its attention if it has one.
        (r"up_blocks\.(\d+)\.upsamplers\.0",
         lambda i: f"output_blocks.{i * (r + 1) + r}.{2 if i in up_attention else 1}", {}),
        (r"conv_norm_out", lambda: "out.0", {}),
        (r"conv_out", lambda: "out.2", {}),
    ]


def vae_rules(levels: int) -> list[Rule]:
    """The decoder's levels run the other way round in diffusers: up_blocks.0 is the smallest resolution."""
    return [
        (r"(encoder|decoder)\.conv_norm_out", lambda part: f"{part}.norm_out", {}),
        (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)", lambda i, j: f"encoder.down.{i}.block.{j}", VAE_RESNET),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", lambda i: f"encoder.down.{i}.downsample", {}),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)", lambda i, j: f"decoder.up.{levels - 1 - i}.block.{j}", VAE_RESNET),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0", lambda i: f"decoder.up.{levels - 1 - i}.upsample", {}),
        (r"(encoder|decoder)\.mid_block\.resnets\.(\d)", lambda part, j: f"{part}.mid.block_{j + 1}", VAE_RESNET),
        (r"(encoder|decoder)\.mid_block\.attentions\.0", lambda part: f"{part}.mid.attn_1", VAE_ATTENTION),
    ]


OPEN_CLIP_RULES: list[Rule] = [
    (r"transformer\.resblocks\.(\d+)", lambda i: f"encoder.layers.{i}", OPEN_CLIP_BLOCK),
    (r"token_embedding", lambda: "embeddings.token_embedding", {}),
    (r"ln_final", lambda: "final_layer_norm", {}),
]
# The way back, for writing original files.
TO_OPEN_CLIP_RULES: list[Rule] = [
    (r"encoder\.layers\.(\d+)", lambda i: f"transformer.resblocks.{i}", {v: k for k, v in OPEN_CLIP_BLOCK.items()}),
    (r"embeddings\.token_embedding", lambda: "token_embedding", {}),
    (r"final_layer_norm", lambda: "ln_final", {}),
]


def from_open_clip(text: dict[str, torch.Tensor], whole: bool = False) -> dict[str, torch.Tensor]:
    """An OpenCLIP text tower (names after its prefix) -> the engine's text-encoder names. whole: every block and
    text_projection (SDXL); otherwise as SD 2.x runs it, without its last block and text_projection. logit_scale
    (CLIP's contrastive temperature) is never used. Each block's packed attention input projection (in_proj_weight/
    bias: q, k, v stacked) becomes three; text_projection, applied as x @ P, becomes a Linear weight, P transposed."""
    last = max((int(m[1]) for k in text if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))), default=-1)
    state = {}
    for key, t in text.items():
        if key == "logit_scale" or not whole and (key == "text_projection"
                                                  or key.startswith(f"transformer.resblocks.{last}.")):
            continue
        if key == "positional_embedding":
            state["embeddings.position_embedding.weight"] = t
        elif key == "text_projection":
            state["text_projection.weight"] = t.T.contiguous()
        elif m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", key):
            for name, part in zip(("q_proj", "k_proj", "v_proj"), t.chunk(3)):
                # Copies, so no two weights share storage (a saved file may not have them share).
                state[f"encoder.layers.{m[1]}.self_attn.{name}.{m[2]}"] = part.clone()
        else:
            state[_rename(key, OPEN_CLIP_RULES)] = t
    return state


def to_open_clip(text: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Engine text-encoder names (after text_encoder.) -> OpenCLIP's, every block kept: from_open_clip(..., whole=True)
    reversed."""
    out = {}
    for key, t in text.items():
        if key == "embeddings.position_embedding.weight":
            out["positional_embedding"] = t
        elif key == "text_projection.weight":
            out["text_projection"] = t.T.contiguous()
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", key):
            layer = f"encoder.layers.{m[1]}.self_attn"
            out[f"transformer.resblocks.{m[1]}.attn.in_proj_{m[2]}"] = torch.cat(
                [text[f"{layer}.{p}_proj.{m[2]}"] for p in "qkv"])
        elif not re.fullmatch(r"encoder\.layers\.\d+\.self_attn\.[kv]_proj\.\w+", key):
            out[_rename(key, TO_OPEN_CLIP_RULES)] = t
    return out


def _rename(key: str, rules: list[Rule]) -> str:
    for pattern, target, leaves in rules:
        m = re.fullmatch(pattern + r"\.(?:(.+)\.)?(\w+)", key)
        if m:
            *indices, module, param = m.groups()
            block = target(*(int(i) if i.isdigit() else i for i in indices))
            return ".".join(filter(None, (block, leaves.get(module, module), param)))
    return key


def _count(keys, pattern: str) -> int:
    """How many distinct indices the (\\d+) in pattern takes among keys."""
    return len({m.group(1) for k in keys if (m := re.match(pattern, k))})


def from_diffusers(parts: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{unet, vae, text_encoder and/or text_encoder_2: diffusers/transformers names} -> engine names. An SDXL
    refiner's folder has text_encoder_2 alone, which is the engine's text_encoder. Block counts are read off the
    keys; unknown names pass through under their part's prefix, to be reported as unexpected."""
    unet, vae = parts["unet"], parts["vae"]
    res_blocks = _count(unet, r"down_blocks\.0\.resnets\.(\d+)\.")
    up_attention = {int(m.group(1)) for k in unet if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    rules = unet_rules(res_blocks, up_attention)
    state = {f"unet.{_rename(k, rules)}": t for k, t in unet.items()}

    state.update(vae_from_diffusers(vae))

    for folder, part in zip(tower_folders(parts), TEXT_PARTS):
        # transformers writes CLIPTextModel with or without the text_model. prefix, depending on its version.
        for k, t in parts[folder].items():
            if not IGNORED.fullmatch(k):
                state[f"{part}.{k.removeprefix('text_model.')}"] = t
    return state


def vae_from_diffusers(vae: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL's tensors -> engine names (vae.*)."""
    state = {}
    rules = vae_rules(_count(vae, r"decoder\.up_blocks\.(\d+)\."))
    for k, t in vae.items():
        k = _rename(k, rules)
        # Diffusers stores the VAE attention projections as Linear weights; the original has 1x1 convolutions.
        if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", k) and t.ndim == 2:
            t = t[:, :, None, None]
        state[f"vae.{k}"] = t
    return state
