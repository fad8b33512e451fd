"""LoRA and LyCORIS files on the tiny model: the images equal diffusers' own load_lora_weights + fuse_lora (and
set_adapters for two at once) on the same weights and seed; LoHa and LoKr equal a checkpoint with the update merged
in by the definitions, written out here in float64; switching is exact; bad files are refused with the weights left
as they were."""

import hashlib
import json

import numpy as np
import pytest
import safetensors.torch
import torch

from tritonsd import CheckpointError, Pipeline
from tritonsd.engine.lora import extract_lora_tags
from tiny import TINY, original_checkpoint, random_state, write_diffusers_folder, write_single_file
from test_parity import diffusers_pipeline, psnr

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

RANK = 4
GEN = dict(steps=3, guidance_scale=7.5, sampler="euler", seed=5, width=32, height=32, output_type="np")
PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    state = random_state(TINY, seed=0)
    single = root / "tiny.safetensors"
    ckpt = write_single_file(single, state)
    folder = root / "tiny-diffusers"
    write_diffusers_folder(folder, ckpt, TINY)
    return root, single, folder, state


@pytest.fixture(scope="module")
def pipe(files):
    return Pipeline.from_checkpoint(files[1], config=TINY)


def theirs(folder):
    """A fresh diffusers pipeline on the tiny weights (LoRAs change its modules)."""
    parts = dict(
        unet=diffusers.UNet2DConditionModel.from_pretrained(folder / "unet").eval(),
        vae=diffusers.AutoencoderKL.from_pretrained(folder / "vae").eval(),
        text_encoder=transformers.CLIPTextModel.from_pretrained(folder / "text_encoder").eval(),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer", model_max_length=77),
    )
    return diffusers_pipeline(parts, "euler", img2img=False)


def their_image(pipeline) -> np.ndarray:
    return pipeline(PROMPT, num_inference_steps=GEN["steps"], guidance_scale=GEN["guidance_scale"], height=32, width=32,
                    output_type="np", generator=torch.Generator("cpu").manual_seed(GEN["seed"])).images


def diffusers_modules(folder) -> dict[str, torch.Size]:
    """{diffusers/transformers module name: weight shape} of the layers a full LoRA patches: every attention,
    feed-forward and projection layer, plus the ResNets' convolutions (LoCon)."""
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet")
    text = transformers.CLIPTextModel.from_pretrained(folder / "text_encoder")
    wanted = ("attn1.to_", "attn2.to_", "ff.net", "proj_in", "proj_out", "resnets.0.conv1", "resnets.1.conv2")
    layers = {f"unet.{n}": m.weight.shape for n, m in unet.named_modules()
              if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and any(w in n for w in wanted)}
    layers |= {"text_encoder." + n.removeprefix("text_model."): m.weight.shape for n, m in text.named_modules()
               if isinstance(m, torch.nn.Linear) and ".layers." in n}
    return layers


def kohya_name(name: str) -> str:
    part, path = name.split(".", 1)
    return ("lora_unet_" if part == "unet" else "lora_te_text_model_") + path.replace(".", "_")


def random_lora(layers: dict, seed: int, rank: int = RANK) -> dict[str, tuple]:
    """{module: (down, up, alpha)}, large enough to change the image."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in layers.items():
        conv = len(shape) == 4
        down = torch.randn(rank, *shape[1:], generator=g) / shape[1:].numel() ** 0.5
        up = torch.randn(shape[0], rank, *((1, 1) if conv else ()), generator=g) * 0.5
        out[name] = (down, up, float(rank) * 2)
    return out


def write_kohya(path, lora: dict, names=kohya_name) -> None:
    tensors = {}
    for name, (down, up, alpha) in lora.items():
        key = names(name)
        tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(alpha)}
    safetensors.torch.save_file(tensors, path)


def weights(pipe) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in pipe.model.named_parameters()}


def assert_weights_equal(pipe, before: dict, what: str):
    changed = [k for k, v in pipe.model.named_parameters() if not torch.equal(v, before[k])]
    assert not changed, f"{what}: {len(changed)} weights differ from before: {changed[:5]}"


def assert_close_images(got, want, what: str, db: float = 40.0):
    value = psnr(got, want)
    assert value >= db, f"{what}: PSNR {value:.1f} dB against the reference < {db} dB"


# --- against diffusers ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kohya(files):
    root, _, folder, _ = files
    layers = diffusers_modules(folder)
    lora = random_lora(layers, seed=1)
    path = root / "kohya.safetensors"
    write_kohya(path, lora)
    return path, lora, layers


def test_kohya_lora_matches_diffusers(pipe, files, kohya):
    path, _, _ = kohya
    base = pipe.txt2img(PROMPT, **GEN)
    reference = theirs(files[2])
    reference.load_lora_weights(str(path))
    reference.fuse_lora(lora_scale=0.8)
    want = their_image(reference)
    name = pipe.load_lora(path, scale=0.8)
    try:
        assert name == "kohya" and pipe.loras == {"kohya": 0.8}
        got = pipe.txt2img(PROMPT, **GEN)
    finally:
        pipe.unload_lora()
    assert psnr(base, want) < 25, f"the LoRA hardly changes the image (PSNR {psnr(base, want):.1f} dB to the base)"
    assert_close_images(got, want, "kohya LoRA (diffusers-style names, LoCon convolutions) at 0.8")


def compvis_names(files) -> dict[str, str]:
    """diffusers UNet module -> CompVis module (the engine's names), read off diffusers' own single-file converter:
    the tensor each CompVis weight becomes."""
    from diffusers.loaders import single_file_utils as sf
    from tiny import original_config

    ckpt = original_checkpoint(files[3], extras=False)
    config = sf.create_unet_diffusers_config_from_ldm(original_config(TINY), ckpt)
    converted = sf.convert_ldm_unet_checkpoint(ckpt, config)
    where = {t.data_ptr(): k.removeprefix("model.diffusion_model.") for k, t in ckpt.items()}
    return {"unet." + k.removesuffix(".weight"): where[t.data_ptr()].removesuffix(".weight")
            for k, t in converted.items() if k.endswith(".weight")}


def test_kohya_compvis_names_give_the_same_image(pipe, files, kohya, tmp_path):
    """diffusers does not read CompVis-style names for SD 1.x; the same factors under diffusers-style names (checked
    against diffusers above) are the reference."""
    path, lora, _ = kohya
    names = compvis_names(files)
    compvis = tmp_path / "compvis.safetensors"
    write_kohya(compvis, lora, names=lambda n: "lora_unet_" + names[n].replace(".", "_") if n in names else kohya_name(n))
    assert any("input_blocks_1_1_transformer_blocks" in k for k in safetensors.torch.load_file(compvis))
    images = []
    for file in (path, compvis):
        pipe.load_lora(file, name="x")
        try:
            images.append(pipe.txt2img(PROMPT, **GEN))
        finally:
            pipe.unload_lora()
    assert np.array_equal(images[0], images[1]), "CompVis-style names give another image than diffusers-style ones"
