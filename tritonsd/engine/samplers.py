"""Samplers as plans. Every sampler SD 1.x uses is, per step, linear in the latent x, the guided noise
prediction eps, one carried tensor (DPM++'s previous x0 prediction) and fresh noise. So a whole run is worked
out up front on the host in float64 as per-step coefficients (StepCoefficients a, b, c, s, d, e):

    x_next     = a*x + b*eps + c*extra + s*noise
    extra_next = d*x + e*eps

and the GPU loop is one fused step per UNet call with no host-device sync. Each sampler reproduces the
diffusers scheduler built from SD's scheduler config (scaled_linear betas, steps_offset=1, set_alpha_to_one=False;
SD 1.x's, 2.x's and SDXL's are the same but for timestep_spacing, which SDXL's sets to "leading" and the others leave
to each scheduler's own default), and img2img truncation follows diffusers'
StableDiffusionImg2ImgPipeline.get_timesteps. SDXL's denoising_start and denoising_end cut a run at a
fraction of the training schedule as diffusers' SDXL pipelines do: a plan is a list of steps, so a cut is a slice of
the whole run's rows, and the two sides of one cut fit together into the whole run (but for DPM++ 2M, whose second
side starts with a first-order step, as diffusers' does: nothing carries the previous prediction across).

A v-prediction model's output v is itself linear in what the model sees, so it changes only the coefficients:
the model reads x_in = c_in*x, the noisy latent at noise level alphā (x_in = sqrt(alphā)*x0 + sqrt(1-alphā)*eps),
and v = sqrt(alphā)*eps - sqrt(1-alphā)*x0 gives eps = sqrt(1-alphā)*x_in + sqrt(alphā)*v. Substituting that
eps into a step's rows makes them rows in x and v, and the fused step runs unchanged."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from tritonsd.engine.config import PREDICTION_TYPES, TIMESTEP_SPACINGS
from tritonsd.kernels.guided_step import StepCoefficients

NUM_TRAIN_TIMESTEPS = 1000
# SD's scheduler configs shift "leading" timesteps one up, so that the last step is at t = 1, not 0.
STEPS_OFFSET = 1

# Columns of SamplerPlan.schedule(), a step's row as the sampling loop reads it on the device.
TIMESTEP, C_IN = 0, 1
COEFFICIENTS = slice(2, 2 + len(StepCoefficients._fields))


def _train_schedule() -> tuple[np.ndarray, np.ndarray]:
    # Built in float32, as SD was trained and as diffusers builds it; the float32 values are the schedule.
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, NUM_TRAIN_TIMESTEPS, dtype=torch.float32) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    return alphas_cumprod.numpy(), sigmas.numpy()


ALPHAS_CUMPROD, TRAIN_SIGMAS = _train_schedule()


@dataclass(frozen=True, eq=False)
class SamplerPlan:
    timesteps: torch.Tensor  # float64 [n]: the UNet's timestep input per step
    c_in: torch.Tensor  # float64 [n]: the UNet sees x * c_in[i]
    alpha_cumprod: torch.Tensor  # float64 [n]: the noise level alphā of what the UNet sees at step i
    coef: torch.Tensor  # float64 [n, 6]: StepCoefficients per step, for the model's prediction type
    noise_steps: tuple[bool, ...]  # step i draws fresh noise (scaled by s)
    uses_extra: bool  # DPM++ carries the previous x0 prediction
    init_scale: float  # txt2img: x = randn * init_scale
    add_noise: tuple[float, float]  # img2img: x = p * x0 + q * noise before the first step

    def first(self, n: int) -> "SamplerPlan":
        """The plan of its first n steps; each step's row is the one it has in the whole run."""
        return dataclasses.replace(self, timesteps=self.timesteps[:n], c_in=self.c_in[:n],
                                   alpha_cumprod=self.alpha_cumprod[:n], coef=self.coef[:n],
                                   noise_steps=self.noise_steps[:n])

    def schedule(self) -> torch.Tensor:
        """float64 [n, 8]: each step's timestep, c_in and coefficients, in the columns TIMESTEP, C_IN, COEFFICIENTS."""
        return torch.cat([self.timesteps[:, None], self.c_in[:, None], self.coef], dim=1)


def _plan(timesteps, coef: StepCoefficients, *, alpha_cumprod, c_in=None, noise_steps=None, uses_extra=False,
          init_scale=1.0,
          add_noise):
    n = len(timesteps)
    return SamplerPlan(
        timesteps=torch.tensor(np.asarray(timesteps, dtype=np.float64)),
        c_in=torch.ones(n, dtype=torch.float64) if c_in is None else torch.tensor(c_in, dtype=torch.float64),
        alpha_cumprod=torch.tensor(np.asarray(alpha_cumprod, dtype=np.float64)),
        coef=torch.tensor(np.stack(coef, axis=-1), dtype=torch.float64),
        noise_steps=(False,) * n if noise_steps is None else tuple(bool(v) for v in noise_steps),
        uses_extra=uses_extra,
        init_scale=float(init_scale),
        add_noise=(float(add_noise[0]), float(add_noise[1])),
    )


def _leading(steps: int) -> np.ndarray:
    return np.arange(steps)[::-1] * (NUM_TRAIN_TIMESTEPS // steps) + STEPS_OFFSET


def _linspace(steps: int) -> np.ndarray:
    return np.linspace(0, NUM_TRAIN_TIMESTEPS - 1, steps)[::-1]


def _trailing(steps: int) -> np.ndarray:
    # diffusers takes np.arange over a fractional stride, which for some counts (61, 103, ...) gains a point just
    # above 0 and so an extra step at t = -1; the plan keeps the steps asked for.
    return np.arange(NUM_TRAIN_TIMESTEPS, 0, -NUM_TRAIN_TIMESTEPS / steps)[:steps].round() - 1


# The timesteps of a run of n steps, from noise to image, by diffusers' timestep_spacing, as its DDPM, DDIM and Euler
# schedulers place them: "linspace" alone gives fractions, which Euler keeps and the others round.
SPACINGS = {"leading": _leading, "linspace": _linspace, "trailing": _trailing}


def _vp_add_noise(alpha_cumprod: float) -> tuple[float, float]:
    return math.sqrt(alpha_cumprod), math.sqrt(1 - alpha_cumprod)


def _ddpm(steps: int, start: int, spacing: str) -> SamplerPlan:
    full = SPACINGS[spacing](steps).round().astype(np.int64)
    ts = full[start:]
    a_t = ALPHAS_CUMPROD[ts].astype(np.float64)
    # The step after the last one is t = -1, where alphas_cumprod is taken as 1.
    a_prev = np.append(ALPHAS_CUMPROD[full[1:]].astype(np.float64), 1.0)[start:]
    beta = 1 - a_t / a_prev
    x0_coef = np.sqrt(a_prev) * beta / (1 - a_t)
    x_coef = np.sqrt(a_t / a_prev) * (1 - a_prev) / (1 - a_t)
    std = np.sqrt(np.maximum((1 - a_prev) / (1 - a_t) * beta, 1e-20))
    noise_steps = ts > 0
    zero = np.zeros_like(a_t)
    coef = StepCoefficients(
        a=x0_coef / np.sqrt(a_t) + x_coef,
        b=-x0_coef * np.sqrt((1 - a_t) / a_t),
        c=zero,
        s=np.where(noise_steps, std, 0.0),
        d=zero,
        e=zero,
    )
    return _plan(ts, coef, alpha_cumprod=a_t, noise_steps=noise_steps, add_noise=_vp_add_noise(a_t[0]))


def _ddim(steps: int, start: int, spacing: str) -> SamplerPlan:
    ts = SPACINGS[spacing](steps).round().astype(np.int64)[start:]
    a_t = ALPHAS_CUMPROD[ts].astype(np.float64)
    # diffusers' DDIM steps back by the leading stride whatever the spacing, not to the next timestep of the run.
    prev = ts - NUM_TRAIN_TIMESTEPS // steps
    # set_alpha_to_one=False: the last step lands on alphas_cumprod[0], not on a clean 1.
    a_prev = ALPHAS_CUMPROD[np.maximum(prev, 0)].astype(np.float64)
    a = np.sqrt(a_prev / a_t)
    b = np.sqrt(1 - a_prev) - np.sqrt(a_prev * (1 - a_t) / a_t)
    zero = np.zeros_like(a_t)
    return _plan(ts, StepCoefficients(a=a, b=b, c=zero, s=zero, d=zero, e=zero), alpha_cumprod=a_t,
                 add_noise=_vp_add_noise(a_t[0]))


def _interp_sigmas(timesteps: np.ndarray) -> np.ndarray:
    sigmas = np.interp(timesteps, np.arange(NUM_TRAIN_TIMESTEPS), TRAIN_SIGMAS)
    return np.append(sigmas, 0.0).astype(np.float32).astype(np.float64)


def _euler(steps: int, start: int, spacing: str, ancestral: bool) -> SamplerPlan:
    full = SPACINGS[spacing](steps).astype(np.float32)
    sigmas = _interp_sigmas(full)
    # diffusers' init_noise_sigma: the largest sigma, but sqrt(sigma^2 + 1) under leading spacing.
    init_scale = sigmas.max() if spacing != "leading" else math.sqrt(sigmas.max() ** 2 + 1)
    sigma, sigma_next = sigmas[start:-1], sigmas[start + 1 :]
    if ancestral:
        sigma_up = np.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
        sigma_next = np.sqrt(sigma_next**2 - sigma_up**2)
    else:
        sigma_up = np.zeros_like(sigma)
    one, zero = np.ones_like(sigma), np.zeros_like(sigma)
    return _plan(
        full[start:],
        StepCoefficients(a=one, b=sigma_next - sigma, c=zero, s=sigma_up, d=zero, e=zero),
        alpha_cumprod=1 / (sigma**2 + 1),
        c_in=1 / np.sqrt(sigma**2 + 1),
        noise_steps=np.full(len(sigma), ancestral),
        init_scale=init_scale,
        add_noise=(1.0, sigma[0]),
    )


def _karras(steps: int) -> tuple[np.ndarray, np.ndarray]:
    rho = 7.0
    lo, hi = float(TRAIN_SIGMAS[0]), float(TRAIN_SIGMAS[-1])
    ramp = np.linspace(0, 1, steps)
    sigmas = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    # Each sigma's timestep: linear in log-sigma between the two training steps around it, then rounded.
    log_sigmas = np.log(TRAIN_SIGMAS)
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=NUM_TRAIN_TIMESTEPS - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    timesteps = ((1 - w) * low + w * (low + 1)).round()
    return timesteps, np.append(sigmas, 0.0).astype(np.float32).astype(np.float64)


def _dpmpp_2m(steps: int, start: int, spacing: str, karras: bool) -> SamplerPlan:
    if karras:
        # Karras sigmas span the training sigmas by their own rule, whatever the spacing (diffusers' too).
        full, sigmas = _karras(steps)
    else:
        # diffusers' DPM-Solver spaces steps + 1 points, the last one the end of sampling, under leading and
        # linspace spacing; its trailing points already stop short of 0.
        full = SPACINGS[spacing](steps) if spacing == "trailing" else SPACINGS[spacing](steps + 1)[:-1]
        full = full.round().astype(np.int64)
        if full[0] >= NUM_TRAIN_TIMESTEPS:  # leading at 999 steps: two steps at one sigma (diffusers' gives NaN)
            raise ValueError(f"DPM++ 2M with {spacing} timestep spacing at {steps} steps starts at timestep {full[0]}, "
                             f"past the last training timestep ({NUM_TRAIN_TIMESTEPS - 1}); take fewer steps")
        sigmas = _interp_sigmas(full)
    # sigmas are k-diffusion's; the solver works in VP terms alpha = 1/sqrt(1+sigma^2), sigma_vp = sigma*alpha,
    # whose log-SNR is lambda = -log(sigma).
    alphas = 1 / np.sqrt(sigmas**2 + 1)
    n = len(full)
    coef = np.zeros((n - start, len(StepCoefficients._fields)))
    for row, i in enumerate(range(start, n)):
        s0, s_next = sigmas[i], sigmas[i + 1]
        alpha_s0, alpha_next = alphas[i], alphas[i + 1]
        phi = alpha_next * (s_next / s0 - 1)  # alpha_t * (exp(-h) - 1)
        # x0 = x / alpha_s0 - s0 * eps is carried to the next step as `extra`.
        # First step taken and last step are first order (lower_order_final, final sigma 0).
        if i == start or i == n - 1:
            x0_weight, prev_weight = phi, 0.0
        else:
            r = math.log(sigmas[i - 1] / s0) / math.log(s0 / s_next)
            x0_weight, prev_weight = phi * (1 + 0.5 / r), 0.5 * phi / r
        coef[row] = StepCoefficients(
            a=s_next * alpha_next / (s0 * alpha_s0) - x0_weight / alpha_s0,
            b=x0_weight * s0,
            c=prev_weight,
            s=0.0,
            d=1 / alpha_s0,
            e=-s0,
        )
    return _plan(
        full[start:],
        StepCoefficients(*coef.T),
        alpha_cumprod=alphas[start:-1] ** 2,
        uses_extra=True,
        add_noise=(alphas[start], sigmas[start] * alphas[start]),
    )


@dataclass(frozen=True)
class Sampler:
    build: Callable[[int, int, str], SamplerPlan]  # (steps, first step kept, a key of SPACINGS) -> plan
    a1111_name: str  # the name AUTOMATIC1111's web UI shows and writes in a PNG's parameters
    a1111_schedule: str = "Uniform"  # its "Schedule type" (web UI 1.9+): how the steps are spaced
    spacing: str = "linspace"  # the diffusers scheduler's own timestep_spacing, taken for "default"


# Every sampler, by id: the one table the API, the command line and the PNG parameters take names from.
SAMPLERS = {
    "ddpm": Sampler(_ddpm, "DDPM", spacing="leading"),
    "ddim": Sampler(_ddim, "DDIM", spacing="leading"),
    "euler": Sampler(functools.partial(_euler, ancestral=False), "Euler"),
    "euler_a": Sampler(functools.partial(_euler, ancestral=True), "Euler a"),
    "dpmpp_2m": Sampler(functools.partial(_dpmpp_2m, karras=False), "DPM++ 2M"),
    "dpmpp_2m_karras": Sampler(functools.partial(_dpmpp_2m, karras=True), "DPM++ 2M", "Karras"),
}

# Since 1.9 the web UI writes "Schedule type" beside the sampler, and an "Automatic" one means the sampler's own
# default: Karras for DPM++ 2M (sd_samplers_kdiffusion.py), the evenly spaced "Uniform" steps for the others. Before
# 1.9 there was no schedule type: a bare name meant Uniform and Karras was part of the name ("DPM++ 2M Karras").
_A1111_AUTOMATIC = {"DPM++ 2M": "Karras"}


def a1111_fields(sampler: str) -> dict[str, str]:
    """The `Sampler` (and, where a reader could take another schedule, `Schedule type`) fields naming a sampler."""
    s = SAMPLERS[sampler]
    if s.a1111_name in _A1111_AUTOMATIC or s.a1111_schedule != "Uniform":
        return {"Sampler": s.a1111_name, "Schedule type": s.a1111_schedule}
    return {"Sampler": s.a1111_name}


def from_a1111(name: str, schedule: str | None = None) -> str | None:
    """The sampler id for a PNG's `Sampler` and `Schedule type` fields, from any web UI version; None if there is none."""
    if name.endswith(" Karras"):
        name, schedule = name.removesuffix(" Karras"), "Karras"
    if schedule is None:
        schedule = "Uniform"
    elif schedule == "Automatic":
        schedule = _A1111_AUTOMATIC.get(name, "Uniform")
    return next((id for id, s in SAMPLERS.items() if (s.a1111_name, s.a1111_schedule) == (name, schedule)), None)


def with_prediction_type(plan: SamplerPlan, prediction_type: str) -> SamplerPlan:
    """The plan for a model of this prediction type. For v-prediction, its rows in x and v instead of x and eps:
    eps = p*x + q*v with p = c_in*sqrt(1-alphā), q = sqrt(alphā) (module docstring), so each row's x weight gains its
    eps weight times p and its eps weight is multiplied by q."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}")
    if prediction_type == "epsilon":
        return plan
    p = plan.c_in * (1 - plan.alpha_cumprod).sqrt()
    q = plan.alpha_cumprod.sqrt()
    k = StepCoefficients(*plan.coef.unbind(1))
    coef = StepCoefficients(a=k.a + k.b * p, b=k.b * q, c=k.c, s=k.s, d=k.d + k.e * p, e=k.e * q)
    return dataclasses.replace(plan, coef=torch.stack(coef, dim=1))


def _cutoff(fraction: float) -> int:
    """The training timestep at `fraction` of the way from pure noise (1000) to the image (0), as diffusers' SDXL
    pipelines round it: a cut keeps the steps at or above it on one side and those below it on the other."""
    return int(round(NUM_TRAIN_TIMESTEPS - fraction * NUM_TRAIN_TIMESTEPS))


def check_run(sampler: str, steps: int, strength: float = 1.0, denoising_start: float | None = None,
              denoising_end: float | None = None) -> None:
    """Refuse what make_plan refuses for every model: an unknown sampler, a step count, strength or cut out of range.
    Whether a cut leaves a step depends on the model's timestep spacing, so only make_plan can tell."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid samplers: {', '.join(SAMPLERS)}")
    # With steps_offset=1, DDPM/DDIM's leading spacing would step past the last training timestep at 1000 steps.
    if not 1 <= steps < NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"steps must be in [1, {NUM_TRAIN_TIMESTEPS - 1}], got {steps}")
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    for name, fraction in (("denoising_start", denoising_start), ("denoising_end", denoising_end)):
        if fraction is not None and not 0 < fraction < 1:
            raise ValueError(f"{name} must be in (0, 1), got {fraction}")
    if denoising_start is not None and denoising_end is not None and denoising_start >= denoising_end:
        raise ValueError(f"denoising_start {denoising_start} must be below denoising_end {denoising_end}")
    if denoising_start is None and int(steps * strength) == 0:
        raise ValueError(f"strength {strength} with {steps} steps leaves no denoising step; "
                         f"steps * strength must be at least 1")


def make_plan(sampler: str, steps: int, strength: float = 1.0, prediction_type: str = "epsilon",
              denoising_start: float | None = None, denoising_end: float | None = None,
              timestep_spacing: str = "default") -> SamplerPlan:
    """The whole run of `sampler` over `steps` steps; strength < 1 keeps only the last steps (img2img).
    denoising_start (img2img, in place of strength) keeps the steps whose timestep is below that fraction of the
    training schedule, denoising_end the steps at or above its own: a run cut with denoising_end=f and one cut with
    denoising_start=f are the two halves of one run (SDXL's base and refiner, "ensemble of experts").
    prediction_type is the model's: "epsilon" or "v_prediction"; timestep_spacing its scheduler's (diffusers'
    "leading", "linspace" or "trailing"; "default": the sampler's own scheduler's, Sampler.spacing)."""
    check_run(sampler, steps, strength, denoising_start, denoising_end)
    if timestep_spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"unknown timestep_spacing {timestep_spacing!r}; valid: {', '.join(TIMESTEP_SPACINGS)}")
    s = SAMPLERS[sampler]
    spacing = s.spacing if timestep_spacing == "default" else timestep_spacing
    if denoising_start is None:
        kept = min(int(steps * strength), steps)
    else:
        kept = int((s.build(steps, 0, spacing).timesteps < _cutoff(denoising_start)).sum())
    plan = s.build(steps, steps - kept, spacing) if kept else None
    if plan is not None and denoising_end is not None:
        plan = plan.first(int((plan.timesteps >= _cutoff(denoising_end)).sum()))
    if plan is None or not len(plan.timesteps):
        cut = ", ".join(f"{name} {value}" for name, value in (("denoising_start", denoising_start),
                                                              ("denoising_end", denoising_end)) if value is not None)
        raise ValueError(f"{cut} with {steps} steps leaves no denoising step; take more steps or move the cut")
    return with_prediction_type(plan, prediction_type)
