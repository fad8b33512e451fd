"""Textual-inversion embeddings in the files people have: AUTOMATIC1111's .pt ({"string_to_param": {"*": T[n, hidden]},
"name": ...}), A1111's and kohya's .safetensors ({"emb_params": T[n, hidden]}) and diffusers' learned_embeds
({token: T[hidden]}, .bin or .safetensors), and SDXL's ({"clip_l": T[n, 768], "clip_g": T[n, 1280]}: one set of
vectors per text tower). Pickles are read weights-only."""

from pathlib import Path

import torch

from tritonsd.engine.config import FAMILY_BY_TEXT_WIDTH
from tritonsd.loader.formats import CheckpointError, read_object

SUFFIXES = (".pt", ".bin", ".safetensors")


def read_embedding(path, hidden_size: int) -> torch.Tensor:
    """The embedding's vectors [n, hidden_size] in float32, for a model of one text tower (SD 1.x, SD 2.x)."""
    path = _existing(path)
    return _checked(path, _vectors(path, read_object(path)), hidden_size)


def read_sdxl_embedding(path, towers: dict[str, int]) -> tuple[torch.Tensor, ...]:
    """An SDXL embedding's vectors [n, hidden] in float32 for each text tower, by the name the file gives its
    vectors and the tower's hidden size: {"clip_l": 768, "clip_g": 1280} for the base, {"clip_g": 1280} for the
    refiner."""
    path = _existing(path)
    obj = read_object(path)
    wanted = " and ".join(towers)
    if not isinstance(obj, dict) or not any(k in obj for k in ("clip_l", "clip_g")):
        raise CheckpointError(f"{path}: not an SDXL embedding: this SDXL model needs {wanted} vectors, and the file "
                              f"holds {_describe(obj)} (an SD 1.x/2.x embedding?)")
    missing = [k for k in towers if not isinstance(obj.get(k), torch.Tensor)]
    if missing:
        raise CheckpointError(f"{path}: the SDXL embedding has no {' or '.join(missing)} vectors; this model needs "
                              f"{wanted} (the file holds {_describe(obj)})")
    vectors = tuple(_checked(path, obj[k], size, k) for k, size in towers.items())
    if len({len(v) for v in vectors}) != 1:
        raise CheckpointError(f"{path}: the SDXL embedding's towers have different vector counts: "
                              + ", ".join(f"{k} {len(v)}" for k, v in zip(towers, vectors)))
    return vectors


def _existing(path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such embedding file")
    return path


def _checked(path: Path, vectors: torch.Tensor, hidden_size: int, key: str | None = None) -> torch.Tensor:
    where = f"{path}" if key is None else f"{path}: {key}"
    if vectors.ndim == 1:  # diffusers keeps a one-vector embedding as [hidden]
        vectors = vectors[None]
    if vectors.ndim != 2 or not vectors.is_floating_point():
        raise CheckpointError(f"{where}: the embedding is a {vectors.dtype} tensor of shape {list(vectors.shape)}, not "
                              "floating-point vectors [n, hidden]")
    if vectors.shape[1] != hidden_size:
        theirs, ours = (FAMILY_BY_TEXT_WIDTH.get(w) for w in (vectors.shape[1], hidden_size))
        raise CheckpointError(f"{where}: embedding vectors of size {vectors.shape[1]}"
                              f"{f' (an {theirs} embedding)' if theirs else ''}, but this model's text encoder has "
                              f"hidden size {hidden_size}{f' ({ours})' if ours else ''}; an embedding works only with "
                              "the model family it was trained for")
    vectors = vectors.detach().to(torch.float32).clone()
    if not torch.isfinite(vectors).all():
        raise CheckpointError(f"{where}: the embedding holds NaN or infinite values")
    return vectors


def _vectors(path: Path, obj) -> torch.Tensor:
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path}: not a textual-inversion embedding: it holds a {type(obj).__name__}, not a dict")
    if "string_to_param" in obj:
        params = obj["string_to_param"]
        tensors = list(params.values()) if isinstance(params, dict) else []
        if len(tensors) != 1 or not isinstance(tensors[0], torch.Tensor):
            raise CheckpointError(f"{path}: string_to_param should hold one tensor; it holds {_describe(params)}")
        return tensors[0]
    if isinstance(obj.get("emb_params"), torch.Tensor):
        return obj["emb_params"]
    if "clip_l" in obj or "clip_g" in obj:
        raise CheckpointError(f"{path}: an SDXL embedding (clip_l/clip_g vectors); this model is not SDXL")
    tensors = [v for v in obj.values() if isinstance(v, torch.Tensor)]
    if len(obj) == 1 and len(tensors) == 1:
        return tensors[0]
    raise CheckpointError(
        f"{path}: not a textual-inversion embedding: expected string_to_param (A1111 .pt), emb_params (.safetensors) "
        f"or a single {{token: vector}} entry (diffusers); it holds {_describe(obj)}"
    )


def _describe(obj) -> str:
    if not isinstance(obj, dict):
        return f"a {type(obj).__name__}"
    keys = [str(k) for k in obj]
    more = f", ... ({len(keys) - 8} more)" if len(keys) > 8 else ""
    return f"{len(keys)} entries: {', '.join(keys[:8])}{more}" if keys else "nothing"
