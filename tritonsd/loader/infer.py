"""What a checkpoint is, and the ModelConfig its tensor shapes imply."""

import re

import torch

from tritonsd.engine.config import ModelConfig
from tritonsd.loader.formats import CheckpointError
from tritonsd.loader.lora import is_lora


def architecture(state: dict[str, torch.Tensor]) -> tuple[str, str]:
    """(name, evidence) for engine-named tensors: ("SD1.x", ...) or what the checkpoint looks like instead."""
    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in state)

    if has("conditioner.embedders."):
        return "SDXL", "its text encoders are conditioner.embedders.*"
    if "unet.label_emb.0.0.weight" in state:
        return "SDXL", "its UNet has label_emb (size conditioning)"
    if has("cond_stage_model.model."):
        return "SD2.x", "its text encoder is OpenCLIP (cond_stage_model.model.*)"
    if has("unet.joint_blocks."):
        return "SD3", "it is an MMDiT (joint_blocks), not a UNet"
    if has("double_blocks.") or has("unet.double_blocks."):
        return "Flux", "it is a transformer (double_blocks), not a UNet"
    if is_lora(state):
        return "a LoRA", "its tensors are low-rank adapters, which patch a model rather than being one"
    if not has("unet.") and (has("encoder.") and has("decoder.") or has("vae.encoder.") and has("vae.decoder.")):
        return "a VAE alone", "it has encoder.* and decoder.* but no UNet or text encoder"
    if "unet.input_blocks.0.0.weight" not in state:
        return "unknown", "it has no UNet (model.diffusion_model.input_blocks.0.0.weight or unet/conv_in)"
    in_channels = state["unet.input_blocks.0.0.weight"].shape[1]
    context = state.get("unet.middle_block.1.transformer_blocks.0.attn2.to_k.weight")
    proj_in = state.get("unet.middle_block.1.proj_in.weight")
    if context is not None and context.shape[1] == 2048:
        return "SDXL", "its UNet attends to 2048-wide text features"
    if context is not None and context.shape[1] == 1024:
        return "SD2.x", "its UNet attends to 1024-wide text features"
    if proj_in is not None and proj_in.ndim == 2:
        return "SD2.x", "its UNet transformers project in with Linear layers"
    if in_channels == 9:
        return "SD1.x inpainting", "its UNet takes 9 input channels (latents, mask, masked image)"
    return "SD1.x", "UNet, VAE and CLIP text encoder of Stable Diffusion 1.x"


def _levels(state: dict, pattern: str) -> list[int]:
    """Sorted distinct values of the (\\d+) in pattern among the keys."""
    return sorted({int(m.group(1)) for k in state if (m := re.match(pattern, k))})


def infer_config(state: dict[str, torch.Tensor]) -> ModelConfig:
    """The config whose model has these tensors' shapes. What shapes cannot tell (attention heads, GroupNorm groups,
    latent scaling) takes the SD1.x value."""
    try:
        conv_in = state["unet.input_blocks.0.0.weight"]
        mc = conv_in.shape[0]
        steps = _levels(state, r"unet\.input_blocks\.(\d+)\.")
        downsamplers = [i for i in steps if f"unet.input_blocks.{i}.0.op.weight" in state]
        levels = len(downsamplers) + 1
        res_blocks = (len(steps) - 1 - len(downsamplers)) // levels
        first = [1 + level * (res_blocks + 1) for level in range(levels)]
        attention = [f"unet.input_blocks.{i}.1.proj_in.weight" in state for i in first]
        unet = dict(
            in_channels=conv_in.shape[1],
            out_channels=state["unet.out.2.weight"].shape[0],
            model_channels=mc,
            channel_mult=tuple(state[f"unet.input_blocks.{i}.0.out_layers.3.weight"].shape[0] // mc for i in first),
            num_res_blocks=res_blocks,
            # Largest first, as the CompVis YAML writes them (4, 2, 1).
            attention_resolutions=tuple(2**level for level in reversed(range(levels)) if attention[level]),
            transformer_depth=len(_levels(state, r"unet\.middle_block\.1\.transformer_blocks\.(\d+)\.")),
            context_dim=state["unet.middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1],
        )
        ch = state["vae.encoder.conv_in.weight"].shape[0]
        vae_levels = _levels(state, r"vae\.encoder\.down\.(\d+)\.")
        vae = dict(
            in_channels=state["vae.encoder.conv_in.weight"].shape[1],
            out_ch=state["vae.decoder.conv_out.weight"].shape[0],
            ch=ch,
            ch_mult=tuple(state[f"vae.encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in vae_levels),
            num_res_blocks=len(_levels(state, r"vae\.encoder\.down\.0\.block\.(\d+)\.")),
            z_channels=state["vae.decoder.conv_in.weight"].shape[1],
            embed_dim=state["vae.post_quant_conv.weight"].shape[1],
        )
        vocab, hidden = state["text_encoder.embeddings.token_embedding.weight"].shape
        text = dict(
            vocab_size=vocab,
            hidden_size=hidden,
            num_hidden_layers=len(_levels(state, r"text_encoder\.encoder\.layers\.(\d+)\.")),
            # CLIP ViT-L/14 has 12 heads of 64; other CLIP text towers keep heads of 64.
            num_attention_heads=12 if hidden == 768 else max(1, hidden // 64),
            intermediate_size=state["text_encoder.encoder.layers.0.mlp.fc1.weight"].shape[0],
            max_position_embeddings=state["text_encoder.embeddings.position_embedding.weight"].shape[0],
        )
    except KeyError as e:
        raise CheckpointError(f"cannot infer the model config: tensor {e.args[0]} is missing") from None
    try:
        return ModelConfig.from_dict({"unet": unet, "vae": vae, "text": text})
    except ValueError as e:
        raise CheckpointError(f"the model config inferred from the tensor shapes is not valid: {e}") from None


def config_from_diffusers(configs: dict[str, dict]) -> ModelConfig:
    """ModelConfig from a diffusers folder's unet/, vae/ and text_encoder/ config.json files."""
    u, v, t = configs["unet"], configs["vae"], configs["text_encoder"]
    try:
        mc = u["block_out_channels"][0]
        # SD1.x's diffusers config names its head count attention_head_dim, a known misnomer kept for compatibility.
        heads = u.get("num_attention_heads") or u["attention_head_dim"]
        depth = u.get("transformer_layers_per_block", 1)
        unet = dict(
            in_channels=u["in_channels"],
            out_channels=u["out_channels"],
            model_channels=mc,
            channel_mult=tuple(c // mc for c in u["block_out_channels"]),
            num_res_blocks=u["layers_per_block"],
            attention_resolutions=tuple(
                2**i for i, b in reversed(list(enumerate(u["down_block_types"]))) if b.startswith("CrossAttn")
            ),
            num_heads=heads if isinstance(heads, int) else heads[0],
            transformer_depth=depth if isinstance(depth, int) else depth[0],
            context_dim=u["cross_attention_dim"],
            norm_groups=u.get("norm_num_groups", 32),
        )
        ch = v["block_out_channels"][0]
        vae = dict(
            in_channels=v["in_channels"],
            out_ch=v["out_channels"],
            ch=ch,
            ch_mult=tuple(c // ch for c in v["block_out_channels"]),
            num_res_blocks=v["layers_per_block"],
            z_channels=v["latent_channels"],
            embed_dim=v["latent_channels"],
            scaling_factor=v.get("scaling_factor", 0.18215),
            norm_groups=v.get("norm_num_groups", 32),
        )
        keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings", "hidden_act", "layer_norm_eps")
        text = {k: t[k] for k in keys if k in t}
    except (KeyError, TypeError, IndexError) as e:
        raise CheckpointError(f"cannot read the diffusers config.json files: missing or malformed entry {e}") from None
    try:
        return ModelConfig.from_dict({"unet": unet, "vae": vae, "text": text})
    except ValueError as e:
        raise CheckpointError(f"the diffusers config.json files describe an unsupported model: {e}") from None
