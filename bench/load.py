"""Load time and peak memory for a full-size SD1.5 (or SDXL base) checkpoint: tritonsd's loader against
safetensors.torch.load_file reading every tensor of the same file. Each measurement runs in a fresh process so
peak RSS is its own. The file is synthetic (every real tensor name and shape in the original layout, random values).

    python bench/load.py [--model sd15|sdxl] [--json bench/results/load-cpu.json] [--repeat 3]

SDXL is loaded into float16 only: a float32 copy of it (14 GB) is not how it is run.
"""

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MEASURE = r"""
import resource, sys, time, torch
sys.path.insert(0, {root!r})
import safetensors.torch
from tritonsd import loader
path, how, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])


def load():
    if how == "safetensors":
        state = safetensors.torch.load_file(path)
        return [t.to(dtype) for t in state.values()]
    model, _ = loader.load(path, dtype=dtype)
    return list(model.parameters())


times = []
for _ in range(2):  # the first load in a process also pays torch's one-time set-up; the second is the steady cost
    start = time.perf_counter()  # imports are not part of loading
    tensors = load()
    total = sum(float(t.view(-1)[-1]) for t in tensors)
    times.append(time.perf_counter() - start)
    del tensors
print(times[0], times[1], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


# The model's family preset (tritonsd.engine.config.FAMILIES) and the dtypes it is loaded into.
MODELS = {"sd15": ("SD 1.x", ("float16", "float32")), "sdxl": ("SDXL", ("float16",))}


def write_checkpoint(path: Path, family: str) -> None:
    sys.path.insert(0, str(ROOT))
    import safetensors.torch
    import torch

    from tritonsd.engine.config import FAMILIES
    from tritonsd.engine.model import StableDiffusion
    from tritonsd.loader.convert import to_original

    gen = torch.Generator().manual_seed(0)
    state = {name: torch.randn(meta.shape, generator=gen, dtype=torch.float32).to(torch.float16)
             for name, meta in StableDiffusion.on_meta(FAMILIES[family]).state_dict().items()}
    safetensors.torch.save_file(to_original(state), path)


def measure(path: Path, how: str, dtype: str) -> tuple[float, float, int]:
    out = subprocess.run([sys.executable, "-c", MEASURE.format(root=str(ROOT)), str(path), how, dtype],
                         check=True, capture_output=True, text=True).stdout.split()
    return float(out[0]), float(out[1]), int(out[2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="sd15")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        family, dtypes = MODELS[args.model]
        path = Path(tmp) / f"{args.model}-synthetic.safetensors"
        write_checkpoint(path, family)
        size = path.stat().st_size
        rows = []
        for dtype in dtypes:
            for how in ("safetensors", "tritonsd"):
                runs = [measure(path, how, dtype) for _ in range(args.repeat)]
                first = sorted(r[0] for r in runs)[len(runs) // 2]
                again = sorted(r[1] for r in runs)[len(runs) // 2]
                peak = max(r[2] for r in runs)
                rows.append(dict(loader=how, dtype=dtype, first_load_seconds_median=first,
                                 second_load_seconds_median=again, peak_rss_bytes=peak, peak_over_file=peak / size))
                print(f"{how:12s} -> {dtype:8s} first {first:6.2f} s, again {again:6.2f} s, "
                      f"peak RSS {peak / 2**30:5.2f} GiB ({peak / size:.2f}x the file)")
    result = dict(model=family, file_bytes=size, file_dtype="float16", device="cpu", cpu=platform.processor() or platform.machine(),
                  cores=len(__import__("os").sched_getaffinity(0)), torch=torch.__version__,
                  python=platform.python_version(), rows=rows)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
