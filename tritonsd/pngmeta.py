"""Generation settings in a PNG's `parameters` text chunk, in the format AUTOMATIC1111's web UI writes and reads,
so images can be reproduced here and dropped into the tools people already use:

    PROMPT
    Negative prompt: NEG
    Steps: 30, Sampler: Euler a, CFG scale: 7.5, Seed: 1234, Size: 512x512, Model hash: 0123456789, Model: NAME
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from tritonsd.engine.samplers import a1111_fields, from_a1111

MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")

# A1111's own pattern for one `Key: value` field; values holding a comma, colon or newline are JSON-quoted.
_FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_NEGATIVE = "Negative prompt:"
# A prompt line that begins (after spaces) with _NEGATIVE would be read back as the start of the negative prompt, by
# A1111 as here; a second space keeps it in its prompt. CLIP's tokenizer collapses runs of spaces, so the stored
# prompt draws the same image.
_NEGATIVE_IN_TEXT = "Negative  prompt:"


def model_hash(path: str | Path) -> str:
    """A1111's short model hash: the first 10 hex digits of the file's sha256. A folder (diffusers layout)
    hashes its weight files' bytes in sorted path order."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.suffix in MODEL_SUFFIXES) if path.is_dir() else [path]
    h = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()[:10]


def format_parameters(
    prompt: str, negative_prompt: str, *, steps: int, sampler: str, cfg: float, seed: int, width: int, height: int,
    model_hash: str, model: str, strength: float | None = None, clip_skip: int = 1, pad_conds: bool = False,
    batch_size: int = 1, batch_pos: int = 0, lora_hashes: dict[str, str] | None = None,
) -> str:
    """pad_conds: the prompt and negative prompt took different chunk counts and the shorter was padded with the
    empty prompt's chunk (tritonsd always pads; A1111 does with this field, its "Pad prompt/negative prompt").
    lora_hashes: {name: short hash} of the LoRAs applied, written as AUTOMATIC1111 writes `Lora hashes`."""
    fields = {
        "Steps": steps,
        **a1111_fields(sampler),
        "CFG scale": _number(cfg),
        "Seed": seed,
        "Size": f"{width}x{height}",
        "Model hash": model_hash,
        "Model": model,
    }
    if strength is not None:
        fields["Denoising strength"] = _number(strength)
    if clip_skip > 1:  # A1111 writes it only when it is not the default
        fields["Clip skip"] = clip_skip
    if pad_conds:
        fields["Pad conds"] = True
    # One seed draws the whole batch, so an image is reproduced by its batch size and position, not by seed + i.
    if batch_size > 1:
        fields["Batch size"] = batch_size
        fields["Batch pos"] = batch_pos
    if lora_hashes:
        # A1111 drops the separators of its own field syntax from the names.
        fields["Lora hashes"] = ", ".join(f"{n.replace(':', '').replace(',', '')}: {h}" for n, h in lora_hashes.items())
    lines = [_escape(prompt)]
    if negative_prompt:
        lines.append(f"{_NEGATIVE} {_escape(negative_prompt)}")
    lines.append(", ".join(f"{k}: {_quote(str(v))}" for k, v in fields.items()))
    return "\n".join(lines)


def parse_parameters(text: str) -> dict:
    """The settings back from a `parameters` chunk: prompt, negative_prompt, steps, sampler (our id when known),
    cfg, seed, width, height, model_hash, model, and strength, clip_skip, pad_conds, batch_size, batch_pos when
    present.
    Fields this project does not write are kept under their A1111 names."""
    lines = text.strip("\n").split("\n")
    fields = {}
    if len(_FIELD.findall(lines[-1])) >= 3:
        fields = {k: json.loads(v) if v.startswith('"') else v for k, v in _FIELD.findall(lines.pop())}
    prompt, negative = [], []
    for line in lines:
        if negative or line.lstrip().startswith(_NEGATIVE):
            negative.append(line.lstrip().removeprefix(_NEGATIVE).lstrip() if not negative else line)
        else:
            prompt.append(line)
    out = {"prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative)}
    sampler = from_a1111(fields["Sampler"], fields.get("Schedule type")) if "Sampler" in fields else None
    if sampler is not None:  # the schedule type is part of the sampler; an unknown pair stays under A1111's names
        out["sampler"] = sampler
        fields = {k: v for k, v in fields.items() if k not in ("Sampler", "Schedule type")}
    typed = {
        "Steps": ("steps", int), "CFG scale": ("cfg", float),
        "Seed": ("seed", int), "Model hash": ("model_hash", str), "Model": ("model", str),
        "Denoising strength": ("strength", float), "Clip skip": ("clip_skip", int),
        "Pad conds": ("pad_conds", lambda v: v == "True"), "Batch size": ("batch_size", int), "Batch pos": ("batch_pos", int),
    }
    for key, value in fields.items():
        if key == "Size":
            out["width"], out["height"] = (int(v) for v in value.split("x"))
        elif key in typed:
            name, cast = typed[key]
            out[name] = cast(value)
        else:
            out[key] = value
    return out


def _escape(text: str) -> str:
    return "\n".join(
        line.replace(_NEGATIVE, _NEGATIVE_IN_TEXT, 1) if line.lstrip().startswith(_NEGATIVE) else line
        for line in text.split("\n")
    )


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',:\n"') else text
