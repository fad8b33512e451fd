"""Bad input to the Python API. Every argument of the wrong type or value is refused with a ValueError that names it,
before any work; a request that cannot fit in memory is refused at once with the estimate and the limit; NaN or Inf
in a run is an error naming the stage where it appeared; images are read as their pixel format means; and files
are written with the umask's mode, whole or not at all, to paths checked before the work."""

import json
import os
import struct
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tritonsd import loader
from tritonsd.engine.pipeline import NonFiniteError, Pipeline
from tritonsd.engine.settings import RANDOM_SEED_LIMIT, SettingError, Settings, read_image
from tritonsd.files import atomic_write
from tiny import TINY, random_state, write_single_file

TESTS = Path(__file__).resolve().parent
FAST = dict(steps=2, width=16, height=16)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    write_single_file(path, random_state(TINY, seed=0))
    path.with_suffix(".json").write_text(TINY.to_json())
    return path


@pytest.fixture(scope="module")
def pipe(model_file):
    return Pipeline.from_checkpoint(model_file)


def refused(call, argument: str, fragment: str) -> str:
    """The message of the ValueError `call()` raises, checked to name `argument` and to contain `fragment`."""
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert argument in message and fragment in message, f"expected {argument!r} and {fragment!r} in {message!r}"
    if isinstance(info.value, SettingError):
        assert message.startswith(argument) and info.value.argument == argument, f"names {info.value.argument!r}"
    return message


TXT2IMG = [
    (dict(steps=2.5), "steps", "must be an integer, got 2.5 (float)"),
    (dict(steps=True), "steps", "must be an integer"),
    (dict(steps="30"), "steps", "must be an integer"),
    (dict(steps=0), "steps", "[1, 999], got 0"),
    (dict(steps=10**12), "steps", "[1, 999]"),
    (dict(seed=True), "seed", "[0, 2**64), got True"),
    (dict(seed=-1), "seed", "[0, 2**64), got -1"),
    (dict(seed=2**64), "seed", f"[0, 2**64), got {2**64}"),
    (dict(seed=1.0), "seed", "[0, 2**64)"),
    (dict(seed="7"), "seed", "[0, 2**64)"),
    (dict(guidance_scale=1e39), "guidance_scale", "finite in float32"),
    (dict(guidance_scale=float("nan")), "guidance_scale", "finite in float32"),
    (dict(guidance_scale=-float("inf")), "guidance_scale", "finite in float32"),
    (dict(guidance_scale=True), "guidance_scale", "a number"),
    (dict(guidance_scale="7.5"), "guidance_scale", "a number"),
    (dict(width=20), "width", "positive multiple of 8, got 20"),
    (dict(height=0), "height", "positive multiple of 8, got 0"),
    (dict(width=-8), "width", "positive multiple of 8"),
    (dict(width=24.0), "width", "positive multiple of 8"),
    (dict(height=True), "height", "positive multiple of 8"),
    (dict(batch_size=0), "batch_size", "positive integer, got 0"),
    (dict(batch_size=True), "batch_size", "positive integer"),
    (dict(batch_size=2.0), "batch_size", "positive integer"),
    (dict(sampler="plms"), "sampler", "euler_a"),
    (dict(sampler=["euler"]), "sampler", "a sampler's name"),
    (dict(prompt=3), "prompt", "a string or a non-empty list of strings"),
    (dict(prompt=["a", None]), "prompt", "a string or a non-empty list of strings"),
    (dict(prompt=[]), "prompt", "a string or a non-empty list of strings"),
    (dict(negative_prompt=["a", "b"]), "negative_prompt", "2 entries for 1 prompt"),
    (dict(negative_prompt=None), "negative_prompt", "a string or a list of strings"),
    (dict(output_type="tensor"), "output_type", "pil, np, latent"),
    (dict(output_type=["pil"]), "output_type", "pil, np, latent"),
]


@pytest.mark.parametrize("override, argument, fragment", TXT2IMG, ids=[repr(case[0])[:40] for case in TXT2IMG])
def test_txt2img_names_the_bad_argument(pipe, override, argument, fragment):
    refused(lambda: pipe.txt2img(**(dict(prompt="a", seed=0, **FAST) | override)), argument, fragment)


IMG2IMG = [
    (dict(strength=0), "strength", "(0, 1], got 0"),
    (dict(strength=1.5), "strength", "(0, 1], got 1.5"),
    (dict(strength=float("nan")), "strength", "finite in float32"),
    (dict(strength=True), "strength", "a number in (0, 1]"),
    (dict(strength="0.5"), "strength", "a number in (0, 1]"),
    (dict(strength=0.1, steps=5), "strength", "leaves no denoising step"),
    (dict(image=12), "image", "a PIL image, a path or a numpy array, got int"),
    (dict(image=None), "image", "got NoneType"),
    (dict(image="/nonexistent/picture.png"), "image", "cannot be read"),
    (dict(image=np.zeros((1, 4, 3), np.uint8)), "image", "smaller than 2x2"),
    (dict(image=np.zeros((8, 8, 2), np.uint8)), "image", "HxW, HxWx1, HxWx3 or HxWx4"),
    (dict(image=np.zeros((0, 8, 3), np.uint8)), "image", "not empty"),
    (dict(image=np.zeros((8, 8, 3), bool)), "image", "dtype bool is not an image"),
    (dict(image=np.zeros((8, 8, 3), complex)), "image", "dtype complex128 is not an image"),
    (dict(image=np.zeros((8, 8, 3), object)), "image", "dtype object is not an image"),
    (dict(image=np.full((8, 8, 3), 300, np.int32)), "image", "holds 300..300; integer images hold 0..255"),
    (dict(image=np.full((8, 8, 3), -1, np.int64)), "image", "holds -1..-1"),
    (dict(image=np.full((8, 8, 3), 255.0, np.float32)), "image", "read as [0, 1]; this one spans 255 to 255"),
    (dict(image=np.full((8, 8, 3), np.nan, np.float32)), "image", "read as [0, 1]"),
    # A view of one pixel repeated: the size is refused before any of its 243 million values is read.
    (dict(image=np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (9000, 9000, 3))), "image", "at most 67,108,864"),
]


@pytest.mark.parametrize("override, argument, fragment", IMG2IMG, ids=[repr(case[0])[:40] for case in IMG2IMG])
def test_img2img_names_the_bad_argument(pipe, override, argument, fragment):
    args = dict(image=np.zeros((16, 16, 3), np.uint8), prompt="a", strength=0.5, steps=2, seed=0) | override
    refused(lambda: pipe.img2img(**args), argument, fragment)


def test_img2img_refuses_a_file_that_is_not_an_image(pipe, tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not a picture")
    refused(lambda: pipe.img2img(path, "a", steps=2), "image", "cannot be read")


def test_settings_refuse_a_size_for_img2img_and_an_image_for_txt2img(pipe):
    refused(lambda: Settings("a", strength=0.5, width=64), "width", "the image's own")
    refused(lambda: pipe.generate(Settings("a", **FAST), np.zeros((16, 16, 3), np.uint8)), "image", "strength is not")


FROM_CHECKPOINT = [
    (dict(device="banana"), "device", "'cpu', 'cuda' or 'cuda:N', got 'banana'"),
    (dict(device="tpu"), "device", "got 'tpu'"),
    (dict(device="cuda:-1"), "device", "got 'cuda:-1'"),
    (dict(device=3), "device", "got 3 (int)"),
    (dict(dtype=torch.int8), "dtype", "torch.float32, torch.float16, torch.bfloat16, got torch.int8"),
    (dict(dtype=torch.float64), "dtype", "got torch.float64"),
    (dict(dtype="float16"), "dtype", "got 'float16'"),
    (dict(config={"unet": {}}), "config", "a ModelConfig or None, got dict"),
    (dict(config="tiny.json"), "config", "got str"),
    (dict(path=123), "path", "a path (str or os.PathLike), got int"),
]
if not torch.cuda.is_available():
    FROM_CHECKPOINT += [(dict(device="cuda"), "device", "CUDA is not available"),
                        (dict(device=torch.device("cuda", 1)), "device", "CUDA is not available")]


@pytest.mark.parametrize("override, argument, fragment", FROM_CHECKPOINT, ids=[repr(c[0])[:40] for c in FROM_CHECKPOINT])
def test_from_checkpoint_names_the_bad_argument_before_loading(model_file, override, argument, fragment):
    refused(lambda: Pipeline.from_checkpoint(**(dict(path=model_file) | override)), argument, fragment)


def test_seeds_take_the_whole_64_bit_range_and_random_ones_stay_below_2_32(pipe):
    top = pipe.txt2img("a", seed=2**64 - 1, output_type="latent", **FAST)
    again = pipe.txt2img("a", seed=np.uint64(2**64 - 1), output_type="latent", **FAST)
    assert torch.equal(top, again), "the same seed as a numpy integer drew other latents"
    seeds = [Settings("a").seed for _ in range(64)]
    assert max(seeds) < RANDOM_SEED_LIMIT == 2**32, f"random seed {max(seeds)} is not below 2**32"
    assert len(set(seeds)) > 60, f"64 random seeds gave only {len(set(seeds))} values"


def test_guidance_finite_in_float32_that_overflows_the_sampler_is_a_unet_error(pipe):
    refused(lambda: pipe.txt2img("a", guidance_scale=3e38, seed=0, **FAST), "UNet sampling", "NaN or Inf")


# Memory: a request that cannot fit is refused in milliseconds, before any allocation.
ABSURD = [
    dict(width=100_000, height=100_000),
    dict(batch_size=10**6),
    dict(prompt=["a"] * 100_000, batch_size=1000),
]


@pytest.mark.parametrize("override", ABSURD, ids=["100000x100000", "batch 1e6", "1e5 prompts x 1000"])
def test_a_request_that_cannot_fit_is_refused_at_once(pipe, override):
    start = time.perf_counter()
    refused(lambda: pipe.txt2img(**(dict(prompt="a", steps=2) | override)), "needs about", "is available")
    seconds = time.perf_counter() - start
    assert seconds < 1.0, f"refusing took {seconds:.2f} s"


MEMORY_SCRIPT = """
import json, resource, sys, time
import torch
torch.set_num_threads(1)
from tritonsd import Pipeline, Settings
from tritonsd.engine import memory

def status():
    return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("Vm")}

pipe = Pipeline.from_checkpoint(sys.argv[1])
pipe.txt2img("a", steps=1, width=16, height=16)  # one-time allocations out of the way
limit = status()["VmSize"] + 2**30
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
out = {"available": memory.host_available()}

settings = Settings("a red cube", steps=1, width=96, height=96, seed=0)
need = memory.estimate(pipe.config, pipe.device, pipe.dtype, settings, settings.plan(pipe.config), 96, 96)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS
base = status()["VmRSS"]
pipe.generate(settings)
out["peak"], out["estimate"] = status()["VmHWM"] - base, need.device + need.host

for name, kw in (("absurd", dict(width=100_000, height=100_000)), ("over the limit", dict(width=256, height=256))):
    start = time.perf_counter()
    try:
        pipe.txt2img("a", steps=2, **kw)
        out[name] = None
    except ValueError as e:
        out[name] = [str(e), time.perf_counter() - start]
print(json.dumps(out))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc")
def test_memory_estimate_covers_a_real_run_and_counts_an_address_space_limit(model_file):
    """In a process limited to 1 GiB more address space (so that a broken bound fails fast instead of swapping): a
    real 96x96 run passes and its peak RSS growth stays under its estimate, while 100000x100000 is refused at once
    and so is 256x256 (an estimate of about 3.5 GiB, which the machine may well have, but not the process)."""
    done = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(model_file)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"the limited process failed:\n{done.stderr[-3000:]}"
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["available"] <= 2**30, f"host_available() is {out['available'] / 2**30:.2f} GiB under a 1 GiB limit"
    assert out["peak"] <= out["estimate"], (
        f"a 96x96 run grew RSS by {out['peak'] / 2**20:.1f} MiB, over its estimate of {out['estimate'] / 2**20:.1f} MiB"
    )
    for name in ("absurd", "over the limit"):
        assert out[name] is not None, f"the {name} request ran"
        message, seconds = out[name]
        assert "needs about" in message and "is available" in message and seconds < 0.5, f"{name}: {out[name]}"


# NaN or Inf: each stage is checked once, and names itself.
@pytest.fixture
def poison(pipe):
    """poison(tensor) fills a parameter with NaN for the test; the weights are restored after it."""
    saved = []

    def put(t: torch.Tensor, value=float("nan")):
        saved.append((t, t.detach().clone()))
        with torch.no_grad():
            t.fill_(value)

    yield put
    with torch.no_grad():
        for t, value in saved:
            t.copy_(value)


STAGES = [
    ("text encoder", lambda p: p.text_encoder.final_layer_norm.weight, "txt2img"),
    ("UNet sampling", lambda p: p.unet.out[2].bias, "txt2img"),
    ("VAE decode", lambda p: p.vae.decoder.conv_out.bias, "txt2img"),
    ("VAE encode", lambda p: p.vae.quant_conv.bias, "img2img"),
]


@pytest.mark.parametrize("stage, parameter, mode", STAGES, ids=[s[0] for s in STAGES])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_weights_are_an_error_naming_the_stage(pipe, poison, stage, parameter, mode, value):
    poison(parameter(pipe), value)
    if mode == "txt2img":
        call = lambda: pipe.txt2img("a", seed=0, **FAST)  # noqa: E731
    else:
        call = lambda: pipe.img2img(np.zeros((16, 16, 3), np.uint8), "a", strength=0.5, steps=2, seed=0)  # noqa: E731
    with pytest.raises(NonFiniteError, match=f"after the {stage}"):
        call()


def test_nan_scaling_factor_is_a_vae_decode_error(pipe, monkeypatch):
    monkeypatch.setattr(pipe.vae, "scaling_factor", float("nan"))
    with pytest.raises(NonFiniteError, match="after the VAE decode"):
        pipe.txt2img("a", seed=0, **FAST)
    assert issubclass(NonFiniteError, ValueError)


def test_finiteness_is_checked_once_per_stage_not_per_step(pipe, monkeypatch):
    calls = []
    isfinite = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda x: calls.append(x.shape) or isfinite(x))
    counts = {}
    for steps in (2, 5):
        calls.clear()
        pipe.txt2img("a", seed=0, steps=steps, width=16, height=16)
        counts[steps] = len(calls)
    assert counts == {2: 3, 5: 3}, f"finiteness checks per run by step count: {counts}; expected 3 (text, UNet, VAE)"


# Images in.
def png_declaring(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares width x height RGB pixels, with no pixel data: decoding it fails, reading its
    header does not."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("side", [9000, 10_000, 100_000])
def test_a_decompression_bomb_is_refused_from_its_header(tmp_path, side):
    """Sizes below, inside and above PIL's own warning range (89 to 179 Mpx) are refused by the size the header
    declares: the message is about the size, not about the missing pixel data, and PIL warns of nothing."""
    path = png_declaring(tmp_path / "bomb.png", side, side)
    for image in (path, str(path)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            message = refused(lambda: read_image(image), "image", str(path))
        assert "at most 67,108,864" in message or "decompression bomb" in message, message
    if side * side <= 2 * Image.MAX_IMAGE_PIXELS:  # PIL opens it: not yet decoded, it is judged by its size too
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            lazy = Image.open(path)
        with lazy:
            refused(lambda: read_image(lazy), "image", "at most 67,108,864")


def scaled_16_to_8(values: np.ndarray) -> np.ndarray:
    """The 16-bit to 8-bit scaling by its definition: round(v * 255 / 65535)."""
    return np.round(values.astype(np.float64) * 255 / 65535).astype(np.uint8)


def test_16_bit_grayscale_png_is_scaled_to_8_bits_not_clipped(pipe, tmp_path):
    values = np.array([[0, 1, 128, 129, 257, 1000, 32767, 32768, 65279, 65534, 65535, 40000]] * 8, dtype=np.uint16)
    path = tmp_path / "gray16.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as check:
        assert check.mode.startswith("I;16"), f"the test image opened as {check.mode}, not a 16-bit mode"
    want = np.repeat(scaled_16_to_8(values)[..., None], 3, axis=-1)
    for source in (path, Image.open(path), values, values.astype(">u2")):
        got = np.asarray(read_image(source))
        assert np.array_equal(got, want), f"{type(source).__name__}: {got[0, :, 0]} != {want[0, :, 0]}"
    args = dict(prompt="a", strength=0.5, steps=2, seed=1, output_type="np")
    assert np.array_equal(pipe.img2img(path, **args), pipe.img2img(want, **args)), "img2img of the 16-bit PNG differs"


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64, np.uint32, np.uint64])
def test_integer_arrays_holding_0_to_255_read_as_8_bit(dtype):
    rgb = np.random.default_rng(0).integers(0, 128 if dtype == np.int8 else 256, (12, 10, 3)).astype(np.uint8)
    got = np.asarray(read_image(rgb.astype(dtype)))
    assert np.array_equal(got, rgb), f"{np.dtype(dtype)} array differs from uint8 by up to {np.abs(got - rgb.astype(int)).max()}"


def test_float_arrays_read_as_0_to_1_and_gray_and_alpha_are_dropped_to_rgb(pipe):
    rgb = np.random.default_rng(1).integers(0, 256, (12, 10, 3)).astype(np.uint8)
    for array in (rgb / 255.0, (rgb / 255.0).astype(np.float32), (rgb / 255.0).astype(np.float16)):
        assert np.array_equal(np.asarray(read_image(array)), rgb), f"{array.dtype} array not read as [0, 1]"
    assert np.array_equal(np.asarray(read_image(np.dstack([rgb, np.full((12, 10), 7, np.uint8)]))), rgb), "RGBA"
    gray = np.asarray(read_image(rgb[..., :1].astype(np.int32)))
    assert np.array_equal(gray, np.repeat(rgb[..., :1], 3, axis=-1)), "HxWx1 int32 not spread to gray RGB"
    args = dict(prompt="a", strength=0.5, steps=2, seed=1, output_type="np")
    assert np.array_equal(pipe.img2img(rgb.astype(np.int32), **args), pipe.img2img(rgb, **args)), "int32 img2img"


# Files out.
def test_saved_checkpoints_take_the_umask_mode(tmp_path):
    state = random_state(TINY)
    old = os.umask(0o027)
    try:
        loader.save(state, TINY, tmp_path / "a.safetensors")
    finally:
        os.umask(old)
    mode = (tmp_path / "a.safetensors").stat().st_mode & 0o777
    assert mode == 0o640, f"mode {mode:o} under umask 027, expected 640"


def test_save_checks_its_path_before_writing(tmp_path):
    state = random_state(TINY)
    (tmp_path / "folder.safetensors").mkdir()
    cases = [
        (tmp_path / "folder.safetensors", "is a folder"),
        (tmp_path / "missing" / "a.safetensors", "does not exist"),
        (tmp_path / ("x" * 250 + ".safetensors"), "the file system allows"),
    ]
    for path, fragment in cases:
        with pytest.raises(ValueError, match=fragment):
            loader.save(state, TINY, path)
    assert os.listdir(tmp_path) == ["folder.safetensors"], f"left {os.listdir(tmp_path)}"


def test_atomic_write_removes_its_file_on_interrupt_and_keeps_the_old_one(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(target) as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == ["a.bin"] and target.read_bytes() == b"old", os.listdir(tmp_path)
