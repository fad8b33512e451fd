"""VAE files on their own (vae-ft-mse-840000-ema-pruned and the like), to replace a model's VAE."""

from pathlib import Path

import torch

from tritonsd.engine.config import read_json
from tritonsd.loader import _cast, _check_tensors
from tritonsd.loader.convert import IGNORED, ORIGINAL_PREFIXES, from_original, vae_from_diffusers
from tritonsd.loader.formats import WEIGHT_FILES, CheckpointError, read_file

PREFIX = ORIGINAL_PREFIXES["vae"][0]


def read_vae(path, dtype: torch.dtype | None = None, device="cpu") -> dict[str, torch.Tensor]:
    """Engine-named VAE tensors (vae.*) of an original single-file VAE (encoder.*, decoder.*, quant_conv.*,
    post_quant_conv.*, with or without first_stage_model.; a whole checkpoint gives its VAE) or a diffusers VAE
    folder (config.json and weights; a model folder's vae/ subfolder is taken)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        folder = path / "vae" if (path / "vae").is_dir() else path
        weights = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
        if weights is None:
            raise CheckpointError(f"{folder}: not a diffusers VAE folder: no weights file (looked for {', '.join(WEIGHT_FILES)})")
        raw, _ = read_file(weights)
        state = vae_from_diffusers(raw)
    else:
        raw, _ = read_file(path)
        whole = any(k.startswith(PREFIX) for k in raw)
        state = from_original({k if whole else PREFIX + k: t for k, t in raw.items()
                               if k.startswith(PREFIX) or not (whole or IGNORED.fullmatch(k))})
    if not any(k.startswith("vae.encoder.") or k.startswith("vae.decoder.") for k in state):
        first = ", ".join(list(raw)[:5])
        raise CheckpointError(f"{path}: not a VAE: it has no encoder.* or decoder.* tensors (its {len(raw)} tensors "
                              f"begin {first})")
    _check_tensors(path, state)
    return _cast(state, dtype, device)


def read_vae_force_upcast(path) -> bool | None:
    """What a diffusers VAE folder's config.json (a model folder's vae/ taken) says of float16: force_upcast true (the
    VAE overflows float16, as SDXL's does; diffusers' default when the config says nothing) or false (an fp16-safe VAE
    such as SDXL's fp16-fix). None for a single file, which says nothing."""
    path = Path(path)
    if not path.is_dir():
        return None
    config_file = (path / "vae" if (path / "vae").is_dir() else path) / "config.json"
    try:
        config = read_json(config_file)
    except ValueError as e:
        raise CheckpointError(f"{config_file}: cannot read the VAE's config ({e})") from None
    upcast = config.get("force_upcast", True) if isinstance(config, dict) else None
    if not isinstance(upcast, bool):
        raise CheckpointError(f"{config_file}: force_upcast must be true or false; got {str(upcast)[:40]}")
    return upcast
