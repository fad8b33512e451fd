"""Loading Stable Diffusion 1.x, 2.x and SDXL (base and refiner) checkpoints in the formats people have, and saving
the engine's own.

Formats: "single_file" (an original CompVis/sgm checkpoint: .safetensors, or a .ckpt/.pt/.pth pickle read
weights-only), "diffusers" (a folder with unet/, vae/, text_encoder/ and/or text_encoder_2/, and maybe tokenizer/,
tokenizer_2/), and "tritonsd" (a safetensors file in the engine's names whose metadata holds its ModelConfig).

What the UNet predicts (noise or v) is read, in this order, from: an explicit prediction_type, the config given or
beside the file (NAME.json), the engine's own file, a diffusers scheduler config, a single file's own metadata
(modelspec.prediction_type, ComfyUI's v_pred marker); with none of those, SD 1.x and SDXL files are noise-predicting
and an SD 2.x file's UNet is put to AUTOMATIC1111's test (infer.probe_prediction_type).
"""

import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import nn

from tritonsd.engine.config import FAMILIES, PARTS, ModelConfig, parse_json, read_json
from tritonsd.engine.model import StableDiffusion
from tritonsd.engine.tokenizer import CLIPTokenizer
from tritonsd.files import atomic_write, check_output
from tritonsd.loader.compvis import read_compvis_config
from tritonsd.loader.convert import from_diffusers, from_original
from tritonsd.loader.formats import CheckpointError, read_diffusers, read_file
from tritonsd.loader.infer import (
    FAMILY_LIST, SUPPORTED, architecture, config_from_diffusers, config_mismatches, infer_config,
    probe_prediction_type, stated_prediction_type,
)
from tritonsd.loader.lora import describe_lora

# How to use the files that are not a model but go with one.
USES = {
    "a LoRA": "apply it to a model: --lora PATH[:SCALE] or a <lora:NAME:WEIGHT> prompt tag with --lora-dir, "
              "Pipeline.load_lora(PATH) in Python",
    "a VAE alone": "use it with a model: --vae PATH, or Pipeline.from_checkpoint(MODEL, vae=PATH) in Python",
}

__all__ = ["CheckpointError", "default_model", "load_state_dict", "infer_config", "read_config", "load", "save",
           "describe"]

logger = logging.getLogger(__name__)

FORMAT_TAG = "tritonsd"
DEMO_MODEL = Path(__file__).resolve().parent.parent / "engine" / "data" / "demo" / "demo.safetensors"


def default_model() -> Path:
    """The small demo model shipped inside the package, used when no checkpoint is named."""
    if not DEMO_MODEL.is_file():
        raise CheckpointError(
            "no checkpoint given and the demo model is not installed with this copy of tritonsd; "
            "point it at an SD checkpoint (Pipeline.from_checkpoint(PATH), or --model PATH on the command line)"
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
    if "v_pred" in raw:  # ComfyUI's mark of a v-prediction model: a flag, not a weight
        metadata = {**metadata, "v_pred": "true"}
    return "single_file", from_original(raw), metadata


def _check_architecture(path: Path, state: dict) -> None:
    name, evidence = architecture(state)
    if name == "unknown":
        first = ", ".join(list(state)[:5])
        raise CheckpointError(
            f"{path}: not a Stable Diffusion checkpoint: {evidence}; its {len(state)} tensors begin {first}"
        )
    if name in USES:
        raise CheckpointError(f"{path}: not a model but {name} ({evidence}); {USES[name]}")
    if name not in SUPPORTED:
        raise CheckpointError(
            f"{path}: looks like {name} ({evidence}); tritonsd runs {FAMILY_LIST} text-to-image models"
        )


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
    """(format, tensors under the engine's names, metadata) of a checkpoint of a family the engine runs. Metadata is the safetensors
    header's, or for a diffusers folder each part's config.json. dtype/device cast tensor by tensor."""
    path = Path(path)
    fmt, state, metadata = _read(path)
    _check_architecture(path, state)
    _check_tensors(path, state)
    return fmt, _cast(state, dtype, device), metadata


def read_config(path, base: ModelConfig | None = None) -> ModelConfig:
    """A model config file: tritonsd's JSON (ModelConfig's fields) or an original CompVis YAML (v1-inference.yaml),
    whose unstated sizes come from base (SD 1.x's by default)."""
    path = Path(path)
    if path.suffix.lower() in (".yaml", ".yml"):
        return read_compvis_config(path, base)
    return ModelConfig.from_json(path)


def _config(path: Path, fmt: str, state: dict, metadata: dict, prediction_type: str | None = None
            ) -> tuple[ModelConfig, str | None]:
    """The config a checkpoint says it has (its own metadata, diffusers' config.json files, a NAME.json or NAME.yaml
    beside a single file, or else what its shapes imply) with prediction_type, if given, in place of its own; and
    where the prediction type came from: None when nothing says and the UNet has to be tested (_probe)."""
    side = path.with_suffix(".json")
    yaml = next((p for p in (path.with_suffix(".yaml"), path.with_suffix(".yml")) if p.is_file()), None)
    where = "the model config in its metadata" if fmt == FORMAT_TAG else f"{(yaml or side).name} beside it"
    try:
        if fmt == FORMAT_TAG:
            config, source = ModelConfig.from_dict(parse_json(metadata.get("config", "null"))), "the file's config"
        elif fmt == "diffusers":
            config = config_from_diffusers(metadata)
            source = "scheduler/scheduler_config.json" if "scheduler" in metadata else _family_rule(state)
        elif yaml is not None:
            # The CompVis config states the architecture and the prediction type; the shapes give the sizes, and the
            # default image size that goes with the prediction type, as for a file without a config.
            stated = read_compvis_config(yaml, infer_config(state)).prediction_type
            config, source = read_compvis_config(yaml, infer_config(state, stated)), yaml.name
        else:
            d = read_json(side) if side.is_file() else None
            # AUTOMATIC1111 keeps its own notes on a model in NAME.json (description, activation text, ...).
            if isinstance(d, dict) and not any(key in d for key in (*PARTS, "prediction_type")):
                logger.info("%s has none of a model config's parts (%s): not a model config, ignored; the config "
                            "is read off the tensor shapes", side, ", ".join(PARTS))
                d = None
            if d is not None:
                config, source = ModelConfig.from_dict(d), side.name
            else:
                stated = None if prediction_type else stated_prediction_type(metadata)
                source = "the file's metadata" if stated else _family_rule(state)
                # The default size follows the prediction type here: SD 2.x's v-prediction models draw at 768.
                config = infer_config(state, prediction_type or stated or "epsilon")
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except ValueError as e:
        raise CheckpointError(f"{path}: {where}: {e}") from None
    if prediction_type is None:
        return config, source
    return _with_prediction_type(config, prediction_type), "given"


def _family_rule(state: dict) -> str | None:
    """SD 1.x and SDXL models predict noise unless they say otherwise; SD 2.x comes both ways, so None: the UNet is
    tested."""
    name = architecture(state)[0]
    return None if name == "SD 2.x" else f"{name} (noise-predicting)"


def _with_prediction_type(config: ModelConfig, prediction_type: str) -> ModelConfig:
    try:
        return dataclasses.replace(config, prediction_type=prediction_type)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def _probe(fmt: str, state: dict, config: ModelConfig, unet: nn.Module) -> tuple[ModelConfig, str]:
    """The config with the prediction type AUTOMATIC1111's test finds in the loaded UNet (and, for a config read off
    the shapes, the default size that goes with it), and what the test measured."""
    prediction_type, statistic = probe_prediction_type(unet, config)
    found = f"a test evaluation of its UNet (mean output - input {statistic:.2f}; v-prediction below -1)"
    if fmt == "single_file":
        return infer_config(state, prediction_type), found
    return _with_prediction_type(config, prediction_type), found


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
        return f"{path}: does not match the model its config describes; " + "; ".join(problems)
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
    metadata: dict = field(default_factory=dict)
    prediction_source: str | None = None  # where the prediction type came from; None: the UNet must be tested


def _tokenizer(path: Path, fmt: str, config: ModelConfig) -> CLIPTokenizer:
    """A diffusers folder's own tokenizer (tokenizer/, or an SDXL refiner's tokenizer_2/), else CLIP's, padding as
    the first text tower does; its ids must all have a row in every tower's token embedding."""
    folder = next((path / name for name in ("tokenizer", "tokenizer_2") if (path / name / "vocab.json").is_file()),
                  None) if fmt == "diffusers" else None
    try:
        tokenizer = CLIPTokenizer.from_folder(folder) if folder else CLIPTokenizer.default()
        tokenizer = tokenizer.with_pad_token(config.text.pad_token)
    except ValueError as e:
        raise CheckpointError(f"{path}: its tokenizer: {e}") from None
    top = max(tokenizer.vocab.values())
    vocab = min(tower.vocab_size for tower in config.towers)
    if top >= vocab:
        raise CheckpointError(f"{path}: its tokenizer's ids go up to {top}, but its text encoder has {vocab} token "
                              "embeddings")
    return tokenizer


def _inspect(path: Path, config: ModelConfig | None = None, prediction_type: str | None = None) -> _Inspection:
    """Every check `load` makes, in order, for `load` and `describe` alike. Only an unreadable file raises; any other
    refusal is `problem`. The config is held to the tensors' shapes before a module is built, so no config a file
    states can make the engine build more than the file holds."""
    fmt, state, metadata = _read(path)
    found = _Inspection(fmt, state, architecture(state), metadata=metadata)
    try:
        _check_architecture(path, state)
        _check_tensors(path, state)
        if config is None:
            found.config, found.prediction_source = _config(path, fmt, state, metadata, prediction_type)
        else:
            found.prediction_source = "given"
            found.config = config if prediction_type is None else _with_prediction_type(config, prediction_type)
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


def load(path, *, device="cpu", dtype: torch.dtype = torch.float32, config: ModelConfig | None = None,
         prediction_type: str | None = None) -> tuple[StableDiffusion, CLIPTokenizer]:
    """The model, ready for inference, and its tokenizer. The modules are built on the meta device and take the
    checkpoint's tensors as they are (cast once), so the weights are in memory once and never randomly initialised.
    prediction_type ("epsilon" or "v_prediction") overrides what the checkpoint or config says."""
    path = Path(path)
    found = _inspect(path, config, prediction_type)
    if found.problem:
        raise CheckpointError(found.problem)
    model = found.model
    model.load_state_dict(_cast(found.state, dtype, device), strict=True, assign=True)
    model.eval().requires_grad_(False)
    if found.prediction_source is None:
        model.config, test = _probe(found.format, found.state, model.config, model.unet)
        logger.warning("%s: nothing says what this SD 2.x model predicts; %s says %s. Pass prediction_type "
                       "(--prediction-type) to choose, or keep the answer with `tritonsd convert`.",
                       path, test, model.config.prediction_type)
    return model, found.tokenizer


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
    """What a checkpoint holds, for `tritonsd info`: format, architecture, config, where its prediction type comes
    from, dtypes, parameters per part, the tensors missing, unexpected or wrongly shaped for its config, and
    `problem`: why `load` would refuse it (the same checks, the same message), or None. Only unreadable files raise."""
    path = Path(path)
    found = _inspect(path)
    config, source = found.config, found.prediction_source
    if source is None and found.problem is None:
        found.model.load_state_dict(found.state, strict=True, assign=True)
        config, source = _probe(found.format, found.state, config, found.model.unet.eval())
    parts = Counter()
    for k, t in found.state.items():
        parts[k.split(".", 1)[0]] += t.numel()
    missing, unexpected, wrong_shape = found.mismatches
    info = {
        "path": str(path), "format": found.format, "architecture": found.architecture[0],
        "evidence": found.architecture[1], "config": config.to_dict() if config else None,
        # The side of the images the model makes when none is asked for: its training latents times the VAE's factor.
        "default_size": config and config.unet.sample_size * 2 ** (len(config.vae.ch_mult) - 1),
        "prediction_source": source,
        "dtypes": dict(Counter(str(t.dtype).removeprefix("torch.") for t in found.state.values())),
        "parameters": dict(parts), "missing": missing, "unexpected": unexpected, "wrong_shape": wrong_shape,
        "problem": found.problem,
    }
    name = found.architecture[0]
    if name in USES:  # a valid file of another kind: say what it is for, not that it is no model
        info["use"], info["problem"] = USES[name], None
    if name == "a LoRA":
        info["lora"] = _describe_lora(found.state, found.metadata)
        info["problem"] = info["lora"]["problem"] and (f"{path}: not a LoRA for any model tritonsd runs "
                                                       f"({FAMILY_LIST}): {info['lora']['problem']}")
    return info


def _describe_lora(state: dict, metadata: dict) -> dict:
    """describe_lora against each family's model (on the meta device), with the families it fits as its family
    ("SD 1.x or SD 2.x" for one whose layers fit both); if it fits none, the problem against the family its names
    or shapes name (else SD 1.x)."""
    fits = {family: describe_lora(state, metadata, StableDiffusion.on_meta(config))
            for family, config in FAMILIES.items()}
    good = [family for family, lora in fits.items() if lora["problem"] is None]
    if good:
        return {**fits[good[0]], "family": " or ".join(good)}
    first = next(iter(fits.values()))
    return fits.get(first["family"], first)
