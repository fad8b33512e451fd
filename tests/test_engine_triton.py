"""The whole tiny engine with every Triton kernel in the path (the interpreter on CPU, compiled on CUDA)
against the same engine on the PyTorch reference path."""

import numpy as np
import pytest
import torch

import kernels
from engine.pipeline import Pipeline
from tiny import TINY, random_state, write_single_file


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    path = tmp_path_factory.mktemp("triton") / "tiny.safetensors"
    write_single_file(path, random_state(TINY, seed=0))
    return Pipeline.from_checkpoint(path, config=TINY, device="cuda" if torch.cuda.is_available() else "cpu")


def test_every_kernel_is_on_the_path(pipe, monkeypatch):
    """Guards the comparison below: with the Triton backend, each kernel launcher really runs."""
    called = set()
    for name in ("attention", "group_norm", "guided_step"):
        module = __import__(f"kernels.{name}", fromlist=[name])
        launcher = getattr(module, f"{name}_triton")

        def spy(*args, _name=name, _launcher=launcher, **kw):
            called.add(_name)
            return _launcher(*args, **kw)

        monkeypatch.setattr(module, f"{name}_triton", spy)
    with kernels.backend("triton"):
        pipe.txt2img("a", steps=1, width=16, height=16, seed=0, output_type="np")
    assert called == {"attention", "group_norm", "guided_step"}, f"kernels not reached: {sorted(called)}"


@pytest.mark.parametrize("sampler,guidance", [("euler", 7.5), ("dpmpp_2m", 7.5), ("euler_a", 1.0)])
def test_triton_path_matches_reference_path(pipe, sampler, guidance):
    args = dict(steps=3, width=16, height=24, seed=4, sampler=sampler, guidance_scale=guidance, output_type="np")
    with kernels.backend("torch"):
        want = pipe.txt2img(["a red circle", "a blue square"], **args)
    with kernels.backend("triton"):
        got = pipe.txt2img(["a red circle", "a blue square"], **args)
    err = np.abs(got - want).max()
    assert err <= 1e-4, f"{sampler}: Triton path differs from the reference path by {err:.2e} (max abs, pixels in [0, 1])"


def test_img2img_triton_path_matches_reference_path(pipe):
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    args = dict(strength=0.7, steps=3, seed=9, output_type="np")
    with kernels.backend("torch"):
        want = pipe.img2img(image, "a green triangle", **args)
    with kernels.backend("triton"):
        got = pipe.img2img(image, "a green triangle", **args)
    err = np.abs(got - want).max()
    assert err <= 1e-4, f"img2img: Triton path differs from the reference path by {err:.2e}"
