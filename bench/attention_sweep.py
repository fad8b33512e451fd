"""Tile sweep for the flash-attention kernel at SD1.5's shapes: the data behind `kernels.attention.plan`.

    python bench/attention_sweep.py --json OUT.json [--jobs 12]

Every (shape, head-dim tiles, BLOCK_M, BLOCK_N, num_warps, num_stages) is compiled first by parallel worker
processes sharing Triton's cache, then run in this process: its error against SDPA in float32 and its median time.
The head-dim tiles are the engine's split (e.g. 40 = 32 + 16) and, where that differs, one padded tile (64). The
fastest correct configuration per shape is printed last, with cuDNN SDPA's time beside it.
"""

import argparse
import itertools
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from tritonsd.kernels.attention import AttentionPlan, attention_triton, plan  # noqa: E402
from tools.sd15_shapes import SD15  # noqa: E402

# SD 1.5's UNet attention from full resolution down to L = 256 self-attention, and SD 2's head dim at L = 4096.
SHAPES = SD15.attention[:5] + [(2, 8, 4096, 4096, 64)]
TILES = [c for c in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4))
         if not (c[0] == 64 and c[2] == 8)]


def configs(shape) -> list[AttentionPlan]:
    head_dim, lk = shape[4], shape[3]
    split = plan(head_dim, lk, torch.float16)[:2]
    heads = dict.fromkeys([split, (triton.next_power_of_2(head_dim), 0)])
    return [AttentionPlan(*head, *tiles) for head in heads for tiles in TILES]


def inputs(shape):
    B, H, Lq, Lk, D = shape
    torch.manual_seed(0)
    q = torch.randn(B, Lq, H, D, device="cuda", dtype=torch.float16).transpose(1, 2)
    k, v = (torch.randn(B, Lk, H, D, device="cuda", dtype=torch.float16).transpose(1, 2) for _ in range(2))
    return q, k, v


def jobs():
    return [(s, c) for s in SHAPES for c in configs(s)]


def worker(index: int, count: int) -> None:
    for shape, config in jobs()[index::count]:
        try:
            attention_triton(*inputs(shape), tiles=config)
        except Exception as e:  # a config that does not compile is reported by the main process
            print(f"{shape} {config}: {type(e).__name__}", file=sys.stderr)
    torch.cuda.synchronize()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", type=Path)
    parser.add_argument("--jobs", type=int, default=12)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, args.jobs)
        return 0
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(i), "--jobs", str(args.jobs)]) for i in range(args.jobs)]
    for p in procs:
        p.wait()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    results = []
    for shape in SHAPES:
        q, k, v = inputs(shape)
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            cudnn = do_bench(lambda: F.scaled_dot_product_attention(q, k, v), return_mode="median")
        rows = []
        for config in configs(shape):
            try:
                out = attention_triton(q, k, v, tiles=config)
                err = ((out.float() - ref).norm() / ref.norm()).item()
                ms = do_bench(lambda: attention_triton(q, k, v, tiles=config), return_mode="median") if err < 1e-2 else None
            except Exception as e:
                err, ms = f"{type(e).__name__}", None
            rows.append({"config": config._asdict(), "ms": ms, "rel_err": err})
        best = min((r for r in rows if r["ms"]), key=lambda r: r["ms"])
        results.append({"shape": shape, "cudnn_ms": cudnn, "best": best, "rows": rows})
        print(f"{shape}: best {best['config']} {best['ms']:.4f} ms, cuDNN {cudnn:.4f} ms", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                         "triton": triton.__version__, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
