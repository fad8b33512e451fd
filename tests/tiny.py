"""Tiny Stable Diffusion models for tests: a config that exercises every structure of the SD1.x graph, random weights,
and those weights written the ways people have them: an original single file (.safetensors or .ckpt) and a diffusers
folder produced by diffusers' and transformers' own conversion and save code."""

import gzip
import json
import os
from pathlib import Path

import safetensors.torch
import torch

from tritonsd.engine.config import ModelConfig
from tritonsd.engine.model import StableDiffusion
from tritonsd.loader.convert import to_original

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


def original_checkpoint(state: dict, text_prefix: bool = True, extras: bool = True) -> dict[str, torch.Tensor]:
    """Engine names -> an original CompVis checkpoint's names; extras adds what real files carry beside the weights:
    EMA copies (flattened names), the noise schedule, and CLIP's position_ids."""
    ckpt = to_original(state, old_text_names=not text_prefix)
    if extras:
        ckpt["model_ema.decay"] = torch.tensor(0.9999)
        ckpt["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
        for name, t in state.items():
            if name.startswith("unet."):
                ckpt["model_ema.diffusion_model" + name[len("unet."):].replace(".", "")] = t * 0.5
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        ckpt.update({k: betas.float() * (i + 1) for i, k in enumerate(SCHEDULE_BUFFERS)})
        ckpt |= to_original({"text_encoder.embeddings.position_ids": torch.arange(77)[None]}, not text_prefix)
    return ckpt


def write_single_file(path, state: dict, fmt: str = "safetensors", text_prefix: bool = True, wrap: bool = True,
                      extras: bool = True) -> dict:
    """Write an original single-file checkpoint; fmt "ckpt" pickles it with torch.save (zip format; "ckpt-legacy" in
    the pre-1.6 format), under "state_dict" if wrap (as Lightning does) or at top level. Returns the written dict."""
    ckpt = original_checkpoint(state, text_prefix, extras)
    if fmt == "safetensors":
        safetensors.torch.save_file(ckpt, path)
    elif fmt in ("ckpt", "ckpt-legacy"):
        obj = {"state_dict": ckpt, "global_step": 1000, "epoch": 3} if wrap else ckpt
        torch.save(obj, path, _use_new_zipfile_serialization=fmt == "ckpt")
    else:
        raise ValueError(f"unknown single-file format {fmt!r}")
    return ckpt


def original_config(config: ModelConfig) -> dict:
    """The CompVis YAML (v1-inference.yaml) shape that diffusers' single-file conversion reads."""
    u, v = config.unet, config.vae
    return {"model": {"params": {
        "scale_factor": v.scaling_factor,
        "unet_config": {"params": {
            "in_channels": u.in_channels, "out_channels": u.out_channels, "model_channels": u.model_channels,
            "channel_mult": list(u.channel_mult), "num_res_blocks": u.num_res_blocks,
            "attention_resolutions": list(u.attention_resolutions), "num_heads": u.num_heads,
            "transformer_depth": u.transformer_depth, "context_dim": u.context_dim, "use_linear_in_transformer": False,
        }},
        "first_stage_config": {"params": {"embed_dim": v.embed_dim, "ddconfig": {
            "in_channels": v.in_channels, "out_ch": v.out_ch, "ch": v.ch, "ch_mult": list(v.ch_mult),
            "num_res_blocks": v.num_res_blocks, "z_channels": v.z_channels, "resolution": 256, "attn_resolutions": [],
        }}},
    }}}


def write_tokenizer(folder: Path) -> None:
    """vocab.json and merges.txt as transformers' CLIPTokenizer reads them, built from CLIP's BPE merges the way
    OpenAI's tokenizer builds its vocabulary."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    bpe = Path(__file__).parents[1] / "tritonsd" / "engine" / "data" / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.decompress(bpe.read_bytes()).decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({s: i for i, s in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def write_diffusers_folder(path, checkpoint: dict, config: ModelConfig, weights: str = "safetensors",
                           tokenizer: bool = True) -> None:
    """A diffusers folder made from an original checkpoint by diffusers' own single-file conversion, loaded strictly
    into diffusers' and transformers' models and written by their save_pretrained. weights: "safetensors", "fp16"
    (the .fp16 variant in half precision) or "bin" (pickles, with the text encoder under the classic text_model.
    names)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sf
    from transformers import CLIPTextConfig, CLIPTextModel

    path = Path(path)
    original = original_config(config)
    unet_config = sf.create_unet_diffusers_config_from_ldm(original, checkpoint)
    vae_config = sf.create_vae_diffusers_config_from_ldm(original, checkpoint)
    # The YAML has no GroupNorm group count (CompVis hard-codes 32); diffusers takes it as norm_num_groups.
    unet_config["norm_num_groups"] = config.unet.norm_groups
    vae_config["norm_num_groups"] = config.vae.norm_groups
    unet = UNet2DConditionModel(**unet_config)
    unet.load_state_dict(sf.convert_ldm_unet_checkpoint(checkpoint, unet_config), strict=True)
    vae = AutoencoderKL(**vae_config)
    vae.load_state_dict(sf.convert_ldm_vae_checkpoint(checkpoint, vae_config), strict=True)

    t = config.text
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads, intermediate_size=t.intermediate_size,
        max_position_embeddings=t.max_position_embeddings, hidden_act=t.hidden_act, layer_norm_eps=t.layer_norm_eps,
    ))
    text_state = {k: v for k, v in sf.convert_ldm_clip_checkpoint(checkpoint).items() if not k.endswith("position_ids")}
    # As diffusers does: CLIPTextModel lost its text_model wrapper in transformers 5.
    wrapped = hasattr(text, "text_model")
    text.load_state_dict({k if wrapped else k.removeprefix("text_model."): v for k, v in text_state.items()}, strict=True)

    if weights == "fp16":
        for model in (unet, vae, text):
            model.half()
    variant = "fp16" if weights == "fp16" else None
    unet.save_pretrained(path / "unet", safe_serialization=weights != "bin", variant=variant)
    vae.save_pretrained(path / "vae", safe_serialization=weights != "bin", variant=variant)
    if weights == "bin":
        # transformers 5 writes only safetensors; a .bin is what older transformers wrote: torch.save of the
        # state dict, with text_model. in the names.
        text.config.save_pretrained(path / "text_encoder")
        prefix = "" if wrapped else "text_model."
        torch.save({prefix + k: v for k, v in text.state_dict().items()}, path / "text_encoder" / "pytorch_model.bin")
    else:
        text.save_pretrained(path / "text_encoder", variant=variant)
    if tokenizer:
        write_tokenizer(path / "tokenizer")


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
