"""A procedural captioned data set for the demo model: 64x64 pictures of one flat-coloured shape on a plain
background, with plain-English captions ("a red circle on a blue background", "a small yellow square in the top
left corner on a black background"). Every picture is a pure function of its seed."""

from __future__ import annotations

import numpy as np

SIZE = 64
SUPERSAMPLE = 4  # edges are anti-aliased by drawing at 4x and averaging down

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (245, 220, 40),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
# Half-sizes in pixels: the shape spans 2 * half_size on each axis.
SIZE_WORDS = {"small": (7, 11), "": (11, 18), "large": (18, 24)}
# Where the shape's centre may lie, as fractions of the picture, per position phrase.
POSITIONS = {
    "": (0.0, 1.0, 0.0, 1.0),
    "in the center": (0.45, 0.55, 0.45, 0.55),
    "in the top left corner": (0.0, 0.35, 0.0, 0.35),
    "in the top right corner": (0.65, 1.0, 0.0, 0.35),
    "in the bottom left corner": (0.0, 0.35, 0.65, 1.0),
    "in the bottom right corner": (0.65, 1.0, 0.65, 1.0),
}


def caption(shape: str, colour: str, background: str, size_word: str = "", position: str = "") -> str:
    words = ["a", size_word, colour, shape, position, "on a", background, "background"]
    return " ".join(w for w in words if w)


def mask(shape: str, cx: float, cy: float, half: float, size: int = SIZE) -> np.ndarray:
    """Coverage in [0, 1] of each pixel by the shape (centre cx, cy and half-size in pixels)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    n = size * SUPERSAMPLE
    y, x = (np.mgrid[0:n, 0:n] + 0.5) / SUPERSAMPLE
    dx, dy = x - cx, y - cy
    if shape == "circle":
        inside = dx * dx + dy * dy <= half * half
    elif shape == "square":
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    else:  # upright triangle filling half of its 2*half square: apex at the top middle, base along the bottom
        inside = (dy <= half) & (np.abs(dx) <= (dy + half) / 2)
    return inside.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))


def render(shape: str, colour: str, background: str, cx: float, cy: float, half: float) -> np.ndarray:
    """The uint8 [64, 64, 3] picture of one shape on a plain background."""
    for name in (colour, background):
        if name not in COLOURS:
            raise ValueError(f"unknown colour {name!r}; choose one of {', '.join(COLOURS)}")
    cover = mask(shape, cx, cy, half)[..., None]
    fg, bg = np.array(COLOURS[colour], np.float64), np.array(COLOURS[background], np.float64)
    return np.round(cover * fg + (1 - cover) * bg).astype(np.uint8)


def sample(seed: int) -> tuple[np.ndarray, str, dict]:
    """(uint8 [64, 64, 3] picture, caption, labels) drawn from the seed alone."""
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = names[rng.integers(len(names))]
    background = [c for c in names if c != colour][rng.integers(len(names) - 1)]
    # Half the captions are the bare "a COLOUR SHAPE on a COLOUR background"; the rest add a size, a place or both.
    kind = rng.choice(4, p=[0.5, 0.2, 0.15, 0.15])
    # A shape in a corner must fit there, so it is never large.
    size_word = ("small", "large")[rng.integers(2)] if kind == 1 else "small" if kind == 3 else ""
    position = list(POSITIONS)[1 + rng.integers(len(POSITIONS) - 1)] if kind in (2, 3) else ""
    lo, hi = SIZE_WORDS[size_word]
    if position.endswith("corner"):
        hi = min(hi, 14)
    half = rng.uniform(lo, hi)
    x0, x1, y0, y1 = POSITIONS[position]
    cx = rng.uniform(_centre_bound(x0, half), _centre_bound(x1, half))
    cy = rng.uniform(_centre_bound(y0, half), _centre_bound(y1, half))
    labels = dict(shape=shape, colour=colour, background=background, size_word=size_word, position=position,
                  cx=cx, cy=cy, half=half)
    return render(shape, colour, background, cx, cy, half), caption(shape, colour, background, size_word, position), labels


def _centre_bound(fraction: float, half: float) -> float:
    """A fraction of the picture as a centre coordinate that keeps the whole shape 2 pixels inside the picture."""
    return float(np.clip(fraction * SIZE, half + 2, SIZE - half - 2))


def dataset(n: int, start: int = 0) -> tuple[np.ndarray, list[str], list[dict]]:
    """Samples for seeds start .. start + n - 1: uint8 [n, 64, 64, 3], captions, labels."""
    images, captions, labels = [], [], []
    for seed in range(start, start + n):
        image, text, label = sample(seed)
        images.append(image)
        captions.append(text)
        labels.append(label)
    return np.stack(images), captions, labels
