"""Ahead-of-time compilation of every kernel variant the engine launches at SD 1.5's and SD 2.x's shapes, for Hopper
(sm_90), with no GPU. Run as a script it compiles them all and prints one JSON line: {case: {"error": ...,
"narrow_loads": ..., "mma_nk": ..., "plan": ... for attention}}.

It must run without TRITON_INTERPRET: under the interpreter, Triton's own jitted helpers (tl.cdiv, tl.sigmoid) are
interpreter functions and cannot be compiled. Pointer arguments are taken as 16-byte aligned and integer arguments
as of unknown alignment, as a launch on strided views would specialise them, except where a case names integers
that are multiples of 16 at every SD shape (a launch specialises those too)."""

import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from tools.sd15_shapes import SD15, SD21_768  # noqa: E402

# (head dim, keys, causal) of each attention the engine launches, and the largest head dim the kernel takes.
_ATTENTION = dict.fromkeys([(d, lk, False) for _, _, _, lk, d in SD15.attention + SD21_768.attention]
                           + [(SD15.text_attention[4], SD15.text_attention[3], True), (256, 20, False)])
# UNet level 0 and its deepest level (channels_last, as the engine runs them), and the VAE's widest full-size one.
_GROUP_NORM = [f"{n}x{c}x{h * w}-cl" for n, c, h, w in (SD15.unet_group_norm[0], SD15.unet_group_norm[-1])]
_GROUP_NORM += [f"{n}x{c}x{h * w}-{layout}" for n, c, h, w in SD15.vae_group_norm[-1:] for layout in ("cl", "nchw")]
_LAYER_NORM_WIDTHS = sorted({c for *_, c in [*SD15.layer_norm, SD15.text_layer_norm]})

CASES = (
    [f"attention-{dt}-D{d}-Lk{lk}{'-causal' if causal else ''}" for dt in ("fp16", "bf16", "fp32")
     for d, lk, causal in _ATTENTION]
    + [f"group_norm-{dt}-{shape}-{'shift' if shift else 'plain'}" for dt in ("fp16", "fp32")
       for shape in _GROUP_NORM for shift in (False, True)]
    + [f"guided_step-{flags}" for flags in ("guided", "guided-extra", "noise")]
    + [f"geglu-{dt}" for dt in ("fp16", "bf16", "fp32")]
    + [f"layer_norm-{dt}-N{n}-{kind}" for dt in ("fp16", "fp32") for n in _LAYER_NORM_WIDTHS
       for kind in ("plain", "residual")]
)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _compile(kernel, pointers: dict, constants: dict, floats=(), num_warps=4, num_stages=3, multiples_of_16=()) -> str:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    signature = {
        n: "constexpr" if n in constants else "*" + pointers[n] if n in pointers else "fp32" if n in floats else "i32"
        for n in names
    }
    aligned = {(names.index(n),): [["tt.divisibility", 16]] for n in (*pointers, *multiples_of_16)}
    compiled = triton.compile(ASTSource(kernel, signature, constants, aligned), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    return compiled.asm["ptx"]


def attention_plan(case: str):
    from tritonsd.kernels.attention import plan

    _, dt, d, lk = case.split("-")[:4]
    return plan(int(d[1:]), int(lk[2:]), DTYPES[dt])


def compile_case(case: str) -> str:
    import triton

    from tritonsd.kernels.geglu import _geglu_kernel
    from tritonsd.kernels.group_norm import (
        _group_norm_apply_kernel, _group_norm_nhwc_apply_kernel, _group_norm_nhwc_finalize_kernel,
        _group_norm_nhwc_stats_kernel, _group_norm_stats_kernel, plan,
    )
    from tritonsd.kernels.guided_step import _guided_step_kernel

    op, *rest = case.split("-")
    if op == "attention":
        from tritonsd.kernels.attention import _attention_fwd_kernel

        dt, d, lk = rest[0], int(rest[1][1:]), int(rest[2][2:])
        cfg = attention_plan(case)
        constants = dict(HEAD_DIM=d, BLOCK_D=cfg.block_d, TAIL_D=cfg.tail_d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                         CAUSAL="causal" in rest, EVEN_N=lk % cfg.block_n == 0,
                         PRECISION="ieee" if dt == "fp32" else "tf32", ALIGN=8,
                         stride_qd=1, stride_kd=1, stride_vd=1, stride_od=1)
        return _compile(_attention_fwd_kernel, dict.fromkeys("QKVO", dt), constants, ("qk_scale",), cfg.num_warps,
                        cfg.num_stages)
    if op == "group_norm":
        dt, shape, shift = rest[0], rest[1], rest[3] == "shift"
        n, c, s = map(int, shape.split("x"))
        cfg = plan(n, c, s, 32, channels_last=rest[2] == "cl")
        if rest[2] == "cl":
            # The finalize kernel reads only a group's few weights; the narrow-load count is of the two passes over x.
            _compile(_group_norm_nhwc_finalize_kernel, {"PART": "fp32", "W": dt, "SHIFT": dt, "CENTRE": "fp32", "SCALE": "fp32"},
                     dict(CG=c // 32, BLOCK=min(triton.next_power_of_2(cfg.num_chunks * c // 32), 1024), HAS_SHIFT=shift),
                     ("eps",))
            ptx = _compile(_group_norm_nhwc_stats_kernel, {"X": dt, "SHIFT": dt, "PART": "fp32"},
                           dict(BLOCK_S=cfg.block_s, BLOCK_C=cfg.block_c, HAS_SHIFT=shift), num_warps=cfg.num_warps,
                           multiples_of_16=("C", "stride_shift_n"))
            return ptx + _compile(_group_norm_nhwc_apply_kernel, {"X": dt, "Y": dt, "B": dt, "CENTRE": "fp32", "SCALE": "fp32"},
                                  dict(BLOCK_S=cfg.block_s, BLOCK_C=cfg.block_c, SILU=True), num_warps=cfg.num_warps,
                                  multiples_of_16=("C",))
        constants = dict(CG=c // 32, BLOCK_C=cfg.block_c, BLOCK_S=cfg.block_s, HAS_SHIFT=shift)
        ptx = _compile(_group_norm_stats_kernel, {"X": dt, "SHIFT": dt, "PART": "fp32"}, constants,
                       num_warps=cfg.num_warps)
        return ptx + _compile(_group_norm_apply_kernel, {"X": dt, "Y": dt, "W": dt, "B": dt, "SHIFT": dt, "PART": "fp32"},
                              dict(constants, BLOCK_P=triton.next_power_of_2(cfg.num_chunks), SILU=True),
                              ("eps",), cfg.num_warps)
    if op == "guided_step":
        from tritonsd.kernels.guided_step import plan as guided_step_plan

        pointers = dict(MODEL_OUT="fp16", X="fp32", EXTRA="fp32", NOISE="fp32", COEF="fp32", X_OUT="fp32",
                        EXTRA_OUT="fp32", GUIDANCE="fp32")
        flags, cfg = set(rest), guided_step_plan()
        constants = dict(GUIDED="guided" in flags, HAS_EXTRA="extra" in flags, HAS_NOISE="noise" in flags, BLOCK=cfg.block)
        return _compile(_guided_step_kernel, pointers, constants, num_warps=cfg.num_warps)
    if op == "layer_norm":
        from tritonsd.kernels.layer_norm import _layer_norm_kernel
        from tritonsd.kernels.layer_norm import plan as layer_norm_plan

        dt, n = rest[0], int(rest[1][1:])
        cfg = layer_norm_plan(8192, n)
        return _compile(_layer_norm_kernel, dict.fromkeys("XRSYWB", dt),
                        dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HAS_RESIDUAL=rest[2] == "residual"), ("eps",),
                        cfg.num_warps, multiples_of_16=("N", "stride_x", "stride_r", "stride_s", "stride_y"))
    if op == "geglu":
        from tritonsd.kernels.geglu import plan as geglu_plan

        cfg = geglu_plan(SD15.geglu[0][-1] // 2)
        return _compile(_geglu_kernel, {"X": rest[0], "Y": rest[0]}, {"BLOCK": cfg.block}, num_warps=cfg.num_warps)
    raise ValueError(f"unknown case {case!r}")


def main() -> int:
    results = {}
    for case in CASES:
        try:
            ptx = compile_case(case)
            # Hopper tensor-core instructions are wgmma.mma_async...m64nNkK: N x K is each one's share of the work.
            mma_nk = sum(int(n) * int(k) for n, k in re.findall(r"wgmma\.mma_async\S*\.m64n(\d+)k(\d+)", ptx))
            results[case] = {"error": None, "narrow_loads": ptx.count("ld.global.b16"), "mma_nk": mma_nk}
            if case.startswith("attention"):
                results[case]["plan"] = attention_plan(case)._asdict()
        except Exception as e:  # each failure is reported by its own test
            results[case] = {"error": f"{type(e).__name__}: {e}"[-2000:], "narrow_loads": None, "mma_nk": None}
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
