"""Draw a grid of the demo model's pictures, one row per prompt and one column per seed, with the prompts written
beside the rows: `python -m tools.render_grid` writes docs/demo_grid.png."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from tritonsd.engine.pipeline import Pipeline
from tritonsd.files import atomic_write

PROMPTS = [
    "a red circle on a blue background",
    "a yellow square on a black background",
    "a white triangle on a green background",
    "a blue circle on a yellow background",
    "a black square on a white background",
    "a green triangle on a red background",
    "a small white circle in the top left corner on a blue background",
    "a large red square on a yellow background",
]


def render(pipe: Pipeline, prompts: list[str], seeds: list[int], steps: int, scale: int) -> Image.Image:
    rows = [pipe.txt2img(prompts, seed=seed, steps=steps, output_type="np") for seed in seeds]
    side = rows[0].shape[1] * scale
    pad = 4
    label_width = int(max(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(p) for p in prompts)) + 12
    grid = Image.new("RGB", (label_width + len(seeds) * (side + pad), len(prompts) * (side + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for r, prompt in enumerate(prompts):
        y = r * (side + pad)
        draw.text((6, y + side // 2 - 6), prompt, fill="black")
        for c in range(len(seeds)):
            tile = Image.fromarray((rows[c][r] * 255).round().astype(np.uint8)).resize((side, side), Image.NEAREST)
            grid.paste(tile, (label_width + c * (side + pad), y))
    return grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split(":")[0])
    parser.add_argument("--model", type=Path, help="checkpoint (default: the demo model)")
    parser.add_argument("--out", type=Path, default=Path("docs/demo_grid.png"))
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--scale", type=int, default=2, help="each 64x64 picture is shown this many times larger")
    args = parser.parse_args()
    pipe = Pipeline.from_checkpoint(args.model)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid = render(pipe, PROMPTS, list(range(args.seeds)), args.steps, args.scale)
    with atomic_write(args.out) as tmp:
        grid.save(tmp, format=Image.registered_extensions()[args.out.suffix.lower()])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
