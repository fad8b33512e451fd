"""txt2img and img2img. Randomness, guidance and step order follow diffusers' StableDiffusionPipeline and
StableDiffusionImg2ImgPipeline, so the same seed gives the same image."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from tritonsd import kernels
from tritonsd.engine.config import ModelConfig
from tritonsd.engine.graphs import GraphCache
from tritonsd.engine.model import StableDiffusion
from tritonsd.engine.prompts import PromptTokenizer, encode_chunks
from tritonsd.engine.samplers import C_IN, COEFFICIENTS, TIMESTEP, SamplerPlan, make_plan
from tritonsd.engine.text_encoder import check_clip_skip
from tritonsd.engine.tokenizer import CLIPTokenizer

OUTPUT_TYPES = ("pil", "np", "latent")


class Pipeline:
    def __init__(self, model: StableDiffusion, tokenizer: CLIPTokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.unet, self.vae, self.text_encoder = model.unet, model.vae, model.text_encoder
        self.config: ModelConfig = model.config
        self.prompt_tokenizer = PromptTokenizer(tokenizer, self.config.text.vocab_size)
        # Pixels per latent: the VAE halves the size at every level but the last.
        self.vae_scale = 2 ** (len(self.config.vae.ch_mult) - 1)
        self.default_size = self.config.unet.sample_size * self.vae_scale
        self._graphs: GraphCache | None = None
        if self.device.type == "cuda":
            # cuDNN's fastest half-precision convolutions read and write NHWC; the GroupNorm kernel and the
            # attention's head split read either layout through strides.
            self.unet.to(memory_format=torch.channels_last)
            self.vae.to(memory_format=torch.channels_last)

    @classmethod
    def from_checkpoint(
        cls, path: str | Path | None = None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
        config: ModelConfig | None = None, prediction_type: str | None = None,
    ) -> "Pipeline":
        """Load an original single-file checkpoint, a diffusers folder or a tritonsd file (the demo model if no path).
        prediction_type ("epsilon" or "v_prediction") overrides what the checkpoint says its UNet predicts."""
        from tritonsd import loader

        model, tokenizer = loader.load(loader.default_model() if path is None else path, device=device, dtype=dtype,
                                       config=config, prediction_type=prediction_type)
        return cls(model, tokenizer)

    @property
    def device(self) -> torch.device:
        return self.unet.out[2].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.out[2].weight.dtype

    @torch.inference_mode()
    def encode_prompt(self, prompt: str | list[str], clip_skip: int = 1) -> torch.Tensor:
        """What the UNet attends to: [B, 77 * n, hidden] in the model dtype, for prompts in AUTOMATIC1111's syntax
        (tritonsd.engine.prompts), n the most chunks any of them takes; shorter prompts end in the empty prompt's
        chunk."""
        texts, _ = _prompt_lists(prompt, "")
        check_clip_skip(clip_skip, self.config.text.num_hidden_layers)
        batch = [self.prompt_tokenizer.chunks(text) for text in texts]
        return encode_chunks(
            batch, self.prompt_tokenizer.empty,
            lambda ids: self._run("text", self.text_encoder, ids.to(self.device), clip_skip),
        )

    def load_textual_inversion(self, path: str | Path, token: str | None = None) -> str:
        """Read a textual-inversion embedding (A1111's .pt or .safetensors, diffusers' learned_embeds) and return the
        word that names it in prompts: `token`, or else the file's name without its suffix."""
        from tritonsd.loader.embeddings import read_embedding

        vectors = read_embedding(path, self.config.text.hidden_size)
        name = Path(path).stem if token is None else token
        self.prompt_tokenizer.add_embedding(name, vectors)
        self.text_encoder.embeddings.extra = self.prompt_tokenizer.table.to(self.device, self.dtype)
        if self._graphs is not None:
            # The captured text-encoder graphs read the table that was just replaced.
            self._graphs.drop(lambda graph: graph[0] == "text")
        return name

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents [B, 4, h, w] -> images [B, 3, H, W] in [0, 1], float32."""
        image = self._run("decode", self.vae.decode, (latents / self.vae.scaling_factor).to(self.dtype))
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def release_cuda_graphs(self) -> None:
        """Drop the captured CUDA graphs and the memory they hold; the next call at each size captures again."""
        self._graphs = None

    def _run(self, name: str, fn, *args):
        """fn(*args), replayed from a CUDA graph on CUDA. The kernel mode is part of the key: it picks the code
        that a graph records."""
        if self.device.type != "cuda":
            return fn(*args)
        if self._graphs is None:
            self._graphs = GraphCache()
        return self._graphs((name, kernels.current_mode()), fn, *args)

    @torch.inference_mode()
    def txt2img(
        self, prompt: str | list[str], negative_prompt: str | list[str] = "", steps: int = 30, guidance_scale: float = 7.5,
        sampler: str = "euler", seed: int | None = None, width: int | None = None, height: int | None = None,
        batch_size: int = 1, output_type: str = "pil", progress: bool = False, clip_skip: int = 1,
    ):
        """width and height default to the size the model was trained at (512 for SD 1.x, 768 for SD 2.x v-models)."""
        prompts, negatives = _prompt_lists(prompt, negative_prompt)
        width = self.default_size if width is None else width
        height = self.default_size if height is None else height
        for name, size in (("width", width), ("height", height)):
            if not isinstance(size, int) or size <= 0 or size % 8:
                raise ValueError(f"{name} must be a positive multiple of 8, got {size!r}")
        _check_common(batch_size, guidance_scale, output_type)
        plan = make_plan(sampler, steps, prediction_type=self.config.prediction_type)
        generator = _generator(seed)
        context = self._context(prompts, negatives, batch_size, guidance_scale, clip_skip)
        shape = (len(prompts) * batch_size, self.config.unet.in_channels, height // self.vae_scale, width // self.vae_scale)
        latents = torch.randn(shape, generator=generator, dtype=torch.float32) * plan.init_scale
        latents = self._denoise(latents.to(self.device), context, plan, guidance_scale, generator, progress)
        return self._output(latents, output_type)

    @torch.inference_mode()
    def img2img(
        self, image, prompt: str | list[str], strength: float = 0.8, negative_prompt: str | list[str] = "", steps: int = 30,
        guidance_scale: float = 7.5, sampler: str = "euler", seed: int | None = None, batch_size: int = 1,
        output_type: str = "pil", progress: bool = False, clip_skip: int = 1,
    ):
        prompts, negatives = _prompt_lists(prompt, negative_prompt)
        _check_common(batch_size, guidance_scale, output_type)
        plan = make_plan(sampler, steps, strength, self.config.prediction_type)
        pixels = _image_tensor(image, self.vae_scale).to(self.device, self.dtype)
        generator = _generator(seed)
        context = self._context(prompts, negatives, batch_size, guidance_scale, clip_skip)
        mean, logvar = self.vae.encode(pixels)
        sample = mean.float() + torch.exp(0.5 * logvar.float()) * torch.randn(mean.shape, generator=generator).to(self.device)
        init = (self.vae.scaling_factor * sample).repeat(len(prompts) * batch_size, 1, 1, 1)
        noise = torch.randn(init.shape, generator=generator).to(self.device)
        p, q = plan.add_noise
        latents = self._denoise(p * init + q * noise, context, plan, guidance_scale, generator, progress)
        return self._output(latents, output_type)

    def _context(
        self, prompts: list[str], negatives: list[str], batch_size: int, guidance_scale: float, clip_skip: int,
    ) -> torch.Tensor:
        texts = negatives + prompts if guidance_scale > 1.0 else prompts
        return self.encode_prompt(texts, clip_skip).repeat_interleave(batch_size, dim=0)

    def _denoise(
        self, latents: torch.Tensor, context: torch.Tensor, plan: SamplerPlan, guidance_scale: float,
        generator: torch.Generator, progress: bool,
    ) -> torch.Tensor:
        """The sampling loop, with no host-device sync: every step's scalars go to the device once, as rows of
        (timestep, c_in, a, b, c, s, d, e), and the step noise is drawn up front, in the order diffusers draws it
        (nothing else draws in between). A plan that adds noise at some steps gets zeros at the others (s = 0
        there), so every step runs the same code and, on CUDA, replays one graph."""
        guided = guidance_scale > 1.0
        schedule = plan.schedule().to(self.device, torch.float32)
        guidance = torch.full((1,), guidance_scale, dtype=torch.float32, device=self.device) if guided else None
        extra = torch.zeros_like(latents) if plan.uses_extra else None
        noise = None
        if any(plan.noise_steps):
            noise = torch.stack([
                torch.randn(latents.shape, generator=generator) if drawn else torch.zeros(latents.shape)
                for drawn in plan.noise_steps
            ])
            noise = noise.pin_memory() if self.device.type == "cuda" else noise
        for i in tqdm(range(len(schedule)), disable=not progress, leave=False, desc="sampling"):
            noise_i = noise[i].to(self.device, non_blocking=True) if noise is not None else None
            latents, extra = self._run("step", self._step, latents, extra, noise_i, context, guidance, schedule[i])
        return latents.clone()

    def _step(self, x: torch.Tensor, extra, noise, context: torch.Tensor, guidance, row: torch.Tensor):
        """One denoising step: the UNet on the scaled latents (twice stacked under guidance), then guidance and the
        sampler update in one kernel. Latents stay float32; the UNet sees the model dtype."""
        x_in = (x * row[C_IN]).to(self.dtype)
        out = self.unet(torch.cat([x_in, x_in]) if guidance is not None else x_in, row[TIMESTEP], context)
        return kernels.guided_step(out, x, row[COEFFICIENTS], guidance, extra, noise)

    def _output(self, latents: torch.Tensor, output_type: str):
        if output_type == "latent":
            return latents
        image = self.decode(latents).permute(0, 2, 3, 1).cpu().numpy()
        if output_type == "np":
            return image
        return [Image.fromarray((im * 255).round().astype(np.uint8)) for im in image]


def _prompt_lists(prompt, negative_prompt) -> tuple[list[str], list[str]]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompt must be a string or a non-empty list of strings, got {type(prompt).__name__}")
    negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else negative_prompt
    if not isinstance(negatives, (list, tuple)) or not all(isinstance(n, str) for n in negatives):
        raise ValueError(f"negative_prompt must be a string or a list of strings, got {type(negative_prompt).__name__}")
    if len(negatives) != len(prompts):
        raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts; give one per prompt or a single string")
    return list(prompts), list(negatives)


def _check_common(batch_size: int, guidance_scale: float, output_type: str) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(guidance_scale, (int, float)) or not np.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"unknown output_type {output_type!r}; choose one of {', '.join(OUTPUT_TYPES)}")


def _generator(seed: int | None) -> torch.Generator:
    """One CPU generator for every draw, as diffusers with a CPU generator: the same seed gives the same image on any device."""
    if seed is None:
        seed = random.randrange(2**63)
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return torch.Generator("cpu").manual_seed(seed)


def _image_tensor(image, multiple: int) -> torch.Tensor:
    """A PIL image, a path or an HWC array -> [1, 3, H, W] in [-1, 1], sized down to multiples of the VAE's
    downsampling factor (8 for SD1.x) as diffusers does."""
    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as f:
                f.load()
                image = f.copy()
        except (OSError, UnidentifiedImageError) as e:
            raise ValueError(f"cannot read image {str(image)!r}: {e}") from None
    elif isinstance(image, np.ndarray):
        array = image
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
            raise ValueError(f"image array must be HxW, HxWx3 or HxWx4, got shape {image.shape}")
        if array.dtype != np.uint8:
            array = (np.clip(array.astype(np.float64), 0.0, 1.0) * 255).round().astype(np.uint8)
        image = Image.fromarray(array)
    if not isinstance(image, Image.Image):
        raise ValueError(f"image must be a PIL image, a path or a numpy array, got {type(image).__name__}")
    image = image.convert("RGB")
    w, h = image.size
    w, h = w - w % multiple, h - h % multiple
    if w == 0 or h == 0:
        raise ValueError(f"image of size {image.size} is smaller than {multiple}x{multiple} pixels")
    image = image.resize((w, h), resample=Image.LANCZOS)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    return 2.0 * x - 1.0
