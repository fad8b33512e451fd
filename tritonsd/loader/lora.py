"""LoRA and LyCORIS files: reading them, naming the engine weight each layer patches, and each layer's ΔW.

Formats (told apart by their tensor names):
- kohya-ss / AUTOMATIC1111: `lora_unet_<module path with _>.lora_down.weight / .lora_up.weight / .alpha` and
  `lora_te_…` for the text encoder (SDXL: `lora_te1_…` CLIP ViT-L, `lora_te2_…` OpenCLIP ViT-bigG), with
  diffusers-style (`down_blocks_0_attentions_0_…`) or CompVis-style (`input_blocks_4_1_…`, as most SDXL LoRAs have)
  module paths; linear and convolution layers (LoCon, with its optional `lora_mid` core);
- LyCORIS LoHa (`hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b[, hada_t1, hada_t2]`) and LoKr
  (`lokr_w1 | lokr_w1_a/b, lokr_w2 | lokr_w2_a/b[, lokr_t2]`) under the same module names;
- diffusers / PEFT: `unet.<diffusers module>.lora_A.weight / lora_B.weight` (or `.lora.down/.lora.up`), the older
  `….processor.to_q_lora.down.weight`, and `text_encoder.…` (SDXL: and `text_encoder_2.…`), with PEFT's alpha from
  diffusers' adapter metadata.

Scaling follows AUTOMATIC1111 and ComfyUI: ΔW = multiplier · (alpha / rank) · update, where the rank is the first
dimension of lora_down (hada_w1_b; for LoKr, lokr_w2_b's or else lokr_w1_b's) and a layer without alpha (or a LoKr
whose factors are both whole) takes 1 for alpha / rank.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tritonsd.engine.config import FAMILY_BY_CONTEXT, FAMILY_BY_TEXT_WIDTH
from tritonsd.loader.convert import unet_rules
from tritonsd.loader.formats import CheckpointError, read_file

LORA_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")

# Tensor names of one layer, by the kind of update they make.
KINDS = {
    "lora": {"lora_down.weight", "lora_up.weight", "lora_mid.weight"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"},
    "lokr": {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"},
}
# diffusers/PEFT leaf names -> kohya's.
PEFT_LEAVES = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
               "lora.down.weight": "lora_down.weight", "lora.up.weight": "lora_up.weight", "alpha": "alpha"}
# What other adapter files hold, named so the refusal says what the file is.
UNSUPPORTED = {
    "dora_scale": "DoRA (weight-decomposed LoRA)", "lora_magnitude_vector": "DoRA (weight-decomposed LoRA)",
    "diff": "a full weight difference (LyCORIS 'full')", "diff_b": "bias differences", "bias": "bias patches",
    "on_input": "(IA)^3", "oft_blocks": "OFT", "oft_diag": "OFT", "w_norm": "GLoRA", "a1.weight": "GLoRA",
}


@dataclass(frozen=True)
class Target:
    """Where a layer's ΔW goes: rows of an engine parameter (the engine joins q/k/v into one weight)."""

    param: str
    rows: slice
    shape: torch.Size


@dataclass(eq=False)
class Layer:
    """One patched layer: its factors as stored (float dtype of the file), and alpha / rank."""

    name: str
    target: Target
    kind: str
    factors: dict[str, torch.Tensor]
    scale: float

    def delta(self) -> torch.Tensor:
        """ΔW in float32, shaped like the target rows, without the multiplier."""
        f = {k: t.float() for k, t in self.factors.items()}
        if self.kind == "lora":
            up, down = f["lora_up.weight"].flatten(1), f["lora_down.weight"].flatten(1)
            if "lora_mid.weight" in f:  # LoCon's Tucker core: up [o, r], mid [r, r, k, k], down [r, i]
                update = torch.einsum("nmkl,in,mj->ijkl", f["lora_mid.weight"], up, down)
            else:
                update = up @ down
        elif self.kind == "loha":
            update = _hada(f, 1) * _hada(f, 2)
        else:
            w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
            if "lokr_w2" in f:
                w2 = f["lokr_w2"]
            elif "lokr_t2" in f:
                w2 = _tucker(f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
            else:
                w2 = f["lokr_w2_a"] @ f["lokr_w2_b"]
            if w2.ndim == 4:
                w1 = w1[:, :, None, None]
            update = torch.kron(w1.contiguous(), w2.contiguous())
        return update.reshape(self.target.shape) * self.scale


def _tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """LyCORIS' CP/Tucker rebuild: core t [r, r, k, k], wa [r, out], wb [r, in] -> [out, in, k, k]."""
    return torch.einsum("ijkl,jr,ip->prkl", t, wb, wa)


def _hada(f: dict, i: int) -> torch.Tensor:
    a, b = f[f"hada_w{i}_a"], f[f"hada_w{i}_b"]
    if f"hada_t{i}" in f:
        return _tucker(f[f"hada_t{i}"], a, b)
    return a @ b.flatten(1)


def _kron_factor(f: dict[str, torch.Tensor], i: int) -> tuple[int, ...]:
    """Shape of LoKr's Kronecker factor i, from its stored tensors' shapes."""
    if f"lokr_w{i}" in f:
        return tuple(f[f"lokr_w{i}"].shape)
    a, b = f[f"lokr_w{i}_a"], f[f"lokr_w{i}_b"]
    if f"lokr_t{i}" in f:
        t = f[f"lokr_t{i}"]
        if t.ndim != 4 or a.ndim != 2 or b.ndim != 2 or (t.shape[0], t.shape[1]) != (a.shape[0], b.shape[0]):
            raise ValueError(f"lokr_t{i} {list(t.shape)} does not fit lokr_w{i}_a {list(a.shape)} and _b {list(b.shape)}")
        return a.shape[1], b.shape[1], *t.shape[2:]
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"lokr_w{i}_a {list(a.shape)} and lokr_w{i}_b {list(b.shape)} do not multiply")
    return a.shape[0], b.shape[1]


def _update_shape(kind: str, f: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(rows, elements) of the update the factors make, from their shapes alone, so that a LoRA for another model
    is refused before anything is allocated."""
    if kind == "lora":
        up, down = f["lora_up.weight"].flatten(1), f["lora_down.weight"].flatten(1)
        if "lora_mid.weight" in f:
            mid = f["lora_mid.weight"]
            if mid.ndim != 4 or (mid.shape[0], mid.shape[1]) != (up.shape[1], down.shape[0]):
                raise ValueError(f"lora_mid {list(mid.shape)} does not fit lora_up {list(up.shape)} "
                                 f"and lora_down {list(down.shape)}")
            return up.shape[0], up.shape[0] * down.shape[1] * mid.shape[2] * mid.shape[3]
        if up.shape[1] != down.shape[0]:
            raise ValueError(f"lora_up {list(up.shape)} and lora_down {list(down.shape)} have different ranks")
        return up.shape[0], up.shape[0] * down.shape[1]
    if kind == "loha":
        shapes = []
        for i in (1, 2):
            a, b = f[f"hada_w{i}_a"], f[f"hada_w{i}_b"]
            if f"hada_t{i}" in f:
                t = f[f"hada_t{i}"]
                if t.ndim != 4 or a.ndim != 2 or b.ndim != 2 or (t.shape[0], t.shape[1]) != (a.shape[0], b.shape[0]):
                    raise ValueError(f"hada_t{i} {list(t.shape)} does not fit hada_w{i}_a {list(a.shape)} "
                                     f"and _b {list(b.shape)}")
                shapes.append((a.shape[1], a.shape[1] * b.shape[1] * t.shape[2] * t.shape[3]))
            else:
                if a.ndim != 2 or a.shape[1] != b.shape[0]:
                    raise ValueError(f"hada_w{i}_a {list(a.shape)} and hada_w{i}_b {list(b.shape)} do not multiply")
                shapes.append((a.shape[0], a.shape[0] * b.flatten(1).shape[1]))
        if shapes[0] != shapes[1]:
            raise ValueError(f"its two Hadamard factors differ in shape ({shapes[0][1]} and {shapes[1][1]} elements)")
        return shapes[0]
    w1, w2 = _kron_factor(f, 1), _kron_factor(f, 2)
    if len(w1) != 2 or len(w2) not in (2, 4):
        raise ValueError(f"Kronecker factors of shapes {list(w1)} and {list(w2)} (a matrix, and a matrix or a kernel)")
    return w1[0] * w2[0], math.prod(w1) * math.prod(w2)


def _missing(kind: str, f: dict) -> list[str]:
    if kind == "lora":
        need = [("lora_down.weight",), ("lora_up.weight",)]
    elif kind == "loha":
        need = [("hada_w1_a",), ("hada_w1_b",), ("hada_w2_a",), ("hada_w2_b",)]
    else:
        need = [(f"lokr_w{i}", f"lokr_w{i}_a and lokr_w{i}_b") for i in (1, 2)]
    have = set(f)
    return [" or ".join(n) for n in need
            if not any(set(alt.split(" and ")) <= have for alt in n)]


def _rank(kind: str, f: dict[str, torch.Tensor]) -> int | None:
    if kind == "lora":
        return f["lora_down.weight"].shape[0]
    if kind == "loha":
        return f["hada_w1_b"].shape[0]
    for key in ("lokr_w2_b", "lokr_w1_b"):
        if key in f:
            return f[key].shape[0]
    return None


# --- where layers go ------------------------------------------------------------------------------------------------

# The networks a LoRA patches; text_encoder_2 only in SDXL base.
PARTS = ("unet", "text_encoder", "text_encoder_2")
# A LoRA's names for the text towers -> the engine's: kohya's lora_te_ (one tower), lora_te1_/lora_te2_ (SDXL's two),
# diffusers' text_encoder./text_encoder_2.
KOHYA_TEXT = {"lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
TWO_TOWERS = ("lora_te1_", "lora_te2_", "text_encoder_2.")


def lora_targets(model: nn.Module) -> dict[str, Target]:
    """{engine module path, as kohya writes it (dots as underscores): Target} for every linear and convolution
    weight of the UNet and the text encoders; q/k/v of the UNet's attention are rows of its joined weight."""
    targets = {}
    for part in PARTS:
        if getattr(model, part, None) is None:
            continue
        for path, module in getattr(model, part).named_modules(prefix=part):
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                targets[path] = Target(f"{path}.weight", slice(None), module.weight.shape)
            for name, parts in getattr(module, "fused", {}).items():
                weight = getattr(module, name)
                n = weight.shape[0] // len(parts)
                for i, sub in enumerate(parts):
                    targets[f"{path}.{sub}"] = Target(f"{path}.{name}", slice(i * n, (i + 1) * n), weight[:n].shape)
    by_underscore = {path.replace(".", "_"): t for path, t in targets.items()}
    assert len(by_underscore) == len(targets), "two engine module paths read the same with dots as underscores"
    return by_underscore


class _Resolver:
    """Module names of LoRA files -> the engine's, through convert.py's diffusers rule table."""

    def __init__(self, model: nn.Module, targets: dict[str, Target]):
        cfg = model.config.unet
        levels = len(cfg.channel_mult)
        up_attention = {i for i in range(levels) if 2 ** (levels - 1 - i) in cfg.attention_resolutions}
        self.rules = [(re.compile(pattern.replace(r"\.", "_") + r"(?:_(\w+))?"), target, leaves)
                      for pattern, target, leaves in unet_rules(cfg.num_res_blocks, up_attention)]
        self.targets = targets

    def unet(self, path: str) -> Target | None:
        """path: a diffusers or CompVis UNet module path with dots as underscores."""
        if (t := self.targets.get("unet_" + path)) is not None:
            return t
        for pattern, target, leaves in self.rules:
            if m := pattern.fullmatch(path):
                *indices, inner = m.groups()
                block = target(*(int(i) if i.isdigit() else i for i in indices))
                inner = {k.replace(".", "_"): v for k, v in leaves.items()}.get(inner, inner)
                return self.targets.get("_".join(filter(None, ("unet", block, inner))).replace(".", "_"))
        return None

    def text(self, part: str, path: str) -> Target | None:
        return self.targets.get(f"{part}_{path.removeprefix('text_model_')}")

    def __call__(self, module: str) -> Target | None:
        """module: a kohya name (lora_unet_…, lora_te_…, lora_te1_…, lora_te2_…) or a diffusers/PEFT dotted one
        (unet.…, text_encoder.…, text_encoder_2.…)."""
        if module.startswith("lora_unet_"):
            return self.unet(module.removeprefix("lora_unet_"))
        for prefix, part in KOHYA_TEXT.items():
            if module.startswith(prefix):
                return self.text(part, module.removeprefix(prefix))
        part, _, path = module.partition(".")
        if part == "unet":
            return self.unet(path.replace(".", "_"))
        if part in ("text_encoder", "text_encoder_2"):
            return self.text(part, path.replace(".", "_"))
        return None


def _split(key: str) -> tuple[str, str]:
    """A tensor name -> (module, leaf), in kohya's leaf names."""
    if key.startswith(("lora_unet_", "lora_te")):
        module, _, leaf = key.partition(".")
        return module, leaf
    # diffusers' attention-processor form: ….processor.to_q_lora.down.weight
    if m := re.fullmatch(r"(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight", key):
        sub = "to_out.0" if m.group(2) == "to_out" else m.group(2)
        return f"{m.group(1)}.{sub}", f"lora_{m.group(3)}.weight"
    for leaf, kohya in PEFT_LEAVES.items():
        if key.endswith("." + leaf):
            return key[: -len(leaf) - 1], kohya
    module, _, leaf = key.rpartition(".")
    return module, leaf


# --- the file -------------------------------------------------------------------------------------------------------

def short_hash(path: Path) -> str:
    """AUTOMATIC1111's short hash of a LoRA file (its `Lora hashes` field): the first 12 hex digits of the
    sha256 of a .safetensors file's bytes after its header (kohya-ss' "addnet" hash, which the file may already
    record as sshs_model_hash), or of all the bytes of any other file."""
    path = Path(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if path.suffix.lower() == ".safetensors":
            n = int.from_bytes(f.read(8), "little")
            try:
                recorded = json.loads(f.read(min(n, 100_000_000))).get("__metadata__", {}).get("sshs_model_hash")
            except (ValueError, AttributeError):
                recorded = None
            if isinstance(recorded, str) and recorded:
                return recorded[:12]
            f.seek(8 + n)
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()[:12]


@dataclass(eq=False)
class LoraFile:
    path: Path
    format: str
    layers: list[Layer]
    hash: str


def _peft_alphas(metadata: dict) -> dict[str, tuple[float, dict]]:
    """{part: (lora_alpha, alpha_pattern)} from diffusers' adapter metadata, for PEFT files without alpha tensors."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
        if any(meta.get(f"{part}.use_dora") for part in PARTS):
            raise ValueError("uses DoRA (weight-decomposed LoRA), which tritonsd does not apply")
        return {part: (float(meta[f"{part}.lora_alpha"]), dict(meta.get(f"{part}.alpha_pattern") or {}))
                for part in PARTS if f"{part}.lora_alpha" in meta}
    except (json.JSONDecodeError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"unreadable lora_adapter_metadata ({e})") from None


def read_lora(path, model: nn.Module, targets: dict[str, Target] | None = None) -> LoraFile:
    """Read a LoRA/LyCORIS file and place every layer in `model` (shapes checked, NaN refused), without touching
    the model. Factors stay in the file's dtype, on the model's device."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such LoRA file" if not path.exists() else f"{path}: not a file")
    raw, metadata = read_file(path)
    try:
        layers, fmt = _layers(raw, metadata, model, targets or lora_targets(model))
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    device = next(model.parameters()).device
    for layer in layers:
        layer.factors = {k: t.to(device) for k, t in layer.factors.items()}
    return LoraFile(path, fmt, layers, short_hash(path))


def _group(raw: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{module: {leaf: tensor}} of a LoRA file's tensors (_split's names)."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in raw.items():
        module, leaf = _split(key)
        grouped.setdefault(module, {})[leaf] = t
    return grouped


def _layers(raw: dict, metadata: dict, model: nn.Module, targets: dict[str, Target]) -> tuple[list[Layer], str]:
    for key in raw:
        if (leaf := _split(key)[1]) in UNSUPPORTED:
            raise ValueError(f"holds {UNSUPPORTED[leaf]} ({key}), which tritonsd does not apply; "
                             "it applies LoRA, LoCon, LoHa and LoKr")
    grouped = _group(raw)
    if not grouped or not any(leaf in set().union(*KINDS.values()) for g in grouped.values() for leaf in g):
        first = ", ".join(list(raw)[:5])
        raise ValueError(f"not a LoRA: none of its {len(raw)} tensors is a LoRA, LoHa or LoKr weight ({first})")
    family, named = model.config.family, lora_family(raw, grouped)
    if named is None and model.text_encoder_2 is not None and any(k.startswith("lora_te_") for k in raw):
        named = "SD 1.x or 2.x", "kohya's lora_te_ names a model with one text encoder"
    other = f"a LoRA for {named[0]} ({named[1]})" if named and named[0] != family else None
    if other:  # its layers that read the text features cannot fit: say so before any layer is placed
        raise ValueError(f"is {other}, but this model is {family}, whose text features are "
                         f"{model.config.unet.context_dim} wide; a LoRA fits only the model family it was trained for")
    peft = _peft_alphas(metadata)
    resolve = _Resolver(model, targets)
    layers, unplaced, formats = [], [], set()
    for module, f in grouped.items():
        alpha = f.pop("alpha", None)
        kinds = [kind for kind, leaves in KINDS.items() if set(f) & leaves]
        unknown = set(f) - set().union(*KINDS.values())
        if len(kinds) != 1 or unknown:
            what = f"unknown tensors {sorted(unknown)}" if unknown else f"tensors of {' and '.join(kinds) or 'no'} kind"
            raise ValueError(f"layer {module} has {what}")
        kind = kinds[0]
        if missing := _missing(kind, f):
            raise ValueError(f"layer {module} lacks {', '.join(missing)}")
        for leaf, t in f.items():
            if not t.is_floating_point():
                raise ValueError(f"{module}.{leaf} holds {t.dtype} values, not floating point")
            if not torch.isfinite(t).all():
                raise ValueError(f"{module}.{leaf} holds NaN or infinite values")
        target = resolve(module)
        if target is None:
            unplaced.append(module)
            continue
        rows, numel = _update_shape(kind, f)
        if rows != target.shape[0] or numel != target.shape.numel():
            raise ValueError(
                f"layer {module} does not fit the model: it makes a {rows}-row update of {numel} elements for "
                f"{target.param} rows {target.rows.start or 0}:{target.rows.stop or target.shape[0]}, whose weight is "
                f"{list(target.shape)}; it is {other or f'a LoRA for another model than this {family} one'}"
            )
        rank = _rank(kind, f)
        if alpha is None and module.startswith(tuple(f"{part}." for part in PARTS)):
            part = module.split(".", 1)[0]
            if part in peft:
                base, pattern = peft[part]
                inner = module.split(".", 1)[1]
                alpha = next((float(v) for k, v in pattern.items() if inner == k or inner.endswith("." + k)), base)
        if alpha is not None:
            if isinstance(alpha, torch.Tensor):
                if alpha.numel() != 1:
                    raise ValueError(f"layer {module} has an alpha of {alpha.numel()} values, not one")
                alpha = alpha.item()
            alpha = float(alpha)
            if not math.isfinite(alpha):
                raise ValueError(f"layer {module} has a non-finite alpha {alpha}")
        scale = alpha / rank if alpha is not None and rank else 1.0
        formats.add(kind if kind != "lora" else "kohya" if module.startswith("lora_") else "diffusers")
        layers.append(Layer(module, target, kind, f, scale))
    if unplaced:
        more = f", ... ({len(unplaced) - 5} more)" if len(unplaced) > 5 else ""
        raise ValueError(f"{len(unplaced)} of its layers name no layer of this model: {', '.join(unplaced[:5])}{more}; "
                         f"it is {other or f'a LoRA for another architecture than this {family} one'}")
    seen: dict[tuple, str] = {}
    for layer in layers:
        key = (layer.target.param, layer.target.rows.start)
        if key in seen:
            raise ValueError(f"layers {seen[key]} and {layer.name} both patch {layer.target.param}")
        seen[key] = layer.name
    return layers, "+".join(sorted(formats))


# Layers whose input is the text features: a one-tower text encoder's attention projections and first MLP layer
# (its hidden size), and the UNet's cross-attention keys and values (its context: both towers' widths in SDXL).
TEXT_INPUT = re.compile(r"(lora_te_|text_encoder\.).*(q_proj|k_proj|v_proj|out_proj|fc1)")
CONTEXT_INPUT = re.compile(r"(lora_unet_|unet\.).*attn2[._]to_[kv]")


def lora_family(raw: dict[str, torch.Tensor], grouped: dict | None = None) -> tuple[str, str] | None:
    """(model family, why) from a LoRA file's names (two text encoders: SDXL) or else the width of the text features
    its layers take in; None when it has no such layer or the width names no family. grouped: _group(raw), if the
    caller has it."""
    if two := sorted({next(p for p in TWO_TOWERS if k.startswith(p)) for k in raw if k.startswith(TWO_TOWERS)}):
        return "SDXL", f"it patches two text encoders: {', '.join(two)}"
    grouped = _group(raw) if grouped is None else grouped
    for pattern, widths, what in ((CONTEXT_INPUT, FAMILY_BY_CONTEXT, "its cross-attention reads {}-wide text features"),
                                  (TEXT_INPUT, FAMILY_BY_TEXT_WIDTH, "its text-encoder layers are {} wide")):
        for module, f in grouped.items():
            kinds = [kind for kind, leaves in KINDS.items() if set(f) & leaves]
            if not pattern.fullmatch(module) or len(kinds) != 1:
                continue
            try:
                rows, numel = _update_shape(kinds[0], f)
            except (KeyError, ValueError, IndexError):  # malformed: refused with its reason when its layer is read
                continue
            if rows and numel // rows in widths:
                return widths[numel // rows], what.format(numel // rows)
    return None


def is_lora(keys) -> bool:
    """Whether tensor names are a LoRA/LyCORIS file's."""
    leaves = set().union(*KINDS.values())
    return any(_split(k)[1] in leaves for k in keys)


def describe_lora(raw: dict, metadata: dict, model: nn.Module) -> dict:
    """What `tritonsd info` says of a LoRA file: its format, layers per network, ranks, the model family its shapes
    name (or None), and whether it fits `model` (problem: None, or why not)."""
    family = lora_family(raw)
    info = {"format": None, "layers": {}, "ranks": [], "problem": None, "family": family and family[0]}
    try:
        layers, info["format"] = _layers(raw, metadata, model, lora_targets(model))
    except ValueError as e:
        info["problem"] = str(e)
        return info
    parts = [layer.target.param.split(".", 1)[0] for layer in layers]
    info["layers"] = {part: parts.count(part) for part in PARTS if part in parts}
    info["ranks"] = sorted({r for layer in layers if (r := _rank(layer.kind, layer.factors)) is not None})
    return info
