"""Loading Stable Diffusion 1.x checkpoints in the formats people have, and saving the engine's own.

Formats: "single_file" (an original CompVis checkpoint: .safetensors, or a .ckpt/.pt/.pth pickle read weights-only),
"diffusers" (a folder with unet/, vae/, text_encoder/ and maybe tokenizer/), and "tritonsd" (a safetensors file in
the engine's names whose metadata holds its ModelConfig).
"""

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from tritonsd.engine.config import PARTS, ModelConfig, parse_json, read_json
from tritonsd.engine.model import StableDiffusion
from tritonsd.engine.tokenizer import CLIPTokenizer
from tritonsd.loader.convert import from_diffusers, from_original
from tritonsd.loader.formats import CheckpointError, read_diffusers, read_file
from tritonsd.loader.infer import architecture, config_from_diffusers, config_mismatches, infer_config

__all__ = ["CheckpointError", "default_model", "load_state_dict", "infer_config", "load", "save", "describe"]

logger = logging.getLogger(__name__)

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


def _read(path: Path) -> tuple[str, dict, dict]:
    """(format, tensors under the engine's names as stored, metadata)."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        parts, configs = read_diffusers(path)
        return "diffusers", from_diffusers(parts), configs
    raw, metadata = read_file(path)
    if metadata.get("format") == FORMAT_TAG:
        return FORMAT_TAG, raw, metadata
    return "single_file", from_original(raw), metadata


def _check_architecture(path: Path, state: dict) -> None:
    name, evidence = architecture(state)
    if name == "unknown":
        first = ", ".join(list(state)[:5])
        raise CheckpointError(
            f"{path}: not a Stable Diffusion checkpoint: {evidence}; its {len(state)} tensors begin {first}"
        )
    if name != "SD1.x":
        raise CheckpointError(f"{path}: looks like {name} ({evidence}); tritonsd runs SD 1.x models only")


def _check_tensors(path: Path, state: dict) -> None:
    """Weights are dense floating-point tensors holding data. Entries real files carry beside the weights (CLIP's
    int64 position_ids, EMA counters, schedule buffers) were dropped by the name conversion before this."""
    bad = []
    for name, t in state.items():
        if t.is_meta:
            bad.append(f"{name} (a meta tensor, with no data)")
        elif t.layout != torch.strided:
            bad.append(f"{name} ({str(t.layout).removeprefix('torch.')})")
        elif not t.is_floating_point():
            bad.append(f"{name} ({str(t.dtype).removeprefix('torch.')})")
    if bad:
        more = f", ... ({len(bad) - 5} more)" if len(bad) > 5 else ""
        raise CheckpointError(f"{path}: {len(bad)} tensor(s) cannot be weights, which must be dense and floating "
                              f"point: {', '.join(bad[:5])}{more}")


def _cast(state: dict, dtype: torch.dtype | None, device) -> dict:
    """In place, so each original is released as soon as its copy is made."""
    for k, t in state.items():
        state[k] = t.to(device=device, dtype=dtype)
    return state


def load_state_dict(path, *, dtype: torch.dtype | None = None, device="cpu") -> tuple[str, dict, dict]:
    """(format, tensors under the engine's names, metadata) of an SD1.x checkpoint. Metadata is the safetensors
    header's, or for a diffusers folder each part's config.json. dtype/device cast tensor by tensor."""
    path = Path(path)
    fmt, state, metadata = _read(path)
    _check_architecture(path, state)
    _check_tensors(path, state)
    return fmt, _cast(state, dtype, device), metadata


def _config(path: Path, fmt: str, state: dict, metadata: dict) -> ModelConfig:
    """The config a checkpoint says it has: its own metadata, diffusers' config.json files, a NAME.json beside a
    single file, or else what its shapes imply."""
    side = path.with_suffix(".json")
    source = "the model config in its metadata" if fmt == FORMAT_TAG else f"{side.name} beside it"
    try:
        if fmt == FORMAT_TAG:
            return ModelConfig.from_dict(parse_json(metadata.get("config", "null")))
        if fmt == "diffusers":
            return config_from_diffusers(metadata)
        if side.is_file():
            d = read_json(side)
            # AUTOMATIC1111 keeps its own notes on a model in NAME.json (description, activation text, ...).
            if isinstance(d, dict) and not any(part in d for part in PARTS):
                logger.info("%s has none of a model config's parts (%s): not a model config, ignored; the config "
                            "is read off the tensor shapes", side, ", ".join(PARTS))
            else:
                return ModelConfig.from_dict(d)
        return infer_config(state)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except ValueError as e:
        raise CheckpointError(f"{path}: {source}: {e}") from None


def _mismatches(state: dict, expected: dict) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, wrongly shaped) tensors of state against the expected (meta) state dict."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} (file {list(state[k].shape)}, model {list(t.shape)})"
        for k, t in expected.items() if k in state and state[k].shape != t.shape
    ]
    return missing, unexpected, shapes


def _mismatch_message(path: Path, mismatches: tuple[list[str], list[str], list[str]]) -> str | None:
    problems = []
    for what, items in zip(("missing", "unexpected", "wrongly shaped"), mismatches):
        if items:
            more = f", ... ({len(items) - 10} more)" if len(items) > 10 else ""
            problems.append(f"{len(items)} {what} tensor(s): {', '.join(items[:10])}{more}")
    if problems:
        return f"{path}: does not match the SD 1.x model of its config; " + "; ".join(problems)
    return None


def _check(path: Path, state: dict, expected: dict) -> None:
    problem = _mismatch_message(path, _mismatches(state, expected))
    if problem:
        raise CheckpointError(problem)


@dataclass
class _Inspection:
    format: str
    state: dict
    architecture: tuple[str, str]
    config: ModelConfig | None = None
    tokenizer: CLIPTokenizer | None = None
    model: StableDiffusion | None = None  # on the meta device, when the config was found good
    mismatches: tuple[list[str], list[str], list[str]] = field(default_factory=lambda: ([], [], []))
    problem: str | None = None  # why `load` refuses the checkpoint, in load's words


def _tokenizer(path: Path, fmt: str, config: ModelConfig) -> CLIPTokenizer:
    """A diffusers folder's own tokenizer, else CLIP's; its ids must all have a row in the token embedding."""
    try:
        if fmt == "diffusers" and (path / "tokenizer" / "vocab.json").is_file():
            tokenizer = CLIPTokenizer.from_folder(path / "tokenizer")
        else:
            tokenizer = CLIPTokenizer.default()
    except ValueError as e:
        raise CheckpointError(f"{path}: its tokenizer: {e}") from None
    top = max(tokenizer.vocab.values())
    if top >= config.text.vocab_size:
        raise CheckpointError(f"{path}: its tokenizer's ids go up to {top}, but its text encoder has "
                              f"{config.text.vocab_size} token embeddings")
    return tokenizer


def _inspect(path: Path, config: ModelConfig | None = None) -> _Inspection:
    """Every check `load` makes, in order, for `load` and `describe` alike. Only an unreadable file raises; any other
    refusal is `problem`. The config is held to the tensors' shapes before a module is built, so no config a file
    states can make the engine build more than the file holds."""
    fmt, state, metadata = _read(path)
    found = _Inspection(fmt, state, architecture(state))
    try:
        _check_architecture(path, state)
        _check_tensors(path, state)
        found.config = config or _config(path, fmt, state, metadata)
        disagree = config_mismatches(found.config, state)
        if disagree:
            raise CheckpointError(f"{path}: its config does not match its tensors: {'; '.join(disagree)}")
        found.tokenizer = _tokenizer(path, fmt, found.config)
        found.model = StableDiffusion.on_meta(found.config)
        found.mismatches = _mismatches(state, found.model.state_dict())
        found.problem = _mismatch_message(path, found.mismatches)
    except CheckpointError as e:
        found.problem = str(e)
    return found


def load(path, *, device="cpu", dtype: torch.dtype = torch.float32, config: ModelConfig | None = None
         ) -> tuple[StableDiffusion, CLIPTokenizer]:
    """The model, ready for inference, and its tokenizer. The modules are built on the meta device and take the
    checkpoint's tensors as they are (cast once), so the weights are in memory once and never randomly initialised."""
    path = Path(path)
    found = _inspect(path, config)
    if found.problem:
        raise CheckpointError(found.problem)
    model = found.model
    model.load_state_dict(_cast(found.state, dtype, device), strict=True, assign=True)
    model.eval().requires_grad_(False)
    return model, found.tokenizer


def save(model_or_state: nn.Module | dict, config: ModelConfig, path, dtype: torch.dtype | None = None) -> None:
    """Write the engine's own file: engine names, config in the metadata. The file appears whole or not at all."""
    path = Path(path)
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else dict(model_or_state)
    _check(path, state, StableDiffusion.on_meta(config).state_dict())
    state = {k: t.detach().to(dtype=dtype if t.is_floating_point() else None).contiguous() for k, t in state.items()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        safetensors.torch.save_file(state, tmp, metadata={"format": FORMAT_TAG, "config": config.to_json()})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def describe(path) -> dict:
    """What a checkpoint holds, for `tritonsd info`: format, architecture, config, dtypes, parameters per part, the
    tensors missing, unexpected or wrongly shaped for its config, and `problem`: why `load` would refuse it (the
    same checks, the same message), or None. Only unreadable files raise."""
    path = Path(path)
    found = _inspect(path)
    parts = Counter()
    for k, t in found.state.items():
        parts[k.split(".", 1)[0]] += t.numel()
    missing, unexpected, wrong_shape = found.mismatches
    return {
        "path": str(path), "format": found.format, "architecture": found.architecture[0],
        "evidence": found.architecture[1], "config": found.config.to_dict() if found.config else None,
        "dtypes": dict(Counter(str(t.dtype).removeprefix("torch.") for t in found.state.values())),
        "parameters": dict(parts), "missing": missing, "unexpected": unexpected, "wrong_shape": wrong_shape,
        "problem": found.problem,
    }
