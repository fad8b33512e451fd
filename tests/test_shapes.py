"""The demo model's training data: every picture is a function of its seed, and its caption says what is drawn."""

import numpy as np
import pytest

from tools import shapes

SEEDS = range(300)


@pytest.fixture(scope="module")
def data():
    return shapes.dataset(len(SEEDS))


def test_same_seed_same_sample_and_other_seeds_differ(data):
    images, captions, labels = data
    for seed in (0, 7, 299):
        image, text, label = shapes.sample(seed)
        assert np.array_equal(image, images[seed]) and text == captions[seed] and label == labels[seed], f"seed {seed} not reproducible"
    distinct = len({im.tobytes() for im in images})
    assert distinct == len(images), f"only {distinct} distinct pictures among {len(images)} seeds"


def test_pictures_are_64x64_rgb_uint8(data):
    images = data[0]
    assert images.shape == (len(SEEDS), 64, 64, 3) and images.dtype == np.uint8


def test_caption_colour_is_the_shape_colour_and_the_border_is_the_background(data):
    for image, text, label in zip(*data):
        centre = image[int(label["cy"]), int(label["cx"])]
        assert tuple(centre) == shapes.COLOURS[label["colour"]], f"{text!r}: centre pixel {tuple(centre)}"
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        assert (border == shapes.COLOURS[label["background"]]).all(), f"{text!r}: border is not the background colour"
        assert text.startswith("a ") and f"{label['colour']} {label['shape']}" in text, text
        assert text.endswith(f"on a {label['background']} background"), text
        assert label["colour"] != label["background"], f"{text!r}: shape and background share a colour"


def test_shape_fills_its_bounding_box_as_its_name_says(data):
    expected = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}
    for image, text, label in zip(*data):
        fg, bg = (np.array(shapes.COLOURS[label[k]], np.float64) for k in ("colour", "background"))
        # Anti-aliased pixels mix the two colours; the mix recovers how much of each pixel the shape covers.
        cover = (image - bg) @ (fg - bg) / ((fg - bg) @ (fg - bg))
        width, height = cover.sum(axis=1).max(), cover.sum(axis=0).max()
        ratio = cover.sum() / (width * height)
        want = expected[label["shape"]]
        assert abs(ratio - want) < 0.1, f"{text!r}: fill ratio {ratio:.2f}, a {label['shape']} fills {want:.2f}"


def test_size_and_position_words_match_the_drawing(data):
    for _, text, label in zip(*data):
        half, cx, cy = label["half"], label["cx"], label["cy"]
        if "small" in text.split():
            assert half <= 11, f"{text!r}: half-size {half:.1f} px is not small"
        if "large" in text.split():
            assert half >= 18, f"{text!r}: half-size {half:.1f} px is not large"
        if "corner" in text:
            assert ("left" in text) == (cx < 32) and ("top" in text) == (cy < 32), f"{text!r}: centre at ({cx:.0f}, {cy:.0f})"
        if "center" in text:
            assert abs(cx - 32) < 4 and abs(cy - 32) < 4, f"{text!r}: centre at ({cx:.0f}, {cy:.0f})"
        assert half + 2 <= min(cx, cy, 64 - cx, 64 - cy) + 1e-9, f"{text!r}: shape leaves the picture"


def test_every_shape_colour_and_phrase_occurs(data):
    _, captions, labels = data
    assert {l["shape"] for l in labels} == set(shapes.SHAPES)
    assert {l["colour"] for l in labels} == set(shapes.COLOURS) == {l["background"] for l in labels}
    assert {l["position"] for l in labels} == set(shapes.POSITIONS)
    assert {l["size_word"] for l in labels} == set(shapes.SIZE_WORDS)


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="unknown shape 'hexagon'"):
        shapes.render("hexagon", "red", "blue", 32, 32, 10)
    with pytest.raises(ValueError, match="unknown colour 'mauve'"):
        shapes.render("circle", "mauve", "blue", 32, 32, 10)
