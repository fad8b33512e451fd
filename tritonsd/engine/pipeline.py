"""txt2img and img2img. Randomness, guidance and step order follow diffusers' StableDiffusionPipeline and
StableDiffusionImg2ImgPipeline (for SDXL, StableDiffusionXLPipeline and StableDiffusionXLImg2ImgPipeline), so the
same seed gives the same image."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from tritonsd import kernels
from tritonsd.engine import memory
from tritonsd.engine.config import SIZE_EMBEDDING_DIM, ModelConfig
from tritonsd.engine.graphs import GraphCache
from tritonsd.engine.lora import CheckpointBase, CopiedBase, LoraSet, extract_lora_tags, find_lora
from tritonsd.engine.model import StableDiffusion
from tritonsd.engine.prompts import PromptTokenizer, encode_chunks
from tritonsd.engine.samplers import C_IN, COEFFICIENTS, TIMESTEP, SamplerPlan
from tritonsd.engine.settings import (
    Settings, SettingError, check_config, check_device, check_dtype, check_path, prompt_lists, read_image,
    read_latents,
)
from tritonsd.engine.text_encoder import applies_clip_skip, check_clip_skip
from tritonsd.engine.tokenizer import CLIPTokenizer
from tritonsd.engine.unet import timestep_embedding
from tritonsd.loader.formats import CheckpointError

logger = logging.getLogger(__name__)


class NonFiniteError(ValueError):
    """A stage of a generation gave NaN or Inf values."""


class Pipeline:
    def __init__(self, model: StableDiffusion, tokenizer: CLIPTokenizer, checkpoint: str | Path | None = None,
                 lora_dirs=()):
        """checkpoint: the file or folder the model was loaded from, where LoRAs read its base weights back;
        without it, the weights a LoRA touches are copied in memory first."""
        self.model = model
        self.tokenizer = tokenizer
        self.unet, self.vae, self.text_encoder = model.unet, model.vae, model.text_encoder
        self.text_encoders = model.text_encoders
        self.config: ModelConfig = model.config
        self.prompt_tokenizer = PromptTokenizer(tokenizer, self.config.text.vocab_size)
        # The towers read the same chunks, each padded with its own token (SDXL: CLIP-L its end token, bigG "!").
        self.pad_ids = tuple(tokenizer.with_pad_token(tower.pad_token).pad_id for tower in self.config.towers)
        self._set_vae_precision(self.config.vae.force_upcast)
        # Pixels per latent: the VAE halves the size at every level but the last.
        self.vae_scale = 2 ** (len(self.config.vae.ch_mult) - 1)
        self.default_size = self.config.unet.sample_size * self.vae_scale
        self._graphs: GraphCache | None = None
        self._told_clip_skip = False  # the warning that SD 2.x ignores clip_skip is given once
        self._loras = LoraSet(model, CheckpointBase(checkpoint) if checkpoint is not None else CopiedBase())
        self.lora_dirs = [Path(d) for d in lora_dirs]
        if self.device.type == "cuda":
            # cuDNN's fastest half-precision convolutions read and write NHWC; the GroupNorm kernel and the
            # attention's head split read either layout through strides.
            self.unet.to(memory_format=torch.channels_last)
            self.vae.to(memory_format=torch.channels_last)

    @classmethod
    def from_checkpoint(
        cls, path: str | Path | None = None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
        config: ModelConfig | None = None, prediction_type: str | None = None, vae: str | Path | None = None,
        lora_dirs=(),
    ) -> "Pipeline":
        """Load an original single-file checkpoint, a diffusers folder or a tritonsd file (the demo model if no path),
        with the VAE of a separate file if given. prediction_type ("epsilon" or "v_prediction") overrides what the
        checkpoint says its UNet predicts. lora_dirs: folders where <lora:NAME> prompt tags find NAME.*"""
        from tritonsd import loader

        path = loader.default_model() if path is None else check_path("path", path)
        check_device(device)
        check_dtype(dtype)
        check_config(config)
        model, tokenizer = loader.load(path, device=device, dtype=dtype, config=config, prediction_type=prediction_type)
        pipe = cls(model, tokenizer, checkpoint=path, lora_dirs=lora_dirs)
        if vae is not None:
            pipe.load_vae(vae)
        return pipe

    def _set_vae_precision(self, force_upcast: bool) -> None:
        """A VAE whose activations overflow float16 (force_upcast: SDXL's) runs in bfloat16 when the model runs in
        float16: bfloat16 has float32's exponent range, so nothing overflows, at float16's memory and speed (diffusers
        decodes in float32 instead). Where the GPU has no bfloat16, float32."""
        dtype = self.dtype
        if force_upcast and dtype == torch.float16:
            bf16 = self.device.type != "cuda" or torch.cuda.is_bf16_supported()
            dtype = torch.bfloat16 if bf16 else torch.float32
        self.vae.to(dtype)

    @property
    def vae_dtype(self) -> torch.dtype:
        return self.vae.post_quant_conv.weight.dtype

    def load_vae(self, path: str | Path) -> None:
        """Replace the VAE's weights with a separate VAE file's or diffusers vae/ folder's (same architecture), in
        place. Nothing changes if the file does not fit. On SDXL, a diffusers folder whose config.json says force_upcast
        false (the fp16-fix VAE's) then runs in the model's dtype."""
        from tritonsd.loader import _mismatches
        from tritonsd.loader.vae import read_vae, read_vae_force_upcast

        state = read_vae(path, self.dtype, self.device)
        # Read before any weight changes, so that a VAE folder with an unreadable config changes nothing.
        upcast = read_vae_force_upcast(path)
        current = {f"vae.{k}": t for k, t in self.vae.state_dict(keep_vars=True).items()}
        problems = [f"{len(items)} {what} tensor(s): {', '.join(items[:5])}{', ...' if len(items) > 5 else ''}"
                    for what, items in zip(("missing", "unexpected", "wrongly shaped"), _mismatches(state, current)) if items]
        if problems:
            raise CheckpointError(f"{path}: does not fit this model's VAE; " + "; ".join(problems))
        with torch.no_grad():
            for name, t in state.items():
                current[name].copy_(t)
        # Only a model whose own VAE overflows float16 (SDXL) reads the flag: diffusers writes force_upcast into every
        # VAE config, SD 1.x's included, whose pipelines never read it.
        if self.config.vae.force_upcast and upcast is not None:
            self._set_vae_precision(upcast)

    # --- LoRA --------------------------------------------------------------------------------------------------

    def load_lora(self, path: str | Path, scale: float = 1.0, name: str | None = None) -> str:
        """Apply a LoRA/LyCORIS file to the UNet and text encoder at `scale`; returns its name (default: the file
        name without extension). Several LoRAs add up. Loading a name already loaded is an error."""
        return self._loras.load(path, scale, name)

    def set_lora_scale(self, name: str, scale: float) -> None:
        self._loras.set_scale(name, scale)

    def unload_lora(self, name: str | None = None) -> None:
        """Remove one LoRA, or all; the weights they touched return to the checkpoint's, bit for bit."""
        self._loras.unload(name)

    @property
    def loras(self) -> dict[str, float]:
        """{name: scale} of the LoRAs loaded with load_lora."""
        return self._loras.scales

    def lora_hashes(self, prompt: str) -> dict[str, str]:
        """{name: AUTOMATIC1111's short hash} of every LoRA a call with this prompt applies: those loaded, then
        the prompt's <lora:NAME> tags."""
        from tritonsd.loader.lora import short_hash

        hashes = self._loras.hashes(list(self.loras))
        for name, _ in extract_lora_tags(prompt)[1]:
            if name not in hashes:
                hashes[name] = short_hash(find_lora(name, self.lora_dirs))
        return hashes

    def _prompt_loras(self, prompts: list[str], negatives: list[str]) -> tuple[list[str], dict]:
        """The prompts without their <lora:NAME:WEIGHT> tags, and the LoRAs they apply for this call. Every prompt
        of a call must name the same LoRAs, as they change the weights all images share."""
        parsed = [extract_lora_tags(p) for p in prompts]
        tags = parsed[0][1]
        if any(sorted(t) != sorted(tags) for _, t in parsed[1:]):
            raise ValueError("the prompts of one call name different LoRAs (<lora:...> tags); "
                             "they share the model's weights, so give them in separate calls")
        if any(extract_lora_tags(n)[1] for n in negatives):
            raise ValueError("<lora:...> tags apply in the prompt, not in the negative prompt")
        names = [name for name, _ in tags]
        if len(set(names)) != len(names):
            raise ValueError(f"a prompt names the same LoRA twice: {', '.join(sorted(names))}")
        loras = {name: (None if name in self.loras else self._loras.read(find_lora(name, self.lora_dirs)), weight)
                 for name, weight in tags}
        return [p for p, _ in parsed], loras

    @property
    def device(self) -> torch.device:
        return self.unet.out[2].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.out[2].weight.dtype

    def encode_prompt(self, prompt: str | list[str], clip_skip: int = 1) -> torch.Tensor:
        """What the UNet attends to: [B, 77 * n, hidden] in the model dtype, for prompts in AUTOMATIC1111's syntax
        (tritonsd.engine.prompts), n the most chunks any of them takes; shorter prompts end in the empty prompt's
        chunk. With two text towers (SDXL), hidden is both towers' widths, the first's states first."""
        return self.encode(prompt, clip_skip)[0]

    @torch.inference_mode()
    def encode(self, prompt: str | list[str], clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(encode_prompt's conditioning, the pooled embedding [B, projection] of the last tower or None where it
        has none). A prompt of several chunks has its first chunk's pooled embedding, as AUTOMATIC1111 takes it.
        clip_skip applies to every tower, but SD 2.x takes none, as in AUTOMATIC1111 (applies_clip_skip)."""
        texts, _ = prompt_lists(prompt, "")
        for encoder in self.text_encoders:
            check_clip_skip(clip_skip, encoder.clip_skip_range)
        if clip_skip > 1 and not applies_clip_skip(self.config):
            if not self._told_clip_skip:
                logger.warning("clip_skip %d is ignored: as in AUTOMATIC1111, SD 2.x's OpenCLIP text encoder takes no "
                               "clip skip (it already stops at its penultimate layer)", clip_skip)
                self._told_clip_skip = True
            clip_skip = 1
        batch = [self.prompt_tokenizer.chunks(text) for text in texts]
        hidden, pooled = [], None
        for i, (encoder, pad_id) in enumerate(zip(self.text_encoders, self.pad_ids)):
            def run(ids, name=f"text{i}", encoder=encoder):
                return self._run(name, encoder, ids.to(self.device), clip_skip)

            states, pooled = encode_chunks(batch, self.prompt_tokenizer.empty, run, pad_id)
            hidden.append(states)
        context = _finite(torch.cat(hidden, dim=-1), "text encoder")
        return context, None if pooled is None else _finite(pooled, "text encoder")

    def load_textual_inversion(self, path: str | Path, token: str | None = None) -> str:
        """Read a textual-inversion embedding (A1111's .pt or .safetensors, diffusers' learned_embeds; for SDXL, a
        file of clip_l and clip_g vectors, the refiner reading clip_g) and return the word that names it in prompts:
        `token`, or else the file's name without its suffix."""
        from tritonsd.loader.embeddings import read_embedding, read_sdxl_embedding

        if self.config.conditioning == "none":
            vectors = read_embedding(path, self.config.text.hidden_size)
        else:
            # SDXL's embeddings name each tower's vectors: clip_l for CLIP ViT-L, clip_g for bigG (the pooled tower).
            vectors = read_sdxl_embedding(path, {"clip_g" if tower.projection_dim else "clip_l": tower.hidden_size
                                                 for tower in self.config.towers})
        name = Path(path).stem if token is None else token
        self.prompt_tokenizer.add_embedding(name, vectors)
        for encoder, table in zip(self.text_encoders, self.prompt_tokenizer.tables):
            encoder.embeddings.extra = table.to(self.device, self.dtype)
        if self._graphs is not None:
            # The captured text-encoder graphs read the tables that were just replaced.
            self._graphs.drop(lambda graph: graph[0].startswith("text"))
        return name

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents [B, 4, h, w] -> images [B, 3, H, W] in [0, 1], float32."""
        image = self._run("decode", self.vae.decode, (latents / self.vae.scaling_factor).to(self.vae_dtype))
        return (_finite(image, "VAE decode").float() / 2 + 0.5).clamp(0, 1)

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

    def txt2img(
        self, prompt: str | list[str], negative_prompt: str | list[str] = "", steps: int = 30, guidance_scale: float = 7.5,
        sampler: str = "euler", seed: int | None = None, width: int | None = None, height: int | None = None,
        batch_size: int = 1, output_type: str = "pil", progress: bool = False, clip_skip: int = 1,
        **sdxl,
    ):
        """width and height default to the size the model was trained at (512 for SD 1.x, 768 for SD 2.x v-models,
        1024 for SDXL). SDXL's options (Settings): original_size, target_size, crops_coords_top_left, their
        negative_ forms, and denoising_end (stop early, output_type="latent", for the refiner's img2img)."""
        settings = Settings(
            prompt, negative_prompt, steps=steps, guidance_scale=guidance_scale, sampler=sampler, seed=seed,
            width=width, height=height, batch_size=batch_size, output_type=output_type, clip_skip=clip_skip, **sdxl,
        )
        return self.generate(settings, progress=progress)

    def img2img(
        self, image, prompt: str | list[str], strength: float = 0.8, negative_prompt: str | list[str] = "", steps: int = 30,
        guidance_scale: float = 7.5, sampler: str = "euler", seed: int | None = None, batch_size: int = 1,
        output_type: str = "pil", progress: bool = False, clip_skip: int = 1, **sdxl,
    ):
        """image: a picture (read_image), or latents [1 or B, 4, h, w] as txt2img's output_type="latent" gives them.
        SDXL's options (Settings): original_size, target_size, crops_coords_top_left, aesthetic_score (refiner),
        their negative_ forms, denoising_start (in place of strength: no noise is added; the base's denoising_end
        run continued) and denoising_end."""
        settings = Settings(
            prompt, negative_prompt, steps=steps, guidance_scale=guidance_scale, sampler=sampler, seed=seed,
            batch_size=batch_size, strength=strength, output_type=output_type, clip_skip=clip_skip, **sdxl,
        )
        return self.generate(settings, image, progress=progress)

    def check(self, settings: Settings, image=None) -> None:
        """Raise what `generate(settings, image)` would refuse before starting: an image without a strength or the
        reverse, an unreadable or oversized image, a cut that leaves this model's schedule no step, or a memory
        estimate that does not fit."""
        self._prepare(settings, image)

    def _prepare(self, settings: Settings, image) -> tuple[Image.Image | torch.Tensor | None, int, int, SamplerPlan]:
        """(img2img's picture, or latents, or None; width, height; the sampler's run) of a run that has passed
        `check`."""
        settings.check_conditioning(self.config.conditioning, self.config.family)
        plan = settings.plan(self.config)
        picture = None
        if settings.strength is None:
            if image is not None:
                raise SettingError("image", "is given but strength is not; img2img needs both")
            width = self.default_size if settings.width is None else settings.width
            height = self.default_size if settings.height is None else settings.height
        elif isinstance(image, torch.Tensor):
            picture = read_latents(image, self.config.unet.in_channels, settings.images, self.vae_scale)
            height, width = (side * self.vae_scale for side in picture.shape[-2:])
        else:
            picture = read_image(image)
            # Sized down to multiples of the VAE's factor (8 for SD 1.x), as diffusers does.
            width, height = (side - side % self.vae_scale for side in picture.size)
            if width == 0 or height == 0:
                raise SettingError("image", f"of size {picture.size} is smaller than {self.vae_scale}x{self.vae_scale} pixels")
        need = memory.estimate(self.config, self.device, self.dtype, settings, plan, width, height, self.vae_dtype)
        memory.check(need, self.device)
        return picture, width, height, plan

    @torch.inference_mode()
    def generate(self, settings: Settings, image=None, progress: bool = False):
        """Run `settings`: txt2img, or img2img of `image` when settings.strength is set. What `check` refuses is
        refused before any work; a stage that gives NaN or Inf raises NonFiniteError naming it."""
        picture, width, height, plan = self._prepare(settings, image)
        generator = torch.Generator("cpu").manual_seed(settings.seed)
        negatives = list(settings.negative_prompts)
        prompts, loras = self._prompt_loras(list(settings.prompts), negatives)
        # The prompts' <lora:...> tags change the weights for this call only; the VAE is never touched by one.
        with self._loras.temporarily(loras):
            context, y = self._conditioning(prompts, negatives, settings, width, height)
            if settings.strength is None:
                shape = (settings.images, self.config.unet.in_channels, height // self.vae_scale, width // self.vae_scale)
                latents = torch.randn(shape, generator=generator, dtype=torch.float32) * plan.init_scale
                latents = latents.to(self.device)
            else:
                if isinstance(picture, torch.Tensor):
                    init = picture.to(self.device, torch.float32)
                else:
                    pixels = _pixels(picture, width, height).to(self.device, self.vae_dtype)
                    mean, logvar = self.vae.encode(pixels)
                    sample = mean.float() + torch.exp(0.5 * logvar.float()) * torch.randn(mean.shape, generator=generator).to(self.device)
                    init = _finite(self.vae.scaling_factor * sample, "VAE encode")
                init = init.expand(settings.images, -1, -1, -1).clone()
                if settings.denoising_start is None:
                    noise = torch.randn(init.shape, generator=generator).to(self.device)
                    p, q = plan.add_noise
                    latents = p * init + q * noise
                else:
                    # A run continued where another stopped (denoising_end): its latents already hold that noise.
                    latents = init
            latents = self._denoise(latents, context, y, plan, settings.guidance_scale, generator, progress)
        return self._output(_finite(latents, "UNet sampling"), settings.output_type)

    def _conditioning(
        self, prompts: list[str], negatives: list[str], settings: Settings, width: int, height: int,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(The UNet's context, SDXL's conditioning vector y or None), one row per image, negatives first under
        guidance."""
        guided = settings.guided
        texts = negatives + prompts if guided else prompts
        context, pooled = self.encode(texts, settings.clip_skip)
        y = None
        if self.config.conditioning != "none":
            if guided and self.config.conditioning == "size":
                # SDXL base conditions an empty negative prompt on zeros, its text and its pooled embedding alike
                # (diffusers' force_zeros_for_empty_prompt, which the refiner's config turns off; A1111 does the
                # same). Each prompt's negative on its own.
                empty = torch.tensor([n == "" for n in negatives] + [False] * len(prompts), device=context.device)
                context = torch.where(empty[:, None, None], torch.zeros_like(context), context)
                pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
            positive, negative = self._size_numbers(settings, width, height)
            numbers = [negative] * len(negatives) + [positive] * len(prompts) if guided else [positive] * len(prompts)
            y = conditioning_vector(pooled, torch.tensor(numbers, dtype=torch.float32, device=pooled.device))
            y = y.repeat_interleave(settings.batch_size, dim=0)
        return context.repeat_interleave(settings.batch_size, dim=0), y

    def _size_numbers(self, settings: Settings, width: int, height: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The numbers label_emb embeds for the prompt and its negative: original size, crop top-left and target
        size (base) or aesthetic score (refiner), sizes as (height, width) and the crop as (top, left), as diffusers'
        add_time_ids. Unset sizes are the image's; an unset negative is the prompt's."""
        s = settings
        original = s.original_size or (height, width)
        crop = s.crops_coords_top_left
        negative_original = s.negative_original_size or original
        negative_crop = crop if s.negative_crops_coords_top_left is None else s.negative_crops_coords_top_left
        if self.config.conditioning == "size":
            target = s.target_size or (height, width)
            return (*original, *crop, *target), (*negative_original, *negative_crop, *(s.negative_target_size or target))
        return (*original, *crop, s.aesthetic_score), (*negative_original, *negative_crop, s.negative_aesthetic_score)

    def _denoise(
        self, latents: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None, plan: SamplerPlan,
        guidance_scale: float, generator: torch.Generator, progress: bool,
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
            latents, extra = self._run("step", self._step, latents, extra, noise_i, context, y, guidance, schedule[i])
        return latents.clone()

    def _step(self, x: torch.Tensor, extra, noise, context: torch.Tensor, y, guidance, row: torch.Tensor):
        """One denoising step: the UNet on the scaled latents (twice stacked under guidance), then guidance and the
        sampler update in one kernel. Latents stay float32; the UNet sees the model dtype. y: SDXL's conditioning
        vector, an input like the context."""
        x_in = (x * row[C_IN]).to(self.dtype)
        out = self.unet(torch.cat([x_in, x_in]) if guidance is not None else x_in, row[TIMESTEP], context, y)
        return kernels.guided_step(out, x, row[COEFFICIENTS], guidance, extra, noise)

    def _output(self, latents: torch.Tensor, output_type: str):
        if output_type == "latent":
            return latents
        image = self.decode(latents).permute(0, 2, 3, 1).cpu().numpy()
        if output_type == "np":
            return image
        return [Image.fromarray((im * 255).round().astype(np.uint8)) for im in image]


def conditioning_vector(pooled: torch.Tensor, numbers: torch.Tensor) -> torch.Tensor:
    """SDXL's label_emb input [B, pooled + 256·k] in float32: the pooled text embedding, then each of the k numbers
    per row [B, k] as a 256-wide sinusoidal embedding, the timesteps' own (diffusers' add_time_proj,
    Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0))."""
    embedded = timestep_embedding(numbers.flatten(), SIZE_EMBEDDING_DIM).reshape(numbers.shape[0], -1)
    return torch.cat([pooled.float(), embedded], dim=1)


def _finite(x: torch.Tensor, stage: str) -> torch.Tensor:
    """x, if every value is finite. One host sync per stage, never per step."""
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteError(
            f"NaN or Inf values after the {stage}: the model's weights (or its VAE scaling factor) hold some, or its "
            "arithmetic overflowed (in float16, float32 may help)"
        )
    return x


def _pixels(picture: Image.Image, width: int, height: int) -> torch.Tensor:
    """An RGB picture -> [1, 3, height, width] in [-1, 1]."""
    picture = picture.resize((width, height), resample=Image.LANCZOS)
    x = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    return 2.0 * x - 1.0
