"""Textual-inversion embeddings in the files people have: AUTOMATIC1111's .pt ({"string_to_param": {"*": T[n, hidden]},
"name": ...}), A1111's and kohya's .safetensors ({"emb_params": T[n, hidden]}) and diffusers' learned_embeds
({token: T[hidden]}, .bin or .safetensors). Pickles are read weights-only."""

from pathlib import Path

import torch

from tritonsd.engine.config import FAMILY_BY_TEXT_WIDTH
from tritonsd.loader.formats import CheckpointError, read_object

SUFFIXES = (".pt", ".bin", ".safetensors")


def read_embedding(path, hidden_size: int) -> torch.Tensor:
    """The embedding's vectors [n, hidden_size] in float32."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such embedding file")
    vectors = _vectors(path, read_object(path))
    if vectors.ndim == 1:  # diffusers keeps a one-vector embedding as [hidden]
        vectors = vectors[None]
    if vectors.ndim != 2 or not vectors.is_floating_point():
        raise CheckpointError(f"{path}: the embedding is a {vectors.dtype} tensor of shape {list(vectors.shape)}, not "
                              "floating-point vectors [n, hidden]")
    if vectors.shape[1] != hidden_size:
        theirs, ours = (FAMILY_BY_TEXT_WIDTH.get(w) for w in (vectors.shape[1], hidden_size))
        raise CheckpointError(f"{path}: embedding vectors of size {vectors.shape[1]}"
                              f"{f' (an {theirs} embedding)' if theirs else ''}, but this model's text encoder has "
                              f"hidden size {hidden_size}{f' ({ours})' if ours else ''}; an embedding works only with "
                              "the model family it was trained for")
    vectors = vectors.detach().to(torch.float32).clone()
    if not torch.isfinite(vectors).all():
        raise CheckpointError(f"{path}: the embedding holds NaN or infinite values")
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
    if "clip_l" in obj and "clip_g" in obj:
        raise CheckpointError(f"{path}: an SDXL embedding (clip_l and clip_g vectors); this model is not SDXL")
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
