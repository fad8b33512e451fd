"""Reading tensors off disk: safetensors files, PyTorch pickles (weights only, never code) and diffusers folders."""

import codecs
import pickle
from pathlib import Path

import safetensors
import torch

from tritonsd.engine.config import read_json


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""



# What diffusers and transformers call a part's weights, best first: safetensors before pickles, full before fp16.
WEIGHT_FILES = [
    f"{stem}{variant}.{ext}"
    for ext in ("safetensors", "bin")
    for stem in ("diffusion_pytorch_model", "model", "pytorch_model")
    for variant in ("", ".fp16")
]
# A folder's networks: the UNet, the VAE and one or two text towers (SDXL base: text_encoder and text_encoder_2; its
# refiner: text_encoder_2 alone).
DIFFUSERS_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
TEXT_PARTS = ("text_encoder", "text_encoder_2")


def tower_folders(parts) -> list[str]:
    """The text-tower folders among a diffusers model's parts, in the order of the engine's towers: an SDXL refiner's
    text_encoder_2, alone, is the engine's first (text_encoder, ModelConfig.text)."""
    return [part for part in TEXT_PARTS if part in parts]


def _kind(path: Path) -> str:
    """What the file's first bytes say it is; the extension is not trusted (files get renamed)."""
    with open(path, "rb") as f:
        head = f.read(16)
    # safetensors first: its first 8 bytes are the header length, whose low byte can be 0x80 like a pickle's.
    if len(head) > 8 and head[8:9] == b"{":
        return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):  # PROTO opcode, protocols 2-5
        return "pickle"
    if not head:
        return "an empty file"
    for magic, name in ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GGUF", "a GGUF file")):
        if head.startswith(magic):
            return name
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head)  # tolerates a character cut at byte 16
    except UnicodeDecodeError:
        return "unrecognised binary data"
    return "a text file" if all(c.isprintable() or c.isspace() for c in text) else "unrecognised binary data"


def _read_safetensors(path: Path, kind: str) -> tuple[dict, dict]:
    # Mapped, so nothing is read until used and the pages are the OS file cache's: without a cast the weights are
    # never copied; with one, the cast copies are the only ones in the process's own memory.
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (safetensors.SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read the safetensors file, it is truncated or corrupt ({e})") from None


class _Inert:
    """Stands in for the objects a CompVis training checkpoint pickles beside its weights (PyTorch Lightning's
    ModelCheckpoint class as a dict key, numpy scalars and dtypes in its state): built from any arguments, it
    keeps none of them, runs nothing and imports nothing. Only tensors are kept from such a file."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


# Names the weights-only unpickler may resolve to _Inert; anything else that is not a tensor is still refused.
TRAINING_GLOBALS = [(_Inert, name) for name in (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
    "numpy.dtype", "numpy.ndarray",
)]


def _load_pickle(path: Path, kind: str):
    """What a PyTorch pickle holds, read weights-only: tensors and plain containers, never code."""
    try:
        # mmap leaves tensors in the file until they are used; only the zip format supports it.
        with torch.serialization.safe_globals(TRAINING_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=kind == "zip")
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():
            raise CheckpointError(f"{path}: cannot read the pickle, it is truncated or corrupt ({e})") from None
        raise CheckpointError(
            f"{path}: the file contains pickled code or objects that are not plain tensors; it was not loaded, "
            "for safety (loading it could run that code). Convert it to .safetensors with a tool you trust."
        ) from None
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read the PyTorch file, it is truncated or corrupt ({e})") from None


def _read_pickle(path: Path, kind: str) -> tuple[dict, dict]:
    obj = _load_pickle(path, kind)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    # Training checkpoints keep counters (global_step, epoch) beside the weights.
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointError(f"{path}: holds no tensors (keys: {', '.join(map(str, list(obj)[:10]))})")
    names = [k for k in state if not isinstance(k, str)]
    if names:
        raise CheckpointError(f"{path}: tensors must be named by strings; {len(names)} are not, the first being "
                              f"{str(names[0])[:40]} ({type(names[0]).__name__})")
    return state, {}


# How each kind of file (formats._kind) is read: one reader per kind, each giving (tensors, metadata).
READERS = {"safetensors": _read_safetensors, "zip": _read_pickle, "pickle": _read_pickle}


def read_file(path: Path) -> tuple[dict, dict]:
    """One file's tensors under their stored names, as stored (not cast), and its metadata (the safetensors header;
    {} for pickles)."""
    kind = _kind(path)
    if kind not in READERS:
        raise CheckpointError(f"{path}: not a checkpoint: it is {kind}, neither safetensors nor a PyTorch pickle")
    return READERS[kind](path, kind)


def read_object(path: Path):
    """A file's contents as stored: the object a PyTorch pickle holds, or a safetensors file's {name: tensor}."""
    kind = _kind(path)
    if kind in ("zip", "pickle"):
        return _load_pickle(path, kind)
    return read_file(path)[0]


# Settings a diffusers folder keeps beside the weights, read when present: what the UNet predicts, what prompts are
# padded with (for each tower).
DIFFUSERS_SETTINGS = {"scheduler": "scheduler/scheduler_config.json", "tokenizer": "tokenizer/special_tokens_map.json",
                      "tokenizer_2": "tokenizer_2/special_tokens_map.json"}


def read_diffusers(folder: Path) -> tuple[dict, dict]:
    """{part: tensors under diffusers/transformers names} and {part: its config.json} for the parts the folder has
    (unet, vae, and text_encoder and/or text_encoder_2), plus each of DIFFUSERS_SETTINGS the folder has."""
    present = [p for p in DIFFUSERS_PARTS if (folder / p).is_dir()]
    if not present:
        raise CheckpointError(
            f"{folder}: a folder, but not a diffusers model: it has none of the subfolders {', '.join(DIFFUSERS_PARTS)}"
        )
    missing = [p for p in ("unet", "vae") if p not in present]
    if not any(p in present for p in TEXT_PARTS):
        missing.append(" or ".join(TEXT_PARTS))
    if missing:
        raise CheckpointError(f"{folder}: incomplete diffusers folder: missing subfolder(s) {', '.join(missing)}")
    parts, configs = {}, {}
    for part in present:
        config_file = folder / part / "config.json"
        try:
            configs[part] = read_json(config_file)
        except ValueError as e:
            raise CheckpointError(f"{config_file}: cannot read the part's config ({e})") from None
        weights = next((folder / part / name for name in WEIGHT_FILES if (folder / part / name).is_file()), None)
        if weights is None:
            raise CheckpointError(f"{folder / part}: no weights file (looked for {', '.join(WEIGHT_FILES)})")
        parts[part], _ = read_file(weights)
    for name, file in DIFFUSERS_SETTINGS.items():
        if (folder / file).is_file():
            try:
                configs[name] = read_json(folder / file)
            except ValueError as e:
                raise CheckpointError(f"{folder / file}: cannot read it ({e})") from None
            if not isinstance(configs[name], dict):
                raise CheckpointError(f"{folder / file}: holds a {type(configs[name]).__name__}, not a JSON object")
    return parts, configs
