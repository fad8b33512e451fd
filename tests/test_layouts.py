"""The checkpoints people actually have beside the plain single file: a separate VAE, the original CompVis
training checkpoints (PyTorch Lightning and numpy objects pickled beside the weights) and their YAML configs."""

import dataclasses
import os
import pickle
import sys
import types

import numpy as np
import pytest
import safetensors.torch
import torch

from tritonsd import CheckpointError, ModelConfig, Pipeline, loader
from tritonsd.engine.config import SD2, SD2_V, SDXL, SDXL_REFINER
from tritonsd.loader.compvis import config_from_compvis, parse_yaml
from tiny import (TINY, TINY_SD2, TINY_SDXL, original_checkpoint, original_sdxl_checkpoint, random_state,
                  write_diffusers_folder, write_single_file)

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

          - is_trainable: False
            input_key: crop_coords_top_left
            target: sgm.modules.encoders.modules.ConcatTimestepEmbedderND
            params:
              outdim: 256  # multiplied by two

          - is_trainable: False
            input_key: target_size_as_tuple
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

# sd_xl_refiner.yaml: the same file but for the UNet's sizes, bigG alone (as embedder 0) and the aesthetic score in
# place of the target size.
_CLIP_L_EMBEDDER = SDXL_BASE[SDXL_BASE.index("          - is_trainable: False\n            input_key: txt\n"):
                             SDXL_BASE.index("          - is_trainable: False\n            input_key: txt\n            target: sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2")]
SDXL_REFINER_YAML = (SDXL_BASE.replace(_CLIP_L_EMBEDDER, "").replace("adm_in_channels: 2816", "adm_in_channels: 2560")
                     .replace("model_channels: 320", "model_channels: 384")
                     .replace("channel_mult: [1, 2, 4]\n", "channel_mult: [1, 2, 4, 4]\n")
                     .replace("transformer_depth: [1, 2, 10]", "transformer_depth: 4")
                     .replace("context_dim: 2048", "context_dim: 1280")
                     .replace("target_size_as_tuple", "aesthetic_score"))

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


@pytest.mark.parametrize("text, want", [(V2_INFERENCE, SD2), (V2_INFERENCE_V, SD2_V)], ids=["v2", "v2-v"])
def test_v2_inference_yamls_are_sd2(text, want):
    """The YAML names what the shapes cannot tell: heads 64 wide, Linear projections, the OpenCLIP tower (GELU, "!"
    padding) and the parameterization. The base gives only the text tower's sizes, with SD 1.x's everything else,
    so each SD 2.x value must come from the YAML; the default image size is the loader's (next test)."""
    sd1 = ModelConfig()
    base = dataclasses.replace(sd1, unet=dataclasses.replace(sd1.unet, context_dim=1024),
                               text=dataclasses.replace(SD2.text, hidden_act=sd1.text.hidden_act, pad_token=sd1.text.pad_token))
    got = config_from_compvis(parse_yaml(text), base)
    assert got == dataclasses.replace(want, unet=dataclasses.replace(want.unet, sample_size=sd1.unet.sample_size))


@pytest.mark.parametrize("text, want", [(SDXL_BASE, SDXL), (SDXL_REFINER_YAML, SDXL_REFINER)], ids=["base", "refiner"])
def test_sgm_yamls_are_sdxl(text, want):
    """Stability's sgm YAMLs (sd_xl_base.yaml, sd_xl_refiner.yaml): the UNet under network_config, the VAE scale,
    what the denoiser's scaling says the UNet predicts. The base (what shapes would give) differs from the answer in
    every field the YAML states, so each must come from the YAML; the text towers come from the base."""
    base = dataclasses.replace(
        want, prediction_type="v_prediction",
        unet=dataclasses.replace(want.unet, num_res_blocks=1, num_head_channels=32, transformer_depth=1),
        vae=dataclasses.replace(want.vae, scaling_factor=0.18215))
    assert config_from_compvis(parse_yaml(text), base) == want
    v = text.replace("denoiser_scaling.EpsScaling", "denoiser_scaling.VScaling")
    assert config_from_compvis(parse_yaml(v), base) == dataclasses.replace(want, prediction_type="v_prediction")


@pytest.mark.parametrize("text, base, message", [
    (SDXL_BASE, SDXL_REFINER, r"its conditioner \(2 text tower\(s\), conditioning size\) does not describe this model "
                              r"\(1 text tower\(s\), conditioning aesthetic\)"),
    (SDXL_BASE.replace("layer: penultimate", "layer: last"), SDXL, "FrozenOpenCLIPEmbedder2 at layer 'last' is not supported"),
    (SDXL_BASE.replace("EpsScaling", "EDMScaling"), SDXL, "denoiser scaling .*EDMScaling is not supported"),
    (SDXL_BASE.replace("attn_type: vanilla-xformers", "attn_type: linear"), SDXL, "attn_type 'linear' is not supported"),
], ids=["another model", "last layer", "edm", "linear attention"])
def test_sgm_yamls_that_do_not_fit_are_refused(text, base, message):
    with pytest.raises(ValueError, match=message):
        config_from_compvis(parse_yaml(text), base)


def test_an_sgm_yaml_beside_an_sdxl_file_is_its_config(tmp_path):
    """A tiny SDXL single file with its sd_xl_base.yaml (sizes set to the tiny model's, VScaling) beside it: the
    YAML's prediction type, and the rest as the file's shapes and the family give it (heads 64 wide and 32 GroupNorm
    groups, which the shapes cannot tell)."""
    config = ModelConfig.from_dict({**TINY_SDXL.to_dict(), "unet": {**TINY_SDXL.to_dict()["unet"], "model_channels": 64,
                                                                     "num_head_channels": 64}})
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(original_sdxl_checkpoint(random_state(config)), path)
    u = config.unet
    (tmp_path / "model.yaml").write_text(
        SDXL_BASE.replace("adm_in_channels: 2816", f"adm_in_channels: {u.adm_in_channels}")
        .replace("model_channels: 320", f"model_channels: {u.model_channels}")
        .replace("channel_mult: [1, 2, 4]\n", f"channel_mult: {list(u.channel_mult)}\n")
        .replace("num_head_channels: 64", f"num_head_channels: {u.num_head_channels}")
        .replace("transformer_depth: [1, 2, 10]", f"transformer_depth: {list(u.transformer_depth)}")
        .replace("context_dim: 2048", f"context_dim: {u.context_dim}")
        .replace("ch: 128", f"ch: {TINY_SDXL.vae.ch}").replace("ch_mult: [1, 2, 4, 4]", f"ch_mult: {list(TINY_SDXL.vae.ch_mult)}")
        .replace("num_res_blocks: 2\n          attn", f"num_res_blocks: {TINY_SDXL.vae.num_res_blocks}\n          attn")
        .replace("denoiser_scaling.EpsScaling", "denoiser_scaling.VScaling"))
    model, _ = loader.load(path)
    got = model.config
    assert (got.family, got.prediction_type, got.unet, got.text_2) == (
        "SDXL", "v_prediction", dataclasses.replace(config.unet, norm_groups=32, sample_size=128),
        dataclasses.replace(config.text_2, num_attention_heads=1)), got


def test_a_v_yaml_beside_an_sd2_file_makes_it_v_prediction_at_its_size(tmp_path):
    """An SD 2.x file (heads 64 wide, as the shapes cannot tell) with v2-inference-v.yaml's parameterization beside
    it: v-prediction, and the 768-v default size (latents 96 wide), which the YAML's image_size (64) does not give."""
    config = ModelConfig.from_dict({**TINY_SD2.to_dict(), "unet": {**TINY_SD2.to_dict()["unet"], "model_channels": 64,
                                                                    "num_head_channels": 64}})
    path = tmp_path / "model.safetensors"
    write_single_file(path, random_state(config), open_clip=True)
    u = config.unet
    (tmp_path / "model.yaml").write_text(
        tiny_yaml().replace(f"model_channels: {TINY.unet.model_channels}", f"model_channels: {u.model_channels}")
        .replace(f"num_heads: {TINY.unet.num_heads}", f"num_head_channels: {u.num_head_channels}\n"
                 "        use_linear_in_transformer: True")
        .replace("  params:\n    linear_start", '  params:\n    parameterization: "v"\n    linear_start')
        .replace("FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder\n      params:\n        layer: penultimate"))
    model, tokenizer = loader.load(path)
    assert model.config.prediction_type == "v_prediction", model.config
    # GroupNorm's group count is in neither the YAML nor the shapes: CompVis's 32.
    assert model.config.unet == dataclasses.replace(u, sample_size=96, norm_groups=32), model.config.unet
    assert tokenizer.pad_id == 0


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


# --- CompVis training checkpoints ----------------------------------------------------------------------------------

class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_training_checkpoint(path, ckpt: dict, monkeypatch, payload=None) -> None:
    """torch.save of what PyTorch Lightning 1.x wrote for CompVis: the ModelCheckpoint class as a key of
    `callbacks`, and numpy scalars pickled as numpy 1.x pickled them (numpy.core.multiarray.scalar of a numpy.dtype
    and the value's bytes, which protocol 2 writes through _codecs.encode). Stand-in modules play both libraries,
    and are gone before the file is read."""
    with monkeypatch.context() as m:
        module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

        class ModelCheckpoint:
            pass

        ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = module.__name__, "ModelCheckpoint"
        module.ModelCheckpoint = ModelCheckpoint
        for name in ("pytorch_lightning", "pytorch_lightning.callbacks", module.__name__):
            m.setitem(sys.modules, name, module if name == module.__name__ else types.ModuleType(name))

        multiarray = types.ModuleType("numpy.core.multiarray")

        def scalar(dtype, data):
            return np.frombuffer(data, dtype)[0]

        scalar.__module__, scalar.__qualname__ = multiarray.__name__, "scalar"
        multiarray.scalar = scalar
        m.setitem(sys.modules, multiarray.__name__, multiarray)

        class Numpy1Scalar:
            def __init__(self, value):
                self.value = np.float64(value)

            def __reduce__(self):
                return scalar, (self.value.dtype, self.value.tobytes())

        obj = {
            "epoch": 5, "global_step": 470000, "pytorch-lightning_version": "1.4.2", "state_dict": ckpt,
            "callbacks": {ModelCheckpoint: {"monitor": None, "best_model_score": Numpy1Scalar(0.125),
                                            "best_model_path": "/logs/last.ckpt", "dirpath": "/logs"}},
            "optimizer_states": [], "lr_schedulers": [], "loss": Numpy1Scalar(0.5),
        }
        if payload is not None:
            obj["hparams"] = payload
        torch.save(obj, path, pickle_protocol=2)
    data = path.read_bytes()
    assert b"numpy.core.multiarray" in data and b"_codecs" in data and b"pytorch_lightning.callbacks" in data


@pytest.fixture(scope="module")
def tiny_ckpt():
    return original_checkpoint(random_state(TINY, seed=0))


def test_compvis_training_checkpoint_loads_like_its_safetensors(tmp_path, tiny_ckpt, monkeypatch):
    path = tmp_path / "sd-v1-4.ckpt"
    write_training_checkpoint(path, tiny_ckpt, monkeypatch)
    safetensors.torch.save_file(tiny_ckpt, tmp_path / "same.safetensors")
    assert "pytorch_lightning" not in sys.modules
    _, got, _ = loader.load_state_dict(path)
    _, want, _ = loader.load_state_dict(tmp_path / "same.safetensors")
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert got.keys() == want.keys() and not differ, f"training checkpoint differs from its safetensors: {differ[:5]}"
    assert "pytorch_lightning" not in sys.modules, "reading the checkpoint imported pytorch_lightning"


def test_training_checkpoint_with_a_reduce_payload_is_refused_and_never_run(tmp_path, tiny_ckpt, monkeypatch):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    write_training_checkpoint(path, tiny_ckpt, monkeypatch, payload=RunsCode(marker))
    with pytest.raises(CheckpointError, match="pickled code or objects that are not plain tensors"):
        loader.load(path)
    assert not marker.exists(), "loading the checkpoint ran pickled code"
    path.write_bytes(pickle.dumps({"state_dict": tiny_ckpt, "x": RunsCode(marker)}, protocol=2))
    with pytest.raises(CheckpointError):
        loader.load(path)
    assert not marker.exists(), "loading the pickle ran its code"


# --- separate VAE --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vae_files(tmp_path_factory, tiny_ckpt):
    """Model A, a VAE from model B in the layouts people have, and A with B's VAE merged in."""
    root = tmp_path_factory.mktemp("vae")
    other = original_checkpoint(random_state(TINY, seed=7))
    vae_b = {k.removeprefix("first_stage_model."): v for k, v in other.items() if k.startswith("first_stage_model.")}
    safetensors.torch.save_file(tiny_ckpt, root / "a.safetensors")
    safetensors.torch.save_file(vae_b, root / "vae.safetensors")
    torch.save({"state_dict": {**{"first_stage_model." + k: v for k, v in vae_b.items()},
                               "first_stage_model.loss.logvar": torch.zeros(())}}, root / "vae.ckpt")
    write_diffusers_folder(root / "b-diffusers", other, TINY, tokenizer=False)
    merged = {k: v for k, v in tiny_ckpt.items() if not k.startswith("first_stage_model.")}
    merged |= {k: v for k, v in other.items() if k.startswith("first_stage_model.")}
    safetensors.torch.save_file(merged, root / "merged.safetensors")
    for name in ("a", "merged"):
        (root / f"{name}.json").write_text(TINY.to_json())
    return root


def vae_weights(pipe) -> dict:
    return {k: v.clone() for k, v in pipe.vae.state_dict().items()}


@pytest.mark.parametrize("vae", ["vae.safetensors", "vae.ckpt", "b-diffusers/vae", "b-diffusers"],
                         ids=["single-safetensors", "ckpt-with-prefix", "diffusers-vae-folder", "diffusers-model-folder"])
def test_separate_vae_equals_the_merged_checkpoint(vae_files, vae):
    merged = Pipeline.from_checkpoint(vae_files / "merged.safetensors")
    pipe = Pipeline.from_checkpoint(vae_files / "a.safetensors", vae=vae_files / vae)
    want, got = vae_weights(merged), vae_weights(pipe)
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, f"VAE from {vae} differs from the merged checkpoint's in {differ[:5]}"
    if vae == "vae.safetensors":
        assert np.array_equal(pipe.txt2img("a cube", **GEN), merged.txt2img("a cube", **GEN)), "images differ"


def test_load_vae_refuses_what_does_not_fit_and_changes_nothing(vae_files, tmp_path):
    pipe = Pipeline.from_checkpoint(vae_files / "a.safetensors")
    before = vae_weights(pipe)
    small = {k: v[..., :1].contiguous() if k == "encoder.conv_in.weight" else v
             for k, v in safetensors.torch.load_file(vae_files / "vae.safetensors").items()}
    safetensors.torch.save_file(small, tmp_path / "small.safetensors")
    with pytest.raises(CheckpointError, match=r"does not fit this model's VAE; 1 wrongly shaped tensor\(s\): "
                                              r"vae.encoder.conv_in.weight \(file \[32, 3, 3, 1\], model \[32, 3, 3, 3\]\)"):
        pipe.load_vae(tmp_path / "small.safetensors")
    safetensors.torch.save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, tmp_path / "lora.safetensors")
    with pytest.raises(CheckpointError, match="not a VAE"):
        pipe.load_vae(tmp_path / "lora.safetensors")
    with pytest.raises(CheckpointError, match="no such file"):
        pipe.load_vae(tmp_path / "absent.safetensors")
    after = vae_weights(pipe)
    assert all(torch.equal(after[k], before[k]) for k in before), "a refused VAE changed the weights"
