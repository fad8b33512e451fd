"""The whole tiny engine with every Triton kernel in the path (the interpreter on CPU, compiled on CUDA)
against the same engine on the PyTorch reference path. The interpreter is slow, so the runs are short; the
kernels' own tests cover their shapes and options."""

import numpy as np
import pytest
import torch

from tritonsd import kernels
from tritonsd.engine.pipeline import Pipeline
from tiny import TINY, random_state, write_single_file

@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    path = tmp_path_factory.mktemp("triton") / "tiny.safetensors"
    write_single_file(path, random_state(TINY, seed=0))
    return Pipeline.from_checkpoint(path, config=TINY, device="cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def launches(monkeypatch):
    """Counts each kernel launcher's calls, so a comparison cannot pass by quietly taking the reference path."""
    counts = dict.fromkeys(kernels.OPS, 0)
    for name in kernels.OPS:
        module = __import__(f"tritonsd.kernels.{name}", fromlist=[name])
        launcher = getattr(module, f"{name}_triton")

        def counted(*args, _name=name, _launcher=launcher, **kw):
            counts[_name] += 1
            return _launcher(*args, **kw)

        monkeypatch.setattr(module, f"{name}_triton", counted)
    return counts


def compare(run, launches, what: str) -> None:
    with kernels.backend("torch"):
        want = run()
    assert not any(launches.values()), f"reference path launched kernels: {launches}"
    with kernels.backend("triton"):
        got = run()
    assert all(launches.values()), f"{what}: kernels not reached on the Triton path: {launches}"
    err = np.abs(got - want).max()
    assert err <= 1e-4, f"{what}: Triton path differs from the reference path by {err:.2e} (max abs, pixels in [0, 1])"


def test_txt2img_triton_path_matches_reference_path(pipe, launches):
    # DPM++ 2M with guidance: the step kernel takes the guidance and the carried x0 in its second step.
    args = dict(steps=2, width=16, height=16, seed=4, sampler="dpmpp_2m", guidance_scale=7.5, output_type="np")
    compare(lambda: pipe.txt2img("a red circle", **args), launches, "txt2img")


def test_img2img_triton_path_matches_reference_path(pipe, launches):
    # Euler ancestral without guidance: the step kernel takes fresh noise; the VAE encoder runs too.
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    args = dict(strength=0.5, steps=2, seed=9, sampler="euler_a", guidance_scale=1.0, output_type="np")
    compare(lambda: pipe.img2img(image, "a green triangle", **args), launches, "img2img")
