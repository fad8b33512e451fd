"""The `tritonsd` command: what each subcommand writes, that its PNGs say how to reproduce them, that batch runs
resume and split across torchrun ranks, and that bad input ends in one line and exit status 2 with nothing written."""

import hashlib
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from tritonsd import kernels
from tritonsd import loader
from tritonsd.engine.pipeline import Pipeline
from tiny import TINY, random_state, write_single_file
from tritonsd.cli import main
from tritonsd.pngmeta import format_parameters, parse_parameters

ROOT = Path(__file__).parents[1]
FAST = ["--steps", "2", "--width", "32", "--height", "32", "--device", "cpu"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """The tiny model as people keep one: an original single file with its config beside it."""
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    write_single_file(path, random_state(TINY, seed=0))
    path.with_suffix(".json").write_text(TINY.to_json())
    return path


@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> Path:
    """A valid safetensors file that is not a Stable Diffusion model."""
    path = tmp_path_factory.mktemp("foreign") / "classifier.safetensors"
    safetensors.torch.save_file({"fc.weight": torch.zeros(10, 4), "fc.bias": torch.zeros(10)}, path)
    return path


def cli(capsys, *argv) -> tuple[str, str]:
    main([str(a) for a in argv])
    captured = capsys.readouterr()
    return captured.out, captured.err


def cli_fails(capsys, *argv, status: int = 2) -> tuple[str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert exit_info.value.code == status, f"exit status {exit_info.value.code}, expected {status}; stderr: {captured.err}"
    return captured.out, captured.err


def parameters(path: Path) -> str:
    with Image.open(path) as im:
        return im.text["parameters"]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def sha10(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:10]


def test_parameters_read_an_a1111_png_text():
    text = (
        "a castle on a hill, masterpiece\nwide shot\n"
        "Negative prompt: lowres, bad anatomy\n"
        "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 3551390545, Size: 512x768, "
        'Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.7, Clip skip: 2, Lora hashes: "a: 1, b: 2"'
    )
    assert parse_parameters(text) == {
        "prompt": "a castle on a hill, masterpiece\nwide shot", "negative_prompt": "lowres, bad anatomy",
        "steps": 20, "sampler": "dpmpp_2m_karras", "cfg": 7.0, "seed": 3551390545, "width": 512, "height": 768,
        "model_hash": "6ce0161689", "model": "v1-5-pruned-emaonly", "strength": 0.7, "Clip skip": "2",
        "Lora hashes": "a: 1, b: 2",
    }


def test_parameters_written_as_a1111_writes_them():
    text = format_parameters(
        "a cat", "", steps=30, sampler="euler_a", cfg=7.0, seed=1234, width=512, height=512,
        model_hash="0123456789", model="my, model: v2", strength=0.75,
    )
    assert text == (
        "a cat\nSteps: 30, Sampler: Euler a, CFG scale: 7, Seed: 1234, Size: 512x512, "
        'Model hash: 0123456789, Model: "my, model: v2", Denoising strength: 0.75'
    )
    assert parse_parameters(text)["model"] == "my, model: v2"


@pytest.mark.parametrize(
    "sampler, negative, width, height",
    [("euler_a", "blurry, low quality", 64, 32), ("dpmpp_2m_karras", "", 32, 48)],
)
def test_txt2img_writes_a_png_that_records_its_settings(capsys, model, tmp_path, sampler, negative, width, height):
    out = tmp_path / "cube.png"
    stdout, stderr = cli(
        capsys, "txt2img", "a red cube, studio light", "--negative-prompt", negative, "--steps", 3, "--cfg", 5.5,
        "--sampler", sampler, "--seed", 1234, "--width", width, "--height", height, "--model", model, "-o", out,
        "--device", "cpu",
    )
    assert stdout == f"{out}\n"
    assert "seed 1234" in stderr and "steps/s on cpu (fp32)" in stderr, f"summary line missing: {stderr!r}"
    with Image.open(out) as im:
        assert im.size == (width, height), f"image is {im.size}, asked for {(width, height)}"
    a1111_name = {"euler_a": "Euler a", "dpmpp_2m_karras": "DPM++ 2M Karras"}[sampler]
    negative_line = f"Negative prompt: {negative}\n" if negative else ""
    assert parameters(out) == (
        f"a red cube, studio light\n{negative_line}Steps: 3, Sampler: {a1111_name}, CFG scale: 5.5, Seed: 1234, "
        f"Size: {width}x{height}, Model hash: {sha10(model)}, Model: tiny"
    )
    assert parse_parameters(parameters(out)) == {
        "prompt": "a red cube, studio light", "negative_prompt": negative, "steps": 3, "sampler": sampler, "cfg": 5.5,
        "seed": 1234, "width": width, "height": height, "model_hash": sha10(model), "model": "tiny",
    }


def test_img2img_writes_the_input_size_down_to_the_vae_multiple(capsys, model, tmp_path):
    source = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (31, 45, 3), dtype=np.uint8)).save(source)
    out = tmp_path / "out.png"
    cli(capsys, "img2img", source, "a watercolor", "--strength", 0.5, "--steps", 4, "--seed", 9, "--model", model,
        "-o", out, "--device", "cpu")
    factor = 2 ** (len(TINY.vae.ch_mult) - 1)  # 8 for SD 1.x
    expected = (45 - 45 % factor, 31 - 31 % factor)
    with Image.open(out) as im:
        assert im.size == expected, f"45x31 input gave {im.size}, expected {expected}"
    settings = parse_parameters(parameters(out))
    assert "Denoising strength: 0.5" in parameters(out)
    assert (settings["strength"], settings["steps"], settings["seed"]) == (0.5, 4, 9)
    assert (settings["width"], settings["height"]) == expected


def test_batch_option_writes_one_file_per_image_with_its_position(capsys, model, tmp_path):
    out = tmp_path / "pair.png"
    stdout, _ = cli(capsys, "txt2img", "two boats", "--batch", 2, "--seed", 3, "--model", model, "-o", out, *FAST)
    written = [tmp_path / "pair-0.png", tmp_path / "pair-1.png"]
    assert stdout.split() == [str(p) for p in written]
    assert sorted(tmp_path.iterdir()) == written, f"wrote {sorted(p.name for p in tmp_path.iterdir())}"
    for pos, path in enumerate(written):
        settings = parse_parameters(parameters(path))
        assert (settings["seed"], settings["batch_size"], settings["batch_pos"]) == (3, 2, pos)
    assert np.abs(pixels(written[0]).astype(int) - pixels(written[1])).max() > 0, "both images of the batch are the same"


def test_same_seed_gives_the_same_image(capsys, model, tmp_path):
    for name, seed in (("a.png", 11), ("b.png", 11), ("c.png", 12)):
        cli(capsys, "txt2img", "a lighthouse", "--seed", seed, "--model", model, "-o", tmp_path / name, *FAST)
    assert np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "b.png")), "same seed gave different images"
    assert not np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "c.png")), "seeds 11 and 12 gave the same image"


def test_random_seed_is_printed_stored_and_reproduces(capsys, model, tmp_path):
    _, stderr = cli(capsys, "txt2img", "a fox", "--model", model, "-o", tmp_path / "random.png", *FAST)
    seed = parse_parameters(parameters(tmp_path / "random.png"))["seed"]
    assert f"seed {seed}" in stderr, f"seed {seed} from the PNG not in the summary {stderr!r}"
    cli(capsys, "txt2img", "a fox", "--seed", seed, "--model", model, "-o", tmp_path / "again.png", *FAST)
    assert np.array_equal(pixels(tmp_path / "random.png"), pixels(tmp_path / "again.png"))


def test_config_option_sizes_a_checkpoint_without_its_json(capsys, model, tmp_path):
    bare = tmp_path / "bare.safetensors"
    bare.write_bytes(model.read_bytes())
    args = ["txt2img", "a tree", "--seed", 2, *FAST]
    cli(capsys, *args, "--model", model, "-o", tmp_path / "sidecar.png")
    cli(capsys, *args, "--model", bare, "--config", model.with_suffix(".json"), "-o", tmp_path / "option.png")
    cli(capsys, *args, "--model", bare, "-o", tmp_path / "inferred.png")
    assert np.array_equal(pixels(tmp_path / "sidecar.png"), pixels(tmp_path / "option.png")), "--config not used"
    # Shapes cannot tell the tiny model's head count or GroupNorm groups, so without the config the image differs.
    assert not np.array_equal(pixels(tmp_path / "sidecar.png"), pixels(tmp_path / "inferred.png"))


def test_convert_writes_a_file_that_loads_to_the_same_images(capsys, model, tmp_path):
    fp32, fp16 = tmp_path / "tiny-fp32.safetensors", tmp_path / "tiny-fp16.safetensors"
    stdout, _ = cli(capsys, "convert", model, fp32, "--dtype", "fp32")
    assert stdout == f"{fp32}\n"
    cli(capsys, "convert", model, fp16)
    assert sorted(p.name for p in tmp_path.iterdir()) == [fp16.name, fp32.name], "convert left other files behind"

    described = loader.describe(fp16)
    assert described["format"] == "tritonsd" and set(described["dtypes"]) == {"float16"}, f"default convert: {described}"
    times, images = {}, {}
    for name, path in (("source", model), ("converted", fp32)):
        for _ in range(2):  # the second load, once the file is in the page cache
            start = time.perf_counter()
            pipe = Pipeline.from_checkpoint(path)
            times[name] = time.perf_counter() - start
        images[name] = pipe.txt2img("a red cube", steps=3, seed=4, width=32, height=32, output_type="np")
    with capsys.disabled():
        print(f"\nload time: source {times['source']:.3f} s, converted {times['converted']:.3f} s")
    err = np.abs(images["source"] - images["converted"]).max()
    assert err == 0, f"converted checkpoint's image differs from the source's by up to {err:.2e}"


def test_info_describes_checkpoints(capsys, model, tmp_path):
    stdout, _ = cli(capsys, "info", model)
    total = sum(t.numel() for t in random_state(TINY, seed=0).values())
    lines = [line.split(None, 1) for line in stdout.splitlines()[1:]]
    rows = dict(lines)
    assert rows["format"] == "single_file" and rows["architecture"].startswith("SD1.x"), stdout
    assert rows["parameters"].startswith(f"{total / 1e6:.2f}M:"), f"{total} parameters, info says {rows['parameters']}"
    assert "model_channels=32" in rows["config.unet"] and "num_heads=2" in rows["config.unet"], rows["config.unet"]
    assert rows["missing"] == rows["unexpected"] == rows["wrong_shape"] == "none", stdout

    converted = tmp_path / "converted.safetensors"
    cli(capsys, "convert", model, converted, "--dtype", "bf16")
    stdout, _ = cli(capsys, "info", converted, "--json")
    described = json.loads(stdout)
    assert described["format"] == "tritonsd" and described["dtypes"] == {"bfloat16": len(random_state(TINY))}
    assert described["config"] == json.loads(TINY.to_json()), "info --json config differs from the model's"
    assert sum(described["parameters"].values()) == total


def test_info_rejects_what_is_not_a_stable_diffusion_checkpoint(capsys, foreign, model, tmp_path):
    stdout, stderr = cli_fails(capsys, "info", foreign)
    assert "architecture  unknown" in stdout and "fc 50" in stdout, f"info should still say what the file holds:\n{stdout}"
    assert stderr.startswith("tritonsd: error: ") and "not a Stable Diffusion 1.x or 2.x checkpoint" in stderr, stderr
    text = tmp_path / "notes.txt"
    text.write_text("not weights")
    _, stderr = cli_fails(capsys, "info", text)
    assert "not a checkpoint" in stderr and stderr.count("\n") == 1, stderr


def write_prompts(path: Path) -> dict[int, str]:
    path.write_text("a red cube\n\nblue sphere\n   \ngreen cone\nyellow torus\n", encoding="utf-8")
    return {1: "a red cube", 3: "blue sphere", 5: "green cone", 6: "yellow torus"}


def test_batch_writes_every_line_once_and_resumes(capsys, model, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.txt")
    out = tmp_path / "out"
    args = ["batch", tmp_path / "prompts.txt", "--out", out, "--seed", 7, "--model", model, *FAST]
    stdout, _ = cli(capsys, *args)
    expected = [out / f"{n:05d}.png" for n in prompts]
    assert Counter(stdout.split()) == Counter(str(p) for p in expected), f"wrote {stdout.split()}"
    assert sorted(out.iterdir()) == expected
    for n, prompt in prompts.items():
        settings = parse_parameters(parameters(out / f"{n:05d}.png"))
        assert (settings["prompt"], settings["seed"]) == (prompt, 7 + n), f"line {n}: {settings}"

    cli(capsys, "txt2img", "blue sphere", "--seed", 10, "--model", model, "-o", tmp_path / "alone.png", *FAST)
    assert np.array_equal(pixels(tmp_path / "alone.png"), pixels(out / "00003.png")), "line 3 not reproduced alone"

    mtimes = {p: p.stat().st_mtime_ns for p in expected}
    stdout, _ = cli(capsys, *args)
    assert stdout == "", f"resumed run rewrote {stdout.split()}"
    assert {p: p.stat().st_mtime_ns for p in expected} == mtimes

    before = pixels(out / "00005.png")
    (out / "00005.png").unlink()
    stdout, _ = cli(capsys, *args)
    assert stdout.split() == [str(out / "00005.png")]
    assert np.array_equal(pixels(out / "00005.png"), before), "regenerated line 5 differs from the first run"


def test_batch_under_torchrun_splits_lines_across_ranks(model, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.txt")
    out = tmp_path / "out"
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "tritonsd.cli",
         "batch", str(tmp_path / "prompts.txt"), "--out", str(out), "--model", str(model), *FAST],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    seconds = time.perf_counter() - start
    assert result.returncode == 0, f"torchrun failed ({result.returncode}):\n{result.stderr[-3000:]}"
    expected = [out / f"{n:05d}.png" for n in prompts]
    written = Counter(result.stdout.split())
    assert written == Counter(str(p) for p in expected), f"ranks wrote {dict(written)} in {seconds:.0f} s"
    assert sorted(out.iterdir()) == expected
    ranks = [line for line in result.stderr.splitlines() if line.startswith(("rank 0/2", "rank 1/2"))]
    assert len(ranks) == 2 and all(" 2 new image(s)" in line for line in ranks), f"uneven split: {ranks}"


def test_interrupted_batch_keeps_finished_images_and_resumes(capsys, model, tmp_path, monkeypatch):
    prompts = write_prompts(tmp_path / "prompts.txt")
    out = tmp_path / "out"
    args = ["batch", tmp_path / "prompts.txt", "--out", out, "--model", model, *FAST]
    step, calls = kernels.guided_step, []

    def interrupt_in_second_image(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step(*a, **kw)

    monkeypatch.setattr(kernels, "guided_step", interrupt_in_second_image)
    _, stderr = cli_fails(capsys, *args, status=130)
    assert stderr == "tritonsd: interrupted\n"
    assert [p.name for p in out.iterdir()] == ["00001.png"], f"left {sorted(p.name for p in out.iterdir())}"
    monkeypatch.setattr(kernels, "guided_step", step)
    stdout, _ = cli(capsys, *args)
    assert stdout.split() == [str(out / f"{n:05d}.png") for n in prompts if n != 1]


def test_interrupt_while_sampling_writes_nothing(capsys, model, tmp_path, monkeypatch):
    def interrupt(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(kernels, "guided_step", interrupt)
    _, stderr = cli_fails(capsys, "txt2img", "a cube", "--model", model, "-o", tmp_path / "a.png", *FAST, status=130)
    assert stderr == "tritonsd: interrupted\n" and list(tmp_path.iterdir()) == []


def test_interrupt_while_writing_leaves_no_partial_file(capsys, model, tmp_path, monkeypatch):
    def half_written(self, fp, *a, **kw):
        fp.write(b"\x89PNG\r\n\x1a\n partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", half_written)
    cli_fails(capsys, "txt2img", "a cube", "--model", model, "-o", tmp_path / "a.png", *FAST, status=130)
    assert list(tmp_path.iterdir()) == [], f"left {[p.name for p in tmp_path.iterdir()]}"


TXT2IMG = ["txt2img", "a cube", "--model", "{model}", "-o", "{out}/a.png"]
IMG2IMG = ["img2img", "{image}", "a cube", "--model", "{model}", "-o", "{out}/a.png"]
BAD_INPUT = [
    ("unknown sampler", [*TXT2IMG, "--sampler", "heun"], "argument --sampler: invalid choice: 'heun'"),
    ("unknown dtype", [*TXT2IMG, "--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
    ("unknown device", [*TXT2IMG, "--device", "tpu"], "unknown device 'tpu'"),
    ("width not a multiple of 8", [*TXT2IMG, "--width", "60"], "--width must be a positive multiple of 8, got 60"),
    ("zero height", [*TXT2IMG, "--height", "0"], "--height must be a positive multiple of 8, got 0"),
    ("zero steps", [*TXT2IMG, "--steps", "0"], "steps must be in [1, 999], got 0"),
    ("non-numeric steps", [*TXT2IMG, "--steps", "many"], "argument --steps: invalid int value: 'many'"),
    ("infinite cfg", [*TXT2IMG, "--cfg", "inf"], "--cfg must be a finite number, got inf"),
    ("zero batch", [*TXT2IMG, "--batch", "0"], "--batch must be at least 1, got 0"),
    ("negative seed", [*TXT2IMG, "--seed", "-1"], "--seed must be in [0, 2**63), got -1"),
    ("strength above 1", [*IMG2IMG, "--strength", "1.5"], "strength must be in (0, 1], got 1.5"),
    ("strength zero", [*IMG2IMG, "--strength", "0"], "strength must be in (0, 1], got 0.0"),
    ("strength too small for the steps", [*IMG2IMG, "--strength", "0.1", "--steps", "5"], "leaves no denoising step"),
    ("missing model", [*TXT2IMG, "--model", "{tmp}/nope.safetensors"], "nope.safetensors: no such file or folder"),
    ("model that is a text file", [*TXT2IMG, "--model", "{text}"], "not a checkpoint: it is a text file"),
    ("model that is not SD", [*TXT2IMG, "--model", "{foreign}"], "not a Stable Diffusion checkpoint"),
    ("unreadable config", [*TXT2IMG, "--config", "{text}"], "cannot read model config"),
    ("unreadable image", ["img2img", "{text}", "a cube", "--model", "{model}", "-o", "{out}/a.png"], "cannot read image"),
    ("output folder missing", [*TXT2IMG, "-o", "{out}/sub/a.png"], "output folder {out}/sub does not exist"),
    ("output not a png", [*TXT2IMG, "-o", "{out}/a.jpg"], "must be a .png file"),
    ("missing prompts file", ["batch", "{tmp}/none.txt", "--out", "{out}", "--model", "{model}"], "cannot read prompts file"),
    ("empty prompts file", ["batch", "{empty}", "--out", "{out}", "--model", "{model}"], "has no prompts"),
    ("batch over a file", ["batch", "{prompts}", "--out", "{text}", "--model", "{model}"], "is not a folder"),
    ("convert missing source", ["convert", "{tmp}/none.safetensors", "{out}/x.safetensors"], "none.safetensors: no such file or folder"),
    ("convert non-SD source", ["convert", "{foreign}", "{out}/x.safetensors"], "not a Stable Diffusion checkpoint"),
    ("convert into missing folder", ["convert", "{model}", "{out}/sub/x.safetensors"], "output folder"),
    ("convert to unknown dtype", ["convert", "{model}", "{out}/x.safetensors", "--dtype", "fp8"], "invalid choice: 'fp8'"),
    ("info on missing file", ["info", "{tmp}/none.safetensors"], "no such file or folder"),
    ("no command", [], "the following arguments are required: COMMAND"),
]


@pytest.fixture
def bad_files(tmp_path, model, foreign) -> dict[str, str]:
    (tmp_path / "out").mkdir()
    (tmp_path / "notes.txt").write_text("not an image, not weights\n")
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "prompts.txt").write_text("a cube\n")
    Image.new("RGB", (32, 32)).save(tmp_path / "in.png")
    return dict(tmp=str(tmp_path), out=str(tmp_path / "out"), model=str(model), foreign=str(foreign),
                text=str(tmp_path / "notes.txt"), empty=str(tmp_path / "empty.txt"),
                prompts=str(tmp_path / "prompts.txt"), image=str(tmp_path / "in.png"))


@pytest.mark.parametrize("argv, message", [case[1:] for case in BAD_INPUT], ids=[case[0] for case in BAD_INPUT])
def test_bad_input_is_one_line_and_exit_2(capsys, bad_files, argv, message):
    _, stderr = cli_fails(capsys, *(a.format(**bad_files) for a in argv))
    message = message.format(**bad_files)
    assert stderr.startswith("tritonsd: error: ") and stderr.count("\n") == 1, f"not one error line: {stderr!r}"
    assert message in stderr, f"expected {message!r} in {stderr!r}"
    assert list(Path(bad_files["out"]).iterdir()) == [], "a failed run wrote output"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_refused(capsys, bad_files):
    _, stderr = cli_fails(capsys, *(a.format(**bad_files) for a in TXT2IMG), "--device", "cuda")
    assert "CUDA is not available" in stderr


def test_missing_demo_model_asks_for_model(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(loader, "DEMO_MODEL", tmp_path / "absent" / "demo.safetensors")
    _, stderr = cli_fails(capsys, "txt2img", "a cube", "-o", tmp_path / "a.png", *FAST)
    assert "demo model is not installed" in stderr and "--model PATH" in stderr, stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, message", [
    (["txt2img", "a cube", "--sampler", "heun", "-o", "{out}/a.png"], "invalid choice: 'heun'"),
    (["txt2img", "a cube", "--model", "{foreign}", "-o", "{out}/a.png", *FAST], "not a Stable Diffusion checkpoint"),
], ids=["argument", "checkpoint"])
def test_command_line_exit_status_and_no_traceback(bad_files, argv, message):
    result = subprocess.run(
        [sys.executable, "-m", "tritonsd.cli", *(a.format(**bad_files) for a in argv)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 2, f"exit status {result.returncode}: {result.stderr}"
    assert result.stderr.startswith("tritonsd: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr and result.stdout == ""
    assert list(Path(bad_files["out"]).iterdir()) == []
