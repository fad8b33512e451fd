"""Whole-pipeline speed: tritonsd against diffusers, eager and under torch.compile, on the same random SD1.5
weights (or SD 2.1 768-v's with --model sd21), on one GPU, in one run.

    python bench/e2e.py --json OUT.json [--skip compiled,cold_start,...] [--model sd15|sd21|sdxl|tiny|tiny-sd2|tiny-sdxl]

Sections (each writes its figures into the JSON as soon as it is done):
- accuracy: a 30-step 512x512 txt2img in float16 (Triton kernels, CUDA graphs) against the float32 reference
  path (PyTorch ops) on the same weights and seed, as PSNR; and against diffusers' float16 image.
- unet_step: one guided step (UNet at batch 2B, guidance and sampler update) at 512x512 B=1 and B=4, 768x768 and
  1024x1024: tritonsd's captured step against the diffusers UNet called eagerly.
- long_prompt: one guided step at 512x512 with the context of a 1-chunk and of a 3-chunk prompt (77 and 231 text
  tokens), each from its own captured graph.
- vae_decode: decoding one 64x64 latent to 512x512.
- txt2img: a whole 30-step 512x512 image (Euler, guidance 7.5), prompt to numpy array, against diffusers'
  StableDiffusionPipeline; and the peak GPU memory of one such image at every size, beyond the weights.
- compiled: diffusers with `torch.compile(mode="reduce-overhead", fullgraph=True)` on the UNet and the VAE decode:
  the first image (compilation included, inductor cache empty on a fresh machine), then the warm figures.
- cold_start: a fresh Python process that imports tritonsd, loads an SD1.5 file and makes one 30-step image,
  with an empty Triton cache and again with the cache it left.
- profile: the GPU kernels of one eager tritonsd step at 512x512, by total time.
- layouts: tritonsd's step and VAE decode with NCHW weights instead of channels_last, and with cuDNN's autotuner.

With --model sd21 every section runs SD 2.1's 768-v architecture (OpenCLIP text tower, heads 64 wide, Linear
transformer projections, v-prediction) at 768x768, batch 1: the guided step and the 30-step image against diffusers
eager and compiled are its figures of interest (`--skip profile,layouts,cold_start` leaves the rest out). With
--model sdxl they are SDXL base's at 1024x1024 (two text towers, label_emb, against StableDiffusionXLPipeline); its
VAE overflows float16, so tritonsd decodes it in bfloat16 and diffusers, as its pipeline does, in float32.

Times are medians of CUDA-event timings after warm-up. `--model tiny` and `--model tiny-sd2` run everything on a
small model (on the CPU when there is no GPU) to check the script itself; their figures mean nothing.
"""

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from tritonsd import kernels, loader  # noqa: E402
from tritonsd.engine.model import StableDiffusion  # noqa: E402
from tritonsd.engine.pipeline import Pipeline  # noqa: E402
from tritonsd.engine.samplers import make_plan  # noqa: E402
from tritonsd.engine.tokenizer import CLIPTokenizer  # noqa: E402
from tritonsd.loader.convert import from_diffusers  # noqa: E402
from tritonsd.loader.infer import config_from_diffusers  # noqa: E402

SECTIONS = ("accuracy", "unet_step", "long_prompt", "vae_decode", "txt2img", "compiled", "cold_start", "profile",
            "layouts")
PROMPT, NEGATIVE = "a photograph of an astronaut riding a horse", "blurry"
STEPS, GUIDANCE = 30, 7.5

SD_VAE = dict(block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2, sample_size=512,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
TINY_UNET = dict(sample_size=8, cross_attention_dim=32, attention_head_dim=2, block_out_channels=(32, 64),
                 layers_per_block=1, norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
TINY_VAE = dict(block_out_channels=(16, 32), latent_channels=4, layers_per_block=1, norm_num_groups=8, sample_size=16,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
SD1_TEXT = dict(hidden_act="quick_gelu", pad_token="<|endoftext|>", prediction_type="epsilon")
# SD 2.x: OpenCLIP's GELU tower (23 blocks as used), prompts padded with "!", heads 64 wide, Linear projections.
SD2_TEXT = dict(hidden_act="gelu", pad_token="!", prediction_type="v_prediction")
MODELS = {
    "sd15": dict(
        unet=dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                  block_out_channels=(320, 640, 1280, 1280)),
        vae=SD_VAE,
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        sizes=[(512, 1), (512, 4), (768, 1), (1024, 1)],
        **SD1_TEXT,
    ),
    "sd21": dict(
        unet=dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                  use_linear_projection=True, upcast_attention=True, block_out_channels=(320, 640, 1280, 1280)),
        vae=SD_VAE,
        text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16),
        sizes=[(768, 1)],
        **SD2_TEXT,
    ),
    "sdxl": dict(
        unet=dict(sample_size=128, cross_attention_dim=2048, attention_head_dim=(5, 10, 20), use_linear_projection=True,
                  block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  addition_embed_type="text_time", addition_time_embed_dim=256,
                  projection_class_embeddings_input_dim=2816),
        vae={**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        text_2=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                    projection_dim=1280, hidden_act="gelu", pad_token="!"),
        sizes=[(1024, 1)],
        **SD1_TEXT,
    ),
    "tiny": dict(unet=TINY_UNET, vae=TINY_VAE, sizes=[(16, 1), (24, 2)], **SD1_TEXT,
                 text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)),
    "tiny-sd2": dict(unet={**TINY_UNET, "attention_head_dim": (2, 4), "use_linear_projection": True}, vae=TINY_VAE,
                     sizes=[(16, 1), (24, 2)], **SD2_TEXT,
                     text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)),
    "tiny-sdxl": dict(
        unet={**TINY_UNET, "attention_head_dim": (2, 4), "use_linear_projection": True, "cross_attention_dim": 80,
              "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
              "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "addition_embed_type": "text_time",
              "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 40 + 6 * 256},
        vae={**TINY_VAE, "scaling_factor": 0.13025, "force_upcast": True}, sizes=[(16, 1), (24, 2)], **SD1_TEXT,
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        text_2=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3, projection_dim=40,
                    hidden_act="gelu", pad_token="!")),
}
TEXT_COMMON = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                   pad_token_id=49407)


class Bench:
    def __init__(self, device: torch.device, out: Path | None):
        self.device, self.out = device, out
        self.report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                       "torch": torch.__version__, "cuda": torch.version.cuda, "sections": {}}
        try:
            import diffusers
            import triton
            import transformers
            self.report.update(triton=triton.__version__, diffusers=diffusers.__version__,
                               transformers=transformers.__version__)
        except ImportError as e:
            self.report["import_error"] = str(e)

    def section(self, name: str, fn, *args) -> None:
        print(f"== {name}", flush=True)
        started = time.perf_counter()
        try:
            result = fn(*args)
        except Exception as e:  # a failed section is recorded and the others still run
            traceback.print_exc()
            result = {"error": f"{type(e).__name__}: {e}"}
        result["section_s"] = round(time.perf_counter() - started, 1)
        self.report["sections"][name] = result
        print(json.dumps(result, indent=1), flush=True)
        if self.out:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text(json.dumps(self.report, indent=1))

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def time_ms(self, fn, warmup: int = 3, iters: int = 10) -> float:
        """Median milliseconds of fn(), each call timed on its own."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return round(statistics.median(times), 3)

    def peak_mb(self, fn) -> float | None:
        """GPU memory fn() allocates at its peak beyond what was allocated before it."""
        if self.device.type != "cuda":
            fn()
            return None
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        self.sync()
        return round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)


def build(model: str, device: torch.device, dtype: torch.dtype, tmp: Path):
    """Random diffusers SD 1.x/2.x/SDXL parts and a tritonsd Pipeline on the very same tensors, plus a diffusers
    pipeline."""
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    from transformers import CLIPTokenizer as HFTokenizer

    spec = MODELS[model]
    xl = "text_2" in spec
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**spec["unet"])
        vae = AutoencoderKL(**spec["vae"])
        text = CLIPTextModel(CLIPTextConfig(**spec["text"], **TEXT_COMMON, hidden_act=spec["hidden_act"]))
        parts = {"unet": unet, "vae": vae, "text_encoder": text}
        if xl:
            second = {k: v for k, v in spec["text_2"].items() if k != "pad_token"}
            parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**second, **TEXT_COMMON))
    for part in parts.values():
        part.to(dtype).eval().requires_grad_(False)

    # As save_pretrained writes them: a text config names its model class, which says whether it projects.
    configs = {name: (dict(part.config) if name in ("unet", "vae")
                      else {**part.config.to_dict(), "architectures": [type(part).__name__]})
               for name, part in parts.items()}
    config = config_from_diffusers({
        **configs, "scheduler": {"prediction_type": spec["prediction_type"]},
        "tokenizer": {"pad_token": spec["pad_token"]},
        **({"tokenizer_2": {"pad_token": spec["text_2"]["pad_token"]}} if xl else {}),
    })
    ours = StableDiffusion.on_meta(config)
    ours.load_state_dict(from_diffusers({k: p.state_dict() for k, p in parts.items()}), strict=True, assign=True)
    ours.eval().requires_grad_(False)
    tokenizer = CLIPTokenizer.default().with_pad_token(config.text.pad_token)
    pipe = Pipeline(ours, tokenizer)

    # The same vocabulary in transformers' files, so diffusers' pipeline tokenizes exactly as tritonsd does.
    folder = tmp / "tokenizer"
    folder.mkdir(exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(tokenizer.vocab))
    merges = sorted(tokenizer.ranks, key=tokenizer.ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    # SD 1.5's (and 2.1's) scheduler config, whose Euler timesteps are evenly spaced ("linspace"), as tritonsd's euler.
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, prediction_type=spec["prediction_type"])

    def hf_tokenizer(pad_token):
        return HFTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77,
                           pad_token=pad_token)

    if xl:
        theirs = StableDiffusionXLPipeline(
            vae=vae, text_encoder=text, text_encoder_2=parts["text_encoder_2"], tokenizer=hf_tokenizer(spec["pad_token"]),
            tokenizer_2=hf_tokenizer(spec["text_2"]["pad_token"]), unet=unet, scheduler=scheduler)
    else:
        theirs = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=hf_tokenizer(spec["pad_token"]),
                                         unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                         requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    return pipe, theirs, config


def ours_image(pipe: Pipeline, size: int, batch: int, steps: int = STEPS):
    return pipe.txt2img(PROMPT, negative_prompt=NEGATIVE, steps=steps, guidance_scale=GUIDANCE, sampler="euler",
                        seed=0, width=size, height=size, batch_size=batch, output_type="np")


def theirs_image(theirs, size: int, batch: int, steps: int = STEPS):
    with torch.inference_mode():
        return theirs(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=GUIDANCE,
                      generator=torch.Generator("cpu").manual_seed(0), width=size, height=size,
                      num_images_per_prompt=batch, output_type="np").images


def psnr(a, b) -> float:
    import numpy as np
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return round(10 * np.log10(1.0 / max(mse, 1e-20)), 2)


class StepInputs:
    """What the sampling loop hands tritonsd's step and diffusers' UNet at one size."""

    def __init__(self, pipe: Pipeline, size: int, batch: int, chunks: int = 1):
        lat = size // pipe.vae_scale
        dev = pipe.device
        self.latents = torch.randn(batch, 4, lat, lat, device=dev)
        self.context = torch.randn(2 * batch, 77 * chunks, pipe.config.unet.context_dim, device=dev, dtype=pipe.dtype)
        plan = make_plan("euler", STEPS, prediction_type=pipe.config.prediction_type,
                         timestep_spacing=pipe.config.timestep_spacing)
        self.row = plan.schedule()[10].to(dev, torch.float32)
        self.guidance = torch.full((1,), GUIDANCE, device=dev)
        self.x2 = torch.randn(2 * batch, 4, lat, lat, device=dev, dtype=pipe.dtype)
        self.t = torch.tensor(500.0, device=dev)
        # SDXL's label_emb input: the pooled text embedding and the six size numbers (diffusers takes them apart).
        self.y, self.added = None, None
        if pipe.config.unet.adm_in_channels:
            pooled = pipe.config.towers[-1].projection_dim
            self.y = torch.randn(2 * batch, pipe.config.unet.adm_in_channels, device=dev, dtype=pipe.dtype)
            self.added = {"text_embeds": self.y[:, :pooled],
                          "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * (2 * batch), device=dev,
                                                   dtype=pipe.dtype)}

    def ours(self, pipe: Pipeline):
        return pipe._run("step", pipe._step, self.latents, None, None, self.context, self.y, self.guidance, self.row)

    def eager_unet(self, pipe: Pipeline):
        """tritonsd's step without graphs: every kernel launched from Python, as the profiler sees it."""
        return pipe._step(self.latents, None, None, self.context, self.y, self.guidance, self.row)

    def theirs(self, unet):
        return unet(self.x2, self.t, encoder_hidden_states=self.context, added_cond_kwargs=self.added,
                    return_dict=False)[0]


def run_accuracy(b: Bench, pipe, theirs, config, size):
    with kernels.backend("auto"):
        fast = ours_image(pipe, size, 1)
    state = {k: t.float() for k, t in pipe.model.state_dict().items()}
    ref_model = StableDiffusion.on_meta(config)
    ref_model.load_state_dict(state, strict=True, assign=True)
    ref = Pipeline(ref_model.eval(), pipe.tokenizer)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # a float32 reference, not tf32
    try:
        with kernels.backend("torch"):
            want = ours_image(ref, size, 1)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    del ref, ref_model, state
    gc.collect()
    return {"psnr_fp16_vs_fp32_reference_db": psnr(fast, want), "psnr_vs_diffusers_fp16_db": psnr(fast, theirs_image(theirs, size, 1))}


def run_unet_step(b: Bench, pipe, theirs, sizes):
    rows = []
    for size, batch in sizes:
        inputs = StepInputs(pipe, size, batch)
        with torch.inference_mode(), kernels.backend("auto"):
            ours = b.time_ms(lambda: inputs.ours(pipe), warmup=3, iters=20)
            eager = b.time_ms(lambda: inputs.theirs(theirs.unet), warmup=2, iters=10)
        rows.append({"size": size, "batch": batch, "tritonsd_ms": ours, "diffusers_eager_ms": eager,
                     "speedup_vs_eager": round(eager / ours, 2)})
        print(rows[-1], flush=True)
        del inputs
    return {"rows": rows}


def run_long_prompt(b: Bench, pipe, size):
    rows = []
    for chunks in (1, 3):
        inputs = StepInputs(pipe, size, 1, chunks)
        with torch.inference_mode(), kernels.backend("auto"):
            rows.append({"chunks": chunks, "tritonsd_ms": b.time_ms(lambda: inputs.ours(pipe), warmup=3, iters=20)})
        print(rows[-1], flush=True)
    extra = rows[1]["tritonsd_ms"] / rows[0]["tritonsd_ms"] - 1
    return {"size": size, "rows": rows, "extra_cost_3_chunks": round(extra, 3)}


def their_vae_dtype(pipe: Pipeline, theirs) -> torch.dtype:
    """The dtype diffusers' pipeline decodes in: float32 for a VAE that overflows float16 (its force_upcast)."""
    return torch.float32 if getattr(theirs.vae.config, "force_upcast", False) and pipe.config.vae.force_upcast else pipe.dtype


def run_vae_decode(b: Bench, pipe, theirs, size):
    z = torch.randn(1, 4, size // 8, size // 8, device=b.device, dtype=pipe.dtype)
    theirs_dtype = their_vae_dtype(pipe, theirs)
    theirs.vae.to(theirs_dtype)
    zt = z.to(theirs_dtype)
    try:
        with torch.inference_mode(), kernels.backend("auto"):
            ours = b.time_ms(lambda: pipe.decode(z), warmup=2, iters=10)
            eager = b.time_ms(lambda: theirs.vae.decode(zt / theirs.vae.config.scaling_factor).sample, warmup=2, iters=10)
    finally:
        theirs.vae.to(pipe.dtype)
    return {"size": size, "tritonsd_ms": ours, "tritonsd_vae_dtype": str(pipe.vae_dtype).removeprefix("torch."),
            "diffusers_eager_ms": eager, "diffusers_vae_dtype": str(theirs_dtype).removeprefix("torch."),
            "speedup_vs_eager": round(eager / ours, 2)}


def run_txt2img(b: Bench, pipe, theirs, sizes):
    size = sizes[0][0]
    with kernels.backend("auto"):
        ours = b.time_ms(lambda: ours_image(pipe, size, 1), warmup=1, iters=5)
        eager = b.time_ms(lambda: theirs_image(theirs, size, 1), warmup=1, iters=3)
        memory = []
        for s, batch in sizes:
            pipe.release_cuda_graphs()  # each size's graphs and pool counted afresh
            memory.append({"size": s, "batch": batch, "tritonsd_peak_mb": b.peak_mb(lambda: ours_image(pipe, s, batch)),
                           "diffusers_eager_peak_mb": b.peak_mb(lambda: theirs_image(theirs, s, batch))})
            print(memory[-1], flush=True)
    weights = {"tritonsd_weights_mb": round(sum(t.numel() * t.element_size() for t in pipe.model.state_dict().values()) / 2**20, 1)}
    return {"size": size, "steps": STEPS, "tritonsd_ms": ours, "diffusers_eager_ms": eager,
            "speedup_vs_eager": round(eager / ours, 2), "memory_beyond_weights": memory, **weights}


def run_compiled(b: Bench, pipe, theirs, size, previous: dict):
    unet, decode = theirs.unet, theirs.vae.decode
    theirs.unet = torch.compile(unet, mode="reduce-overhead", fullgraph=True)
    theirs.vae.decode = torch.compile(decode, mode="reduce-overhead", fullgraph=True)
    try:
        b.sync()
        t0 = time.perf_counter()
        theirs_image(theirs, size, 1)
        b.sync()
        first = time.perf_counter() - t0
        image = b.time_ms(lambda: theirs_image(theirs, size, 1), warmup=1, iters=3)
        inputs = StepInputs(pipe, size, 1)
        with torch.inference_mode():
            step = b.time_ms(lambda: inputs.theirs(theirs.unet), warmup=3, iters=20)
            z = torch.randn(1, 4, size // 8, size // 8, device=b.device, dtype=their_vae_dtype(pipe, theirs))
            theirs.vae.to(z.dtype)
            vae = b.time_ms(lambda: theirs.vae.decode(z).sample, warmup=3, iters=10)
            theirs.vae.to(pipe.dtype)
    finally:
        theirs.unet, theirs.vae.decode = unet, decode
    result = {"size": size, "first_image_s_with_compilation": round(first, 1), "txt2img_ms": image,
              "unet_step_ms": step, "vae_decode_ms": vae}
    ours_step = next((r["tritonsd_ms"] for r in previous.get("unet_step", {}).get("rows", []) if r["size"] == size and r["batch"] == 1), None)
    if ours_step:
        result["tritonsd_step_speedup_vs_compiled"] = round(step / ours_step, 2)
    if "tritonsd_ms" in previous.get("vae_decode", {}):
        result["tritonsd_vae_speedup_vs_compiled"] = round(vae / previous["vae_decode"]["tritonsd_ms"], 2)
    if "tritonsd_ms" in previous.get("txt2img", {}):
        result["tritonsd_txt2img_speedup_vs_compiled"] = round(image / previous["txt2img"]["tritonsd_ms"], 2)
    return result


COLD_CHILD = """
import json, sys, time
t0 = time.perf_counter()
import torch
t_torch = time.perf_counter()
from tritonsd.engine.pipeline import Pipeline
t1 = time.perf_counter()
pipe = Pipeline.from_checkpoint(sys.argv[1], device=sys.argv[2], dtype=getattr(torch, sys.argv[3]))
t2 = time.perf_counter()
pipe.txt2img("a photograph of an astronaut riding a horse", steps=30, seed=0, width=int(sys.argv[4]), height=int(sys.argv[4]), output_type="np")
t3 = time.perf_counter()
print(json.dumps({"import_s": round(t1 - t0, 2), "import_torch_s": round(t_torch - t0, 2), "load_s": round(t2 - t1, 2), "first_image_s": round(t3 - t2, 2), "total_s": round(t3 - t0, 2)}))
"""


def run_cold_start(b: Bench, pipe, config, size, tmp: Path):
    path = tmp / "model.safetensors"
    loader.save(pipe.model, config, path, dtype=pipe.dtype)
    cache = tmp / "triton-cache"
    env = dict(os.environ, TRITON_CACHE_DIR=str(cache), TRITONSD_KERNELS="auto", PYTHONPATH=str(ROOT))
    result = {"checkpoint_mb": round(path.stat().st_size / 2**20, 1)}
    for name in ("empty_triton_cache", "warm_triton_cache"):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", COLD_CHILD, str(path), b.device.type, str(pipe.dtype).removeprefix("torch."), str(size)],
                              env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)
        wall = time.perf_counter() - t0
        if proc.returncode:
            raise RuntimeError(f"{name}: child failed: {proc.stderr[-2000:]}")
        result[name] = {**json.loads(proc.stdout.strip().splitlines()[-1]), "process_wall_s": round(wall, 2)}
    path.unlink()
    return result


def run_profile(b: Bench, pipe, size):
    from torch.profiler import ProfilerActivity, profile
    if b.device.type != "cuda":
        return {"skipped": "needs CUDA"}
    inputs = StepInputs(pipe, size, 1)
    with torch.inference_mode(), kernels.backend("auto"):
        for _ in range(2):
            inputs.eager_unet(pipe)
        b.sync()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            inputs.eager_unet(pipe)
            b.sync()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or getattr(e, "device_time_total", 0) > 0]
    total = sum(e.device_time_total for e in events) / 1e3
    top = sorted(events, key=lambda e: e.device_time_total, reverse=True)[:25]
    return {"size": size, "batch": 1, "gpu_ms_total": round(total, 3), "kernels": [
        {"name": e.key[:160], "calls": e.count, "ms": round(e.device_time_total / 1e3, 3),
         "share": round(e.device_time_total / 1e3 / total, 3)} for e in top]}


def run_layouts(b: Bench, pipe, size):
    inputs = StepInputs(pipe, size, 1)
    z = torch.randn(1, 4, size // 8, size // 8, device=b.device, dtype=pipe.dtype)
    result = {}
    variants = [("channels_last", torch.channels_last, False), ("nchw", torch.contiguous_format, False),
                ("channels_last_cudnn_benchmark", torch.channels_last, True)]
    with torch.inference_mode(), kernels.backend("auto"):
        for name, layout, autotune in variants:
            pipe.unet.to(memory_format=layout)
            pipe.vae.to(memory_format=layout)
            pipe.release_cuda_graphs()
            torch.backends.cudnn.benchmark = autotune
            result[name] = {"unet_step_ms": b.time_ms(lambda: inputs.ours(pipe), iters=20),
                            "vae_decode_ms": b.time_ms(lambda: pipe.decode(z))}
    torch.backends.cudnn.benchmark = False
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    pipe.release_cuda_graphs()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the figures here, section by section")
    parser.add_argument("--model", choices=sorted(MODELS), default="sd15")
    parser.add_argument("--skip", default="", help=f"comma-separated sections to leave out, of {','.join(SECTIONS)}")
    args = parser.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if skip - set(SECTIONS):
        parser.error(f"--skip takes sections of {','.join(SECTIONS)}; got {args.skip!r}")
    if not torch.cuda.is_available() and not args.model.startswith("tiny"):
        print("bench/e2e.py: needs a CUDA GPU (or --model tiny/tiny-sd2/tiny-sdxl to check the script on the CPU)",
              file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    b = Bench(device, args.json)
    sizes = MODELS[args.model]["sizes"]
    size = sizes[0][0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pipe, theirs, config = build(args.model, device, dtype, tmp)
        b.report["model"] = {"name": args.model, "dtype": str(dtype).removeprefix("torch."), "steps": STEPS,
                             "sampler": "euler", "guidance": GUIDANCE, "prediction_type": config.prediction_type}
        plan = [
            ("accuracy", run_accuracy, b, pipe, theirs, config, size),
            ("unet_step", run_unet_step, b, pipe, theirs, sizes),
            ("long_prompt", run_long_prompt, b, pipe, size),
            ("vae_decode", run_vae_decode, b, pipe, theirs, size),
            ("txt2img", run_txt2img, b, pipe, theirs, sizes),
            ("profile", run_profile, b, pipe, size),
            ("layouts", run_layouts, b, pipe, size),
            ("cold_start", run_cold_start, b, pipe, config, size, tmp),
            ("compiled", run_compiled, b, pipe, theirs, size, b.report["sections"]),
        ]
        for name, fn, *fn_args in plan:
            if name not in skip:
                b.section(name, fn, *fn_args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
