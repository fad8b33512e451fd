"""The txt2img/img2img API: what it accepts, what it returns, and that seeds reproduce (what it refuses:
test_bad_input.py)."""

import numpy as np
import pytest
import torch
from PIL import Image

from tritonsd.engine.pipeline import Pipeline
from tritonsd.engine.samplers import SAMPLERS
from tiny import TINY, random_state, write_single_file

FAST = dict(steps=2, width=16, height=16)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipeline") / "tiny.safetensors"
    write_single_file(path, random_state(TINY, seed=0))
    return Pipeline.from_checkpoint(path, config=TINY)


def test_txt2img_returns_each_output_type(pipe):
    images = pipe.txt2img(["a", "b"], batch_size=2, seed=1, **FAST)
    assert len(images) == 4 and all(isinstance(im, Image.Image) and im.size == (16, 16) and im.mode == "RGB" for im in images)
    array = pipe.txt2img("a", seed=1, output_type="np", **FAST)
    assert array.shape == (1, 16, 16, 3) and array.dtype == np.float32 and 0.0 <= array.min() and array.max() <= 1.0
    latents = pipe.txt2img("a", seed=1, output_type="latent", **FAST)
    assert latents.shape == (1, TINY.unet.in_channels, 8, 8)


def test_same_seed_same_image_and_other_seed_other_image(pipe):
    a = pipe.txt2img("a cat", seed=5, output_type="np", **FAST)
    b = pipe.txt2img("a cat", seed=5, output_type="np", **FAST)
    c = pipe.txt2img("a cat", seed=6, output_type="np", **FAST)
    assert np.array_equal(a, b), "same seed gave different images"
    assert np.abs(a - c).max() > 1e-3, "different seeds gave the same image"


def test_width_and_height_follow_the_request(pipe):
    images = pipe.txt2img("a", seed=0, steps=1, width=24, height=40)
    assert images[0].size == (24, 40)


def test_default_size_is_the_models_own(pipe):
    side = TINY.unet.sample_size * 2 ** (len(TINY.vae.ch_mult) - 1)
    assert pipe.txt2img("a", seed=0, steps=1)[0].size == (side, side)


def test_img2img_accepts_path_array_rgba_and_grayscale(pipe, tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (21, 27, 3), dtype=np.uint8)
    path = tmp_path / "in.png"
    Image.fromarray(rgb).save(path)
    args = dict(strength=0.5, steps=2, seed=3, output_type="np")
    from_pil = pipe.img2img(Image.fromarray(rgb), "a", **args)
    from_path = pipe.img2img(str(path), "a", **args)
    from_array = pipe.img2img(rgb, "a", **args)
    assert from_pil.shape == (1, 20, 26, 3), f"image not sized down to multiples of the VAE factor 2: {from_pil.shape}"
    assert np.array_equal(from_pil, from_path) and np.array_equal(from_pil, from_array)
    rgba = Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]), "RGBA")
    assert np.array_equal(pipe.img2img(rgba, "a", **args), from_pil), "opaque RGBA should equal its RGB image"
    gray = pipe.img2img(Image.fromarray(rgb).convert("L"), "a", **args)
    assert gray.shape == from_pil.shape


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_gives_finite_images(pipe, sampler):
    out = pipe.txt2img("a", sampler=sampler, seed=0, output_type="np", **FAST)
    assert np.isfinite(out).all(), f"{sampler} produced non-finite pixels"


def test_bfloat16_on_cpu_stays_close_to_float32(tmp_path):
    path = tmp_path / "tiny.safetensors"
    write_single_file(path, random_state(TINY, seed=0))
    ref = Pipeline.from_checkpoint(path, config=TINY).txt2img("a", seed=2, output_type="np", **FAST)
    bf16 = Pipeline.from_checkpoint(path, config=TINY, dtype=torch.bfloat16).txt2img("a", seed=2, output_type="np", **FAST)
    assert np.abs(bf16 - ref).max() < 0.1, f"bfloat16 image differs from float32 by {np.abs(bf16 - ref).max():.3f}"
