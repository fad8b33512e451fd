"""What a checkpoint is, the ModelConfig its tensor shapes imply, and what its UNet predicts."""

import re

import torch

from tritonsd import kernels
from tritonsd.engine.config import ModelConfig
from tritonsd.loader.formats import CheckpointError

# The architectures the engine runs; architecture() names others so that they can be refused by name.
SUPPORTED = ("SD1.x", "SD2.x")
_EOS = "<|endoftext|>"


def architecture(state: dict[str, torch.Tensor]) -> tuple[str, str]:
    """(name, evidence) for engine-named tensors: "SD1.x", "SD2.x" or what the checkpoint looks like instead."""
    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in state)

    if has("conditioner.embedders."):
        return "SDXL", "its text encoders are conditioner.embedders.*"
    if has("embedder.") or has("noise_augmentor.") or has("unet.class_embedding."):
        return "SD2.x unCLIP", "it conditions on image embeddings (embedder.*, noise_augmentor.*, or class_embedding)"
    if has("depth_model."):
        return "SD2.x depth", "it carries a MiDaS depth estimator (depth_model.*) and reads depth as a 5th latent channel"
    if has("low_scale_model."):
        return "SD2.x x4 upscaler", "it conditions on a low-resolution image (low_scale_model.*)"
    if "unet.label_emb.0.0.weight" in state:
        return "SDXL", "its UNet has label_emb (size conditioning)"
    if has("unet.joint_blocks."):
        return "SD3", "it is an MMDiT (joint_blocks), not a UNet"
    if has("double_blocks.") or has("unet.double_blocks."):
        return "Flux", "it is a transformer (double_blocks), not a UNet"
    if any("lora_" in k for k in state):
        return "a LoRA", "its tensors are low-rank adapters (lora_*), which patch a model rather than being one"
    if not has("unet.") and has("encoder.") and has("decoder."):
        return "a VAE alone", "it has encoder.* and decoder.* but no UNet or text encoder"
    if "unet.input_blocks.0.0.weight" not in state:
        return "unknown", "it has no UNet (model.diffusion_model.input_blocks.0.0.weight or unet/conv_in)"
    in_channels = state["unet.input_blocks.0.0.weight"].shape[1]
    context = state.get("unet.middle_block.1.transformer_blocks.0.attn2.to_k.weight")
    if context is not None and context.shape[1] == 2048:
        return "SDXL", "its UNet attends to 2048-wide text features"
    family = "SD2.x" if _sd2(state) else "SD1.x"
    if in_channels == 9:
        return f"{family} inpainting", "its UNet takes 9 input channels (latents, mask, masked image)"
    if in_channels == 5 and family == "SD2.x":
        return "SD2.x depth", "its UNet takes 5 input channels (latents and depth)"
    if family == "SD2.x":
        return "SD2.x", "UNet with Linear transformer projections, OpenCLIP text encoder: Stable Diffusion 2.x"
    return "SD1.x", "UNet, VAE and CLIP text encoder of Stable Diffusion 1.x"


def _sd2(state: dict[str, torch.Tensor]) -> bool:
    """SD 2.x's UNet projects in and out of its transformers with Linear layers (2-D weights) and attends to 1024-wide
    OpenCLIP features; SD 1.x's uses 1x1 convolutions and 768-wide CLIP features."""
    proj_in = state.get("unet.middle_block.1.proj_in.weight")
    context = state.get("unet.middle_block.1.transformer_blocks.0.attn2.to_k.weight")
    return (proj_in is not None and proj_in.ndim == 2) or (context is not None and context.shape[1] == 1024)


def _levels(state: dict, pattern: str) -> list[int]:
    """Sorted distinct values of the (\\d+) in pattern among the keys."""
    return sorted({int(m.group(1)) for k in state if (m := re.match(pattern, k))})


def infer_config(state: dict[str, torch.Tensor], prediction_type: str = "epsilon") -> ModelConfig:
    """The config whose model has these tensors' shapes, for a model of this prediction type. What shapes cannot
    tell (attention heads, GroupNorm groups, latent scaling, the text tower's activation and padding) takes the
    value of the family the shapes belong to, SD 1.x or SD 2.x; SD 2.x v-prediction models draw at 768 pixels."""
    sd2 = _sd2(state)
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
            # SD 2.x: heads 64 wide and Linear projections; SD 1.x: 8 heads and 1x1 convolutions.
            num_heads=-1 if sd2 else 8,
            num_head_channels=64 if sd2 else -1,
            use_linear_in_transformer=sd2,
            sample_size=96 if sd2 and prediction_type == "v_prediction" else 64,
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
            # CLIP ViT-L/14 has 12 heads of 64; other CLIP text towers (OpenCLIP ViT-H/14: 16) keep heads of 64.
            num_attention_heads=12 if hidden == 768 else max(1, hidden // 64),
            intermediate_size=state["text_encoder.encoder.layers.0.mlp.fc1.weight"].shape[0],
            max_position_embeddings=state["text_encoder.embeddings.position_embedding.weight"].shape[0],
            **_text_family(sd2),
        )
    except KeyError as e:
        raise CheckpointError(f"cannot infer the model config: tensor {e.args[0]} is missing") from None
    try:
        return ModelConfig.from_dict({"unet": unet, "vae": vae, "text": text, "prediction_type": prediction_type})
    except ValueError as e:
        raise CheckpointError(f"the model config inferred from the tensor shapes is not valid: {e}") from None


def _text_family(sd2: bool) -> dict:
    """The text tower's activation and padding: OpenCLIP's (GELU, id 0 "!") in SD 2.x, OpenAI CLIP's in SD 1.x."""
    return dict(hidden_act="gelu", pad_token="!") if sd2 else dict(hidden_act="quick_gelu", pad_token=_EOS)


def _heads(heads, block_out_channels) -> dict:
    """UNet head fields from diffusers' head count, one number or one per level: a count shared by every level
    (SD 1.x) or a width shared by every level (SD 2.x: 5, 10, 20, 20 heads of 64)."""
    if isinstance(heads, int):
        return dict(num_heads=heads, num_head_channels=-1)
    if not all(isinstance(h, int) and h > 0 for h in heads) or len(heads) != len(block_out_channels):
        raise CheckpointError(f"the UNet's head counts {heads!r} are not one positive count per level")
    if len(set(heads)) == 1:
        return dict(num_heads=heads[0], num_head_channels=-1)
    widths = {c // h for c, h in zip(block_out_channels, heads)}
    if len(widths) != 1 or any(c % h for c, h in zip(block_out_channels, heads)):
        raise CheckpointError(f"the UNet's heads {list(heads)} for channels {list(block_out_channels)} share neither "
                              "a count nor a width")
    return dict(num_heads=-1, num_head_channels=widths.pop())


def _pad_token(tokenizer: dict) -> str | None:
    """The pad token of a tokenizer folder's special_tokens_map.json: a string, or transformers' AddedToken dict."""
    pad = tokenizer.get("pad_token")
    return pad.get("content") if isinstance(pad, dict) else pad


def config_from_diffusers(configs: dict[str, dict]) -> ModelConfig:
    """ModelConfig from a diffusers folder's unet/, vae/ and text_encoder/ config.json files, with the prediction type
    of scheduler/scheduler_config.json ("epsilon" without one) and the pad token of tokenizer/."""
    u, v, t = configs["unet"], configs["vae"], configs["text_encoder"]
    try:
        mc = u["block_out_channels"][0]
        sd2 = bool(u.get("use_linear_projection", False))
        # diffusers names the UNet's head count attention_head_dim, a known misnomer kept for compatibility.
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
            **_heads(heads, u["block_out_channels"]),
            transformer_depth=depth if isinstance(depth, int) else depth[0],
            context_dim=u["cross_attention_dim"],
            use_linear_in_transformer=sd2,
            norm_groups=u.get("norm_num_groups", 32),
            sample_size=u.get("sample_size", 64),
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
        text = {"pad_token": _text_family(sd2)["pad_token"], **{k: t[k] for k in keys if k in t}}
        if pad := _pad_token(configs.get("tokenizer", {})):
            text["pad_token"] = pad
        prediction_type = configs.get("scheduler", {}).get("prediction_type", "epsilon")
    except (KeyError, TypeError, IndexError, AttributeError) as e:
        raise CheckpointError(f"cannot read the diffusers config.json files: missing or malformed entry {e}") from None
    try:
        return ModelConfig.from_dict({"unet": unet, "vae": vae, "text": text, "prediction_type": prediction_type})
    except ValueError as e:
        raise CheckpointError(f"the diffusers config.json files describe an unsupported model: {e}") from None


def stated_prediction_type(metadata: dict) -> str | None:
    """What a single file's own metadata says its UNet predicts: Stability's ModelSpec field
    modelspec.prediction_type ("epsilon" or "v"; kohya's sd-scripts write it), or ComfyUI's v_pred marker tensor."""
    spec = metadata.get("modelspec.prediction_type")
    if spec is not None:
        named = {"epsilon": "epsilon", "eps": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction"}
        if spec not in named:
            raise CheckpointError(f"its metadata gives modelspec.prediction_type {spec!r}, which is neither "
                                  "epsilon nor v; pass the prediction type explicitly")
        return named[spec]
    return "v_prediction" if "v_pred" in metadata else None


def probe_prediction_type(unet: torch.nn.Module, config: ModelConfig) -> tuple[str, float]:
    """AUTOMATIC1111's test for an SD 2.x file that does not say what its UNet predicts: one evaluation at the last
    training timestep (999) of an 8x8 latent of 0.5s under a 2-token context of 0.5s. There the latent is nearly all
    noise, so a noise-predicting model returns about its input, while a v-predicting one returns about minus its
    guess of the clean latent; AUTOMATIC1111 takes a mean of (output - input) below -1 for v-prediction. Runs the
    reference ops (nothing to compile for one call). Returns the decision and that mean."""
    weight = unet.out[2].weight
    with torch.inference_mode(), kernels.backend("torch"):
        x = torch.full((1, config.unet.in_channels, 8, 8), 0.5, dtype=weight.dtype, device=weight.device)
        context = torch.full((1, 2, config.unet.context_dim), 0.5, dtype=weight.dtype, device=weight.device)
        out = unet(x, torch.tensor([999.0], device=weight.device), context)
        statistic = (out.float() - x.float()).mean().item()
    return ("v_prediction" if statistic < -1 else "epsilon"), statistic
