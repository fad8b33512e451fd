"""Sampler plans against diffusers' schedulers, run the way diffusers' SD pipelines run them, for noise-predicting
(SD 1.x, SD 2.x 512, SDXL) and v-predicting (SD 2.x 768) models, with each scheduler's own timestep spacing and with
each spacing a scheduler config can set (SDXL's: "leading")."""

import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline

from tritonsd.engine.config import TIMESTEP_SPACINGS
from tritonsd.engine.samplers import (
    C_IN, COEFFICIENTS, SAMPLERS, SPACINGS, TIMESTEP, a1111_fields, from_a1111, make_plan,
)
from tritonsd.kernels.guided_step import StepCoefficients
from tiny import diffusers_scheduler

# diffusers' schedulers call np.array on tensors, which numpy 2 flags; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

STEPS = (1, 2, 5, 10, 20, 30, 50)
# A v-prediction plan is an epsilon plan with its rows re-expressed step by step; fewer step counts cover it.
V_STEPS = (1, 2, 5, 30)
GUIDANCE = (None, 7.5)
# Each spacing set in the scheduler config (as SDXL's sets "leading"), at step counts whose strides round differently
# (1000/3, 1000/7); guidance changes nothing in the schedule, so one scale covers them.
SPACED_STEPS = (1, 3, 7, 30)
# (prediction type, steps, timestep_spacing, guidance)
CASES = ([("epsilon", steps, "default", g) for steps in STEPS for g in GUIDANCE]
         + [("v_prediction", steps, "default", g) for steps in V_STEPS for g in GUIDANCE]
         + [("epsilon", steps, spacing, 7.5) for spacing in SPACINGS for steps in SPACED_STEPS])
# (workflow, strength): txt2img is strength 1; img2img at 1 still noises the image to the first timestep.
RUNS = (("txt2img", 1.0), ("img2img", 1.0), ("img2img", 0.8), ("img2img", 0.3))
SHAPE = (2, 4, 9, 7)
SEED = 1234
# diffusers keeps its schedule in float32 and does the Euler and DPM++ updates on a float32 copy of the latent
# (DDPM/DDIM coefficients are float32 scalar arithmetic), so agreement is at float32 level, not float64's.
TOL = 5e-6
C_IN_TOL = 5e-7


def fake_unet(x, t, phase):
    """Deterministic, nonlinear in x and t; `phase` makes the cond and uncond branches differ."""
    t = float(t)
    return torch.tanh(0.5 * x) * (0.4 + t / 1000) + 0.1 * torch.sin(x * t / 1000 + phase)


def model_output(x_in, t, guidance):
    if guidance is None:
        return fake_unet(x_in, t, 0.0)
    return torch.cat([fake_unet(x_in[: len(x_in) // 2], t, 0.0), fake_unet(x_in[len(x_in) // 2 :], t, 1.3)])


def start_latents(workflow, generator, init_scale, add_noise):
    if workflow == "txt2img":
        return torch.randn(SHAPE, generator=generator, dtype=torch.float64) * init_scale
    # The VAE posterior sample comes first from the generator, then the noise added to it.
    x0 = torch.randn(SHAPE, generator=generator, dtype=torch.float64)
    noise = torch.randn(SHAPE, generator=generator, dtype=torch.float64)
    return add_noise(x0, noise)


def run_diffusers(sampler, steps, workflow, strength, guidance, prediction_type, spacing):
    """The denoising loop of diffusers' StableDiffusion(Img2Img)Pipeline, with its own helpers."""
    scheduler = diffusers_scheduler(sampler, prediction_type, spacing)
    pipe = SimpleNamespace(scheduler=scheduler)
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    if workflow == "img2img":
        timesteps, _ = StableDiffusionImg2ImgPipeline.get_timesteps(pipe, steps, strength, "cpu")
        if len(timesteps) == 0:
            return None, [], [], None
    generator = torch.Generator().manual_seed(SEED)
    x = start_latents(
        workflow,
        generator,
        scheduler.init_noise_sigma,
        lambda x0, noise: scheduler.add_noise(x0, noise, timesteps[:1]),
    )
    step_kwargs = StableDiffusionImg2ImgPipeline.prepare_extra_step_kwargs(pipe, generator, 0.0)
    c_in = []
    for t in timesteps:
        c_in.append(scheduler.scale_model_input(torch.ones(1, dtype=torch.float64), t).item())
        x_in = torch.cat([x] * 2) if guidance is not None else x
        out = model_output(scheduler.scale_model_input(x_in, t), t, guidance)
        if guidance is not None:
            uncond, cond = out.chunk(2)
            out = uncond + guidance * (cond - uncond)
        x = scheduler.step(out, t, x, **step_kwargs, return_dict=False)[0]
    return x, [float(t) for t in timesteps], c_in, generator


def guided_step(model_out, x, coef, guidance_scale=None, extra=None, noise=None):
    """The fused step's formula in float64."""
    a, b, c, s, d, e = (dict(zip(StepCoefficients._fields, coef.tolist()))[k] for k in "abcsde")
    if guidance_scale is None:
        eps = model_out
    else:
        uncond, cond = model_out.chunk(2)
        eps = uncond + guidance_scale * (cond - uncond)
    x_next = a * x + b * eps
    if extra is not None:
        x_next = x_next + c * extra
    if noise is not None:
        x_next = x_next + s * noise
    return x_next, (d * x + e * eps if extra is not None else None)


def run_plan(plan, workflow, guidance):
    """The engine's loop: one fused step per UNet call, reading the schedule's rows, and the plan's noise draws."""
    generator = torch.Generator().manual_seed(SEED)
    p, q = plan.add_noise
    x = start_latents(workflow, generator, plan.init_scale, lambda x0, noise: p * x0 + q * noise)
    extra = torch.zeros_like(x) if plan.uses_extra else None
    for i, row in enumerate(plan.schedule()):
        x_in = x * row[C_IN].item()
        out = model_output(torch.cat([x_in] * 2) if guidance is not None else x_in, row[TIMESTEP].item(), guidance)
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float64) if plan.noise_steps[i] else None
        x, extra = guided_step(out, x, row[COEFFICIENTS], guidance, extra, noise)
    return x, generator


@pytest.mark.parametrize("workflow,strength", RUNS, ids=[f"{w}-{s}" for w, s in RUNS])
@pytest.mark.parametrize("prediction_type,steps,spacing,guidance", CASES,
                         ids=[f"{p}-{n}-{s}-cfg{g}" for p, n, s, g in CASES])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_matches_diffusers(sampler, prediction_type, steps, spacing, guidance, workflow, strength):
    ref, ref_timesteps, ref_c_in, ref_generator = run_diffusers(sampler, steps, workflow, strength, guidance,
                                                                prediction_type, spacing)
    if not ref_timesteps:
        with pytest.raises(ValueError, match="leaves no denoising step"):
            make_plan(sampler, steps, strength, prediction_type, timestep_spacing=spacing)
        return
    plan = make_plan(sampler, steps, strength, prediction_type, timestep_spacing=spacing)
    assert plan.timesteps.tolist() == ref_timesteps, f"timesteps {plan.timesteps.tolist()} != {ref_timesteps}"
    c_in_err = max(abs(a - b) / b for a, b in zip(plan.c_in.tolist(), ref_c_in))
    assert c_in_err <= C_IN_TOL, f"c_in rel err {c_in_err:.2e} > {C_IN_TOL:.0e}"
    out, generator = run_plan(plan, workflow, guidance)
    assert torch.equal(generator.get_state(), ref_generator.get_state()), (
        f"random draws differ from diffusers': {sum(plan.noise_steps)} noise steps in the plan"
    )
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    assert err <= TOL, (
        f"final latents max rel err {err:.2e} > {TOL:.0e} ({sampler}, {prediction_type}, {steps} steps, {spacing}, "
        f"{workflow})"
    )


# 61 and 103: where diffusers' trailing timesteps gain an extra step at t = -1 (test below).
WELL_FORMED = [("v_prediction", "default")] + [("epsilon", spacing) for spacing in TIMESTEP_SPACINGS]


@pytest.mark.parametrize("prediction_type,spacing", WELL_FORMED, ids=[f"{p}-{s}" for p, s in WELL_FORMED])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_plan_is_finite_and_well_formed(sampler, prediction_type, spacing):
    for steps in (*range(1, 62), 75, 100, 103, 150, 250, 500, 999):
        for strength in (1.0, 0.75, 0.5, 0.1):
            if int(steps * strength) == 0 or (sampler, spacing, steps) == ("dpmpp_2m", "leading", 999):
                continue  # the second: refused (test_bad_input)
            plan = make_plan(sampler, steps, strength, prediction_type, timestep_spacing=spacing)
            n = int(steps * strength)
            assert plan.coef.shape == (n, len(StepCoefficients._fields)) and plan.coef.dtype == torch.float64, (
                f"coef {plan.coef.shape}")
            assert plan.timesteps.shape == (n,) and plan.c_in.shape == (n,) and len(plan.noise_steps) == n
            assert plan.alpha_cumprod.shape == (n,) and ((0 < plan.alpha_cumprod) & (plan.alpha_cumprod < 1)).all()
            for name, value in (("coef", plan.coef), ("c_in", plan.c_in), ("timesteps", plan.timesteps)):
                assert torch.isfinite(value).all(), f"{name} not finite for {steps} steps at strength {strength}"
            assert all(map(math.isfinite, (plan.init_scale, *plan.add_noise))), "init_scale/add_noise not finite"


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_trailing_spacing_keeps_the_steps_asked_for(sampler):
    """At 61 steps diffusers' trailing timesteps (np.arange over a stride of 1000/61) gain a 62nd, at t = -1, past
    the training schedule; the plan runs the 61 asked for, diffusers' first 61."""
    scheduler = diffusers_scheduler(sampler, timestep_spacing="trailing")
    scheduler.set_timesteps(61)
    theirs = scheduler.timesteps.tolist()
    assert len(theirs) == 62 and theirs[-1] == -1, f"diffusers' trailing timesteps end {theirs[-3:]}"
    assert make_plan(sampler, 61, timestep_spacing="trailing").timesteps.tolist() == theirs[:61]


@pytest.mark.parametrize(
    "args,message",
    [
        (("heun", 20), "unknown sampler 'heun'; valid samplers: ddpm, ddim, euler, euler_a, dpmpp_2m"),
        (("ddim", 0), r"steps must be in \[1, 999\], got 0"),
        (("ddim", -3), r"steps must be in \[1, 999\], got -3"),
        (("euler", 1000), r"steps must be in \[1, 999\], got 1000"),
        (("ddim", 20, 0.0), r"strength must be in \(0, 1\], got 0.0"),
        (("ddim", 20, -0.5), r"strength must be in \(0, 1\], got -0.5"),
        (("ddim", 20, 1.5), r"strength must be in \(0, 1\], got 1.5"),
        (("ddim", 20, float("nan")), r"strength must be in \(0, 1\], got nan"),
        (("dpmpp_2m", 20, 0.04), "strength 0.04 with 20 steps leaves no denoising step"),
        (("euler", 20, 1.0, "v"), "unknown prediction_type 'v'; valid: epsilon, v_prediction"),
        (("euler", 20, 1.0, "sample"), "unknown prediction_type 'sample'"),
        (("euler", 20, 1.0, "epsilon", None, None, "uniform"),
         "unknown timestep_spacing 'uniform'; valid: default, leading, linspace, trailing"),
        (("dpmpp_2m", 999, 1.0, "epsilon", None, None, "leading"),
         r"DPM\+\+ 2M with leading timestep spacing at 999 steps starts at timestep 1000, past the last training "
         r"timestep \(999\)"),
    ],
)
def test_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        make_plan(*args)


def test_every_sampler_writes_an_a1111_name_that_reads_back():
    for sampler in SAMPLERS:
        fields = a1111_fields(sampler)
        back = from_a1111(fields["Sampler"], fields.get("Schedule type"))
        assert back == sampler, f"{sampler} is written as {fields}, which reads back as {back}"


@pytest.mark.parametrize("name, schedule, sampler", [
    ("Euler a", None, "euler_a"),
    ("Euler", "Automatic", "euler"),  # web UI 1.9+: the sampler's default schedule, evenly spaced for Euler
    ("DDIM", "Uniform", "ddim"),
    ("DPM++ 2M Karras", None, "dpmpp_2m_karras"),  # before 1.9, the schedule was part of the name
    ("DPM++ 2M", "Karras", "dpmpp_2m_karras"),
    ("DPM++ 2M", "Automatic", "dpmpp_2m_karras"),  # 1.9+ runs an "Automatic" DPM++ 2M on Karras sigmas
    ("DPM++ 2M", None, "dpmpp_2m"),  # a bare name from before 1.9
    ("DPM++ 2M", "Uniform", "dpmpp_2m"),
    ("Euler", "Karras", None),
    ("DPM++ 2M", "Exponential", None),
    ("Heun", None, None),
])
def test_a1111_sampler_names_from_every_web_ui_version(name, schedule, sampler):
    assert from_a1111(name, schedule) == sampler, f"Sampler {name!r}, Schedule type {schedule!r}"
