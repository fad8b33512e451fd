"""The `tritonsd` command: what each subcommand writes, that its PNGs say how to reproduce them, that batch runs
resume and split across torchrun ranks, and that bad input ends in one line and exit status 2 with nothing written."""

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image, PngImagePlugin

from tritonsd import kernels
from tritonsd import loader
from tritonsd.engine.pipeline import Pipeline
from tritonsd.engine.tokenizer import CLIPTokenizer
from tiny import TINY, TINY_SDXL, original_sdxl_checkpoint, random_state, write_single_file
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
        "model_hash": "6ce0161689", "model": "v1-5-pruned-emaonly", "strength": 0.7, "clip_skip": 2,
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
    # As the web UI (1.9+) writes them: the Karras schedule is a Schedule type, not part of the sampler's name.
    a1111_name = {"euler_a": "Euler a", "dpmpp_2m_karras": "DPM++ 2M, Schedule type: Karras"}[sampler]
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
    assert seed < 2**32, f"random seed {seed} is not below 2**32, the range A1111 replays"
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
    assert rows["format"] == "single_file" and rows["architecture"].startswith("SD 1.x"), stdout
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
    assert stderr.startswith("tritonsd: error: ") and "not a Stable Diffusion checkpoint" in stderr, stderr
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
        Path(fp).write_bytes(b"\x89PNG\r\n\x1a\n partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", half_written)
    cli_fails(capsys, "txt2img", "a cube", "--model", model, "-o", tmp_path / "a.png", *FAST, status=130)
    assert list(tmp_path.iterdir()) == [], f"left {[p.name for p in tmp_path.iterdir()]}"


LONG_PROMPT = "(masterpiece:1.2), a lighthouse on a cliff, " + ", ".join(["[stormy] sea at dusk"] * 20) + " BREAK fog"


def test_from_png_reproduces_the_image_and_options_override_it(capsys, model, tmp_path):
    first = tmp_path / "first.png"
    cli(capsys, "txt2img", LONG_PROMPT, "--negative-prompt", "(blurry:1.3)", "--clip-skip", 2, "--sampler", "euler_a",
        "--cfg", 6, "--seed", 21, "--model", model, "-o", first, *FAST)
    assert "Clip skip: 2, Pad conds: True" in parameters(first), "3 chunks against 1 should record the padding"
    again = tmp_path / "again.png"
    cli(capsys, "txt2img", "--from-png", first, "--model", model, "-o", again, "--device", "cpu")
    assert parameters(again) == parameters(first), "replaying a PNG should record the same settings"
    assert np.array_equal(pixels(again), pixels(first)), "replaying a PNG drew another image"
    other = tmp_path / "other.png"
    cli(capsys, "txt2img", "--from-png", first, "--seed", 22, "--clip-skip", 1, "--model", model, "-o", other,
        "--device", "cpu")
    settings = parse_parameters(parameters(other))
    assert (settings["seed"], settings.get("clip_skip", 1), settings["prompt"]) == (22, 1, LONG_PROMPT), settings
    assert not np.array_equal(pixels(other), pixels(first))


def test_from_png_says_what_it_does_not_reproduce(capsys, model, tmp_path):
    source = tmp_path / "a1111.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cube\nSteps: 2, Sampler: Euler, Schedule type: Karras, CFG scale: 7, Seed: 5, "
                                "Size: 32x32, Model hash: 0123456789, Model: other, Hires upscale: 2")
    Image.new("RGB", (32, 32)).save(source, pnginfo=info)
    _, stderr = cli(capsys, "txt2img", "--from-png", source, "--model", model, "-o", tmp_path / "b.png", "--device", "cpu")
    assert "settings tritonsd does not apply: Sampler, Schedule type, Hires upscale" in stderr, stderr
    assert "was made with model other (hash 0123456789)" in stderr, stderr


def test_clip_skip_changes_the_image(capsys, model, tmp_path):
    for skip in (1, 2):
        cli(capsys, "txt2img", "a lighthouse", "--clip-skip", skip, "--seed", 1, "--model", model,
            "-o", tmp_path / f"{skip}.png", *FAST)
    assert "Clip skip" not in parameters(tmp_path / "1.png"), "clip skip 1 is the default; A1111 leaves it out"
    assert parse_parameters(parameters(tmp_path / "2.png"))["clip_skip"] == 2
    assert not np.array_equal(pixels(tmp_path / "1.png"), pixels(tmp_path / "2.png"))


def test_embeddings_folder_names_its_files_in_prompts(capsys, model, tmp_path):
    """tsdblue.pt holds the token vector of "blue"; a file for another model and a text file are skipped."""
    folder = tmp_path / "embeddings"
    folder.mkdir()
    pipe = Pipeline.from_checkpoint(model)
    blue, = pipe.tokenizer.encode("blue")
    vector = pipe.text_encoder.embeddings.token_embedding.weight[blue][None].clone()
    torch.save({"string_to_param": {"*": vector}, "name": "tsdblue"}, folder / "tsdblue.pt")
    safetensors.torch.save_file({"emb_params": torch.zeros(2, 768)}, folder / "sd15only.safetensors")
    (folder / "notes.txt").write_text("not an embedding")
    _, stderr = cli(capsys, "txt2img", "a tsdblue cube", "--embeddings", folder, "--seed", 4, "--model", model,
                    "-o", tmp_path / "embedded.png", "--verbose", *FAST)
    warnings = [line for line in stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "sd15only.safetensors: embedding vectors of size 768" in warnings[0], stderr
    assert "embeddings: tsdblue\n" in stderr and "prompt: 3 tokens in 1 chunk(s) of 75" in stderr, stderr
    cli(capsys, "txt2img", "a blue cube", "--seed", 4, "--model", model, "-o", tmp_path / "plain.png", *FAST)
    assert np.array_equal(pixels(tmp_path / "embedded.png"), pixels(tmp_path / "plain.png")), (
        "'tsdblue' should draw what 'blue' draws"
    )


def test_verbose_counts_the_tokens_of_long_prompts(capsys, model, tmp_path):
    _, stderr = cli(capsys, "txt2img", LONG_PROMPT, "--negative-prompt", "blurry", "--seed", 1, "--model", model,
                    "-o", tmp_path / "a.png", "--verbose", *FAST)
    # masterpiece (1), ", a lighthouse on a cliff ," (7), 20 times "stormy sea at dusk" (4) with 19 commas, then
    # BREAK and fog (1): the first 107 tokens fill two chunks, fog has a third.
    assert "prompt: 108 tokens in 3 chunk(s) of 75" in stderr, stderr
    assert "negative prompt: 1 tokens in 1 chunk(s) of 75" in stderr, stderr


# Bad input through the real command: every case runs `python -m tritonsd ARGS` (what the `tritonsd` script and
# torchrun run) in one subprocess, one after another, so a case costs a model load rather than torch's import.
DRIVER = r"""
import contextlib, io, json, os, resource, signal, sys, traceback

cases = json.loads(sys.stdin.read())
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past RLIMIT_FSIZE fails with EFBIG, as on a full disk
import tritonsd.cli  # noqa: F401  loaded once for all cases
# What `python -m tritonsd` runs, read once: a case run as another user may not be allowed to read this checkout.
MAIN = compile(open(os.path.join(os.path.dirname(tritonsd.__file__), "__main__.py")).read(), "tritonsd/__main__.py",
               "exec")

# An address-space limit, so that a request the memory bound fails to refuse fails fast instead of swapping.
size = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize"))
resource.setrlimit(resource.RLIMIT_AS, (size + 4 * 2**30, resource.RLIM_INFINITY))
results = []
for case in cases:
    saved_env = {name: os.environ.get(name) for name in case["env"]}
    os.environ.update(case["env"])
    fsize = resource.getrlimit(resource.RLIMIT_FSIZE)
    if case["fsize"]:
        resource.setrlimit(resource.RLIMIT_FSIZE, (case["fsize"], fsize[1]))
    if case["euid"] is not None:
        os.seteuid(case["euid"])
    out, err, status, trace = io.StringIO(), io.StringIO(), None, None
    sys.argv = ["tritonsd", *case["argv"]]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            exec(MAIN, {"__name__": "__main__"})
        status = 0
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:  # what the interpreter would print as a traceback
        trace = traceback.format_exc()
    finally:
        if case["euid"] is not None:
            os.seteuid(0)
        resource.setrlimit(resource.RLIMIT_FSIZE, fsize)
        for name, value in saved_env.items():
            os.environ.pop(name) if value is None else os.environ.__setitem__(name, value)
    results.append({"status": status, "stdout": out.getvalue(), "stderr": err.getvalue(), "traceback": trace})
print(json.dumps(results))
"""

TXT2IMG = ["txt2img", "a cube", "--model", "{model}", "-o", "{out}/a.png", *FAST]
IMG2IMG = ["img2img", "{image}", "a cube", "--model", "{model}", "-o", "{out}/a.png", "--device", "cpu"]
CONVERT = ["convert", "{model}", "{out}/x.safetensors"]
LONG_NAME = "x" * 252 + ".png"
# (name, argv, what stderr says, options: status (2), env, fsize (RLIMIT_FSIZE bytes), folders made in {out} first)
BAD_INPUT = [
    ("unknown sampler", [*TXT2IMG, "--sampler", "heun"], "unknown sampler 'heun'; valid samplers: ddpm"),
    ("unknown dtype", [*TXT2IMG, "--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
    ("unknown device", [*TXT2IMG, "--device", "tpu"], "--device must be 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
    ("width not a multiple of 8", [*TXT2IMG, "--width", "60"], "--width must be a positive multiple of 8, got 60"),
    ("zero height", [*TXT2IMG, "--height", "0"], "--height must be a positive multiple of 8, got 0"),
    ("zero steps", [*TXT2IMG, "--steps", "0"], "steps must be in [1, 999], got 0"),
    ("non-numeric steps", [*TXT2IMG, "--steps", "many"], "argument --steps: invalid int value: 'many'"),
    ("fractional steps", [*TXT2IMG, "--steps", "2.5"], "argument --steps: invalid int value: '2.5'"),
    ("infinite cfg", [*TXT2IMG, "--cfg", "inf"], "--cfg must be a number (finite in float32), got inf"),
    ("cfg beyond float32", [*TXT2IMG, "--cfg", "1e39"], "--cfg must be a number (finite in float32), got 1e+39"),
    ("zero batch", [*TXT2IMG, "--batch", "0"], "--batch must be a positive integer, got 0"),
    ("negative seed", [*TXT2IMG, "--seed", "-1"], "--seed must be an integer in [0, 2**64), got -1"),
    ("seed of 2**64", [*TXT2IMG, "--seed", str(2**64)], f"--seed must be an integer in [0, 2**64), got {2**64}"),
    ("strength above 1", [*IMG2IMG, "--strength", "1.5"], "strength must be in (0, 1], got 1.5"),
    ("strength zero", [*IMG2IMG, "--strength", "0"], "strength must be in (0, 1], got 0.0"),
    ("strength too small for the steps", [*IMG2IMG, "--strength", "0.1", "--steps", "5"], "leaves no denoising step"),
    ("image too large for memory", [*TXT2IMG, "--width", "100000", "--height", "100000"], "needs about"),
    ("batch of a million", [*TXT2IMG, "--batch", "1000000"], "is available; ask for fewer or smaller images"),
    ("missing model", [*TXT2IMG, "--model", "{tmp}/nope.safetensors"], "nope.safetensors: no such file or folder"),
    ("model that is a text file", [*TXT2IMG, "--model", "{text}"], "not a checkpoint: it is a text file"),
    ("model that is not SD", [*TXT2IMG, "--model", "{foreign}"], "not a Stable Diffusion checkpoint"),
    ("model with NaN UNet weights", [*TXT2IMG, "--model", "{nan_unet}"], "NaN or Inf values after the UNet sampling"),
    ("model with NaN text weights", [*TXT2IMG, "--model", "{nan_text}"], "NaN or Inf values after the text encoder"),
    ("unreadable config", [*TXT2IMG, "--config", "{text}"], "cannot read model config"),
    ("unreadable image", ["img2img", "{text}", "a cube", "--model", "{model}", "-o", "{out}/a.png"], "image {text} cannot be read"),
    ("decompression bomb", ["img2img", "{bomb}", "a cube", "--model", "{model}", "-o", "{out}/a.png"],
     "image {bomb} is 10000x10000 pixels; img2img reads at most 67,108,864 (8192x8192)"),
    ("output folder missing", [*TXT2IMG, "-o", "{out}/sub/a.png"], "output folder {out}/sub does not exist"),
    ("output path with a line break", [*TXT2IMG, "-o", "{out}/new\nline/a.png"], "output folder {out}/new\\nline does not"),
    ("output not a png", [*TXT2IMG, "-o", "{out}/a.jpg"], "must be a .png file"),
    ("output is a folder", TXT2IMG, "output {out}/a.png is a folder", dict(folders=["a.png"])),
    ("batch output is a folder", [*TXT2IMG, "--batch", "2", "-o", "{out}/b.png"], "output {out}/b-1.png is a folder",
     dict(folders=["b-1.png"])),
    ("output name too long", [*TXT2IMG, "-o", "{out}/" + LONG_NAME], "is 256 bytes; the file system allows"),
    ("output onto a full disk", TXT2IMG, "File too large", dict(status=1, fsize=200)),
    ("missing prompts file", ["batch", "{tmp}/none.txt", "--out", "{out}", "--model", "{model}"], "cannot read prompts file"),
    ("empty prompts file", ["batch", "{empty}", "--out", "{out}", "--model", "{model}"], "has no prompts"),
    ("batch over a file", ["batch", "{prompts}", "--out", "{text}", "--model", "{model}"], "is not a folder"),
    ("batch too large for memory", ["batch", "{prompts}", "--out", "{out}/images", "--model", "{model}", "--width",
                                    "100000", "--height", "100000"], "needs about"),
    ("batch seed past 2**64", ["batch", "{prompts}", "--out", "{out}", "--seed", str(2**64 - 1)],
     "--seed 18446744073709551615 plus the last line's number, 1, passes 2**64 - 1"),
    ("launcher without LOCAL_RANK", ["batch", "{prompts}", "--out", "{out}", "--model", "{model}", *FAST],
     "WORLD_SIZE is 2 but LOCAL_RANK is not set", dict(env={"WORLD_SIZE": "2", "RANK": "0"})),
    ("launcher WORLD_SIZE not a number", ["batch", "{prompts}", "--out", "{out}", "--model", "{model}"],
     "environment variable WORLD_SIZE must be an integer, got 'two'", dict(env={"WORLD_SIZE": "two"})),
    ("convert missing source", ["convert", "{tmp}/none.safetensors", "{out}/x.safetensors"], "none.safetensors: no such file or folder"),
    ("convert non-SD source", ["convert", "{foreign}", "{out}/x.safetensors"], "not a Stable Diffusion checkpoint"),
    ("convert into missing folder", ["convert", "{model}", "{out}/sub/x.safetensors"], "output folder {out}/sub does not exist"),
    ("convert to unknown dtype", [*CONVERT, "--dtype", "fp8"], "invalid choice: 'fp8'"),
    ("convert onto a folder", CONVERT, "output {out}/x.safetensors is a folder", dict(folders=["x.safetensors"])),
    ("convert into a read-only folder", ["convert", "{model}", "{readonly}/x.safetensors"],
     "output folder {readonly} is not writable"),
    ("convert onto a full disk", CONVERT, "cannot write {out}/x.safetensors:", dict(status=1, fsize=65536)),
    ("info on missing file", ["info", "{tmp}/none.safetensors"], "no such file or folder"),
    ("no command", [], "the following arguments are required: COMMAND"),
    ("clip skip zero", [*TXT2IMG, "--clip-skip", "0"], "clip_skip must be an integer >= 1 (1 = the last layer), got 0"),
    ("clip skip past the layers", [*TXT2IMG, "--clip-skip", "3"], "clip_skip 3 is past the text encoder's first layer: it has 2 layers"),
    ("embeddings folder missing", [*TXT2IMG, "--embeddings", "{tmp}/none"], "--embeddings {tmp}/none is not a folder"),
    ("no prompt", ["txt2img", "--model", "{model}", "-o", "{out}/a.png"], "txt2img needs a PROMPT, or --from-png"),
    ("from-png missing", ["txt2img", "--from-png", "{tmp}/none.png", "-o", "{out}/a.png"], "cannot read --from-png"),
    ("from-png without parameters", ["txt2img", "--from-png", "{image}", "-o", "{out}/a.png"], "has no 'parameters' text chunk"),
    ("from-png on a text file", ["txt2img", "--from-png", "{text}", "-o", "{out}/a.png"], "cannot read --from-png"),
    ("weight not a number", ["txt2img", "(a cube:1.2.3)", "--model", "{tmp}/none.safetensors", "-o", "{out}/a.png"],
     "prompt weight '1.2.3'"),
    ("weight not a number in a batch", ["batch", "{bad_weights}", "--out", "{out}", "--model", "{tmp}/none.safetensors"],
     "bad_weights.txt line 2: prompt weight '..'"),
]
if not torch.cuda.is_available():
    BAD_INPUT.append(("cuda without cuda", [*TXT2IMG, "--device", "cuda"], "--device is 'cuda' but CUDA is not available"))


def png_declaring(path: Path, width: int, height: int) -> Path:
    """A PNG header declaring width x height RGB pixels, and no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))
    return path


def model_with_nan(path: Path, part: str) -> Path:
    state = random_state(TINY, seed=0)
    name = next(k for k in state if k.startswith(part) and k.endswith(".bias"))
    state[name] = torch.full_like(state[name], float("nan"))
    write_single_file(path, state)
    path.with_suffix(".json").write_text(TINY.to_json())
    return path


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory, model, foreign):
    """{case name: (result, its output folder, what the folder held before)} for every BAD_INPUT case."""
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "notes.txt").write_text("not an image, not weights\n")
    (tmp / "empty.txt").write_text("\n  \n")
    (tmp / "prompts.txt").write_text("a cube\n")
    (tmp / "bad_weights.txt").write_text("a cube\n(a sphere:..)\n")
    Image.new("RGB", (32, 32)).save(tmp / "in.png")
    # A folder this process cannot write to. Root writes anywhere, so as root that case runs with the effective user
    # id of nobody, and the folder sits in a place nobody can reach.
    shared = Path(tempfile.mkdtemp(prefix="tritonsd-readonly-"))
    shared.chmod(0o755)
    files = dict(
        tmp=str(tmp), model=str(model), foreign=str(foreign), text=str(tmp / "notes.txt"), empty=str(tmp / "empty.txt"),
        prompts=str(tmp / "prompts.txt"), bad_weights=str(tmp / "bad_weights.txt"), image=str(tmp / "in.png"), bomb=str(png_declaring(tmp / "bomb.png", 10000, 10000)),
        nan_unet=str(model_with_nan(tmp / "nan-unet.safetensors", "unet.")),
        nan_text=str(model_with_nan(tmp / "nan-text.safetensors", "text_encoder.")),
    )
    cases, runs = [], {}
    for i, (name, argv, _, *options) in enumerate(BAD_INPUT):
        options = options[0] if options else {}
        places = dict(files, out=tmp / f"case{i}", readonly=shared / f"case{i}")
        places["out"].mkdir()
        for folder in options.get("folders", []):
            (places["out"] / folder).mkdir()
        places["readonly"].mkdir()
        places["readonly"].chmod(0o555)
        runs[name] = dict(places=places, before=sorted(os.listdir(places["out"])))
        cases.append(dict(
            argv=[a.format(**places) for a in argv], env=options.get("env", {}), fsize=options.get("fsize"),
            euid=65534 if os.geteuid() == 0 and "{readonly}" in " ".join(argv) else None,
        ))
    try:
        done = subprocess.run([sys.executable, "-c", DRIVER], input=json.dumps(cases), cwd=ROOT, capture_output=True,
                              text=True, timeout=600, env={**os.environ, "PYTHONWARNINGS": "default"})
        assert done.returncode == 0, f"the driver failed:\n{done.stderr[-3000:]}"
        for run, result in zip(runs.values(), json.loads(done.stdout.splitlines()[-1])):
            run.update(result=result, after=sorted(os.listdir(run["places"]["out"])),
                       readonly_after=os.listdir(run["places"]["readonly"]))
    finally:
        for path in shared.rglob("*"):
            path.chmod(0o755)
        shutil.rmtree(shared)
    return runs


@pytest.mark.parametrize("name, message, status", [(c[0], c[2], (c[3:] or [{}])[0].get("status", 2)) for c in BAD_INPUT],
                         ids=[c[0] for c in BAD_INPUT])
def test_bad_input_is_one_line_with_its_exit_status_and_writes_nothing(bad_runs, name, message, status):
    run = bad_runs[name]
    result = run["result"]
    assert result["traceback"] is None, f"uncaught:\n{result['traceback']}"
    assert result["status"] == status, f"exit status {result['status']}, expected {status}; stderr: {result['stderr']!r}"
    stderr = result["stderr"]
    assert stderr.startswith("tritonsd: error: ") and stderr.count("\n") == 1, f"not one error line: {stderr!r}"
    message = message.format(**run["places"])
    assert message in stderr, f"expected {message!r} in {stderr!r}"
    assert result["stdout"] == "", f"wrote to stdout: {result['stdout']!r}"
    assert run["after"] == run["before"] and run["readonly_after"] == [], (
        f"a failed run left {sorted(set(run['after']) - set(run['before'])) + run['readonly_after']}"
    )


def test_missing_demo_model_asks_for_model(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(loader, "DEMO_MODEL", tmp_path / "absent" / "demo.safetensors")
    _, stderr = cli_fails(capsys, "txt2img", "a cube", "-o", tmp_path / "a.png", *FAST)
    assert "demo model is not installed" in stderr and "--model PATH" in stderr, stderr
    assert list(tmp_path.iterdir()) == []


COMMAND = [sys.executable, "-m", "tritonsd"]  # what the `tritonsd` script runs, and what torchrun launches


def mapped(pid: int, name: str) -> bool:
    try:
        return name in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="watches the process through Linux's /proc")
@pytest.mark.parametrize("moment", ["importing torch", "generating"])
def test_ctrl_c_at_any_moment_exits_130_with_one_line(model, tmp_path, moment):
    """SIGINT as soon as torch's library is mapped (its import has begun and has a second or more to run), or once
    the model file is mapped (loading, then a 999-step run): one line, status 130, nothing written."""
    proc = subprocess.Popen(
        [*COMMAND, "txt2img", "a cube", "--model", str(model), "-o", str(tmp_path / "a.png"), "--steps", "999",
         "--width", "64", "--height", "64", "--device", "cpu"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    watched = "libtorch" if moment == "importing torch" else model.name
    deadline = time.monotonic() + 120
    while not mapped(proc.pid, watched) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    if moment == "generating":
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, f"exit status {proc.returncode}; stderr:\n{stderr}"
    assert stderr == "tritonsd: interrupted\n" and stdout == "", f"stdout {stdout!r}, stderr:\n{stderr}"
    assert os.listdir(tmp_path) == [], f"left {os.listdir(tmp_path)}"


def test_launcher_device_is_local_rank_unless_one_is_named(monkeypatch):
    """Under torchrun a bare cuda (or auto, on a CUDA machine) is the process's own GPU, cuda:LOCAL_RANK; an
    explicit cuda:N is kept. (Two fake CUDA devices: the mapping is what is tested, not a GPU.)"""
    from tritonsd import cli as command

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [command._device(d, 1) for d in ("cuda", "auto", "cuda:0", "cpu")] == ["cuda:1", "cuda:1", "cuda:0", "cpu"]
    assert command._device("cuda") == "cuda"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert command._launcher() == (1, 2, 1)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK 2 and LOCAL_RANK 1 do not fit WORLD_SIZE 2"):
        command._launcher()


def test_batch_numbers_lines_as_an_editor_does(capsys, model, tmp_path):
    """Only "\n" ends a line ("\r\n" too); U+2028, U+0085 and form feed inside a line do not, and a byte-order mark
    is not part of the first prompt. Image n is line n with seed base + n."""
    (tmp_path / "prompts.txt").write_bytes(
        "\ufeffred\u2028cube\nblue\x0csphere\r\ngreen\x85cone\n\nyellow torus\n".encode("utf-8")
    )
    out = tmp_path / "out"
    cli(capsys, "batch", tmp_path / "prompts.txt", "--out", out, "--seed", 100, "--model", model, *FAST)
    lines = {1: "red\u2028cube", 2: "blue\x0csphere", 3: "green\x85cone", 5: "yellow torus"}
    assert sorted(p.name for p in out.iterdir()) == [f"{n:05d}.png" for n in lines], sorted(os.listdir(out))
    for n, prompt in lines.items():
        settings = parse_parameters(parameters(out / f"{n:05d}.png"))
        assert (settings["prompt"], settings["seed"]) == (prompt, 100 + n), f"line {n}: {settings}"


def a1111_prompts(text: str) -> tuple[str, str]:
    """Prompt and negative prompt as AUTOMATIC1111 reads a `parameters` chunk: the last line holds the settings;
    each other line is stripped; a line that then starts with "Negative prompt:" loses that prefix and it and every
    later line belong to the negative prompt."""
    prompt, negative, in_negative = [], [], False
    for line in text.strip().split("\n")[:-1]:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    return "\n".join(prompt), "\n".join(negative)


@pytest.mark.parametrize("prompt, negative", [
    ("a castle\nNegative prompt: fog", ""),
    ("a castle\n  Negative prompt: fog\nat dusk", "blurry\nNegative prompt: noise"),
    ("Negative prompt: first line", "Negative prompt: twice"),
])
def test_a_prompt_holding_the_negative_marker_round_trips(prompt, negative):
    """Read back by this project or by A1111, the prompt and negative prompt are the ones written, up to whitespace,
    which CLIP's tokenizer ignores: the same token ids, so the same image."""
    text = format_parameters(prompt, negative, steps=2, sampler="euler", cfg=7, seed=1, width=64, height=64,
                             model_hash="0123456789", model="m")
    tokens = CLIPTokenizer.default()
    ours = parse_parameters(text)
    for reader, (got_prompt, got_negative) in (("ours", (ours["prompt"], ours["negative_prompt"])),
                                               ("A1111", a1111_prompts(text))):
        for what, want, got in (("prompt", prompt, got_prompt), ("negative prompt", negative, got_negative)):
            assert torch.equal(tokens([got]), tokens([want])), f"{reader} read the {what} {want!r} back as {got!r}"
    assert ours["steps"] == 2 and ours["seed"] == 1


def test_written_files_take_the_umask_mode(capsys, model, tmp_path):
    old = os.umask(0o027)
    try:
        cli(capsys, "txt2img", "a cube", "--model", model, "-o", tmp_path / "a.png", *FAST)
        cli(capsys, "convert", model, tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    modes = {p.name: f"{p.stat().st_mode & 0o777:o}" for p in tmp_path.iterdir()}
    assert modes == {"a.png": "640", "m.safetensors": "640"}, f"modes under umask 027: {modes}"


def test_command_line_draws_sdxl_as_the_python_api_does(capsys, tmp_path):
    """An SDXL file through txt2img (with size conditioning), img2img and batch: each image is the Python API's for
    the same settings, and the PNG records what replays it."""
    path = tmp_path / "xl.safetensors"
    safetensors.torch.save_file(original_sdxl_checkpoint(random_state(TINY_SDXL, seed=2)), path)
    path.with_suffix(".json").write_text(TINY_SDXL.to_json())
    fast = ["--steps", "2", "--width", "32", "--height", "24", "--device", "cpu"]
    pipe = Pipeline.from_checkpoint(path)

    cli(capsys, "txt2img", "a red cube", "--model", path, "-o", tmp_path / "a.png", "--seed", "3",
        "--original-size", "64x48", "--crop-top-left", "4,8", *fast)
    want = pipe.txt2img("a red cube", steps=2, width=32, height=24, seed=3, original_size=(48, 64),  # (height, width)
                        crops_coords_top_left=(4, 8))[0]
    assert np.array_equal(pixels(tmp_path / "a.png"), np.asarray(want)), "txt2img differs from the API's image"
    recorded = parse_parameters(parameters(tmp_path / "a.png"))
    assert (recorded["model"], recorded["seed"], recorded["width"], recorded["height"]) == ("xl", 3, 32, 24), recorded

    cli(capsys, "img2img", tmp_path / "a.png", "a blue cube", "--model", path, "-o", tmp_path / "b.png", "--seed", "5",
        "--strength", "0.5", "--steps", "2", "--device", "cpu")
    want = pipe.img2img(Image.open(tmp_path / "a.png"), "a blue cube", strength=0.5, steps=2, seed=5)[0]
    assert np.array_equal(pixels(tmp_path / "b.png"), np.asarray(want)), "img2img differs from the API's image"

    (tmp_path / "prompts.txt").write_text("a red cube\nblue sphere\n")
    stdout, _ = cli(capsys, "batch", tmp_path / "prompts.txt", "--out", tmp_path / "batch", "--model", path, *fast)
    written = [tmp_path / "batch" / f"0000{n}.png" for n in (1, 2)]
    assert stdout.split() == [str(p) for p in written], stdout
    want = pipe.txt2img("blue sphere", steps=2, width=32, height=24, seed=int(parse_parameters(parameters(written[1]))["seed"]))[0]
    assert np.array_equal(pixels(written[1]), np.asarray(want)), "batch image differs from the API's image"
