"""Loading Stable Diffusion 1.x checkpoints in the formats people have, and saving the engine's own.

Formats: "single_file" (an original CompVis checkpoint: .safetensors, or a .ckpt/.pt/.pth pickle read weights-only),
"diffusers" (a folder with unet/, vae/, text_encoder/ and maybe tokenizer/), and "tritonsd" (a safetensors file in
the engine's names whose metadata holds its ModelConfig).
"""

import json
from collections import Counter
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import nn

from tritonsd.engine.config import ModelConfig
from tritonsd.engine.model import StableDiffusion
from tritonsd.engine.tokenizer import CLIPTokenizer
from tritonsd.files import atomic_write, check_output
from tritonsd.loader.convert import from_diffusers, from_original
from tritonsd.loader.formats import CheckpointError, read_diffusers, read_file
from tritonsd.loader.infer import architecture, config_from_diffusers, infer_config

__all__ = ["CheckpointError", "default_model", "load_state_dict", "infer_config", "load", "save", "describe"]

FORMAT_TAG = "tritonsd"
DEMO_MODEL = Path(__file__).resolve().parent.parent / "engine" / "data" / "demo" / "demo.safetensors"


def default_model() -> Path:
    """The small demo model shipped inside the package, used when no checkpoint is named."""
    if not DEMO_MODEL.is_file():
        raise CheckpointError(
            "no checkpoint given and the demo model is not installed with this copy of tritonsd; "
            "point it at an SD1.x checkpoint (Pipeline.from_checkpoint(PATH), or --model PATH on the command line)"
        )
    return DEMO_MODEL


def _read(path: Path, dtype: torch.dtype | None, device) -> tuple[str, dict, dict]:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        parts, configs = read_diffusers(path, dtype, device)
        return "diffusers", from_diffusers(parts), configs
    raw, metadata = read_file(path, dtype, device)
    if metadata.get("format") == FORMAT_TAG:
        return FORMAT_TAG, raw, metadata
    return "single_file", from_original(raw), metadata


def load_state_dict(path, *, dtype: torch.dtype | None = None, device="cpu") -> tuple[str, dict, dict]:
    """(format, tensors under the engine's names, metadata) of an SD1.x checkpoint. Metadata is the safetensors
    header's, or for a diffusers folder each part's config.json. dtype/device cast tensor by tensor while reading."""
    path = Path(path)
    fmt, state, metadata = _read(path, dtype, device)
    name, evidence = architecture(state)
    if name == "unknown":
        first = ", ".join(list(state)[:5])
        raise CheckpointError(
            f"{path}: not a Stable Diffusion checkpoint: {evidence}; its {len(state)} tensors begin {first}"
        )
    if name != "SD1.x":
        raise CheckpointError(f"{path}: looks like {name} ({evidence}); tritonsd runs SD 1.x models only")
    return fmt, state, metadata


def _config(path: Path, fmt: str, state: dict, metadata: dict) -> ModelConfig:
    """The config a checkpoint says it has: its own metadata, diffusers' config.json files, a NAME.json beside a
    single file, or else what its shapes imply."""
    side = path.with_suffix(".json")
    try:
        if fmt == FORMAT_TAG:
            return ModelConfig.from_dict(json.loads(metadata.get("config", "null")))
        if fmt == "diffusers":
            return config_from_diffusers(metadata)
        if side.is_file():
            return ModelConfig.from_json(side)
        return infer_config(state)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _mismatches(state: dict, expected: dict) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, wrongly shaped) tensors of state against the expected (meta) state dict."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} (file {list(state[k].shape)}, model {list(t.shape)})"
        for k, t in expected.items() if k in state and state[k].shape != t.shape
    ]
    return missing, unexpected, shapes


def _check(path: Path, state: dict, expected: dict) -> None:
    problems = []
    for what, items in zip(("missing", "unexpected", "wrongly shaped"), _mismatches(state, expected)):
        if items:
            more = f", ... ({len(items) - 10} more)" if len(items) > 10 else ""
            problems.append(f"{len(items)} {what} tensor(s): {', '.join(items[:10])}{more}")
    if problems:
        raise CheckpointError(f"{path}: does not match the SD 1.x model of its config; " + "; ".join(problems))


def load(path, *, device="cpu", dtype: torch.dtype = torch.float32, config: ModelConfig | None = None
         ) -> tuple[StableDiffusion, CLIPTokenizer]:
    """The model, ready for inference, and its tokenizer. The modules are built on the meta device and take the
    checkpoint's tensors as they are (cast once), so the weights are in memory once and never randomly initialised."""
    path = Path(path)
    fmt, state, metadata = load_state_dict(path, dtype=dtype, device=device)
    config = config or _config(path, fmt, state, metadata)
    model = StableDiffusion.on_meta(config)
    _check(path, state, model.state_dict())
    model.load_state_dict(state, strict=True, assign=True)
    model.eval().requires_grad_(False)
    if fmt == "diffusers" and (path / "tokenizer" / "vocab.json").is_file():
        return model, CLIPTokenizer.from_folder(path / "tokenizer")
    return model, CLIPTokenizer.default()


def save(model_or_state: nn.Module | dict, config: ModelConfig, path, dtype: torch.dtype | None = None) -> None:
    """Write the engine's own file: engine names, config in the metadata. The file appears whole or not at all."""
    path = check_output(path)
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else dict(model_or_state)
    _check(path, state, StableDiffusion.on_meta(config).state_dict())
    state = {k: t.detach().to(dtype=dtype if t.is_floating_point() else None).contiguous() for k, t in state.items()}
    with atomic_write(path) as tmp:
        try:
            safetensors.torch.save_file(state, tmp, metadata={"format": FORMAT_TAG, "config": config.to_json()})
        except SafetensorError as e:  # the write failed (a full disk, say): an OSError, like any other
            raise OSError(f"cannot write {path}: {e}") from None


def describe(path) -> dict:
    """What a checkpoint holds, for `tritonsd info`: format, architecture, config, dtypes, parameters per part, and
    the tensors missing, unexpected or wrongly shaped for its config. Only unreadable files raise."""
    path = Path(path)
    fmt, state, metadata = _read(path, None, "cpu")
    name, evidence = architecture(state)
    parts = Counter()
    for k, t in state.items():
        parts[k.split(".", 1)[0]] += t.numel()
    info = {
        "path": str(path), "format": fmt, "architecture": name, "evidence": evidence, "config": None,
        "dtypes": dict(Counter(str(t.dtype).removeprefix("torch.") for t in state.values())),
        "parameters": dict(parts), "missing": [], "unexpected": [], "wrong_shape": [], "problem": None,
    }
    if name != "SD1.x":
        return info
    try:
        config = _config(path, fmt, state, metadata)
    except CheckpointError as e:
        info["problem"] = str(e)
        return info
    info["config"] = config.to_dict()
    expected = StableDiffusion.on_meta(config).state_dict()
    info["missing"], info["unexpected"], info["wrong_shape"] = _mismatches(state, expected)
    return info
