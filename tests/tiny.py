"""Tiny Stable Diffusion models for tests: configs that exercise every structure of the SD 1.x, SD 2.x and SDXL graphs,
random weights, and those weights written the ways people have them: an original single file (.safetensors or .ckpt,
SD 2.x's and SDXL's OpenCLIP towers in OpenCLIP's layout) and a diffusers folder produced by diffusers' and
transformers' own conversion and save code."""

import dataclasses
import gzip
import json
import os
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from tritonsd.engine.config import SIZE_EMBEDDING_DIM, ModelConfig
from tritonsd.engine.model import StableDiffusion
from tritonsd.loader.convert import OPEN_CLIP_PREFIX, to_original

# Two levels so there are down/upsamplers; attention at both; a channel change so ResBlocks have skip convolutions;
# norm_groups 8 and heads 2 so nothing silently relies on the SD1.x values; the real CLIP vocabulary so the real
# tokenizer's ids fit.
TINY = ModelConfig.from_dict({
    "unet": dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=2, attention_resolutions=(2, 1), num_heads=2,
                 transformer_depth=1, context_dim=32, norm_groups=8),
    "vae": dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, scaling_factor=0.25, norm_groups=8),
    "text": dict(vocab_size=49408, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=77),
})

# SD 2.x's structure at the same sizes: heads of a fixed width (16: 2 heads at 32 channels, 4 at 64), Linear
# transformer projections, a GELU text tower padding with "!". Its original files hold one more text block than the
# model runs, as SD 2.x's hold 24 of which 23 run.
TINY_SD2 = ModelConfig.from_dict({
    **TINY.to_dict(),
    "unet": {**TINY.to_dict()["unet"], "num_heads": -1, "num_head_channels": 16, "use_linear_in_transformer": True},
    "text": {**TINY.to_dict()["text"], "hidden_act": "gelu", "pad_token": "!"},
})
TINY_SD2_V = dataclasses.replace(TINY_SD2, prediction_type="v_prediction")

# SDXL's structure: three levels, the first without attention, transformer depths that differ by level (the middle
# block takes the last level's), a CLIP-L-like and a bigG-like tower of different widths both read at their
# penultimate layer, the second with a text projection to a third width, label_emb fed by the pooled embedding and six
# 256-wide size embeddings; a VAE that is not decoded in float16.
_TINY_TEXT = TINY.to_dict()["text"]
_TINY_BIG_G = {**_TINY_TEXT, "hidden_size": 48, "num_hidden_layers": 3, "num_attention_heads": 3,
               "intermediate_size": 96, "hidden_act": "gelu", "pad_token": "!", "hidden_layer": "penultimate",
               "projection_dim": 40}
TINY_SDXL = ModelConfig.from_dict({
    "unet": dict(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions=(4, 2),
                 num_heads=-1, num_head_channels=16, transformer_depth=(0, 1, 2), context_dim=32 + 48,
                 use_linear_in_transformer=True, norm_groups=8, adm_in_channels=40 + 6 * 256),
    "vae": {**TINY.to_dict()["vae"], "scaling_factor": 0.13025, "force_upcast": True},
    "text": {**_TINY_TEXT, "num_hidden_layers": 3, "hidden_layer": "penultimate"},
    "text_2": _TINY_BIG_G,
    "conditioning": "size",
    "timestep_spacing": "leading",
})
# The refiner's: four levels, attention at the middle two, bigG alone, five conditioning numbers (aesthetic score).
TINY_SDXL_REFINER = ModelConfig.from_dict({
    "unet": dict(model_channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attention_resolutions=(4, 2),
                 num_heads=-1, num_head_channels=16, transformer_depth=2, context_dim=48,
                 use_linear_in_transformer=True, norm_groups=8, adm_in_channels=40 + 5 * 256),
    "vae": TINY_SDXL.to_dict()["vae"],
    "text": _TINY_BIG_G,
    "conditioning": "aesthetic",
    "timestep_spacing": "leading",
})
# The diffusers scheduler of each sampler, built from SD 1.5's scheduler config (SD 2.x's is the same, with the model's
# prediction type; SDXL's adds "leading" timestep spacing).
SCHEDULERS = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
}
SD15_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False, "skip_prk_steps": True, "trained_betas": None,
}
# Stability's scheduler/scheduler_config.json for SDXL 1.0, base and refiner alike (EulerDiscreteScheduler's): SD 1.5's
# schedule with "leading" timestep spacing, which from_config carries to every scheduler.
SDXL_SCHEDULER_CONFIG = {
    **SD15_SCHEDULER_CONFIG, "interpolation_type": "linear", "prediction_type": "epsilon", "sample_max_value": 1.0,
    "timestep_spacing": "leading", "use_karras_sigmas": False,
}


def diffusers_scheduler(sampler: str, prediction_type: str = "epsilon", timestep_spacing: str = "default",
                        config: dict = SD15_SCHEDULER_CONFIG):
    """diffusers' scheduler for one of our samplers, from a scheduler config (SD 1.5's, which names no spacing), with
    the model's prediction type and, unless "default", timestep_spacing set."""
    import diffusers

    cls_name, extra = SCHEDULERS[sampler]
    spacing = {} if timestep_spacing == "default" else {"timestep_spacing": timestep_spacing}
    return getattr(diffusers, cls_name).from_config({**config, **extra, "prediction_type": prediction_type, **spacing})


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return ((a - b).norm() / b.norm()).item()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


SCHEDULE_BUFFERS = ["betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2"]


def random_state(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Engine-named float32 weights at the scale of a trained model: unit-variance outputs from linear layers,
    norms near 1, small biases."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, meta in StableDiffusion.on_meta(config).state_dict().items():
        t = torch.randn(meta.shape, generator=gen)
        if meta.ndim >= 2:
            t /= (meta[0].numel()) ** 0.5
        elif name.endswith(".weight"):
            t = 1 + 0.1 * t
        else:
            t *= 0.1
        state[name] = t
    return state


def open_clip_text_tower(text: dict[str, torch.Tensor], unused_block: bool = True) -> dict[str, torch.Tensor]:
    """HF CLIPTextModel(WithProjection) names (without text_model.) -> OpenCLIP's, as SD 2.x's and SDXL's original
    files store the tower: one attention input projection per block with q, k and v stacked (in_proj_weight,
    in_proj_bias), ln_1/ln_2, mlp.c_fc/c_proj, positional_embedding, token_embedding, ln_final, text_projection (a
    [width, projection] matrix applied as x @ P: HF's weight transposed; the identity where the model has none) and
    logit_scale. unused_block adds what SD 2.x's files hold and never run: a last block (the one before it, rolled and
    scaled, so a loader that ran it would differ)."""
    blocks = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc",
              "mlp.fc2": "mlp.c_proj"}
    out = {
        "token_embedding.weight": text["embeddings.token_embedding.weight"],
        "positional_embedding": text["embeddings.position_embedding.weight"],
        "ln_final.weight": text["final_layer_norm.weight"],
        "ln_final.bias": text["final_layer_norm.bias"],
    }
    layers = sorted({int(k.split(".")[2]) for k in text if k.startswith("encoder.layers.")})
    for i in layers:
        layer = f"encoder.layers.{i}."
        for param in ("weight", "bias"):
            out[f"transformer.resblocks.{i}.attn.in_proj_{param}"] = torch.cat(
                [text[f"{layer}self_attn.{p}_proj.{param}"] for p in "qkv"])
            for ours, theirs in blocks.items():
                out[f"transformer.resblocks.{i}.{theirs}.{param}"] = text[f"{layer}{ours}.{param}"]
    last = len(layers)
    if unused_block:
        for k in [k for k in out if k.startswith(f"transformer.resblocks.{last - 1}.")]:
            out[k.replace(f"resblocks.{last - 1}.", f"resblocks.{last}.")] = 1.5 * out[k].roll(1, 0)
    ln = text["final_layer_norm.weight"]
    projection = text.get("text_projection.weight")
    out["text_projection"] = (torch.eye(ln.shape[0], dtype=ln.dtype, device=ln.device) if projection is None
                              else projection.T.contiguous())
    out["logit_scale"] = torch.tensor(4.6052, dtype=ln.dtype, device=ln.device)
    return out


def original_checkpoint(state: dict, text_prefix: bool = True, extras: bool = True,
                         open_clip: bool = False) -> dict[str, torch.Tensor]:
    """Engine names -> an original CompVis checkpoint's names, the text tower in OpenCLIP's layout if open_clip (SD
    2.x); extras adds what real files carry beside the weights: EMA copies (flattened names), the noise schedule, and
    CLIP's position_ids."""
    ckpt = to_original({k: t for k, t in state.items() if not (open_clip and k.startswith("text_encoder."))},
                       old_text_names=not text_prefix)
    if open_clip:
        tower = {k.removeprefix("text_encoder."): t for k, t in state.items() if k.startswith("text_encoder.")}
        ckpt.update((OPEN_CLIP_PREFIX + k, t) for k, t in open_clip_text_tower(tower).items())
    if extras:
        ckpt["model_ema.decay"] = torch.tensor(0.9999)
        ckpt["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
        for name, t in state.items():
            if name.startswith("unet."):
                ckpt["model_ema.diffusion_model" + name[len("unet."):].replace(".", "")] = t * 0.5
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        ckpt.update({k: betas.float() * (i + 1) for i, k in enumerate(SCHEDULE_BUFFERS)})
        if not open_clip:
            ckpt |= to_original({"text_encoder.embeddings.position_ids": torch.arange(77)[None]}, not text_prefix)
    return ckpt


# Where SDXL's original files keep their towers: CLIP-L in HF's names, bigG in OpenCLIP's layout; the refiner has
# bigG alone, as embedder 0.
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_BIG_G_PREFIX = {"base": "conditioner.embedders.1.model.", "refiner": "conditioner.embedders.0.model."}


def original_sdxl_checkpoint(state: dict, extras: bool = True) -> dict[str, torch.Tensor]:
    """Engine names of an SDXL base or refiner -> its original single file's (sd_xl_base_1.0.safetensors layout);
    extras adds CLIP-L's position_ids, as the released files have them."""
    ckpt = to_original({k: t for k, t in state.items() if k.split(".")[0] in ("unet", "vae")})
    base = any(k.startswith("text_encoder_2.") for k in state)
    big_g = "text_encoder_2." if base else "text_encoder."
    tower = {k.removeprefix(big_g): t for k, t in state.items() if k.startswith(big_g)}
    ckpt.update((SDXL_BIG_G_PREFIX["base" if base else "refiner"] + k, t)
                for k, t in open_clip_text_tower(tower, unused_block=False).items())
    if base:
        ckpt.update((SDXL_CLIP_L_PREFIX + k.removeprefix("text_encoder."), t)
                    for k, t in state.items() if k.startswith("text_encoder."))
        if extras:
            ckpt[SDXL_CLIP_L_PREFIX + "embeddings.position_ids"] = torch.arange(77)[None]
    return ckpt


def original_sdxl_config(config: ModelConfig) -> dict:
    """The sgm YAML shape (sd_xl_base.yaml, sd_xl_refiner.yaml) that diffusers' single-file conversion reads: the
    UNet's label_emb is num_classes "sequential" of adm_in_channels inputs."""
    original = original_config(config)
    unet = original["model"]["params"].pop("unet_config")
    unet["params"].update(num_classes="sequential", adm_in_channels=config.unet.adm_in_channels,
                          transformer_depth=list(config.unet.transformer_depth))
    original["model"]["params"]["network_config"] = unet
    return original


def diffusers_sdxl_parts(config: ModelConfig, checkpoint: dict, tokenizer_folder: Path) -> dict:
    """diffusers' and transformers' modules of an SDXL base or refiner (the keyword arguments of
    StableDiffusionXL(Img2Img)Pipeline, less the scheduler), converted from its original single file by diffusers'
    own single-file functions, float32, loaded strictly."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sf
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    original = original_sdxl_config(config)
    unet_config = sf.create_unet_diffusers_config_from_ldm(original, checkpoint)
    # diffusers recognises SDXL's label_emb by the released models' context widths (2048, 1280); the tiny models'
    # are others, so the SDXL choice is made here: the text_time addition of 256-wide embeddings.
    unet_config.update(class_embed_type=None, addition_embed_type="text_time", addition_time_embed_dim=256,
                       norm_num_groups=config.unet.norm_groups, sample_size=config.unet.sample_size)
    unet = UNet2DConditionModel(**unet_config)
    unet.load_state_dict(sf.convert_ldm_unet_checkpoint(checkpoint, unet_config), strict=True)
    vae_config = sf.create_vae_diffusers_config_from_ldm(original, checkpoint)
    vae_config.update(norm_num_groups=config.vae.norm_groups, force_upcast=config.vae.force_upcast)
    vae = AutoencoderKL(**vae_config)
    vae.load_state_dict(sf.convert_ldm_vae_checkpoint(checkpoint, vae_config), strict=True)

    def hf_config(t, **extra):
        return CLIPTextConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size, num_hidden_layers=t.num_hidden_layers,
                              num_attention_heads=t.num_attention_heads, intermediate_size=t.intermediate_size,
                              max_position_embeddings=t.max_position_embeddings, hidden_act=t.hidden_act,
                              layer_norm_eps=t.layer_norm_eps, **extra)

    def load(model, state):
        wrapped = hasattr(model, "text_model")  # CLIPTextModel lost its wrapper in transformers 5
        model.load_state_dict({k if wrapped else k.removeprefix("text_model."): v for k, v in state.items()},
                              strict=True)
        return model.eval()

    def tokenizer(pad_token: str):
        folder = Path(tokenizer_folder) / ("pad-eos" if pad_token == "<|endoftext|>" else "pad-bang")
        if not folder.is_dir():
            write_tokenizer(folder, pad_token)
        return CLIPTokenizer.from_pretrained(folder, model_max_length=77)

    refiner = config.text_2 is None
    big_g = config.text if refiner else config.text_2
    prefix = SDXL_BIG_G_PREFIX["refiner" if refiner else "base"]
    text_2 = CLIPTextModelWithProjection(hf_config(big_g, projection_dim=big_g.projection_dim))
    load(text_2, sf.convert_open_clip_checkpoint(text_2, checkpoint, prefix=prefix))
    parts = dict(unet=unet.eval(), vae=vae.eval(), text_encoder_2=text_2, tokenizer_2=tokenizer(big_g.pad_token),
                 text_encoder=None, tokenizer=None)
    if not refiner:
        text = CLIPTextModel(hf_config(config.text))
        state = {k: v for k, v in sf.convert_ldm_clip_checkpoint(checkpoint).items() if not k.endswith("position_ids")}
        parts.update(text_encoder=load(text, state), tokenizer=tokenizer(config.text.pad_token))
    return parts


def write_single_file(path, state: dict, fmt: str = "safetensors", text_prefix: bool = True, wrap: bool = True,
                      extras: bool = True, open_clip: bool = False, metadata: dict | None = None) -> dict:
    """Write an original single-file checkpoint; fmt "ckpt" pickles it with torch.save (zip format; "ckpt-legacy" in
    the pre-1.6 format), under "state_dict" if wrap (as Lightning does) or at top level. metadata goes into a
    safetensors header. Returns the written dict."""
    ckpt = original_checkpoint(state, text_prefix, extras, open_clip)
    if fmt == "safetensors":
        safetensors.torch.save_file(ckpt, path, metadata=metadata)
    elif fmt in ("ckpt", "ckpt-legacy"):
        obj = {"state_dict": ckpt, "global_step": 1000, "epoch": 3} if wrap else ckpt
        torch.save(obj, path, _use_new_zipfile_serialization=fmt == "ckpt")
    else:
        raise ValueError(f"unknown single-file format {fmt!r}")
    return ckpt


def _yaml_depth(config: ModelConfig):
    """transformer_depth as a YAML writes it: one number when every level that builds transformers has the same."""
    depths = {d for d in config.unet.transformer_depth if d}
    return depths.pop() if len(depths) == 1 else list(config.unet.transformer_depth)


def original_config(config: ModelConfig) -> dict:
    """The CompVis YAML shape (v1-inference.yaml; v2-inference(-v).yaml; SDXL's label_emb as sgm's YAML gives it)
    that diffusers' single-file conversion reads."""
    u, v = config.unet, config.vae
    # v2-inference.yaml gives the head width and no head count; diffusers reads whichever is there.
    heads = {"num_heads": u.num_heads} if u.num_head_channels == -1 else {"num_head_channels": u.num_head_channels}
    return {"model": {"params": {
        "scale_factor": v.scaling_factor,
        "parameterization": "v" if config.prediction_type == "v_prediction" else "eps",
        "unet_config": {"params": {
            "in_channels": u.in_channels, "out_channels": u.out_channels, "model_channels": u.model_channels,
            "channel_mult": list(u.channel_mult), "num_res_blocks": u.num_res_blocks,
            "attention_resolutions": list(u.attention_resolutions), **heads,
            "transformer_depth": _yaml_depth(config), "context_dim": u.context_dim,
            "use_linear_in_transformer": u.use_linear_in_transformer,
            # sgm's way of saying the UNet has label_emb (SDXL).
            **({"num_classes": "sequential", "adm_in_channels": u.adm_in_channels} if u.adm_in_channels else {}),
        }},
        "first_stage_config": {"params": {"embed_dim": v.embed_dim, "ddconfig": {
            "in_channels": v.in_channels, "out_ch": v.out_ch, "ch": v.ch, "ch_mult": list(v.ch_mult),
            "num_res_blocks": v.num_res_blocks, "z_channels": v.z_channels, "resolution": 256, "attn_resolutions": [],
        }}},
    }}}


def write_tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> None:
    """vocab.json and merges.txt as transformers' CLIPTokenizer reads them, built from CLIP's BPE merges the way
    OpenAI's tokenizer builds its vocabulary, and special_tokens_map.json naming the pad token ("!" in SD 2.x's)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    bpe = Path(__file__).parents[1] / "tritonsd" / "engine" / "data" / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.decompress(bpe.read_bytes()).decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({s: i for i, s in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": {"content": pad_token, "lstrip": False, "normalized": True, "rstrip": False,
                             "single_word": False}}
    (folder / "special_tokens_map.json").write_text(json.dumps(special), encoding="utf-8")


def unet_diffusers_config(config: ModelConfig, checkpoint: dict) -> dict:
    """diffusers' UNet2DConditionModel config for an original checkpoint, by diffusers' own single-file code."""
    from diffusers.loaders import single_file_utils as sf

    unet_config = sf.create_unet_diffusers_config_from_ldm(original_config(config), checkpoint)
    # The YAML has no GroupNorm group count (CompVis hard-codes 32); diffusers takes it as norm_num_groups. diffusers
    # guesses the sample size from the model type (512 pixels unless it recognises SD 2.x by its full-size shapes),
    # and tells SDXL's label_emb ("text_time") from other class embeddings by SDXL's full-size context widths.
    unet_config["norm_num_groups"] = config.unet.norm_groups
    unet_config["sample_size"] = config.unet.sample_size
    if config.unet.adm_in_channels:
        unet_config.update(class_embed_type=None, addition_embed_type="text_time",
                           addition_time_embed_dim=SIZE_EMBEDDING_DIM)
    return unet_config


def diffusers_text_towers(checkpoint: dict, config: ModelConfig) -> dict:
    """{diffusers folder: transformers text model holding its weights} of an original checkpoint, converted by
    diffusers' own single-file code: text_encoder (SD 1.x/2.x, SDXL's CLIP ViT-L) and text_encoder_2 (SDXL's bigG,
    a CLIPTextModelWithProjection; the refiner's only tower)."""
    from diffusers.loaders import single_file_utils as sf
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def model(t, projection: bool):
        cls = CLIPTextModelWithProjection if projection else CLIPTextModel
        return cls(CLIPTextConfig(
            vocab_size=t.vocab_size, hidden_size=t.hidden_size, num_hidden_layers=t.num_hidden_layers,
            num_attention_heads=t.num_attention_heads, intermediate_size=t.intermediate_size,
            max_position_embeddings=t.max_position_embeddings, hidden_act=t.hidden_act,
            layer_norm_eps=t.layer_norm_eps, projection_dim=t.projection_dim or 512,
        ))

    towers = {}
    if config.conditioning == "none":
        text = towers["text_encoder"] = model(config.text, False)
        if any(k.startswith(OPEN_CLIP_PREFIX) for k in checkpoint):
            # diffusers leaves out SD 2.x's unused 24th block by name (SD_2_TEXT_ENCODER_KEYS_TO_IGNORE); the tiny
            # tower's unused block is its last one.
            states = {"text_encoder": {
                k: v for k, v in sf.convert_open_clip_checkpoint(text, checkpoint).items()
                if not k.startswith(f"text_model.encoder.layers.{config.text.num_hidden_layers}.")}}
        else:
            states = {"text_encoder": sf.convert_ldm_clip_checkpoint(checkpoint)}
    elif config.text_2 is not None:
        towers["text_encoder"] = model(config.text, False)
        towers["text_encoder_2"] = model(config.text_2, True)
        states = {"text_encoder": sf.convert_ldm_clip_checkpoint(checkpoint),
                  "text_encoder_2": sf.convert_open_clip_checkpoint(towers["text_encoder_2"], checkpoint,
                                                                    prefix=SDXL_BIG_G_PREFIX["base"])}
    else:
        towers["text_encoder_2"] = model(config.text, True)
        states = {"text_encoder_2": sf.convert_open_clip_checkpoint(towers["text_encoder_2"], checkpoint,
                                                                    prefix=SDXL_BIG_G_PREFIX["refiner"])}
    for folder, text in towers.items():
        # As diffusers does: CLIPTextModel lost its text_model wrapper in transformers 5.
        wrapped = hasattr(text, "text_model")
        text.load_state_dict({k if wrapped else k.removeprefix("text_model."): v for k, v in states[folder].items()
                              if not k.endswith("position_ids")}, strict=True)
    return towers


def write_diffusers_folder(path, checkpoint: dict, config: ModelConfig, weights: str = "safetensors",
                           tokenizer: bool = True, scheduler: bool = True) -> None:
    """A diffusers folder made from an original checkpoint (SD 1.x/2.x, or SDXL's from original_sdxl_checkpoint) by
    diffusers' own single-file conversion, loaded strictly into diffusers' and transformers' models and written by
    their save_pretrained, with SD's scheduler config for the model's prediction type. weights: "safetensors",
    "fp16" (the .fp16 variant in half precision) or "bin" (pickles, with the text encoder under the classic
    text_model. names)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sf

    path = Path(path)
    unet_config = unet_diffusers_config(config, checkpoint)
    vae_config = sf.create_vae_diffusers_config_from_ldm(original_config(config), checkpoint)
    vae_config["norm_num_groups"] = config.vae.norm_groups
    unet = UNet2DConditionModel(**unet_config)
    unet.load_state_dict(sf.convert_ldm_unet_checkpoint(checkpoint, unet_config), strict=True)
    vae = AutoencoderKL(**vae_config)
    vae.load_state_dict(sf.convert_ldm_vae_checkpoint(checkpoint, vae_config), strict=True)
    towers = diffusers_text_towers(checkpoint, config)

    if weights == "fp16":
        for model in (unet, vae, *towers.values()):
            model.half()
    variant = "fp16" if weights == "fp16" else None
    unet.save_pretrained(path / "unet", safe_serialization=weights != "bin", variant=variant)
    vae.save_pretrained(path / "vae", safe_serialization=weights != "bin", variant=variant)
    for folder, text in towers.items():
        if weights == "bin":
            # transformers 5 writes only safetensors; a .bin is what older transformers wrote: torch.save of the
            # state dict, with text_model. in the names.
            text.config.save_pretrained(path / folder)
            prefix = "" if hasattr(text, "text_model") else "text_model."
            torch.save({(k if k.startswith("text_projection") else prefix + k): v for k, v in text.state_dict().items()},
                       path / folder / "pytorch_model.bin")
        else:
            text.save_pretrained(path / folder, variant=variant)
    if tokenizer:
        for folder, tower in zip(towers, config.towers):
            write_tokenizer(path / folder.replace("text_encoder", "tokenizer"), tower.pad_token)
    if scheduler:
        (path / "scheduler").mkdir(parents=True, exist_ok=True)
        (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config(config)))


def scheduler_config(config: ModelConfig, cls: str = "DDIMScheduler") -> dict:
    """SD's scheduler config (diffusers' scheduler_config.json) for the model's prediction type and timestep spacing
    (SD 1.x's and 2.x's name none)."""
    spacing = {} if config.timestep_spacing == "default" else {"timestep_spacing": config.timestep_spacing}
    return {"_class_name": cls, **SD15_SCHEDULER_CONFIG, "prediction_type": config.prediction_type, **spacing}


def linked_copy(folder: Path, dest: Path, replace: dict[str, str]) -> Path:
    """A copy of a model folder whose files link to the original's, except those in replace ({relative path: text}),
    written anew: a variant of a diffusers folder for the price of a few small files."""
    for src in Path(folder).rglob("*"):
        if src.is_file():
            target = dest / src.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            key = str(src.relative_to(folder))
            if key in replace:
                target.write_text(replace[key], encoding="utf-8")
            else:
                os.symlink(src, target)
    return dest
