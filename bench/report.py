"""Markdown tables from the JSON that bench/kernels.py and bench/e2e.py write: the README's performance section.

    python bench/report.py bench/results/DATE-GPU-kernels.json bench/results/DATE-GPU-e2e.json
"""

import json
import sys
from pathlib import Path


def kernels_table(report: dict) -> list[str]:
    lines = [
        f"Kernels — {report['device']}, torch {report['torch']}, Triton {report['triton']}, {report['dtype']}; "
        "medians of CUDA-graph replays (launch-free, as the engine runs them):",
        "",
        "| op | case | tritonsd | best PyTorch | speedup | tritonsd rate |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in report["results"]:
        best = r.get("best_torch")
        ours = r["graph_times_ms"]["triton"]
        theirs = f"{r['graph_times_ms'][best] * 1e3:.1f} µs ({best})" if best else "n/a"
        speedup = f"{r['speedup_vs_best_torch']:.2f}x" if best else "n/a"
        lines.append(f"| {r['op']} | {r['case']} | {ours * 1e3:.1f} µs | {theirs} | {speedup} | "
                     f"{r['rate']['triton']:.0f} {r['unit']} |")
    return lines


def e2e_table(report: dict) -> list[str]:
    s = report["sections"]
    compiled = s.get("compiled", {})
    model = {"sd21": "SD 2.1 768-v"}.get(report.get("model", {}).get("name"), "SD 1.5")
    lines = [
        f"Whole pipeline — {report['device']}, torch {report['torch']}, Triton {report['triton']}, diffusers "
        f"{report['diffusers']}, float16, random {model} weights shared by both engines; guided steps (UNet at batch "
        "2B), medians of CUDA-event timings:",
        "",
        "| | tritonsd | diffusers eager | diffusers compiled | vs eager | vs compiled |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    rows = []
    for row in s["unet_step"]["rows"]:
        comp = compiled.get("unet_step_ms") if (row["size"], row["batch"]) == (compiled.get("size"), 1) else None
        rows.append((f"UNet guided step {row['size']}², batch {row['batch']}", row["tritonsd_ms"],
                     row["diffusers_eager_ms"], comp))
    vae, image = s["vae_decode"], s["txt2img"]
    rows.append((f"VAE decode {vae['size']}²", vae["tritonsd_ms"], vae["diffusers_eager_ms"], compiled.get("vae_decode_ms")))
    rows.append((f"txt2img, {image['steps']} steps, {image['size']}²", image["tritonsd_ms"], image["diffusers_eager_ms"],
                 compiled.get("txt2img_ms")))
    for name, ours, eager, comp in rows:
        comp_ms, vs_comp = (f"{comp:.2f} ms", f"{comp / ours:.2f}x") if comp else ("—", "—")
        lines.append(f"| {name} | {ours:.2f} ms | {eager:.2f} ms | {comp_ms} | {eager / ours:.2f}x | {vs_comp} |")
    cold = s.get("cold_start", {})
    if "empty_triton_cache" in cold:
        lines += ["", "| first image in a new process (import, load, 30 steps) | tritonsd | diffusers compiled |",
                  "| --- | ---: | ---: |",
                  f"| empty Triton / inductor cache | {cold['empty_triton_cache']['total_s']:.1f} s | "
                  f"{compiled.get('first_image_s_with_compilation', float('nan')):.1f} s (compilation and first image, "
                  "model already loaded) |",
                  f"| warm Triton cache | {cold['warm_triton_cache']['total_s']:.1f} s | — |"]
    lines += ["", "| GPU memory beyond the weights, one 30-step image | tritonsd | diffusers eager |",
              "| --- | ---: | ---: |"]
    for m in image["memory_beyond_weights"]:
        lines.append(f"| {m['size']}², batch {m['batch']} | {m['tritonsd_peak_mb']:.0f} MiB | "
                     f"{m['diffusers_eager_peak_mb']:.0f} MiB |")
    acc = s.get("accuracy", {})
    if "psnr_fp16_vs_fp32_reference_db" in acc:
        lines += ["", f"float16 with every kernel and graph against the float32 reference path, same weights and seed: "
                  f"PSNR {acc['psnr_fp16_vs_fp32_reference_db']:.1f} dB."]
    return lines


def main(paths: list[str]) -> int:
    if not paths:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    for path in paths:
        report = json.loads(Path(path).read_text())
        lines = kernels_table(report) if "results" in report else e2e_table(report)
        print("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
