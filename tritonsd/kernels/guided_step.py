"""Classifier-free guidance fused with the sampler's update, in one elementwise launch.

    eps        = u + g * (c - u)         (model_out = [uncond; cond])   or   model_out
    x_next     = a * x + b * eps [+ c * extra] [+ s * noise]
    extra_next = d * x + e * eps                                        (when extra is given)

The six coefficients (StepCoefficients) and the guidance scale g are read from device memory inside
the kernel: passed as Python floats they would be baked into a captured CUDA graph, which could then
run only one step of one sampler at one guidance scale. All math is float32.
"""

from typing import NamedTuple

import torch

from .compat import tl, triton
from .dispatch import INTERPRET, use_triton
from .launch import launch


class StepCoefficients(NamedTuple):
    """One step's coefficients, in the order `coef` holds them (the samplers plan them, the kernel reads them)."""
    a: float  # x_next: weight of x
    b: float  # x_next: weight of the guided eps
    c: float  # x_next: weight of the carried extra
    s: float  # x_next: weight of the fresh noise
    d: float  # extra_next: weight of x
    e: float  # extra_next: weight of eps


# Where the kernel finds each coefficient in `coef`.
_A, _B, _C, _S, _D, _E = (tl.constexpr(StepCoefficients._fields.index(name)) for name in "abcsde")


@triton.jit
def _guided_step_kernel(
    MODEL_OUT, X, EXTRA, NOISE, COEF, X_OUT, EXTRA_OUT,
    GUIDANCE, numel,
    GUIDED: tl.constexpr, HAS_EXTRA: tl.constexpr, HAS_NOISE: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if GUIDED:
        uncond = tl.load(MODEL_OUT + offs, mask=mask, other=0.0).to(tl.float32)
        cond = tl.load(MODEL_OUT + numel + offs, mask=mask, other=0.0).to(tl.float32)
        eps = uncond + tl.load(GUIDANCE) * (cond - uncond)
    else:
        eps = tl.load(MODEL_OUT + offs, mask=mask, other=0.0).to(tl.float32)
    x_next = tl.load(COEF + _A) * x + tl.load(COEF + _B) * eps
    if HAS_EXTRA:
        extra = tl.load(EXTRA + offs, mask=mask, other=0.0).to(tl.float32)
        x_next += tl.load(COEF + _C) * extra
        extra_next = tl.load(COEF + _D) * x + tl.load(COEF + _E) * eps
        tl.store(EXTRA_OUT + offs, extra_next.to(EXTRA_OUT.dtype.element_ty), mask=mask)
    if HAS_NOISE:
        noise = tl.load(NOISE + offs, mask=mask, other=0.0).to(tl.float32)
        x_next += tl.load(COEF + _S) * noise
    tl.store(X_OUT + offs, x_next.to(X_OUT.dtype.element_ty), mask=mask)


class GuidedStepPlan(NamedTuple):
    block: int  # elements per program
    num_warps: int


def plan() -> GuidedStepPlan:
    """An elementwise pass: 2048 elements (8 KB of float32 per input) per program."""
    return GuidedStepPlan(1024 if INTERPRET else 2048, 4)


def _check_inputs(model_out, x, coef, guidance_scale, extra, noise) -> None:
    if x.dim() == 0:
        raise ValueError("guided_step expects x of shape [B, ...]; got a scalar")
    expected = (2 * x.shape[0], *x.shape[1:]) if guidance_scale is not None else tuple(x.shape)
    if tuple(model_out.shape) != expected:
        layout = "[uncond; cond] stacked on the batch dim" if guidance_scale is not None else "no guidance: x's shape"
        raise ValueError(
            f"guided_step expects model_out of shape {expected} ({layout}) for x of shape {tuple(x.shape)}; "
            f"got {tuple(model_out.shape)}"
        )
    if coef.shape != (len(StepCoefficients._fields),) or coef.dtype != torch.float32 or coef.device != x.device:
        raise ValueError(
            f"guided_step expects coef as {len(StepCoefficients._fields)} float32 values "
            f"({', '.join(StepCoefficients._fields)}) on {x.device}; got shape {tuple(coef.shape)}, "
            f"{coef.dtype} on {coef.device}"
        )
    if isinstance(guidance_scale, torch.Tensor) and (
        guidance_scale.numel() != 1 or guidance_scale.dtype != torch.float32 or guidance_scale.device != x.device
    ):
        raise ValueError(
            f"guided_step expects guidance_scale as a float or one float32 value on {x.device}; got shape "
            f"{tuple(guidance_scale.shape)}, {guidance_scale.dtype} on {guidance_scale.device}"
        )
    for name, t in (("extra", extra), ("noise", noise)):
        if t is not None and t.shape != x.shape:
            raise ValueError(f"guided_step expects {name} of x's shape {tuple(x.shape)}; got {tuple(t.shape)}")
    for name, t in (("model_out", model_out), ("extra", extra), ("noise", noise)):
        if t is not None and t.device != x.device:
            raise ValueError(f"guided_step expects {name} on x's device {x.device}; got {t.device}")


def guided_step_triton(model_out: torch.Tensor, x: torch.Tensor, coef: torch.Tensor,
                       guidance_scale: float | torch.Tensor | None = None, extra: torch.Tensor | None = None,
                       noise: torch.Tensor | None = None, *, tiles: GuidedStepPlan | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the fused step kernel; outputs are contiguous, in x's and extra's dtypes. `tiles` overrides `plan()`."""
    _check_inputs(model_out, x, coef, guidance_scale, extra, noise)
    model_out, x = model_out.contiguous(), x.contiguous()
    extra = extra.contiguous() if extra is not None else None
    noise = noise.contiguous() if noise is not None else None
    x_next = torch.empty_like(x)
    extra_next = torch.empty_like(extra) if extra is not None else None
    numel = x.numel()
    if numel == 0:
        return x_next, extra_next
    cfg = plan() if tiles is None else tiles
    if guidance_scale is not None and not isinstance(guidance_scale, torch.Tensor):
        guidance_scale = torch.full((1,), float(guidance_scale), dtype=torch.float32, device=x.device)
    # Absent tensors are never read (GUIDED, HAS_* are False); x and coef stand in for their pointers.
    launch(
        _guided_step_kernel, (triton.cdiv(numel, cfg.block),),
        model_out, x, extra if extra is not None else x, noise if noise is not None else x, coef,
        x_next, extra_next if extra_next is not None else x_next,
        guidance_scale if guidance_scale is not None else coef, numel,
        GUIDED=guidance_scale is not None, HAS_EXTRA=extra is not None, HAS_NOISE=noise is not None,
        BLOCK=cfg.block, num_warps=cfg.num_warps,
    )
    return x_next, extra_next


def guided_step_ref(model_out: torch.Tensor, x: torch.Tensor, coef: torch.Tensor,
                    guidance_scale: float | torch.Tensor | None = None, extra: torch.Tensor | None = None,
                    noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The same update in eager PyTorch, in (at least) float32."""
    _check_inputs(model_out, x, coef, guidance_scale, extra, noise)
    acc = torch.promote_types(x.dtype, torch.float32)
    eps = model_out.to(acc)
    if guidance_scale is not None:
        uncond, cond = eps.chunk(2)
        g = guidance_scale.to(acc).reshape(()) if isinstance(guidance_scale, torch.Tensor) else guidance_scale
        eps = uncond + g * (cond - uncond)
    k = StepCoefficients(*coef.to(acc).unbind())
    xf = x.to(acc)
    x_next = k.a * xf + k.b * eps
    extra_next = None
    if extra is not None:
        x_next = x_next + k.c * extra.to(acc)
        extra_next = (k.d * xf + k.e * eps).to(extra.dtype)
    if noise is not None:
        x_next = x_next + k.s * noise.to(acc)
    return x_next.to(x.dtype), extra_next


def guided_step(model_out: torch.Tensor, x: torch.Tensor, coef: torch.Tensor,
                guidance_scale: float | torch.Tensor | None = None, extra: torch.Tensor | None = None,
                noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One sampler step with optional classifier-free guidance; returns (x_next, extra_next or None).

    model_out: [2B, ...] = [uncond; cond] when guidance_scale is given, else [B, ...]; x: [B, ...];
    coef: float32 StepCoefficients on x's device; guidance_scale: a float, one float32 value on x's device,
    or None for no guidance; extra and noise: like x, or None.
    """
    if use_triton(x):
        return guided_step_triton(model_out, x, coef, guidance_scale, extra, noise)
    return guided_step_ref(model_out, x, coef, guidance_scale, extra, noise)
