"""The checkpoints people actually have beside the plain single file: a separate VAE, the original CompVis
training checkpoints (PyTorch Lightning and numpy objects pickled beside the weights) and their YAML configs."""

import math
import os
import pickle
import sys
import types

import numpy as np
import pytest
import safetensors.torch
import torch

from tritonsd import CheckpointError, ModelConfig, Pipeline, loader
from tritonsd.loader.compvis import config_from_compvis, parse_yaml
from tiny import TINY, original_checkpoint, original_config, random_state, write_diffusers_folder, write_single_file

yaml = pytest.importorskip("yaml")

GEN = dict(steps=2, guidance_scale=7.5, seed=3, width=32, height=32, output_type="np")

# The public configs' text: CompVis/stable-diffusion configs/stable-diffusion/v1-inference.yaml,
# Stability-AI/stablediffusion configs/stable-diffusion/v2-inference.yaml and v2-inference-v.yaml,
# Stability-AI/generative-models configs/inference/sd_xl_base.yaml.
V1_INFERENCE = """\
model:
  base_learning_rate: 1.0e-04
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 64
    channels: 4
    cond_stage_trainable: false   # Note: different from the one we trained before
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: 0.18215
    use_ema: False

    scheduler_config: # 10000 warmup steps
      target: ldm.lr_scheduler.LambdaLinearScheduler
      params:
        warm_up_steps: [ 10000 ]
        cycle_lengths: [ 10000000000000 ] # incredibly large number to prevent corner cases
        f_start: [ 1.e-6 ]
        f_max: [ 1. ]
        f_min: [ 1. ]

    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 32 # unused
        in_channels: 4
        out_channels: 4
        model_channels: 320
        attention_resolutions: [ 4, 2, 1 ]
        num_res_blocks: 2
        channel_mult: [ 1, 2, 4, 4 ]
        num_heads: 8
        use_spatial_transformer: True
        transformer_depth: 1
        context_dim: 768
        use_checkpoint: True
        legacy: False

    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult:
          - 1
          - 2
          - 4
          - 4
          num_res_blocks: 2
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity

    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
"""

V2_INFERENCE = """\
model:
  base_learning_rate: 1.0e-4
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 64
    channels: 4
    cond_stage_trainable: false
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: 0.18215
    use_ema: False # we set this to false because this is an inference only config

    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        use_checkpoint: True
        use_fp16: True
        image_size: 32 # unused
        in_channels: 4
        out_channels: 4
        model_channels: 320
        attention_resolutions: [ 4, 2, 1 ]
        num_res_blocks: 2
        channel_mult: [ 1, 2, 4, 4 ]
        num_head_channels: 64 # need to fix for flash-attn
        use_spatial_transformer: True
        use_linear_in_transformer: True
        transformer_depth: 1
        context_dim: 1024
        legacy: False

    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          #attn_type: "vanilla-xformers"
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult:
          - 1
          - 2
          - 4
          - 4
          num_res_blocks: 2
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity

    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder
      params:
        freeze: True
        layer: "penultimate"
"""

V2_INFERENCE_V = V2_INFERENCE.replace("  params:\n    linear_start", '  params:\n    parameterization: "v"\n    linear_start')

SDXL_BASE = """\
model:
  target: sgm.models.diffusion.DiffusionEngine
  params:
    scale_factor: 0.13025
    disable_first_stage_autocast: True

    denoiser_config:
      target: sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser
      params:
        num_idx: 1000

        scaling_config:
          target: sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling
        discretization_config:
          target: sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization

    network_config:
      target: sgm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        adm_in_channels: 2816
        num_classes: sequential
        use_checkpoint: True
        in_channels: 4
        out_channels: 4
        model_channels: 320
        attention_resolutions: [4, 2]
        num_res_blocks: 2
        channel_mult: [1, 2, 4]
        num_head_channels: 64
        use_linear_in_transformer: True
        transformer_depth: [1, 2, 10]
        context_dim: 2048
        spatial_transformer_attn_type: softmax-xformers

    conditioner_config:
      target: sgm.modules.GeneralConditioner
      params:
        emb_models:
          - is_trainable: False
            input_key: txt
            target: sgm.modules.encoders.modules.FrozenCLIPEmbedder
            params:
              layer: hidden
              layer_idx: 11

          - is_trainable: False
            input_key: txt
            target: sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2
            params:
              arch: ViT-bigG-14
              version: laion2b_s39b_b160k
              freeze: True
              layer: penultimate
              always_return_pooled: True
              legacy: False

          - is_trainable: False
            input_key: original_size_as_tuple
            target: sgm.modules.encoders.modules.ConcatTimestepEmbedderND
            params:
              outdim: 256  # multiplied by two
              
    first_stage_config:
      target: sgm.models.autoencoder.AutoencoderKLInferenceWrapper
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          attn_type: vanilla-xformers
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult: [1, 2, 4, 4]
          num_res_blocks: 2
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
"""

TRICKY = """\
# comment first
a: 'it''s'   # single quotes
b: "x # not a comment"
c: [ [1, 2], [], ["*", 'y'] ]
d:
  - - 1
    - 2
  -
    e: ~
    f: null
  - g: [ 1.5, -2, +3, 1_000, .5 ]
    h: yes
e: 0.0120
f: 1.e-6
g: .inf
h: -.Inf
i: 089
j: val/loss_simple_ema
"""


@pytest.mark.parametrize("text", [V1_INFERENCE, V2_INFERENCE, V2_INFERENCE_V, SDXL_BASE, TRICKY],
                         ids=["v1-inference", "v2-inference", "v2-inference-v", "sd_xl_base", "tricky"])
def test_yaml_reader_equals_pyyaml(text):
    want = yaml.safe_load(text)
    got = parse_yaml(text)
    assert got == want, f"parse_yaml differs from yaml.safe_load:\n{got}\n!=\n{want}"


@pytest.mark.parametrize("text, message", [
    ("a: &x 1\nb: *x\n", "anchors, tags"),
    ("a: !!str 1\n", "anchors, tags"),
    ("a: {b: 1}\n", "flow mappings"),
    ("a: |\n  text\n", "anchors, tags, block strings"),
    ("a: 1\n---\nb: 2\n", "several documents"),
    ("a:\n\tb: 1\n", "tabs"),
    ("a: 1\na: 2\n", "appears twice"),
    ("a: 0x1f\n", "number or date form"),
    ("a: 2001-12-14\n", "number or date form"),
    ("a: b: c\n", "a colon in a plain value"),
    ("a: [1, 2\n", "unterminated flow sequence"),
    ("a: 1\n  b: 2\n", "unexpected indentation"),
], ids=["anchor", "tag", "flow-mapping", "block-string", "two-documents", "tab", "duplicate", "hex", "date",
        "colon", "unterminated", "indentation"])
def test_yaml_reader_refuses_what_it_does_not_read(text, message):
    with pytest.raises(ValueError, match=message):
        parse_yaml(text)


def test_v1_inference_yaml_is_sd15():
    assert config_from_compvis(parse_yaml(V1_INFERENCE)) == ModelConfig()


@pytest.mark.parametrize("text, message", [
    (V2_INFERENCE, "num_head_channels: 64 is not supported"),
    (V2_INFERENCE_V, "v-prediction"),
    (SDXL_BASE, "SDXL"),
    (V1_INFERENCE.replace("attn_resolutions: []", "attn_resolutions: [16]"), r"attn_resolutions: \[16\] is not supported"),
    (V1_INFERENCE.replace("legacy: False", "legacy: False\n        use_scale_shift_norm: True"), "use_scale_shift_norm"),
    (V1_INFERENCE.replace("FrozenCLIPEmbedder", "BERTEmbedder"), "text encoder"),
])
def test_compvis_configs_of_other_models_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        config_from_compvis(parse_yaml(text))


def tiny_yaml() -> str:
    """TINY as a CompVis YAML: v1-inference.yaml with the tiny sizes."""
    u, v = TINY.unet, TINY.vae
    return (V1_INFERENCE
            .replace("model_channels: 320", f"model_channels: {u.model_channels}")
            .replace("attention_resolutions: [ 4, 2, 1 ]", f"attention_resolutions: {list(u.attention_resolutions)}")
            .replace("channel_mult: [ 1, 2, 4, 4 ]", f"channel_mult: {list(u.channel_mult)}")
            .replace("num_heads: 8", f"num_heads: {u.num_heads}").replace("context_dim: 768", f"context_dim: {u.context_dim}")
            .replace("ch: 128", f"ch: {v.ch}").replace("          - 4\n          - 4\n", "")
            .replace("num_res_blocks: 2\n          attn", f"num_res_blocks: {v.num_res_blocks}\n          attn")
            .replace("scale_factor: 0.18215", f"scale_factor: {v.scaling_factor}"))


def test_yaml_beside_the_checkpoint_and_config_option(tmp_path):
    path = tmp_path / "model.ckpt"
    write_single_file(path, random_state(TINY), "ckpt")
    (tmp_path / "model.yaml").write_text(tiny_yaml())
    model, _ = loader.load(path)
    # What the YAML cannot say (GroupNorm groups, text sizes) is read off the shapes' SD 1.x defaults elsewhere;
    # the YAML's own fields must all arrive.
    u = model.config.unet
    assert (u.model_channels, u.channel_mult, u.attention_resolutions, u.num_heads, u.context_dim) == (32, (1, 2), (2, 1), 2, 32)
    assert model.config.vae.scaling_factor == 0.25 and model.config.vae.ch_mult == (1, 2)
    assert loader.read_config(tmp_path / "model.yaml", base=model.config) == model.config
