"""The original CompVis model config (v1-inference.yaml and its kin), which AUTOMATIC1111 reads from NAME.yaml beside
NAME.ckpt: a small, strict reader for the YAML these files use, and its mapping onto ModelConfig.

The reader takes block mappings and sequences (a sequence's items may be mappings), flow sequences, plain, single-
and double-quoted scalars resolved as PyYAML's safe_load resolves them (YAML 1.1: `True`, `yes`, `1.0e-04`, `~`),
and comments. Anything else (anchors, tags, flow mappings, multi-line strings, several documents, tabs) is refused
with its line number, rather than read differently from PyYAML.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from tritonsd.engine.config import ModelConfig

_BOOL = {v: b for b, vs in ((True, "true True TRUE yes Yes YES on On ON"), (False, "false False FALSE no No NO off Off OFF"))
         for v in vs.split()}
_NULL = {"~", "null", "Null", "NULL", ""}
_INT = re.compile(r"[-+]?(0|[1-9][0-9_]*)")
_FLOAT = re.compile(r"[-+]?[0-9][0-9_]*\.[0-9_]*([eE][-+][0-9]+)?|\.[0-9_]+([eE][-+][0-9]+)?")
_INF = re.compile(r"([-+]?)\.(inf|Inf|INF)")
_NAN = re.compile(r"\.(nan|NaN|NAN)")
# Plain scalars PyYAML would read as something this reader does not implement (octal, hex, sexagesimal, dates).
_EXOTIC = re.compile(r"[-+]?0[0-7_]+|[-+]?0[xXbBoO][0-9a-fA-F_]+|[-+]?[0-9][0-9_]*(:[0-5]?[0-9])+(\.[0-9_]*)?"
                     r"|[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}.*|[-+]?\.(inf|Inf|INF|nan|NaN|NAN)|=|<<")


class YAMLError(ValueError):
    pass


def _strip_comment(line: str) -> str:
    quote = None
    for i, c in enumerate(line):
        if quote:
            if c == quote and not (quote == '"' and line[i - 1] == "\\"):
                quote = None
        elif c in "'\"" and (i == 0 or line[i - 1] in " [,:-"):
            quote = c
        elif c == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i].rstrip()
    return line.rstrip()


def _scalar(text: str, lineno: int):
    text = text.strip()
    if text.startswith('"'):
        if not text.endswith('"') or len(text) < 2:
            raise YAMLError(f"line {lineno}: unterminated double-quoted string")
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            raise YAMLError(f"line {lineno}: unsupported escape in {text}") from None
    if text.startswith("'"):
        if not text.endswith("'") or len(text) < 2:
            raise YAMLError(f"line {lineno}: unterminated single-quoted string")
        return text[1:-1].replace("''", "'")
    if text[:1] in ("&", "*", "!", "|", ">", "{", "%", "@", "`") or text.startswith("---"):
        raise YAMLError(f"line {lineno}: {text[:20]!r}: anchors, tags, block strings and flow mappings are not supported")
    if text in _NULL:
        return None
    if text in _BOOL:
        return _BOOL[text]
    if m := _INF.fullmatch(text):
        return -math.inf if m.group(1) == "-" else math.inf
    if _NAN.fullmatch(text):
        return math.nan
    if _INT.fullmatch(text):
        return int(text.replace("_", ""))
    if _FLOAT.fullmatch(text):
        return float(text.replace("_", ""))
    if _EXOTIC.fullmatch(text):
        raise YAMLError(f"line {lineno}: {text!r}: this number or date form is not supported")
    if ": " in text or text.endswith(":"):
        raise YAMLError(f"line {lineno}: {text!r}: a colon in a plain value (quote it)")
    return text


def _flow(text: str, lineno: int):
    """A flow sequence: [a, "b", [c]]."""
    items, stack, token, quote = None, [], "", None

    def flush():
        nonlocal token
        if token.strip():
            stack[-1].append(_scalar(token, lineno))
        token = ""

    for c in text:
        if quote:
            token += c
            if c == quote:
                quote = None
        elif c in "'\"":
            quote, token = c, token + c
        elif c == "[":
            if token.strip():
                raise YAMLError(f"line {lineno}: unexpected [ in {text}")
            stack.append([])
        elif c in ",]":
            if not stack:
                raise YAMLError(f"line {lineno}: unbalanced ] in {text}")
            flush()
            if c == "]":
                done = stack.pop()
                if stack:
                    stack[-1].append(done)
                else:
                    items = done
        elif c in "{}":
            raise YAMLError(f"line {lineno}: flow mappings are not supported: {text}")
        elif items is not None and not c.isspace():
            raise YAMLError(f"line {lineno}: text after the closing ] in {text}")
        else:
            token += c
    if stack or items is None or quote:
        raise YAMLError(f"line {lineno}: unterminated flow sequence {text}")
    return items


def _value(text: str, lineno: int):
    return _flow(text, lineno) if text.startswith("[") else _scalar(text, lineno)


def _key_value(content: str, lineno: int) -> tuple[str, str] | None:
    """Split `key: value` (or `key:`); None if the line is not a mapping entry."""
    m = re.match(r"""("(?:[^"\\]|\\.)*"|'(?:[^']|'')*'|[^'"\[\]{},#&*!|>%@`][^:#]*?)\s*:(?:\s+(.*))?$""", content)
    if not m:
        return None
    key = _scalar(m.group(1), lineno)
    if not isinstance(key, str):
        raise YAMLError(f"line {lineno}: only string keys are supported, got {m.group(1)!r}")
    return key, (m.group(2) or "")


class _Parser:
    def __init__(self, text: str):
        self.lines = []
        for lineno, raw in enumerate(text.splitlines(), 1):
            indent = len(raw) - len(raw.lstrip(" "))
            if raw[indent:indent + 1] == "\t":
                raise YAMLError(f"line {lineno}: tabs are not allowed for indentation")
            content = _strip_comment(raw[indent:])
            if content in ("---", "...") and not self.lines:
                continue
            if content in ("---", "..."):
                raise YAMLError(f"line {lineno}: several documents in one file are not supported")
            if content:
                self.lines.append((lineno, indent, content))
        self.i = 0

    def parse(self):
        if not self.lines:
            return None
        value = self.block(self.lines[0][1])
        if self.i != len(self.lines):
            lineno, _, content = self.lines[self.i]
            raise YAMLError(f"line {lineno}: unexpected indentation at {content!r}")
        return value

    def block(self, indent: int):
        lineno, _, content = self.lines[self.i]
        if content == "-" or content.startswith("- "):
            return self.sequence(indent)
        if _key_value(content, lineno) is None:
            if self.i + 1 < len(self.lines) and self.lines[self.i + 1][1] > indent:
                raise YAMLError(f"line {lineno}: {content!r} is neither `key: value` nor `- item`")
            self.i += 1
            return _value(content, lineno)
        return self.mapping(indent)

    def nested(self, indent: int, lineno: int, sequence_at_same_indent: bool):
        """The block under a `key:` or `-` with nothing after it."""
        if self.i < len(self.lines):
            _, next_indent, content = self.lines[self.i]
            if next_indent > indent:
                return self.block(next_indent)
            if sequence_at_same_indent and next_indent == indent and (content == "-" or content.startswith("- ")):
                return self.sequence(indent)
        return None

    def mapping(self, indent: int) -> dict:
        out = {}
        while self.i < len(self.lines):
            lineno, line_indent, content = self.lines[self.i]
            if line_indent < indent:
                break
            if line_indent > indent:
                raise YAMLError(f"line {lineno}: unexpected indentation at {content!r}")
            if content == "-" or content.startswith("- "):
                break
            entry = _key_value(content, lineno)
            if entry is None:
                raise YAMLError(f"line {lineno}: expected `key: value`, got {content!r}")
            key, rest = entry
            if key in out:
                raise YAMLError(f"line {lineno}: key {key!r} appears twice")
            self.i += 1
            out[key] = _value(rest, lineno) if rest else self.nested(indent, lineno, True)
        return out

    def sequence(self, indent: int) -> list:
        out = []
        while self.i < len(self.lines):
            lineno, line_indent, content = self.lines[self.i]
            if line_indent != indent or not (content == "-" or content.startswith("- ")):
                if line_indent > indent:
                    raise YAMLError(f"line {lineno}: unexpected indentation at {content!r}")
                break
            item = content[1:].lstrip()
            if not item:
                self.i += 1
                out.append(self.nested(indent, lineno, False))
            elif item.startswith("- ") or _key_value(item, lineno) is not None:
                # The item's own block starts on this line, at the column of its text.
                self.lines[self.i] = (lineno, indent + len(content) - len(item), item)
                out.append(self.block(indent + len(content) - len(item)))
            else:
                self.i += 1
                out.append(_value(item, lineno))
        return out


def parse_yaml(text: str):
    """The YAML document in text, as PyYAML's safe_load reads it, for the subset described above."""
    return _Parser(text).parse()


# --- CompVis config -> ModelConfig ---------------------------------------------------------------------------------

UNET_FIELDS = ("in_channels", "out_channels", "model_channels", "attention_resolutions", "num_res_blocks",
               "channel_mult", "num_heads", "num_head_channels", "transformer_depth", "context_dim",
               "use_linear_in_transformer", "adm_in_channels")
VAE_FIELDS = ("in_channels", "out_ch", "ch", "ch_mult", "num_res_blocks", "z_channels")
# Parameters that do not change the graph: training and memory switches, and values the engine's graph has.
UNET_NEUTRAL = {"image_size": None, "use_checkpoint": None, "use_fp16": None, "legacy": None, "dropout": None,
                "use_spatial_transformer": True, "dims": 2, "conv_resample": True, "use_scale_shift_norm": False, "resblock_updown": False,
                "num_heads_upsample": -1, "use_new_attention_order": False, "num_classes": None, "n_embed": None,
                "spatial_transformer_attn_type": None}
# xformers' attention is the same attention, run by another library.
DDCONFIG_NEUTRAL = {"double_z": True, "resolution": None, "dropout": None, "attn_resolutions": [],
                    "attn_type": None}
ATTENTION_TYPES = ("vanilla", "vanilla-xformers")
# The text towers a CompVis config can name, and the text config fields each one fixes (its sizes come from base).
TEXT_ENCODERS = {
    "ldm.modules.encoders.modules.FrozenCLIPEmbedder": dict(hidden_act="quick_gelu", pad_token="<|endoftext|>"),
    # SD 2.x: OpenCLIP ViT-H/14 up to its penultimate block, the only `layer` its configs use.
    "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder": dict(hidden_act="gelu", pad_token="!"),
}
PARAMETERIZATIONS = {"eps": "epsilon", "v": "v_prediction"}

# sgm's configs (SDXL): the UNet under network_config, what it predicts in the denoiser's scaling, and the text towers
# and size/aesthetic embedders under conditioner_config, each embedder reading one input key.
SGM_SCALINGS = {"sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling": "epsilon",
                "sgm.modules.diffusionmodules.denoiser_scaling.VScaling": "v_prediction"}
SGM_TEXT_ENCODERS = ("sgm.modules.encoders.modules.FrozenCLIPEmbedder",
                     "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2")
SGM_CONDITIONING = {("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple"): "size",
                    ("original_size_as_tuple", "crop_coords_top_left", "aesthetic_score"): "aesthetic"}


def _params(d, *path: str) -> dict:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            raise ValueError(f"CompVis config has no {'.'.join(path)}")
        d = d[key]
    if not isinstance(d, dict):
        raise ValueError(f"CompVis config's {'.'.join(path)} is not a mapping")
    return d


def _take(params: dict, fields, neutral: dict, where: str) -> dict:
    out = {}
    for key, value in params.items():
        if key in fields:
            out[key] = value
        elif key not in neutral:
            raise ValueError(f"CompVis config: {where}.{key} is not supported by tritonsd's graph")
        elif neutral[key] is not None and value != neutral[key]:
            raise ValueError(f"CompVis config: {where}.{key}: {value!r} is not supported (only {neutral[key]!r}); "
                             "tritonsd runs SD 1.x, 2.x and SDXL models")
    return out


def _vae(model: dict) -> dict:
    first = _params(model, "first_stage_config", "params")
    ddconfig = _params(first, "ddconfig")
    if ddconfig.get("attn_type", "vanilla") not in ATTENTION_TYPES:
        raise ValueError(f"CompVis config: first_stage_config.params.ddconfig.attn_type {ddconfig['attn_type']!r} is not "
                         f"supported ({', '.join(ATTENTION_TYPES)})")
    vae = _take(ddconfig, VAE_FIELDS, DDCONFIG_NEUTRAL, "first_stage_config.params.ddconfig")
    if "embed_dim" in first:
        vae["embed_dim"] = first["embed_dim"]
    if "scale_factor" in model:
        vae["scaling_factor"] = model["scale_factor"]
    return vae


def _unet(params: dict, where: str) -> dict:
    unet = _take(params, UNET_FIELDS, UNET_NEUTRAL, where)
    # Heads are a count or a width; the one a config gives makes the other -1, as in the CompVis code's defaults.
    if unet.get("num_head_channels", -1) != -1:
        unet.setdefault("num_heads", -1)
    elif "num_heads" in unet:
        unet.setdefault("num_head_channels", -1)
    return unet


def _sgm(model: dict, base: ModelConfig) -> ModelConfig:
    """An sgm config (SDXL base or refiner) over base, which gives the text towers' sizes: the conditioner must name
    as many towers, at their penultimate layer, and the conditioning base's label_emb takes."""
    unet = _unet(_params(model, "network_config", "params"), "network_config.params")
    scaling = (_params(model, "denoiser_config", "params").get("scaling_config") or {}).get("target") \
        if "denoiser_config" in model else "sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling"
    if scaling not in SGM_SCALINGS:
        raise ValueError(f"CompVis config: denoiser scaling {scaling} is not supported ({', '.join(SGM_SCALINGS)})")
    embedders = _params(model, "conditioner_config", "params").get("emb_models")
    if not isinstance(embedders, list) or not all(isinstance(e, dict) for e in embedders):
        raise ValueError("CompVis config: conditioner_config.params.emb_models is not a list of embedders")
    towers = [e for e in embedders if e.get("input_key") == "txt"]
    for tower in towers:
        params = tower.get("params") or {}
        penultimate = params.get("layer") == "penultimate" or (params.get("layer") == "hidden"
                                                               and params.get("layer_idx") in (11, -2))
        if tower.get("target") not in SGM_TEXT_ENCODERS or not penultimate:
            raise ValueError(f"CompVis config: text embedder {tower.get('target')} at layer {params.get('layer')!r} "
                             "is not supported (SDXL's CLIP and OpenCLIP towers at their penultimate layer)")
    conditioning = SGM_CONDITIONING.get(tuple(e.get("input_key") for e in embedders if e.get("input_key") != "txt"))
    if len(towers) != len(base.towers) or conditioning != base.conditioning:
        raise ValueError(f"CompVis config: its conditioner ({len(towers)} text tower(s), conditioning {conditioning}) "
                         f"does not describe this model ({len(base.towers)} text tower(s), conditioning "
                         f"{base.conditioning})")
    parts = base.to_dict()
    parts["unet"].update(unet)
    parts["vae"].update(_vae(model))
    parts["prediction_type"] = SGM_SCALINGS[scaling]
    return ModelConfig.from_dict(parts)


def config_from_compvis(d, base: ModelConfig | None = None) -> ModelConfig:
    """ModelConfig from a parsed CompVis config (model.params.unet_config.params, first_stage_config.params.ddconfig,
    cond_stage_config, scale_factor, parameterization), or from an SDXL one of Stability's sgm code (network_config,
    conditioner_config, denoiser_config). What it does not say (GroupNorm groups; the text encoder's sizes, which it
    names only as a tower; the default image size: its image_size is the training crop, 64 even in SD 2.x's 768-v
    config) comes from base: SD 1.x's values, or those a checkpoint's shapes imply."""
    model = _params(d, "model", "params")
    if "network_config" in model:
        return _sgm(model, base or ModelConfig())
    parameterization = model.get("parameterization", "eps")
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"CompVis config: parameterization {parameterization!r} is not supported "
                         f"({', '.join(PARAMETERIZATIONS)})")
    unet = _unet(_params(d, "model", "params", "unet_config", "params"), "unet_config.params")
    vae = _vae(model)
    text = model.get("cond_stage_config", {})
    target = text.get("target") if isinstance(text, dict) else None
    if target is not None and target not in TEXT_ENCODERS:
        raise ValueError(f"CompVis config: text encoder {target} is not supported (CLIP ViT-L/14's "
                         "FrozenCLIPEmbedder or OpenCLIP's FrozenOpenCLIPEmbedder)")
    layer = (text.get("params") or {}).get("layer", "penultimate") if target in TEXT_ENCODERS and "Open" in target else None
    if layer not in (None, "penultimate"):
        raise ValueError(f"CompVis config: the OpenCLIP text tower's layer {layer!r} is not supported (penultimate)")
    parts = (base or ModelConfig()).to_dict()
    parts["unet"].update(unet)
    parts["vae"].update(vae)
    parts["text"].update(TEXT_ENCODERS.get(target, {}))
    parts["prediction_type"] = PARAMETERIZATIONS[parameterization]
    return ModelConfig.from_dict(parts)


def read_compvis_config(path, base: ModelConfig | None = None) -> ModelConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read model config {path}: {e}") from None
    try:
        return config_from_compvis(parse_yaml(text), base)
    except ValueError as e:
        raise ValueError(f"model config {path}: {e}") from None
