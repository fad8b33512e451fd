"""The shipped demo model draws what its prompt asks for. Pictures are judged by plain pixel statistics: the
background is the named colour nearest the median border pixel, the foreground the named colour most of the
pixels far from the background are nearest to, and the shape the circle, square or upright triangle that, fitted to
the foreground's bounding box, overlaps it best."""

import numpy as np
import pytest

from tritonsd.engine.pipeline import Pipeline
from tritonsd.engine.samplers import SAMPLERS
from tritonsd.loader import DEMO_MODEL
from tools import shapes

pytestmark = pytest.mark.skipif(not DEMO_MODEL.is_file(), reason="the demo model is not installed in this copy")

NAMES = list(shapes.COLOURS)
PALETTE = np.array([shapes.COLOURS[n] for n in NAMES], np.float64)
# Every colour as a shape, each on a different background, every shape with every colour.
CASES = [(colour, shape, NAMES[(i + 1 + j) % len(NAMES)])
         for i, colour in enumerate(NAMES) for j, shape in enumerate(shapes.SHAPES)]
PROMPTS = [shapes.caption(shape, colour, bg) for colour, shape, bg in CASES]
SEEDS = (0, 1, 2)
STEPS = 20


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_checkpoint()


def nearest(rgb: np.ndarray) -> np.ndarray:
    return np.argmin(((rgb[..., None, :] - PALETTE) ** 2).sum(-1), axis=-1)


def judge(image: np.ndarray) -> tuple[str, str, str]:
    """(foreground colour, background colour, shape) of one HWC picture in [0, 1]."""
    rgb = image.astype(np.float64) * 255
    border = np.concatenate([rgb[:2].reshape(-1, 3), rgb[-2:].reshape(-1, 3), rgb[:, :2].reshape(-1, 3), rgb[:, -2:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    bg = nearest(bg_rgb)
    far = np.sqrt(((rgb - bg_rgb) ** 2).sum(-1)) > 80
    if far.sum() < 16:
        return "none", NAMES[bg], "none"
    fg = np.bincount(nearest(rgb[far]), minlength=len(NAMES)).argmax()
    # The shape is the pixels nearer the foreground colour than the background's.
    mask = ((rgb - PALETTE[fg]) ** 2).sum(-1) < ((rgb - bg_rgb) ** 2).sum(-1)
    return NAMES[fg], NAMES[bg], best_template(mask)


def best_template(mask: np.ndarray) -> str:
    """The shape whose outline, fitted to the mask's bounding box (its outermost 1% of pixels trimmed as noise),
    overlaps the mask best (intersection over union)."""
    rows, cols = np.nonzero(mask)
    top, bottom = np.percentile(rows, [1, 99])
    left, right = np.percentile(cols, [1, 99])
    cx, cy, half = (left + right + 1) / 2, (top + bottom + 1) / 2, (right - left + bottom - top + 2) / 4
    iou = {}
    for shape in shapes.SHAPES:
        template = shapes.mask(shape, cx, cy, half) > 0.5
        iou[shape] = (template & mask).sum() / (template | mask).sum()
    return max(iou, key=iou.get)


def accuracy(images: np.ndarray, cases: list[tuple[str, str, str]]) -> dict[str, float]:
    got = [judge(im) for im in images]
    return {
        "foreground": np.mean([g[0] == c for g, (c, _, _) in zip(got, cases)]),
        "background": np.mean([g[1] == b for g, (_, _, b) in zip(got, cases)]),
        "shape": np.mean([g[2] == s for g, (_, s, _) in zip(got, cases)]),
    }


def draw(pipe, prompts, seeds, **kw) -> np.ndarray:
    return np.concatenate([pipe.txt2img(prompts, seed=seed, steps=STEPS, output_type="np", **kw) for seed in seeds])


@pytest.fixture(scope="module")
def guided(pipe):
    return accuracy(draw(pipe, PROMPTS, SEEDS), CASES * len(SEEDS))


def test_judge_reads_the_training_pictures():
    """The pixel statistics tell colours and shapes of the data set's own pictures, so they can judge the model's."""
    images, _, labels = shapes.dataset(200)
    acc = accuracy(images / 255.0, [(l["colour"], l["shape"], l["background"]) for l in labels])
    assert min(acc.values()) >= 0.97, f"judge misreads the training pictures: {acc}"


def test_txt2img_draws_the_prompted_colours_and_shape(guided):
    print(f"\nguidance 7.5, euler, {STEPS} steps, {len(PROMPTS) * len(SEEDS)} images: {guided}")
    assert guided["foreground"] >= 0.9, f"foreground colour right in {guided['foreground']:.0%} of images, want >= 90%"
    assert guided["background"] >= 0.9, f"background colour right in {guided['background']:.0%} of images, want >= 90%"
    assert guided["shape"] >= 0.75, f"shape right in {guided['shape']:.0%} of images, want >= 75%"


def test_guidance_makes_the_colours_follow_the_prompt(pipe, guided):
    unguided = accuracy(draw(pipe, PROMPTS, SEEDS, guidance_scale=1.0), CASES * len(SEEDS))

    def colour(acc):
        return (acc["foreground"] + acc["background"]) / 2

    print(f"\nguidance 1.0: {unguided}; guidance 7.5: {guided}")
    assert colour(unguided) <= colour(guided) - 0.03, (
        f"colour accuracy {colour(unguided):.1%} without guidance vs {colour(guided):.1%} at 7.5: guidance should help by >= 3 points"
    )


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_draws_the_prompted_colours_and_shape(pipe, sampler):
    acc = accuracy(draw(pipe, PROMPTS, (3,), sampler=sampler), CASES)
    print(f"\n{sampler}: {acc}")
    assert acc["foreground"] >= 0.9 and acc["background"] >= 0.9, f"{sampler} at {STEPS} steps: colour accuracy {acc}, want >= 90%"
    assert acc["shape"] >= 0.75, f"{sampler} at {STEPS} steps: shape right in {acc['shape']:.0%} of images, want >= 75%"


IMG2IMG = [(("red", "circle", "blue"), ("yellow", "square", "green")),
           (("white", "square", "black"), ("blue", "triangle", "yellow")),
           (("green", "triangle", "white"), ("black", "circle", "red"))]


@pytest.mark.parametrize("source, target", IMG2IMG)
def test_img2img_keeps_the_input_at_low_strength_and_follows_a_new_prompt_at_high(pipe, source, target):
    colour, shape, bg = source
    picture = shapes.render(shape, colour, bg, 30.0, 34.0, 15.0)
    low = pipe.img2img(picture, shapes.caption(shape, colour, bg), strength=0.2, steps=STEPS, seed=0, output_type="np")[0]
    psnr = 10 * np.log10(1.0 / np.mean((low - picture / 255.0) ** 2))
    print(f"\nimg2img strength 0.2 of {shapes.caption(shape, colour, bg)!r}: PSNR {psnr:.1f} dB")
    # The VAE alone reconstructs these pictures at 21-28 dB (sharp black/white edges are the hardest).
    assert psnr >= 18.0, f"strength 0.2 moved the picture too far: PSNR {psnr:.1f} dB < 18 dB"
    assert judge(low) == (colour, bg, shape), f"strength 0.2 changed {source} into {judge(low)}"
    prompt = shapes.caption(target[1], target[0], target[2])
    high = pipe.img2img(picture, prompt, strength=0.9, steps=STEPS, seed=0, batch_size=4, output_type="np")
    acc = accuracy(high, [target] * len(high))
    print(f"img2img strength 0.9 toward {prompt!r}: {acc}")
    assert acc["foreground"] >= 0.75 and acc["background"] >= 0.75, f"strength 0.9 toward {prompt!r}: {acc}"


def red_share(images: np.ndarray) -> np.ndarray:
    """Per image, the share of pixels whose nearest named colour is red."""
    return (nearest(images.astype(np.float64) * 255) == NAMES.index("red")).mean(axis=(1, 2))


def test_attention_weight_changes_how_much_red_is_drawn(pipe):
    shares = {w: red_share(pipe.txt2img(f"a (red:{w}) circle on a blue background", seed=0, steps=STEPS,
                                        batch_size=3, output_type="np"))
              for w in (1.4, 0.6)}
    print(f"\nshare of red pixels: (red:1.4) {shares[1.4].round(3)}, (red:0.6) {shares[0.6].round(3)}")
    assert (shares[1.4] > shares[0.6]).all(), f"(red:1.4) should draw more red than (red:0.6) from the same noise: {shares}"
    assert shares[1.4].mean() >= shares[0.6].mean() + 0.1, f"red share moved by less than 10 points: {shares}"


def test_a_textual_inversion_embedding_draws_what_its_vectors_say(pipe, tmp_path):
    """tsdtest holds the token vectors of "a red circle", in A1111's .pt format."""
    import torch

    words = pipe.tokenizer.encode("a red circle")
    vectors = pipe.text_encoder.embeddings.token_embedding.weight[words].float().clone()
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "tsdtest", "step": 0},
               tmp_path / "tsdtest.pt")
    fresh = Pipeline.from_checkpoint()
    assert fresh.load_textual_inversion(tmp_path / "tsdtest.pt") == "tsdtest"
    images = fresh.txt2img("tsdtest on a blue background", seed=0, steps=STEPS, batch_size=3, output_type="np")
    got = [judge(im) for im in images]
    without = [judge(im)[0] for im in pipe.txt2img("tsdtest on a blue background", seed=0, steps=STEPS, batch_size=3,
                                                      output_type="np")]
    print(f"\n'tsdtest on a blue background': {got}; foregrounds without the embedding: {without}")
    assert got == [("red", "blue", "circle")] * 3, f"tsdtest should draw a red circle on blue, drew {got}"
    assert "red" not in without, f"the test needs the prompt to draw no red without the embedding: {without}"
