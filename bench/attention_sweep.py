"""Tile sweep for the flash-attention kernel at SD1.5's shapes: the data behind `kernels.attention._config`.

    python bench/attention_sweep.py --json OUT.json [--jobs 12]

Every (shape, BLOCK_M, BLOCK_N, num_warps, num_stages) is compiled first by parallel worker processes sharing
Triton's cache, then run in this process: its error against SDPA in float32 and its median time. The fastest correct
configuration per shape is printed last, with cuDNN SDPA's time beside it.
"""

import argparse
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from kernels.attention import LOG2E, _attention_fwd_kernel  # noqa: E402

SHAPES = [(2, 8, 4096, 4096, 40), (2, 8, 4096, 77, 40), (2, 8, 1024, 1024, 80), (2, 8, 1024, 77, 80),
          (2, 8, 256, 256, 160), (2, 8, 4096, 4096, 64)]
CONFIGS = [c for c in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4))
           if not (c[0] == 64 and c[2] == 8)]


def inputs(shape):
    B, H, Lq, Lk, D = shape
    torch.manual_seed(0)
    q = torch.randn(B, Lq, H, D, device="cuda", dtype=torch.float16).transpose(1, 2)
    k, v = (torch.randn(B, Lk, H, D, device="cuda", dtype=torch.float16).transpose(1, 2) for _ in range(2))
    return q, k, v


def launch(q, k, v, config):
    block_m, block_n, warps, stages = config
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    out = torch.empty((B, Lq, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)
    _attention_fwd_kernel[(triton.cdiv(Lq, block_m), B * H)](
        q, k, v, out, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, Lq, Lk, LOG2E / math.sqrt(D),
        HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_M=block_m, BLOCK_N=block_n,
        CAUSAL=False, EVEN_N=Lk % block_n == 0, PRECISION="tf32", num_warps=warps, num_stages=stages,
    )
    return out


def jobs():
    return [(s, c) for s in SHAPES for c in CONFIGS]


def worker(index: int, count: int) -> None:
    for shape, config in jobs()[index::count]:
        try:
            launch(*inputs(shape), config)
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
        for config in CONFIGS:
            try:
                out = launch(q, k, v, config)
                err = ((out.float() - ref).norm() / ref.norm()).item()
                ms = do_bench(lambda: launch(q, k, v, config), return_mode="median") if err < 1e-2 else None
            except Exception as e:
                err, ms = f"{type(e).__name__}", None
            rows.append({"config": config, "ms": ms, "rel_err": err})
        best = min((r for r in rows if r["ms"]), key=lambda r: r["ms"])
        results.append({"shape": shape, "cudnn_ms": cudnn, "best": best, "rows": rows})
        print(f"{shape}: best {best['config']} {best['ms']:.4f} ms, cuDNN {cudnn:.4f} ms", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                         "triton": triton.__version__, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
