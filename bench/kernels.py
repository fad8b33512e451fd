"""Kernel benchmarks at SD1.5's 512x512 shapes: tritonsd's Triton kernels against PyTorch's own
implementations of the same op, on the same GPU, in the same run.

    python bench/kernels.py [--json OUT.json] [--dtype float16] [--only attention,group_norm,step]

- attention: batch 2 (guidance), 8 heads, self-attention at L = 4096 / 1024 / 256 / 64 with
  D = 40 / 80 / 160 / 160 and cross-attention to 77 tokens, in the engine's layout (heads split off
  [B, L, H*D] as strided views); against SDPA with each of its FLASH_ATTENTION,
  EFFICIENT_ATTENTION and CUDNN_ATTENTION backends (one that refuses the input is skipped), and,
  where the kernel splits the head dim (40 = 32 + 16), against itself with one padded tile
  (`triton_padded_head`). TFLOP/s = 4 * B * H * Lq * Lk * D / time.
- group_norm: GroupNorm(32) + SiLU on the UNet's and the VAE decoder's activations, NCHW and (as
  the engine runs them) channels_last, against F.silu(F.group_norm(...)). GB/s counts one read of x
  and one write of y.
- step: guidance + sampler update on [1, 4, 64, 64] latents (float32; float16 UNet output; with
  extra and noise), against the same arithmetic in eager PyTorch. GB/s counts each input read once
  and each output written once.
- geglu: h * gelu(gate) on the UNet's feed-forward activations [2, L, 2*I], against the eager
  chunk, F.gelu and product. GB/s counts one read of x and one write of the result.
- layer_norm: the residual add and LayerNorm of the UNet's transformer rows [2, L, C], against the
  eager add and F.layer_norm. GB/s counts reads of x and the residual, writes of the sum and the norm.

Every op is timed twice, both medians after warm-up on random normal inputs: `times_ms` with
triton.testing.do_bench (each call launched from Python, as in eager code), and `graph_times_ms`
with do_bench_cudagraph (the calls replayed from a CUDA graph, as the engine runs them: GPU time
without launch overhead). Speedups are taken on the graph times.
"""

import argparse
import json
import sys
import warnings
from pathlib import Path

# Runs as a script from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench, do_bench_cudagraph  # noqa: E402

from tritonsd.kernels.attention import attention_triton, plan  # noqa: E402
from tritonsd.kernels.geglu import geglu_triton  # noqa: E402
from tritonsd.kernels.group_norm import group_norm_triton  # noqa: E402
from tritonsd.kernels.guided_step import guided_step_triton  # noqa: E402
from tritonsd.kernels.layer_norm import layer_norm_triton  # noqa: E402
from tools.sd15_shapes import GROUP_NORM_STRESS, SD15  # noqa: E402

OPS = ("attention", "group_norm", "step", "geglu", "layer_norm")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}

ATTENTION_SHAPES = SD15.attention
GROUP_NORM_SHAPES = SD15.unet_group_norm + SD15.vae_group_norm + [GROUP_NORM_STRESS]
# The engine's activations on CUDA are channels_last: a group is then a run of C/G channels at every pixel.
GROUP_NORM_CHANNELS_LAST = [SD15.unet_group_norm[0], SD15.unet_group_norm[2], *SD15.vae_group_norm[-2:]]
STEP_SHAPE = SD15.step
GEGLU_SHAPES = SD15.geglu
LAYER_NORM_SHAPES = SD15.layer_norm


def time_ms(fn) -> tuple[float, float | None]:
    """(launched from Python, replayed from a CUDA graph) median milliseconds."""
    fn()
    torch.cuda.synchronize()
    launched = do_bench(fn, warmup=25, rep=100, return_mode="median")
    try:
        graphed = do_bench_cudagraph(fn, rep=50, return_mode="median")
    except RuntimeError:  # an op that cannot be captured
        graphed = None
    return launched, graphed


def bench_attention(dtype):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
                "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}
    for B, H, Lq, Lk, D in ATTENTION_SHAPES:
        q = torch.randn(B, Lq, H, D, device="cuda", dtype=dtype).transpose(1, 2)
        k, v = (torch.randn(B, Lk, H, D, device="cuda", dtype=dtype).transpose(1, 2) for _ in range(2))
        flop = 4 * B * H * Lq * Lk * D
        times = {"triton": time_ms(lambda: attention_triton(q, k, v))}
        split = plan(D, Lk, dtype)
        if split.tail_d:
            # The same tiles with the head dim padded to one power-of-two tile: what the split saves.
            padded = split._replace(block_d=triton.next_power_of_2(D), tail_d=0)
            times["triton_padded_head"] = time_ms(lambda: attention_triton(q, k, v, tiles=padded))
        for name, sdp_backend in backends.items():
            try:
                with sdpa_kernel(sdp_backend), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    times[name] = time_ms(lambda: F.scaled_dot_product_attention(q, k, v))
            except RuntimeError:
                times[name] = None
        kind = "self" if Lq == Lk else "cross"
        yield {"op": "attention", "case": f"{kind} Lq={Lq} Lk={Lk} D={D}", "shape": [B, H, Lq, Lk, D],
               "unit": "TFLOP/s", "times_ms": times, "work": flop / 1e12}


def bench_group_norm(dtype):
    cases = [(shape, False) for shape in GROUP_NORM_SHAPES] + [(shape, True) for shape in GROUP_NORM_CHANNELS_LAST]
    for shape, channels_last in cases:
        x = torch.randn(shape, device="cuda", dtype=dtype)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        weight, bias = (torch.randn(shape[1], device="cuda", dtype=dtype) for _ in range(2))
        times = {
            "triton": time_ms(lambda: group_norm_triton(x, 32, weight, bias, 1e-5, silu=True)),
            "torch": time_ms(lambda: F.silu(F.group_norm(x, 32, weight, bias, 1e-5))),
        }
        yield {"op": "group_norm+silu", "case": "x".join(map(str, shape)) + (" channels_last" if channels_last else ""),
               "shape": list(shape), "channels_last": channels_last,
               "unit": "GB/s", "times_ms": times, "work": 2 * x.numel() * x.element_size() / 1e9}
        del x


def bench_step(dtype):
    B = STEP_SHAPE[0]
    x, extra, noise = (torch.randn(STEP_SHAPE, device="cuda") for _ in range(3))
    model_out = torch.randn(2 * B, *STEP_SHAPE[1:], device="cuda", dtype=dtype)
    coef = torch.rand(6, device="cuda") + 0.5
    g = torch.full((1,), 7.5, device="cuda")  # on the device, as the pipeline passes it: one launch per step

    def eager():
        a, b, c, s, d, e = coef.unbind()
        uncond, cond = model_out.float().chunk(2)
        eps = uncond + g * (cond - uncond)
        return a * x + b * eps + c * extra + s * noise, d * x + e * eps

    times = {
        "triton": time_ms(lambda: guided_step_triton(model_out, x, coef, g, extra, noise)),
        "torch_eager": time_ms(eager),
    }
    nbytes = model_out.numel() * model_out.element_size() + 5 * x.numel() * x.element_size()
    yield {"op": "guided_step", "case": "x".join(map(str, STEP_SHAPE)) + " cfg+extra+noise",
           "shape": list(STEP_SHAPE), "unit": "GB/s", "times_ms": times, "work": nbytes / 1e9}


def bench_geglu(dtype):
    for shape in GEGLU_SHAPES:
        x = torch.randn(shape, device="cuda", dtype=dtype)

        def eager():
            h, gate = x.chunk(2, dim=-1)
            return h * F.gelu(gate)

        times = {"triton": time_ms(lambda: geglu_triton(x)), "torch_eager": time_ms(eager)}
        yield {"op": "geglu", "case": "x".join(map(str, shape)), "shape": list(shape), "unit": "GB/s",
               "times_ms": times, "work": 1.5 * x.numel() * x.element_size() / 1e9}


def bench_layer_norm(dtype):
    for shape in LAYER_NORM_SHAPES:
        x, r = (torch.randn(shape, device="cuda", dtype=dtype) for _ in range(2))
        weight, bias = torch.ones(shape[-1], device="cuda", dtype=dtype), torch.zeros(shape[-1], device="cuda", dtype=dtype)

        def eager():
            total = x + r
            return total, F.layer_norm(total, (shape[-1],), weight, bias)

        times = {"triton": time_ms(lambda: layer_norm_triton(x, weight, bias, residual=r)), "torch_eager": time_ms(eager)}
        yield {"op": "layer_norm", "case": "x".join(map(str, shape)) + " +residual", "shape": list(shape),
               "unit": "GB/s", "times_ms": times, "work": 4 * x.numel() * x.element_size() / 1e9}


def summarize(result: dict) -> dict:
    """Split the (launched, graphed) pairs; rates and speedups come from the graph times."""
    pairs = result.pop("times_ms")
    result["times_ms"] = {name: (t[0] if t else None) for name, t in pairs.items()}
    result["graph_times_ms"] = {name: (t[1] if t else None) for name, t in pairs.items()}
    times = result["graph_times_ms"]
    result["rate"] = {name: (result["work"] / (ms * 1e-3) if ms else None) for name, ms in times.items()}
    others = {name: ms for name, ms in times.items() if not name.startswith("triton") and ms}
    if others and times["triton"]:
        best = min(others, key=others.get)
        result["best_torch"] = best
        result["speedup_vs_best_torch"] = others[best] / times["triton"]
    return result


def print_row(result: dict) -> None:
    cells = []
    for name, ms in result["graph_times_ms"].items():
        launched = result["times_ms"][name]
        cells.append(f"{name} {ms:8.4f} ms {result['rate'][name]:7.1f} ({launched:.4f})" if ms else f"{name} {'n/a':>8}")
    speedup = result.get("speedup_vs_best_torch")
    ratio = f"x{speedup:5.2f} vs {result['best_torch']}" if speedup else ""
    print(f"{result['op']:<16} {result['case']:<28} {ratio:<26} " + " | ".join(cells), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write every figure to this JSON file")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float16", help="activation dtype")
    parser.add_argument("--only", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    args = parser.parse_args(argv)
    ops = [op.strip() for op in args.only.split(",") if op.strip()]
    unknown = sorted(set(ops) - set(OPS))
    if unknown or not ops:
        parser.error(f"--only takes a comma-separated subset of {','.join(OPS)}; got {args.only!r}")
    if not torch.cuda.is_available():
        print("bench/kernels.py: needs a CUDA GPU, and torch.cuda.is_available() is False", file=sys.stderr)
        return 2

    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    device = torch.cuda.get_device_name()
    print(f"{device}, torch {torch.__version__}, triton {triton.__version__}, {args.dtype}; graph-replay times, "
          "rates in TFLOP/s (attention) or GB/s, launched-from-Python times in brackets; xN = best PyTorch / Triton")
    runners = {"attention": bench_attention, "group_norm": bench_group_norm, "step": bench_step, "geglu": bench_geglu,
               "layer_norm": bench_layer_norm}
    results = []
    for op in ops:
        for result in runners[op](dtype):
            results.append(summarize(result))
            print_row(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {"device": device, "torch": torch.__version__, "triton": triton.__version__,
                  "cuda": torch.version.cuda, "dtype": args.dtype, "results": results}
        args.json.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
