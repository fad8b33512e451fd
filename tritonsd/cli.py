"""The `tritonsd` command: txt2img, img2img, batch, convert and info.

Bad input ends in one `tritonsd: error: ...` line and exit status 2, found before any model is loaded where
that is cheap. Every file is written whole or not at all, so an interrupted run (exit 130) leaves nothing torn."""

from __future__ import annotations

import sys


def _say(text, file=None) -> None:
    """One write per line: torchrun's ranks share an unbuffered stdout and stderr, where print() writes the
    newline apart and another rank's line can land in between."""
    file = file or sys.stdout
    file.write(f"{text}\n")
    file.flush()


def _interrupted():
    _say("tritonsd: interrupted", sys.stderr)
    raise SystemExit(130)


# Importing torch takes a second or more, and Ctrl-C then must end as it does at any later moment. The package's
# __init__ imports nothing heavy, so before this point an interrupt can only land in the interpreter's start-up.
try:
    import argparse
    import dataclasses
    import json
    import os
    import time
    from pathlib import Path

    import torch
    from PIL import Image, PngImagePlugin
    from tqdm.auto import tqdm

    from tritonsd import loader
    from tritonsd.engine.config import PREDICTION_TYPES, ModelConfig
    from tritonsd.engine.lora import check_scale, extract_lora_tags, find_lora
    from tritonsd.engine.pipeline import Pipeline
    from tritonsd.engine.prompts import parse_attention
    from tritonsd.engine.samplers import SAMPLERS
    from tritonsd.engine.settings import DTYPES, SEED_LIMIT, SettingError, Settings, check_device, read_image
    from tritonsd.files import atomic_write, check_output, check_output_folder
    from tritonsd.loader.embeddings import SUFFIXES as EMBEDDING_SUFFIXES
    from tritonsd.pngmeta import format_parameters, model_hash, parse_parameters
except KeyboardInterrupt:
    _interrupted()

DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# SDXL's conditioning options: (Settings argument, option, how its value is written, what it sets); each also has a
# --negative- form for the negative prompt.
_SDXL_OPTIONS = (
    ("original_size", "--original-size", "WIDTHxHEIGHT", "the size the training picture had (default: the image's)"),
    ("target_size", "--target-size", "WIDTHxHEIGHT", "the size it was shown at (base; default: the image's)"),
    ("crops_coords_top_left", "--crop-top-left", "TOP,LEFT", "where it was cropped (default: 0,0)"),
    ("aesthetic_score", "--aesthetic-score", "SCORE", "its aesthetic score, 0 to 10 (refiner; default: 6)"),
)
# The Python arguments that SettingError names, as options of this command.
_OPTIONS = {
    "guidance_scale": "--cfg", "batch_size": "--batch", "negative_prompt": "--negative-prompt",
    "clip_skip": "--clip-skip",
    **{name: f"--{name}" for name in ("steps", "sampler", "seed", "width", "height", "strength", "device")},
    **{f"{neg}{name}": f"--{neg.replace('_', '-')}{flag[2:]}" for name, flag, *_ in _SDXL_OPTIONS
       for neg in ("", "negative_")},
    "denoising_start": "--denoising-start", "denoising_end": "--denoising-end",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        _fail(f"{message} (see {self.prog} --help)")


def _fail(message: str, status: int = 2):
    # One line, whatever the message quotes (a path or prompt may hold line breaks).
    message = message.replace("\r", "\\r").replace("\n", "\\n")
    _say(f"tritonsd: error: {message}", sys.stderr)
    raise SystemExit(status)


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="PATH", help="checkpoint file or diffusers folder (default: the demo model)")
    p.add_argument("--config", metavar="FILE", help="model config (FILE.json, or a CompVis FILE.yaml), for "
                   "checkpoints that do not carry one")
    _add_prediction_type(p)
    p.add_argument("--vae", metavar="PATH", help="a separate VAE file or diffusers vae/ folder to use instead of the model's")
    p.add_argument("--lora", metavar="PATH[:SCALE]", action="append", default=[], type=_lora_arg,
                   help="apply a LoRA/LyCORIS file at SCALE (default 1); repeatable")
    p.add_argument("--lora-dir", metavar="DIR", action="append", default=[],
                   help="folder where <lora:NAME:WEIGHT> prompt tags find NAME.safetensors; repeatable")
    p.add_argument("--device", default="auto",
                   help="auto, cpu, cuda or cuda:N (default: auto, CUDA when there is one)")
    p.add_argument("--dtype", choices=("auto", *DTYPES), default="auto", metavar="DTYPE",
                   help="auto, fp32, fp16 or bf16 (default: auto, fp16 on CUDA and fp32 on CPU)")


def _lora_arg(value: str) -> tuple[Path, float]:
    """PATH or PATH:SCALE; a colon followed by no number belongs to the path."""
    path, _, scale = value.rpartition(":")
    try:
        scale = float(scale)
    except ValueError:
        return Path(value), 1.0
    if not path:
        return Path(value), 1.0
    try:
        return Path(path), check_scale(scale)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _size_arg(value: str) -> tuple[int, int]:
    """WIDTHxHEIGHT, as sizes are written (A1111's "Size: 1024x768"), -> diffusers' (height, width)."""
    width, _, height = value.lower().partition("x")
    try:
        return int(height), int(width)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT in pixels, such as 1024x768, got {value!r}") from None


def _pair_arg(value: str) -> tuple[int, int]:
    top, _, left = value.partition(",")
    try:
        return int(top), int(left)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TOP,LEFT in pixels, such as 0,0, got {value!r}") from None


def _add_sdxl_options(p: argparse.ArgumentParser, img2img: bool) -> None:
    group = p.add_argument_group("SDXL", "the training picture SDXL is told it draws (see the README); the negative-"
                                         " forms condition the negative prompt (default: as the prompt)")
    for name, flag, metavar, text in _SDXL_OPTIONS:
        kind = {"WIDTHxHEIGHT": _size_arg, "TOP,LEFT": _pair_arg, "SCORE": float}[metavar]
        group.add_argument(flag, dest=name, type=kind, metavar=metavar, help=text)
        group.add_argument(f"--negative-{flag[2:]}", dest=f"negative_{name}", type=kind, metavar=metavar)
    if img2img:
        group.add_argument("--denoising-start", type=float, metavar="F",
                           help="continue a run stopped at F (0 to 1) of the schedule, adding no noise: in place of "
                                "--strength, for the refiner")
    group.add_argument("--denoising-end", type=float, metavar="F", help="stop at F (0 to 1) of the schedule")


def _sdxl_settings(args) -> dict:
    """The SDXL options given, as Settings arguments (those not given keep Settings' defaults)."""
    names = [f"{neg}{name}" for name, *_ in _SDXL_OPTIONS for neg in ("", "negative_")]
    names += ["denoising_start", "denoising_end"]
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def _add_prediction_type(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prediction-type", choices=PREDICTION_TYPES, metavar="TYPE",
                   help="what the UNet predicts, epsilon or v_prediction (default: what the checkpoint says; "
                        "see the README for files that say nothing)")


def _add_generation_options(p: argparse.ArgumentParser, size: bool, files: bool) -> None:
    """files: one run writing -o OUT.png (a random seed by default), else a batch run with seed 0 by default."""
    p.add_argument("--negative-prompt", default="", metavar="TEXT", help="what the image should not show")
    p.add_argument("--clip-skip", type=int, default=1, metavar="N",
                   help="stop the text encoder N - 1 layers before its last (default: 1, all layers); "
                        "SD 2.x ignores it, as AUTOMATIC1111 does")
    p.add_argument("--embeddings", metavar="DIR",
                   help=f"load every textual-inversion embedding ({', '.join(EMBEDDING_SUFFIXES)}) in DIR; "
                        "a file's name without its suffix names it in prompts")
    p.add_argument("--steps", type=int, default=30, help="denoising steps (default: 30)")
    p.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale (default: 7.5)")
    p.add_argument("--sampler", default="euler", metavar="NAME",
                   help=f"{', '.join(SAMPLERS)} (default: euler)")
    if files:
        p.add_argument("--seed", type=int, help="default: random, printed and stored in the PNG")
    else:
        p.add_argument("--seed", type=int, default=0, help="line N of the file uses seed + N (default: 0)")
    if size:
        default = "(default: the model's own, 512 for SD 1.x, 768 for SD 2.x v-prediction models, 1024 for SDXL)"
        p.add_argument("--width", type=int, help=f"pixels, a multiple of 8 {default}")
        p.add_argument("--height", type=int, help=f"pixels, a multiple of 8 {default}")
    if files:
        p.add_argument("--batch", type=int, default=1, help="images drawn together from one seed (default: 1)")
        p.add_argument("-o", "--output", default="output.png", metavar="OUT.png",
                       help="where to write; with --batch N, OUT-0.png ... OUT-{N-1}.png (default: output.png)")
    _add_sdxl_options(p, img2img=not size)
    _add_model_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.add_argument("-v", "--verbose", action="store_true", help="also print each prompt's token and chunk counts")


def _parser(png: dict | None = None) -> argparse.ArgumentParser:
    """png: the settings of a --from-png picture, which become txt2img's defaults."""
    parser = _Parser(prog="tritonsd", description="Stable Diffusion 1.x, 2.x and SDXL inference with Triton kernels.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("txt2img", help="generate images from a prompt")
    p.add_argument("prompt", nargs="?", help="required unless --from-png gives it")
    p.add_argument("--from-png", metavar="IMAGE.png",
                   help="take the prompt and settings from a PNG's parameters (tritonsd's or AUTOMATIC1111's); "
                        "options given here override them")
    _add_generation_options(p, size=True, files=True)
    p.set_defaults(run=_txt2img, png=None)
    if png:
        p.set_defaults(**png)

    p = sub.add_parser("img2img", help="redraw an image from a prompt")
    p.add_argument("image")
    p.add_argument("prompt")
    p.add_argument("--strength", type=float, default=0.8, help="how much to change the image, in (0, 1] (default: 0.8)")
    _add_generation_options(p, size=False, files=True)
    p.set_defaults(run=_img2img)

    p = sub.add_parser("batch", help="one image per line of a prompts file; resumable, splits across torchrun ranks")
    p.add_argument("prompts", metavar="PROMPTS.txt")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for NNNNN.png, named by line number")
    _add_generation_options(p, size=True, files=False)
    p.set_defaults(run=_batch)

    p = sub.add_parser("convert", help="rewrite any checkpoint as tritonsd's own safetensors file")
    p.add_argument("src", metavar="SRC", help="single-file checkpoint, diffusers folder or tritonsd file")
    p.add_argument("dst", metavar="DST", help="the tritonsd file to write")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp16", metavar="DTYPE",
                   help="fp32, fp16 or bf16 (default: fp16)")
    p.add_argument("--config", metavar="FILE", help="model config (FILE.json, or a CompVis FILE.yaml), for "
                   "checkpoints that do not carry one")
    _add_prediction_type(p)
    p.set_defaults(run=_convert)

    p = sub.add_parser("info", help="describe a checkpoint, LoRA or VAE file; exit status 2 if it would not load")
    p.add_argument("ckpt", metavar="CKPT")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=_info)
    return parser


def main(argv: list[str] | None = None) -> None:
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        args = _parser(_png_defaults(argv)).parse_args(argv)
        args.run(args)
    except SettingError as e:
        _fail(f"{_OPTIONS.get(e.argument, e.argument)} {e.problem}")
    except ValueError as e:
        _fail(str(e))
    except torch.cuda.OutOfMemoryError:
        _fail("out of GPU memory; try a smaller --batch, --width/--height or --dtype fp16", status=1)
    except OSError as e:
        _fail(str(e), status=1)
    except KeyboardInterrupt:
        _interrupted()


# --from-png: what a `parameters` chunk sets, as txt2img's option names.
_PNG_OPTIONS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "steps": "steps", "sampler": "sampler",
                "cfg": "cfg", "seed": "seed", "width": "width", "height": "height", "clip_skip": "clip_skip",
                "batch_size": "batch"}
_PNG_NOTED = ("model", "model_hash", "batch_pos", "pad_conds")  # compared, reported or always so


def _png_defaults(argv: list[str]) -> dict:
    """For `txt2img --from-png IMAGE.png`: the picture's settings under txt2img's option names, so that options
    given on the command line override them; {} otherwise."""
    if not argv or argv[0] != "txt2img":
        return {}
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--from-png")
    path = pre.parse_known_args(argv[1:])[0].from_png
    if path is None:
        return {}
    try:
        with Image.open(path) as image:
            text = getattr(image, "text", {}).get("parameters")
    except OSError as e:
        raise ValueError(f"cannot read --from-png {path}: {e}") from None
    if text is None:
        raise ValueError(f"--from-png {path} has no 'parameters' text chunk to take settings from")
    try:
        settings = parse_parameters(text)
    except ValueError as e:
        raise ValueError(f"--from-png {path}: cannot read its parameters ({e})") from None
    return {_PNG_OPTIONS[k]: v for k, v in settings.items() if k in _PNG_OPTIONS} | {"png": (path, settings)}


def _settings(args, prompt: str, **run) -> Settings:
    """The run's settings, checked by the same code as the Python API's, before any model loads. A prompt whose
    weights do not parse is refused here too."""
    for text in (prompt, args.negative_prompt):
        parse_attention(text)
    if args.embeddings is not None and not Path(args.embeddings).is_dir():
        raise ValueError(f"--embeddings {args.embeddings} is not a folder")
    for path, _ in args.lora:
        if not path.is_file():
            raise ValueError(f"--lora {path}: no such file")
    for folder in args.lora_dir:
        if not Path(folder).is_dir():
            raise ValueError(f"--lora-dir {folder}: no such folder")
    if args.vae and not Path(args.vae).exists():
        raise ValueError(f"--vae {args.vae}: no such file or folder")
    _check_lora_tags(prompt, args)
    return Settings(
        prompt, args.negative_prompt, steps=args.steps, guidance_scale=args.cfg, sampler=args.sampler, seed=args.seed,
        clip_skip=args.clip_skip, **_sdxl_settings(args), **run,
    )


def _check_lora_tags(prompt: str, args) -> None:
    """Every <lora:NAME:WEIGHT> tag is well formed and names a LoRA given with --lora or found in a --lora-dir."""
    for name, _ in extract_lora_tags(prompt)[1]:
        if name not in {p.stem for p, _ in args.lora}:
            find_lora(name, [Path(d) for d in args.lora_dir])


def _launcher() -> tuple[int, int, int | None]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, None) when not launched as one of several."""
    world = _environment_int("WORLD_SIZE", 1)
    if world < 1:
        raise ValueError(f"WORLD_SIZE must be at least 1, got {world}")
    if world == 1:
        return 0, 1, None
    missing = [name for name in ("RANK", "LOCAL_RANK") if name not in os.environ]
    if missing:
        raise ValueError(
            f"WORLD_SIZE is {world} but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set; "
            "launch with torchrun, which sets all three"
        )
    rank, local_rank = _environment_int("RANK", 0), _environment_int("LOCAL_RANK", 0)
    if not 0 <= rank < world or local_rank < 0:
        raise ValueError(f"RANK {rank} and LOCAL_RANK {local_rank} do not fit WORLD_SIZE {world}")
    return rank, world, local_rank


def _environment_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def _device(value: str, local_rank: int | None = None) -> str:
    """--device as a device: auto is CUDA when there is one; a bare cuda under a launcher is this process's GPU,
    cuda:LOCAL_RANK; cuda:N is taken as given."""
    if value == "auto":
        value = "cuda" if torch.cuda.is_available() else "cpu"
    if value == "cuda" and local_rank is not None:
        value = f"cuda:{local_rank}"
    check_device(value)
    return value


def _png_path(value: str) -> Path:
    path = Path(value)
    if path.suffix.lower() != ".png":
        raise ValueError(f"output {path} must be a .png file")
    return path


def _model_path(args) -> Path:
    return Path(args.model) if args.model else Path(loader.default_model())


def _model_config(args) -> ModelConfig | None:
    return loader.read_config(args.config) if args.config else None


def _dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return DTYPES[name]


class _Model:
    """A loaded pipeline with the name and hash its images record."""

    def __init__(self, args, device: str):
        path, config = _model_path(args), _model_config(args)
        start = time.perf_counter()
        self.pipe = Pipeline.from_checkpoint(path, device=device, dtype=_dtype(args.dtype, device), config=config,
                                             prediction_type=args.prediction_type, vae=args.vae,
                                             lora_dirs=args.lora_dir)
        for lora, scale in args.lora:
            self.pipe.load_lora(lora, scale)
        if args.embeddings is not None:
            self._load_embeddings(Path(args.embeddings))
        self.load_seconds = time.perf_counter() - start
        self.name = path.stem if path.is_file() else path.name
        self.hash = model_hash(path)

    def _load_embeddings(self, folder: Path) -> None:
        """Every embedding file in the folder, as A1111 reads its embeddings/ folder: one that does not fit this
        model (another model family's, an unknown format) is skipped with a warning."""
        for file in sorted(f for f in folder.iterdir() if f.suffix.lower() in EMBEDDING_SUFFIXES and f.is_file()):
            try:
                self.pipe.load_textual_inversion(file)
            except ValueError as e:
                _say(f"tritonsd: warning: skipped embedding {e}", sys.stderr)

    def describe_embeddings(self) -> None:
        """For --verbose: the embedding names prompts can use."""
        names = self.pipe.prompt_tokenizer.embeddings
        if names:
            _say(f"embeddings: {', '.join(names)}", sys.stderr)

    def pads_conds(self, settings: Settings) -> bool:
        """Whether the guided run pads the prompt or the negative prompt to the other's chunk count."""
        chunks = self.pipe.prompt_tokenizer.chunks
        return settings.guided and len(chunks(settings.prompts[0])) != len(chunks(settings.negative_prompts[0]))

    def describe_prompts(self, prompts: list[tuple[str, str]]) -> None:
        """For --verbose: each prompt's token and chunk counts."""
        for what, text in prompts:
            chunks = self.pipe.prompt_tokenizer.chunks(text)
            _say(f"{what}: {sum(c.length for c in chunks)} tokens in {len(chunks)} chunk(s) of "
                 f"{self.pipe.prompt_tokenizer.room}", sys.stderr)

    def summary(self, what: str, steps: int, seconds: float) -> str:
        dtype = DTYPE_NAMES.get(self.pipe.dtype, str(self.pipe.dtype))
        return (
            f"{what} in {seconds:.1f} s, {steps / seconds:.2f} steps/s on {self.pipe.device} ({dtype}); "
            f"model loaded in {self.load_seconds:.1f} s"
        )


def _progress(args) -> bool:
    return not args.quiet and sys.stderr.isatty()


def _save_png(image, path: Path, parameters: str) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    with atomic_write(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def _txt2img(args) -> None:
    if args.prompt is None:
        raise ValueError("txt2img needs a PROMPT, or --from-png IMAGE.png to take one from")
    _generate(args, _settings(args, args.prompt, width=args.width, height=args.height, batch_size=args.batch))


def _img2img(args) -> None:
    settings = _settings(args, args.prompt, strength=args.strength, batch_size=args.batch)
    _generate(args, settings, read_image(args.image))


def _generate(args, settings: Settings, image=None) -> None:
    device = _device(args.device)
    output = _png_path(args.output)

    def target(i: int) -> Path:
        return output if settings.batch_size == 1 else output.with_name(f"{output.stem}-{i}{output.suffix}")

    check_output(target(settings.batch_size - 1))  # the longest name
    model = _Model(args, device)
    # The memory estimate first: it refuses an absurd --batch at once, before every one of its names is looked at.
    model.pipe.check(settings, image)
    paths = [target(i) for i in range(settings.batch_size)]
    for out in paths:
        check_output(out)
    if getattr(args, "png", None):
        _note_png(args, model, paths)
    if args.verbose:
        model.describe_embeddings()
        model.describe_prompts([("prompt", args.prompt), ("negative prompt", args.negative_prompt)])

    start = time.perf_counter()
    images = model.pipe.generate(settings, image, progress=_progress(args))
    seconds = time.perf_counter() - start
    steps = len(settings.plan(model.pipe.config).timesteps)
    for i, (picture, out) in enumerate(zip(images, paths)):
        parameters = format_parameters(
            args.prompt, args.negative_prompt, steps=settings.steps, sampler=settings.sampler,
            cfg=settings.guidance_scale, seed=settings.seed, width=picture.width, height=picture.height,
            model_hash=model.hash, model=model.name, strength=settings.strength, clip_skip=settings.clip_skip,
            pad_conds=model.pads_conds(settings), batch_size=settings.batch_size, batch_pos=i,
            lora_hashes=model.pipe.lora_hashes(args.prompt),
        )
        _save_png(picture, out, parameters)
        _say(out)
    if not args.quiet:
        summary = model.summary(f"{len(images)} image(s), {steps} steps", steps, seconds)
        _say(f"seed {settings.seed}: {summary}", sys.stderr)


def _note_png(args, model: _Model, paths: list[Path]) -> None:
    """What of a --from-png picture's settings this run does not reproduce, on stderr."""
    path, settings = args.png
    ignored = [k for k in settings if k not in _PNG_OPTIONS and k not in _PNG_NOTED]
    if ignored:
        _say(f"tritonsd: warning: {path}: settings tritonsd does not apply: {', '.join(ignored)}", sys.stderr)
    if settings.get("model_hash", model.hash) != model.hash:
        _say(f"tritonsd: warning: {path} was made with model {settings.get('model', '?')} (hash "
             f"{settings['model_hash']}); this is {model.name} (hash {model.hash})", sys.stderr)
    pos = settings.get("batch_pos", 0)
    if args.batch == settings.get("batch_size", 1) > 1 and pos < len(paths):
        _say(f"tritonsd: {path} was image {pos} of a batch of {args.batch}: {paths[pos]}", sys.stderr)


def _read_prompts(path: str) -> list[tuple[int, str]]:
    """(line number from 1, prompt) for each non-empty line, so a file name and seed name a line of the file.
    Lines end at "\n" only (a "\r" before it is stripped), as editors number them: U+2028, U+0085 or a form feed
    inside a line does not start another."""
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read prompts file {path}: {e}") from None
    prompts = [(n, line.strip()) for n, line in enumerate(text.split("\n"), start=1) if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {path} has no prompts")
    return prompts


def _batch(args) -> None:
    rank, world, local_rank = _launcher()
    device = _device(args.device, local_rank)
    prompts = _read_prompts(args.prompts)
    for n, prompt in prompts:
        try:
            parse_attention(prompt)
            _check_lora_tags(prompt, args)
        except ValueError as e:
            raise ValueError(f"{args.prompts} line {n}: {e}") from None
    settings = _settings(args, prompts[0][1], width=args.width, height=args.height)
    last = prompts[-1][0]
    if settings.seed + last >= SEED_LIMIT:
        raise SettingError("seed", f"{settings.seed} plus the last line's number, {last}, passes 2**64 - 1")
    out = check_output_folder(args.out)
    model = _Model(args, device)
    model.pipe.check(settings)
    steps = len(settings.plan(model.pipe.config).timesteps)
    if args.verbose:
        model.describe_embeddings()
    out.mkdir(parents=True, exist_ok=True)

    def target(n: int) -> Path:
        return out / f"{n:05d}.png"

    pending = [(n, prompt) for n, prompt in prompts if not target(n).exists()]
    if world > 1:
        import torch.distributed as dist

        on_gpu = device.startswith("cuda")
        dist.init_process_group("nccl" if on_gpu else "gloo", device_id=torch.device(device) if on_gpu else None)
        # Every rank has listed the pending lines before any rank writes, so all ranks split the same list.
        dist.barrier()
    try:
        start = time.perf_counter()
        mine = pending[rank::world]
        for n, prompt in tqdm(mine, disable=not _progress(args) or rank != 0, desc="batch", unit="image"):
            if args.verbose:
                model.describe_prompts([(f"line {n}", prompt)])
            line = dataclasses.replace(settings, prompt=prompt, seed=settings.seed + n)
            image = model.pipe.generate(line)[0]
            parameters = format_parameters(
                prompt, args.negative_prompt, steps=line.steps, sampler=line.sampler, cfg=line.guidance_scale,
                seed=line.seed, width=image.width, height=image.height, model_hash=model.hash, model=model.name,
                clip_skip=line.clip_skip, pad_conds=model.pads_conds(line), lora_hashes=model.pipe.lora_hashes(prompt),
            )
            _save_png(image, target(n), parameters)
            with tqdm.external_write_mode(file=sys.stdout):  # the bar steps aside for the line
                _say(target(n))
        seconds = time.perf_counter() - start
        if world > 1:
            dist.barrier()
    finally:
        if world > 1:
            dist.destroy_process_group()
    if not args.quiet:
        who = f"rank {rank}/{world}: " if world > 1 else ""
        done = f"{len(mine)} new image(s) ({len(prompts) - len(pending)} already in {out}), {steps} steps each"
        _say(who + model.summary(done, steps * len(mine), max(seconds, 1e-9)), sys.stderr)


def _convert(args) -> None:
    src, dst = Path(args.src), check_output(args.dst)
    config = _model_config(args)
    dtype = DTYPES[args.dtype]
    start = time.perf_counter()
    model, _ = loader.load(src, device="cpu", dtype=dtype, config=config, prediction_type=args.prediction_type)
    loader.save(model, model.config, dst, dtype=dtype)
    _say(dst)
    _say(f"converted {src} to {args.dtype} in {time.perf_counter() - start:.1f} s", sys.stderr)


def _info(args) -> None:
    """Print what the file holds; exit 2 with the reason when it is not a loadable SD 1.x/2.x checkpoint."""
    d = loader.describe(args.ckpt)
    if args.json:
        _say(json.dumps(d, indent=2))
    else:
        rows = [
            ("format", d["format"]),
            ("architecture", f"{d['architecture']} ({d['evidence']})"),
            ("dtypes", ", ".join(f"{k} ({n} tensors)" for k, n in d["dtypes"].items())),
            ("parameters", f"{_count(sum(d['parameters'].values()))}: "
                           + ", ".join(f"{k} {_count(n)}" for k, n in d["parameters"].items())),
        ]
        if "lora" in d:
            lora = d["lora"]
            layers = ", ".join(f"{part} {n}" for part, n in lora["layers"].items())
            ranks = ", ".join(map(str, lora["ranks"]))
            rows.append(("lora", lora["problem"] or f"{lora['format']} for {lora['family']}; layers: {layers}; "
                                                    f"rank {ranks}"))
        if "use" in d:
            rows.append(("use", d["use"]))
        for part, fields in (d["config"] or {}).items():
            if isinstance(fields, dict):
                rows.append((f"config.{part}", " ".join(f"{k}={v}" for k, v in fields.items())))
        if d["config"]:
            rows.append(("prediction", f"{d['config']['prediction_type']} (from {d['prediction_source']})"))
            rows += [(key, _listing(d[key])) for key in ("missing", "unexpected", "wrong_shape")]
        _say(d["path"])
        for key, value in rows:
            _say(f"  {key:<14}{value}")
    if d["problem"]:  # the refusal `load` would make, word for word
        raise ValueError(d["problem"])


def _count(n: int) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _listing(items: list[str], limit: int = 10) -> str:
    if not items:
        return "none"
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


if __name__ == "__main__":
    main()
