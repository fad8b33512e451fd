"""LoRA switching at full SD 1.5 size: load + apply, re-scale and unload of a rank-32 kohya LoRA over every
attention, feed-forward and projection layer of the UNet and the text encoder, and the memory it adds. The
checkpoint is synthetic (every real SD 1.5 tensor name and shape, random values, float16, as bench/load.py writes
it) and loaded in float16; the measurement runs in a fresh process so its memory figures are its own.

    python bench/lora.py [--json bench/results/lora-cpu-2core.json] [--repeat 3]
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MEASURE = r"""
import hashlib, json, resource, sys, time, torch
sys.path.insert(0, {root!r})
from tritonsd import Pipeline

checkpoint, lora, repeat, device = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]


def sync():
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def memory():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    kib = lambda key: int(fields[key].split()[0]) * 1024
    return dict(rss=kib("VmRSS"), anon=kib("RssAnon"), file=kib("RssFile"),
                peak=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def digest(pipe, names):
    return {{n: hashlib.sha256(pipe.model.get_parameter(n).detach().cpu().view(torch.uint8).numpy().tobytes()).hexdigest()
            for n in names}}


pipe = Pipeline.from_checkpoint(checkpoint, dtype=torch.float16, device=device)
model_bytes = sum(p.numel() * p.element_size() for p in pipe.model.parameters())
sum(float(p.float().sum()) for p in pipe.model.parameters())  # every page of the model resident
touched = sorted({{layer.target.param for layer in pipe._loras.read(lora).layers}})
before_digest = digest(pipe, touched)
base = memory()
times = dict(load_apply=[], rescale=[], unload=[])
after_apply = None
for i in range(repeat):
    start = time.perf_counter()
    pipe.load_lora(lora, scale=1.0, name="bench")
    sync()
    times["load_apply"].append(time.perf_counter() - start)
    after_apply = after_apply or memory()
    start = time.perf_counter()
    pipe.set_lora_scale("bench", 0.5)
    sync()
    times["rescale"].append(time.perf_counter() - start)
    start = time.perf_counter()
    pipe.unload_lora("bench")
    sync()
    times["unload"].append(time.perf_counter() - start)
end = memory()
exact = digest(pipe, touched) == before_digest
layers = len(pipe._loras.read(lora).layers)
print(json.dumps(dict(threads=torch.get_num_threads(), times=times, model_bytes=model_bytes, memory_before=base, memory_after_apply=after_apply,
                      memory_after_unload=end, touched_weights=len(touched), layers=layers, unload_exact=exact)))
"""


def write_lora(path: Path, rank: int = 32) -> int:
    """kohya names (CompVis-style module paths) over every attention, feed-forward and projection layer of SD 1.5's
    UNet and text encoder; returns the layer count."""
    import safetensors.torch
    import torch

    from tritonsd.engine.config import ModelConfig
    from tritonsd.engine.model import StableDiffusion

    model = StableDiffusion.on_meta(ModelConfig())
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    unet_leaves = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
                   "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
    for name, shape in model.state_dict().items():
        module = name.removesuffix(".weight")
        if name.startswith("unet.") and (module.endswith(unet_leaves) or module.endswith((".proj_in", ".proj_out"))):
            key = "lora_unet_" + module.removeprefix("unet.").replace(".", "_")
        elif name.startswith("text_encoder.") and module.endswith(("_proj", ".fc1", ".fc2")):
            key = "lora_te_text_model_" + module.removeprefix("text_encoder.").replace(".", "_")
        else:
            continue
        out, inp = shape.shape[0], shape.shape[1:].numel()
        tensors[f"{key}.lora_down.weight"] = (torch.randn(rank, inp, generator=gen) / inp**0.5).half().reshape(rank, *shape.shape[1:])
        tensors[f"{key}.lora_up.weight"] = (torch.randn(out, rank, generator=gen) * 0.01).half().reshape(out, rank, *[1] * (len(shape.shape) - 2))
        tensors[f"{key}.alpha"] = torch.tensor(float(rank) / 2, dtype=torch.float16)
    safetensors.torch.save_file(tensors, path)
    return len(tensors) // 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (memory figures are the host's)")
    parser.add_argument("--threads", type=int, help="torch's intra-op threads (default: torch's own choice)")
    args = parser.parse_args()
    import torch
    import triton

    from bench.load import write_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, lora = Path(tmp) / "sd15-synthetic.safetensors", Path(tmp) / "lora-r32.safetensors"
        write_checkpoint(checkpoint)
        layers = write_lora(lora)
        os.sync()  # no write-back of the fresh files competing with the measurement
        load_before = os.getloadavg()
        env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
        out = subprocess.run([sys.executable, "-c", MEASURE.format(root=str(ROOT)), str(checkpoint), str(lora),
                              str(args.repeat), args.device], check=True, capture_output=True, text=True, env=env).stdout
        r = json.loads(out.strip().splitlines()[-1])
        lora_bytes = lora.stat().st_size
        load_after = os.getloadavg()
    # The first load also takes the copy-on-write faults of the weights mapped from the file; the median is the rest.
    median = {k: sorted(v)[len(v) // 2] for k, v in r["times"].items()}
    best = {k: min(v) for k, v in r["times"].items()}
    added = r["memory_after_apply"]["rss"] - r["memory_before"]["rss"]
    peak = r["memory_after_apply"]["peak"] - r["memory_before"]["peak"]
    for k, v in median.items():
        print(f"{k:12s} median {v:6.3f} s, best {best[k]:6.3f} s over {args.repeat} "
              f"(each: {', '.join(f'{t:.3f}' for t in r['times'][k])})")
    print(f"{r['threads']} thread(s); load average (1 min) {load_before[0]:.1f} before, {load_after[0]:.1f} after, "
          f"on {os.cpu_count()} CPUs")
    print(f"model {r['model_bytes'] / 2**30:.2f} GiB; LoRA file {lora_bytes / 2**20:.1f} MiB, {layers} layers, "
          f"{r['touched_weights']} engine weights; RSS added after apply {added / 2**20:.0f} MiB "
          f"({added / r['model_bytes']:.1%} of the model), peak RSS rise during the first apply {peak / 2**20:.0f} MiB; "
          f"unload exact: {r['unload_exact']}")
    result = dict(
        device=args.device, cpu=platform.processor() or platform.machine(), cores=len(os.sched_getaffinity(0)),
        torch=torch.__version__, triton=triton.__version__, python=platform.python_version(), dtype="float16",
        threads=r["threads"], rank=32, lora_layers=layers, lora_file_bytes=lora_bytes, repeat=args.repeat, seconds_median=median,
        seconds_best=best, load_average_1min=dict(before=load_before[0], after=load_after[0]),
        seconds=r["times"], model_bytes=r["model_bytes"], rss_added_after_apply_bytes=added,
        rss_added_over_model=added / r["model_bytes"], peak_rss_rise_first_apply_bytes=peak,
        memory=dict(before=r["memory_before"], after_apply=r["memory_after_apply"], after_unload=r["memory_after_unload"]),
        touched_weights=r["touched_weights"], unload_exact=r["unload_exact"],
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
