"""What a generation is asked to do, checked in one place: the Python API checks its arguments here as it is called,
and the command line checks its options here before any model loads. A wrong type or value raises `SettingError`,
a ValueError whose message starts with the argument's name and says what it accepts."""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tritonsd.engine.config import ModelConfig
from tritonsd.engine.samplers import SamplerPlan, check_run, make_plan
from tritonsd.engine.text_encoder import check_clip_skip

OUTPUT_TYPES = ("pil", "np", "latent")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# torch.Generator takes any unsigned 64-bit seed. Seeds drawn at random stay below 2**32, AUTOMATIC1111's range, so
# a recorded seed replays there too.
SEED_LIMIT = 2**64
RANDOM_SEED_LIMIT = 2**32
SIZE_MULTIPLE = 8
# The largest picture img2img reads, judged by the size an image file declares before any pixel is decoded.
MAX_IMAGE_SIDE = 8192
MAX_IMAGE_PIXELS = MAX_IMAGE_SIDE**2
_FLOAT32_MAX = float(np.finfo(np.float32).max)
# SDXL's size conditioning (original_size, target_size, crops_coords_top_left) in pixels: a picture past this side is
# no picture SDXL was trained on (its data was bucketed around 1024x1024), so a larger value is a mistake.
MAX_CONDITIONING_SIDE = 16384
# The refiner's aesthetic score is that of the LAION aesthetics predictor it was trained with: 0 to 10.
AESTHETIC_RANGE = (0.0, 10.0)


def _with_negatives(*names: str) -> tuple[str, ...]:
    return names + tuple(f"negative_{name}" for name in names)


# The Settings options each kind of ModelConfig.conditioning reads; a model refuses the others set away from their
# defaults (Pipeline.check).
CONDITIONING_OPTIONS = {
    "none": (),
    "size": _with_negatives("original_size", "crops_coords_top_left", "target_size"),
    "aesthetic": _with_negatives("original_size", "crops_coords_top_left", "aesthetic_score"),
}
# PIL modes whose pixels are wider than 8 bits: convert("RGB") would clip them, so they are scaled instead.
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


class SettingError(ValueError):
    """A generation argument of the wrong type or value. `argument` names it; the message is `argument problem`."""

    def __init__(self, argument: str, problem: str):
        super().__init__(f"{argument} {problem}")
        self.argument, self.problem = argument, problem


def random_seed() -> int:
    return random.randrange(RANDOM_SEED_LIMIT)


def check_integer(argument: str, value, accepted: str) -> int:
    """value as a Python int; bools, floats and strings are refused. `accepted` describes the range, for the message."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise SettingError(argument, f"must be {accepted}, got {value!r} ({type(value).__name__})")
    return int(value)


def check_real(argument: str, value, accepted: str) -> float:
    """value as a float that is finite in float32, the precision the sampler runs at; bools are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not abs(float(value)) <= _FLOAT32_MAX:
        raise SettingError(argument, f"must be {accepted} (finite in float32), got {value!r}")
    return float(value)


def check_seed(seed) -> int:
    seed = check_integer("seed", seed, "an integer in [0, 2**64)")
    if not 0 <= seed < SEED_LIMIT:
        raise SettingError("seed", f"must be an integer in [0, 2**64), got {seed}")
    return seed


def check_size(argument: str, size) -> int:
    accepted = f"a positive multiple of {SIZE_MULTIPLE}"
    size = check_integer(argument, size, accepted)
    if size <= 0 or size % SIZE_MULTIPLE:
        raise SettingError(argument, f"must be {accepted}, got {size}")
    return size


def check_pair(argument: str, value, low: int) -> tuple[int, int]:
    """An SDXL conditioning pair (height, width) or (top, left), in diffusers' order: integers in
    [low, MAX_CONDITIONING_SIDE]."""
    accepted = f"a (height, width) pair of integers in [{low}, {MAX_CONDITIONING_SIDE}]"
    if argument.endswith("crops_coords_top_left"):
        accepted = f"a (top, left) pair of integers in [{low}, {MAX_CONDITIONING_SIDE}]"
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise SettingError(argument, f"must be {accepted}, got {value!r}")
    pair = tuple(check_integer(argument, v, accepted) for v in value)
    if not all(low <= v <= MAX_CONDITIONING_SIDE for v in pair):
        raise SettingError(argument, f"must be {accepted}, got {value!r}")
    return pair


def check_device(device) -> torch.device:
    """"cpu", "cuda" or "cuda:N" (or a torch.device) that exists on this machine."""
    accepted = "'cpu', 'cuda' or 'cuda:N'"
    if not isinstance(device, (str, torch.device)):
        raise SettingError("device", f"must be {accepted}, got {device!r} ({type(device).__name__})")
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise SettingError("device", f"must be {accepted}, got {device!r}") from None
    if parsed.type == "cpu":
        return parsed
    if parsed.type != "cuda":
        raise SettingError("device", f"must be {accepted}, got {device!r}")
    if not torch.cuda.is_available():
        raise SettingError("device", f"is {str(device)!r} but CUDA is not available; use 'cpu'")
    count = torch.cuda.device_count()
    if parsed.index is not None and parsed.index >= count:
        raise SettingError("device", f"is {str(device)!r} but there are {count} CUDA device(s)")
    return parsed


def check_dtype(dtype) -> torch.dtype:
    if dtype not in DTYPES.values():
        names = ", ".join(str(d) for d in DTYPES.values())
        raise SettingError("dtype", f"must be one of {names}, got {dtype!r}")
    return dtype


def check_config(config) -> ModelConfig | None:
    if config is not None and not isinstance(config, ModelConfig):
        raise SettingError(
            "config", f"must be a ModelConfig or None, got {type(config).__name__} (ModelConfig.from_dict builds one)"
        )
    return config


def check_path(argument: str, path) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise SettingError(argument, f"must be a path (str or os.PathLike), got {type(path).__name__}")
    return Path(path)


def prompt_lists(prompt, negative_prompt) -> tuple[tuple[str, ...], tuple[str, ...]]:
    prompts = (prompt,) if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise SettingError("prompt", f"must be a string or a non-empty list of strings, got {type(prompt).__name__}")
    negatives = (negative_prompt,) * len(prompts) if isinstance(negative_prompt, str) else negative_prompt
    if not isinstance(negatives, (list, tuple)) or not all(isinstance(n, str) for n in negatives):
        raise SettingError(
            "negative_prompt", f"must be a string or a list of strings, got {type(negative_prompt).__name__}"
        )
    if len(negatives) != len(prompts):
        raise SettingError(
            "negative_prompt", f"has {len(negatives)} entries for {len(prompts)} prompt(s); give one per prompt or one string"
        )
    return tuple(prompts), tuple(negatives)


@dataclass(frozen=True)
class Settings:
    """One txt2img run, or img2img when `strength` is set (the size then comes from the image). Made with seed=None,
    it draws a seed below 2**32 and keeps it, so a copy made with dataclasses.replace draws the same images."""

    prompt: str | list[str] | tuple[str, ...]
    negative_prompt: str | list[str] | tuple[str, ...] = ""
    steps: int = 30
    guidance_scale: float = 7.5
    sampler: str = "euler"
    seed: int | None = None
    width: int | None = None  # None: the model's own size
    height: int | None = None
    batch_size: int = 1  # images per prompt
    strength: float | None = None  # img2img: how much of the schedule runs, in (0, 1]
    output_type: str = "pil"
    clip_skip: int = 1  # 1: the text encoder's last layer; n: n - 1 layers earlier (A1111's "Clip skip")
    # SDXL's conditioning on the training picture's size and crop, in pixels and diffusers' (height, width) and
    # (top, left) order. None: the size of the image made. The negative forms condition the negative prompt; None:
    # the same as the prompt's. The base reads original, crop and target; the refiner original, crop and aesthetic
    # score. Pipeline.check refuses one a model does not read.
    original_size: tuple[int, int] | None = None
    target_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    negative_original_size: tuple[int, int] | None = None
    negative_target_size: tuple[int, int] | None = None
    negative_crops_coords_top_left: tuple[int, int] | None = None
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5
    # Where the run starts (img2img, in place of strength) and ends, as fractions of the training schedule: a run
    # with denoising_end=f and an img2img of its latents with denoising_start=f make one run (base and refiner).
    denoising_start: float | None = None
    denoising_end: float | None = None
    prompts: tuple[str, ...] = field(init=False, repr=False)
    negative_prompts: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

        prompts, negatives = prompt_lists(self.prompt, self.negative_prompt)
        put("prompts", prompts)
        put("negative_prompts", negatives)
        put("steps", check_integer("steps", self.steps, "an integer"))
        put("guidance_scale", check_real("guidance_scale", self.guidance_scale, "a number"))
        if not isinstance(self.sampler, str):
            raise SettingError("sampler", f"must be a sampler's name, got {self.sampler!r}")
        put("seed", random_seed() if self.seed is None else check_seed(self.seed))
        for name in ("width", "height"):
            if getattr(self, name) is not None:
                put(name, check_size(name, getattr(self, name)))
        batch_size = check_integer("batch_size", self.batch_size, "a positive integer")
        if batch_size < 1:
            raise SettingError("batch_size", f"must be a positive integer, got {batch_size}")
        put("batch_size", batch_size)
        if self.strength is not None:
            put("strength", check_real("strength", self.strength, "a number in (0, 1]"))
            if (self.width, self.height) != (None, None):
                raise SettingError("width", "and height are the image's own in img2img; leave them None")
        if not isinstance(self.output_type, str) or self.output_type not in OUTPUT_TYPES:
            raise SettingError("output_type", f"must be one of {', '.join(OUTPUT_TYPES)}, got {self.output_type!r}")
        check_clip_skip(self.clip_skip)  # the layer count is the model's: encode_prompt checks the upper bound
        for name in ("original_size", "target_size", "negative_original_size", "negative_target_size"):
            if getattr(self, name) is not None:
                put(name, check_pair(name, getattr(self, name), 1))
        for name in ("crops_coords_top_left", "negative_crops_coords_top_left"):
            if getattr(self, name) is not None:
                put(name, check_pair(name, getattr(self, name), 0))
        for name in ("aesthetic_score", "negative_aesthetic_score"):
            low, high = AESTHETIC_RANGE
            score = check_real(name, getattr(self, name), f"a number in [{low:g}, {high:g}]")
            if not low <= score <= high:
                raise SettingError(name, f"must be a number in [{low:g}, {high:g}] (the LAION aesthetic score the "
                                         f"refiner was trained with), got {score}")
            put(name, score)
        for name in ("denoising_start", "denoising_end"):
            if getattr(self, name) is not None:
                put(name, check_real(name, getattr(self, name), "a number in (0, 1)"))
        if self.denoising_start is not None and self.strength is None:
            raise SettingError("denoising_start", "applies to img2img (it takes the place of strength); txt2img "
                                                  "starts from noise")
        # The sampler's own checks: its name, the step count, strength and the cuts' range.
        check_run(self.sampler, self.steps, self._strength, self.denoising_start, self.denoising_end)

    @property
    def _strength(self) -> float:
        return 1.0 if self.strength is None else self.strength

    def plan(self, config: ModelConfig) -> SamplerPlan:
        """The sampler's run for a model of this config (its prediction type and timestep spacing); a ValueError if a
        cut (denoising_start, denoising_end) leaves that schedule no step."""
        return make_plan(self.sampler, self.steps, self._strength, config.prediction_type, self.denoising_start,
                         self.denoising_end, config.timestep_spacing)

    def check_conditioning(self, conditioning: str, family: str) -> None:
        """Refuse an SDXL conditioning option, set away from its default, that a model of this conditioning kind
        (ModelConfig.conditioning) does not read."""
        reads = CONDITIONING_OPTIONS[conditioning]
        for f in dataclasses.fields(self):
            if f.name in CONDITIONING_OPTIONS["size"] + CONDITIONING_OPTIONS["aesthetic"] and f.name not in reads \
                    and getattr(self, f.name) != f.default:
                what = {"none": "no size or aesthetic conditioning", "size": "no aesthetic score (the refiner's)",
                        "aesthetic": "no target size (the base's)"}[conditioning]
                raise SettingError(f.name, f"does not apply to this {family} model: it reads {what}")

    @property
    def images(self) -> int:
        return len(self.prompts) * self.batch_size

    @property
    def guided(self) -> bool:
        """Classifier-free guidance runs the UNet on the negative prompts too; at a scale <= 1 it is skipped."""
        return self.guidance_scale > 1.0


def read_latents(latents: torch.Tensor, channels: int, images: int, vae_scale: int) -> torch.Tensor:
    """img2img's input given as latents [1 or images, channels, h, w] (txt2img's output_type="latent"), checked as
    read_image checks a picture: their shape, an image size within MAX_IMAGE_SIDE, finite values."""
    if latents.ndim != 4 or latents.shape[1] != channels or not latents.is_floating_point():
        raise SettingError("image", f"given as a tensor must be latents [1 or {images}, {channels}, h, w] (txt2img's "
                                    f"output_type='latent'), got a {latents.dtype} tensor of shape {list(latents.shape)}")
    if latents.shape[0] not in (1, images):
        raise SettingError("image", f"holds {latents.shape[0]} latents for {images} images; give one or {images}")
    if max(latents.shape[-2:]) * vae_scale > MAX_IMAGE_SIDE or min(latents.shape[-2:]) == 0:
        raise SettingError("image", f"latents of {list(latents.shape[-2:])} make an image past {MAX_IMAGE_SIDE} pixels "
                                    "a side, or an empty one")
    if not bool(torch.isfinite(latents).all()):
        raise SettingError("image", "latents hold NaN or infinite values")
    return latents


def read_image(image) -> Image.Image:
    """img2img's input as an RGB PIL image, from a PIL image, a path or an HxW, HxWx1, HxWx3 or HxWx4 numpy array.
    Grayscale is spread to RGB and alpha dropped. 16-bit pixels (PIL's I;16 modes, uint16 arrays) are scaled to 8
    bits; other integer arrays must hold 0..255; float arrays are read as [0, 1]. A file's declared size is checked
    against MAX_IMAGE_PIXELS before any pixel is decoded."""
    if isinstance(image, (str, os.PathLike)):
        return _read_file(Path(image))
    if isinstance(image, np.ndarray):
        return _from_array(image)
    if isinstance(image, Image.Image):
        _check_pixels(image.size)  # an Image.open()ed image has not decoded its pixels yet either
        return _to_rgb(image)
    raise SettingError("image", f"must be a PIL image, a path or a numpy array, got {type(image).__name__}")


# What PIL raises on files it cannot read or decode (a broken PNG chunk is a SyntaxError).
_PIL_ERRORS = (OSError, SyntaxError, EOFError, ValueError, Image.DecompressionBombError)


def _read_file(path: Path) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # PIL warns of sizes above its own limit, which is above ours: the check below refuses them.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(path)  # reads the header only
    except _PIL_ERRORS as e:
        raise SettingError("image", f"{path} cannot be read: {e}") from None
    with opened:
        _check_pixels(opened.size, str(path))
        try:
            return _to_rgb(opened)
        except _PIL_ERRORS as e:
            raise SettingError("image", f"{path} cannot be read: {e}") from None


def _check_pixels(size: tuple[int, int], source: str = "") -> None:
    width, height = size
    if width * height > MAX_IMAGE_PIXELS:
        raise SettingError("image", " ".join(filter(None, [
            source, f"is {width}x{height} pixels; img2img reads at most {MAX_IMAGE_PIXELS:,} ({MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE})"
        ])))


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _WIDE_MODES:
        array = np.asarray(image)
        if image.mode == "I":  # 32-bit integers, as older Pillow opens 16-bit PNGs: read as 16-bit values
            if array.size and not 0 <= array.min() <= array.max() <= 65535:
                raise SettingError("image", f"of mode I holds {array.min()}..{array.max()}; expected 16-bit values")
            array = array.astype(np.uint16)
        return _from_array(array)
    return image.convert("RGB")


def _from_array(array: np.ndarray) -> Image.Image:
    """uint8 as it is; uint16 as 16-bit (a 16-bit PNG's pixels), scaled to 8 bits; other integers as 0..255;
    floats as [0, 1], up to half an 8-bit step outside (which rounds inside)."""
    kind = array.dtype.kind
    if kind not in "uif":
        raise SettingError(
            "image", f"array of dtype {array.dtype} is not an image; use integers (uint8 0..255, uint16 0..65535) "
            "or floats in [0, 1]"
        )
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)) or array.size == 0:
        raise SettingError("image", f"array must be HxW, HxWx1, HxWx3 or HxWx4 and not empty, got shape {array.shape}")
    _check_pixels((array.shape[1], array.shape[0]), "array")
    if kind == "f":
        low, high = float(array.min()), float(array.max())
        margin = 0.5 / 255
        if not (math.isfinite(low) and math.isfinite(high) and -margin <= low and high <= 1 + margin):
            raise SettingError("image", f"float arrays are read as [0, 1]; this one spans {low:g} to {high:g}")
        array = (np.clip(array.astype(np.float64), 0.0, 1.0) * 255).round().astype(np.uint8)
    elif kind == "u" and array.dtype.itemsize == 2:
        # round(v * 255 / 65535), in integers: v * 255 stays below 2**24.
        array = ((array.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    elif array.dtype != np.uint8:
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise SettingError(
                "image", f"array of dtype {array.dtype} holds {low}..{high}; integer images hold 0..255 "
                "(uint16: 0..65535)"
            )
        array = array.astype(np.uint8)
    return Image.fromarray(array).convert("RGB")
