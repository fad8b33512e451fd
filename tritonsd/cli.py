"""The `tritonsd` command: txt2img, img2img, batch, convert and info.

Bad input ends in one `tritonsd: error: ...` line and exit status 2, found before any model is loaded where
that is cheap. Every file is written whole or not at all, so an interrupted run (exit 130) leaves nothing torn."""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin
from tqdm.auto import tqdm

from tritonsd import loader
from tritonsd.engine.config import PREDICTION_TYPES, ModelConfig
from tritonsd.engine.pipeline import Pipeline
from tritonsd.engine.prompts import parse_attention
from tritonsd.engine.samplers import SAMPLERS, make_plan
from tritonsd.engine.text_encoder import check_clip_skip
from tritonsd.loader.embeddings import SUFFIXES as EMBEDDING_SUFFIXES
from tritonsd.pngmeta import format_parameters, model_hash, parse_parameters

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        _fail(f"{message} (see {self.prog} --help)")


def _fail(message: str, status: int = 2):
    _say(f"tritonsd: error: {message}", sys.stderr)
    raise SystemExit(status)


def _say(text, file=None) -> None:
    """One write per line: torchrun's ranks share an unbuffered stdout and stderr, where print() writes the
    newline apart and another rank's line can land in between."""
    file = file or sys.stdout
    file.write(f"{text}\n")
    file.flush()


def _device_arg(value: str) -> str:
    if value == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    m = re.fullmatch(r"cpu|cuda(?::(\d+))?", value)
    if m is None:
        raise argparse.ArgumentTypeError(f"unknown device {value!r}; use auto, cpu, cuda or cuda:N")
    if value != "cpu":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{value} requested but CUDA is not available; use --device cpu")
        if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{value} requested but there are {torch.cuda.device_count()} CUDA devices")
    return value


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="PATH", help="checkpoint file or diffusers folder (default: the demo model)")
    p.add_argument("--config", metavar="FILE.json", help="model config, for checkpoints that do not carry one")
    _add_prediction_type(p)
    p.add_argument("--device", type=_device_arg, default="auto",
                   help="auto, cpu, cuda or cuda:N (default: auto, CUDA when there is one)")
    p.add_argument("--dtype", choices=("auto", *DTYPES), default="auto", metavar="DTYPE",
                   help="auto, fp32, fp16 or bf16 (default: auto, fp16 on CUDA and fp32 on CPU)")


def _add_prediction_type(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prediction-type", choices=PREDICTION_TYPES, metavar="TYPE",
                   help="what the UNet predicts, epsilon or v_prediction (default: what the checkpoint says; "
                        "see the README for files that say nothing)")


def _add_generation_options(p: argparse.ArgumentParser, size: bool, files: bool) -> None:
    """files: one run writing -o OUT.png (a random seed by default), else a batch run with seed 0 by default."""
    p.add_argument("--negative-prompt", default="", metavar="TEXT", help="what the image should not show")
    p.add_argument("--clip-skip", type=int, default=1, metavar="N",
                   help="stop the text encoder N - 1 layers before its last (default: 1, all layers)")
    p.add_argument("--embeddings", metavar="DIR",
                   help=f"load every textual-inversion embedding ({', '.join(EMBEDDING_SUFFIXES)}) in DIR; "
                        "a file's name without its suffix names it in prompts")
    p.add_argument("--steps", type=int, default=30, help="denoising steps (default: 30)")
    p.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale (default: 7.5)")
    p.add_argument("--sampler", choices=SAMPLERS, default="euler", metavar="NAME",
                   help=f"{', '.join(SAMPLERS)} (default: euler)")
    if files:
        p.add_argument("--seed", type=int, help="default: random, printed and stored in the PNG")
    else:
        p.add_argument("--seed", type=int, default=0, help="line N of the file uses seed + N (default: 0)")
    if size:
        default = "(default: the model's own, 512 for SD 1.x, 768 for SD 2.x v-prediction models)"
        p.add_argument("--width", type=int, help=f"pixels, a multiple of 8 {default}")
        p.add_argument("--height", type=int, help=f"pixels, a multiple of 8 {default}")
    if files:
        p.add_argument("--batch", type=int, default=1, help="images drawn together from one seed (default: 1)")
        p.add_argument("-o", "--output", default="output.png", metavar="OUT.png",
                       help="where to write; with --batch N, OUT-0.png ... OUT-{N-1}.png (default: output.png)")
    _add_model_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.add_argument("-v", "--verbose", action="store_true", help="also print each prompt's token and chunk counts")


def _parser(png: dict | None = None) -> argparse.ArgumentParser:
    """png: the settings of a --from-png picture, which become txt2img's defaults."""
    parser = _Parser(prog="tritonsd", description="Stable Diffusion 1.x and 2.x inference with Triton kernels.")
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
    p.add_argument("--config", metavar="FILE.json", help="model config, for checkpoints that do not carry one")
    _add_prediction_type(p)
    p.set_defaults(run=_convert)

    p = sub.add_parser("info", help="describe a checkpoint; exit status 2 if it would not load")
    p.add_argument("ckpt", metavar="CKPT")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=_info)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        png = _png_defaults(argv)
    except ValueError as e:
        _fail(str(e))
    args = _parser(png).parse_args(argv)
    try:
        args.run(args)
    except ValueError as e:
        _fail(str(e))
    except torch.cuda.OutOfMemoryError:
        _fail("out of GPU memory; try a smaller --batch, --width/--height or --dtype fp16", status=1)
    except OSError as e:
        _fail(str(e), status=1)
    except KeyboardInterrupt:
        _say("tritonsd: interrupted", sys.stderr)
        raise SystemExit(130)


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


def _check_generation(args, strength: float | None = None) -> int:
    """Every setting a run needs, checked before the model loads. Returns the denoising steps the run takes."""
    plan = make_plan(args.sampler, args.steps, 1.0 if strength is None else strength)
    check_clip_skip(args.clip_skip)
    for text in (getattr(args, "prompt", None), args.negative_prompt):
        if text is not None:
            parse_attention(text)  # a malformed weight is an error worth finding before the model loads
    if not math.isfinite(args.cfg):
        raise ValueError(f"--cfg must be a finite number, got {args.cfg}")
    if args.seed is not None and not 0 <= args.seed < 2**63:
        raise ValueError(f"--seed must be in [0, 2**63), got {args.seed}")
    for name in ("width", "height"):
        size = getattr(args, name, None)
        if size is not None and (size <= 0 or size % 8):
            raise ValueError(f"--{name} must be a positive multiple of 8, got {size}")
    if getattr(args, "batch", 1) < 1:
        raise ValueError(f"--batch must be at least 1, got {args.batch}")
    if args.embeddings is not None and not Path(args.embeddings).is_dir():
        raise ValueError(f"--embeddings {args.embeddings} is not a folder")
    return len(plan.timesteps)


def _check_output(path: Path) -> None:
    if path.suffix.lower() != ".png":
        raise ValueError(f"output {path} must be a .png file")
    if not path.parent.is_dir():
        raise ValueError(f"output folder {path.parent} does not exist")


def _model_path(args) -> Path:
    return Path(args.model) if args.model else Path(loader.default_model())


def _model_config(args) -> ModelConfig | None:
    return ModelConfig.from_json(args.config) if args.config else None


def _dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return DTYPES[name]


class _Model:
    """A loaded pipeline with the name and hash its images record."""

    def __init__(self, path: Path, config: ModelConfig | None, prediction_type: str | None, device: str,
                 dtype: torch.dtype, embeddings: str | None = None):
        start = time.perf_counter()
        self.pipe = Pipeline.from_checkpoint(path, device=device, dtype=dtype, config=config,
                                             prediction_type=prediction_type)
        if embeddings is not None:
            self._load_embeddings(Path(embeddings))
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

    def pads_conds(self, prompt: str, negative_prompt: str, cfg: float) -> bool:
        """Whether the guided run pads the prompt or the negative prompt to the other's chunk count."""
        chunks = self.pipe.prompt_tokenizer.chunks
        return cfg > 1.0 and len(chunks(prompt)) != len(chunks(negative_prompt))

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


def _save_png(image: Image.Image, path: Path, parameters: str) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    _write_atomic(path, lambda f: image.save(f, format="PNG", pnginfo=info))


def _write_atomic(path: Path, write) -> None:
    """Write beside the target and rename over it, so readers (and resumed runs) never see a partial file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _txt2img(args) -> None:
    if args.prompt is None:
        raise ValueError("txt2img needs a PROMPT, or --from-png IMAGE.png to take one from")
    _generate(args, lambda pipe, **kw: pipe.txt2img(args.prompt, width=args.width, height=args.height, **kw))


def _img2img(args) -> None:
    try:
        with Image.open(args.image) as f:
            image = f.convert("RGB")
    except OSError as e:
        raise ValueError(f"cannot read image {args.image}: {e}") from None
    if min(image.size) < 8:
        raise ValueError(f"image {args.image} is {image.width}x{image.height}; both sides must be at least 8 pixels")
    _generate(args, lambda pipe, **kw: pipe.img2img(image, args.prompt, strength=args.strength, **kw), args.strength)


def _generate(args, run, strength: float | None = None) -> None:
    steps = _check_generation(args, strength)
    output = Path(args.output)
    _check_output(output)
    paths = [output] if args.batch == 1 else [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(args.batch)]
    path, config = _model_path(args), _model_config(args)
    model = _Model(path, config, args.prediction_type, args.device, _dtype(args.dtype, args.device), args.embeddings)
    seed = random.randrange(2**32) if args.seed is None else args.seed
    if getattr(args, "png", None):
        _note_png(args, model, paths)
    if args.verbose:
        model.describe_embeddings()
        model.describe_prompts([("prompt", args.prompt), ("negative prompt", args.negative_prompt)])

    start = time.perf_counter()
    images = run(
        model.pipe, negative_prompt=args.negative_prompt, steps=args.steps, guidance_scale=args.cfg,
        sampler=args.sampler, seed=seed, batch_size=args.batch, progress=_progress(args), clip_skip=args.clip_skip,
    )
    seconds = time.perf_counter() - start
    for i, (image, out) in enumerate(zip(images, paths)):
        parameters = format_parameters(
            args.prompt, args.negative_prompt, steps=args.steps, sampler=args.sampler, cfg=args.cfg, seed=seed,
            width=image.width, height=image.height, model_hash=model.hash, model=model.name, strength=strength,
            clip_skip=args.clip_skip, pad_conds=model.pads_conds(args.prompt, args.negative_prompt, args.cfg),
            batch_size=args.batch, batch_pos=i,
        )
        _save_png(image, out, parameters)
        _say(out)
    if not args.quiet:
        _say(f"seed {seed}: " + model.summary(f"{len(images)} image(s), {steps} steps", steps, seconds), sys.stderr)


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
    """(line number from 1, prompt) for each non-empty line, so a file name and seed name a line of the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read prompts file {path}: {e}") from None
    prompts = [(n, line.strip()) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {path} has no prompts")
    return prompts


def _batch(args) -> None:
    steps = _check_generation(args)
    prompts = _read_prompts(args.prompts)
    for n, prompt in prompts:
        try:
            parse_attention(prompt)
        except ValueError as e:
            raise ValueError(f"{args.prompts} line {n}: {e}") from None
    if args.seed + prompts[-1][0] >= 2**63:
        raise ValueError(f"--seed {args.seed} plus the line count passes 2**63")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is not a folder")
    path, config = _model_path(args), _model_config(args)

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = args.device
    if world > 1 and device.startswith("cuda"):
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    model = _Model(path, config, args.prediction_type, device, _dtype(args.dtype, device), args.embeddings)
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
            image = model.pipe.txt2img(
                prompt, args.negative_prompt, steps=args.steps, guidance_scale=args.cfg, sampler=args.sampler,
                seed=args.seed + n, width=args.width, height=args.height, clip_skip=args.clip_skip,
            )[0]
            parameters = format_parameters(
                prompt, args.negative_prompt, steps=args.steps, sampler=args.sampler, cfg=args.cfg, seed=args.seed + n,
                width=image.width, height=image.height, model_hash=model.hash, model=model.name,
                clip_skip=args.clip_skip, pad_conds=model.pads_conds(prompt, args.negative_prompt, args.cfg),
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
    src, dst = Path(args.src), Path(args.dst)
    if not dst.parent.is_dir():
        raise ValueError(f"output folder {dst.parent} does not exist")
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
