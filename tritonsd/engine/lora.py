"""LoRAs applied to a loaded model, switched in place and exactly.

Every weight a LoRA touches is recomputed from its base value whenever the set of LoRAs or their scales changes:
W = base + Σ scale · ΔW, summed in float32 in the order of the LoRAs' names and cast once to the model's dtype. The
result depends only on which LoRAs are applied at which scales, never on the order of calls, and with none applied
it is the base weight bit for bit. Weights are written into their existing storage (copy_), so captured CUDA graphs,
which read the parameters' memory, see the new weights with no recapture.

The base values come from the checkpoint file the model was loaded from (read again, memory-mapped, for the
touched weights only), so holding them costs no memory; a model built in memory keeps copies of the touched
weights instead.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from tritonsd.loader.formats import CheckpointError
from tritonsd.loader.lora import LORA_SUFFIXES, Layer, LoraFile, lora_targets, read_lora

# AUTOMATIC1111's extra-network tag: <kind:arguments>. `lyco` is the older LyCORIS extension's name for the same.
TAG = re.compile(r"<(\w+):([^>]+)>")
TAG_KINDS = ("lora", "lyco")


def extract_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """The prompt without its `<lora:NAME>` / `<lora:NAME:WEIGHT>` tags, and (NAME, WEIGHT) for each (weight 1 if
    omitted). AUTOMATIC1111's separate text-encoder and UNet weights (`<lora:NAME:TE:UNET>`, `te=`, `unet=`) are
    refused, as are other extra networks (hypernetworks)."""
    tags = []

    def take(m: re.Match) -> str:
        kind, args = m.group(1), m.group(2).split(":")
        if kind not in TAG_KINDS:
            raise ValueError(f"prompt tag {m.group(0)!r}: only <lora:NAME:WEIGHT> extra networks are supported")
        name = args[0].strip()
        if not name or len(args) > 2 or "=" in m.group(2):
            raise ValueError(f"prompt tag {m.group(0)!r}: write <lora:NAME> or <lora:NAME:WEIGHT> "
                             "(separate text-encoder and UNet weights are not supported)")
        try:
            weight = float(args[1]) if len(args) == 2 else 1.0
        except ValueError:
            raise ValueError(f"prompt tag {m.group(0)!r}: weight {args[1]!r} is not a number") from None
        if not math.isfinite(weight):
            raise ValueError(f"prompt tag {m.group(0)!r}: weight must be finite")
        tags.append((name, weight))
        return ""

    return TAG.sub(take, prompt), tags


def find_lora(name: str, dirs: list[Path]) -> Path:
    """The LoRA file named NAME (its file name without extension) in the folders, searched in order, with their
    subfolders; the first match in sorted path order wins."""
    if "/" in name or "\\" in name or name in (".", ".."):
        raise ValueError(f"LoRA name {name!r} is a path; name a file in the LoRA folders by its name alone")
    for folder in dirs:
        found = sorted(p for p in Path(folder).rglob(f"{_glob_escape(name)}.*")
                       if p.suffix.lower() in LORA_SUFFIXES and p.stem == name and p.is_file())
        if found:
            return found[0]
    where = ", ".join(map(str, dirs)) or "no LoRA folders (give lora_dirs, or --lora-dir on the command line)"
    raise ValueError(f"no LoRA named {name!r} in {where}")


def _glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"LoRA scale must be a finite number, got {scale!r}")
    return float(scale)


class CheckpointBase:
    """Base weights read again from the checkpoint the model came from. The file's size and modification time are
    checked first: a file changed since loading would give other weights."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.stamp = self._stamp()

    def _stamp(self) -> list[tuple]:
        files = [self.path] if self.path.is_file() else sorted(p for p in self.path.rglob("*") if p.is_file())
        return [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]

    def read(self, model: nn.Module, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        from tritonsd import loader

        try:
            changed = self._stamp() != self.stamp
        except OSError:
            changed = True
        if changed:
            raise CheckpointError(f"{self.path}: the checkpoint changed on disk since it was loaded; its base weights "
                                  "cannot be read again to apply or remove LoRAs (load the model again)")
        _, state, _ = loader.load_state_dict(self.path)
        for name in names:
            param = model.get_parameter(name)
            if name in state:
                t = state[name]
            else:  # a weight the engine joins: its parts in order, as the model joined them when loading
                module_name, _, leaf = name.rpartition(".")
                parts = model.get_submodule(module_name).fused[leaf]
                t = torch.cat([state[f"{module_name}.{p}.weight"].to(param.device, param.dtype) for p in parts])
            yield name, t.to(param.device, param.dtype)


class CopiedBase:
    """Base weights of a model built in memory: a copy of each weight the first time a LoRA touches it."""

    def __init__(self):
        self.copies: dict[str, torch.Tensor] = {}

    def read(self, model: nn.Module, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for name in names:
            if name not in self.copies:
                self.copies[name] = model.get_parameter(name).detach().clone()
            yield name, self.copies[name]


class LoraSet:
    """The LoRAs applied to one model: {name: (file, scale)}."""

    def __init__(self, model: nn.Module, base: CheckpointBase | CopiedBase):
        self.model = model
        self.base = base
        self.applied: dict[str, tuple[LoraFile, float]] = {}
        self._targets = None

    @property
    def scales(self) -> dict[str, float]:
        return {name: scale for name, (_, scale) in self.applied.items()}

    def read(self, path) -> LoraFile:
        if self._targets is None:
            self._targets = lora_targets(self.model)
        return read_lora(path, self.model, self._targets)

    def load(self, path, scale: float = 1.0, name: str | None = None) -> str:
        scale = check_scale(scale)
        name = Path(path).stem if name is None else name
        if not isinstance(name, str) or not name:
            raise ValueError(f"LoRA name must be a non-empty string, got {name!r}")
        if name in self.applied:
            raise ValueError(f"a LoRA named {name!r} is already loaded; change its scale with set_lora_scale, "
                             "or unload it first")
        lora = self.read(path)
        self._switch({**self.applied, name: (lora, scale)})
        return name

    def set_scale(self, name: str, scale: float) -> None:
        scale = check_scale(scale)
        self._loaded(name)
        self._switch({**self.applied, name: (self.applied[name][0], scale)})

    def unload(self, name: str | None = None) -> None:
        if name is not None:
            self._loaded(name)
        self._switch({k: v for k, v in self.applied.items() if name is not None and k != name})

    @contextmanager
    def temporarily(self, loras: dict[str, tuple[LoraFile | None, float]]):
        """Apply these LoRAs (a None file: the one already loaded under that name) at these scales for the block's
        duration, then return to exactly the state before."""
        before = dict(self.applied)
        after = dict(before)
        for name, (lora, scale) in loras.items():
            after[name] = (lora or before[name][0], scale)
        self._switch(after)
        try:
            yield
        finally:
            self._switch(before)

    def _loaded(self, name: str) -> None:
        if name not in self.applied:
            loaded = ", ".join(map(repr, self.applied)) or "none"
            raise ValueError(f"no LoRA named {name!r} is loaded (loaded: {loaded})")

    def _switch(self, new: dict[str, tuple[LoraFile, float]]) -> None:
        """Make `new` the applied set, rewriting only the weights whose LoRAs or scales change."""
        old = self.applied
        changed = {n for n in old.keys() | new.keys() if old.get(n) != new.get(n)}
        touched = sorted({layer.target.param for n in changed for layer in (old.get(n) or new[n])[0].layers})
        if not touched:
            self.applied = new
            return
        contributions: dict[str, list[tuple[Layer, float]]] = {}
        for name in sorted(new):
            lora, scale = new[name]
            if scale != 0.0:
                for layer in lora.layers:
                    contributions.setdefault(layer.target.param, []).append((layer, scale))
        with torch.no_grad():
            for param_name, base in self.base.read(self.model, touched):
                param = self.model.get_parameter(param_name)
                layers = contributions.get(param_name)
                if layers:
                    _recompute(param, base, layers)
                else:
                    param.copy_(base)
        self.applied = new

    def hashes(self, names: list[str]) -> dict[str, str]:
        return {name: self.applied[name][0].hash for name in names}


# Elements per block of rows on the CPU: a float32 block (1 MiB) stays in cache from the read of the base through
# the updates to the write into the weight, instead of three passes over a float32 copy of the whole weight.
CPU_BLOCK = 1 << 18


def _recompute(param: torch.Tensor, base: torch.Tensor, layers: list[tuple[Layer, float]]) -> None:
    """param = base + Σ scale · ΔW, in float32, block of rows by block of rows."""
    rows = param.shape[0]
    blocked = param.device.type == "cpu" and param.is_contiguous()
    step = max(1, CPU_BLOCK // max(1, param[0].numel())) if blocked else rows
    out = param.view(rows, -1) if blocked else None
    base = base.reshape(rows, -1)
    updates = []  # (first row, last row, add(block, first, last)) per layer
    for layer, scale in layers:
        start, stop, _ = layer.target.rows.indices(rows)
        if layer.kind == "lora" and "lora_mid.weight" not in layer.factors:
            up = layer.factors["lora_up.weight"].flatten(1).float()
            down = layer.factors["lora_down.weight"].flatten(1).float()
            alpha = scale * layer.scale

            def add(block, a, b, up=up, down=down, alpha=alpha, start=start):
                block.addmm_(up[a - start:b - start], down, alpha=alpha)
        else:
            delta = layer.delta().reshape(stop - start, -1)

            def add(block, a, b, delta=delta, scale=scale, start=start):
                block.add_(delta[a - start:b - start], alpha=scale)
        updates.append((start, stop, add))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        block = base[r0:r1].to(torch.float32, copy=True)  # a copy even of a float32 base, which stays untouched
        for start, stop, add in updates:
            a, b = max(r0, start), min(r1, stop)
            if a < b:
                add(block[a - r0:b - r0], a, b)
        if blocked:
            out[r0:r1].copy_(block)
        else:
            param.copy_(block.view(param.shape))
