"""LoRA and LyCORIS files on the tiny model: the images equal diffusers' own load_lora_weights + fuse_lora (and
set_adapters for two at once) on the same weights and seed; LoHa and LoKr equal a checkpoint with the update merged
in by the definitions, written out here in float64; switching is exact; bad files are refused with the weights left
as they were."""

import dataclasses
import hashlib
import json

import numpy as np
import pytest
import safetensors.torch
import torch

from tritonsd import CheckpointError, Pipeline
from tritonsd.engine.lora import extract_lora_tags
from tritonsd.engine.model import StableDiffusion
from tritonsd.engine.tokenizer import CLIPTokenizer
from tritonsd.loader.lora import lora_targets
from tiny import TINY, TINY_SD2, original_checkpoint, random_state, write_diffusers_folder, write_single_file
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


def theirs(folder, family="sd1"):
    """A fresh diffusers pipeline on the tiny weights (LoRAs change its modules)."""
    parts = dict(
        unet=diffusers.UNet2DConditionModel.from_pretrained(folder / "unet").eval(),
        vae=diffusers.AutoencoderKL.from_pretrained(folder / "vae").eval(),
        text_encoder=transformers.CLIPTextModel.from_pretrained(folder / "text_encoder").eval(),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer", model_max_length=77),
    )
    return diffusers_pipeline(parts, family, "euler", img2img=False)


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


@pytest.fixture(scope="module")
def peft_file(files):
    return write_peft(files[2], files[0] / "peft.safetensors")


def write_peft(folder, path):
    """A LoRA trained-and-saved the diffusers way: PEFT adapters on diffusers' UNet and transformers' CLIP, with
    lora_alpha != r so the scaling counts, written by diffusers' save_lora_weights with its adapter metadata."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(3)
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet")
    text = transformers.CLIPTextModel.from_pretrained(folder / "text_encoder")
    unet_config = LoraConfig(r=RANK, lora_alpha=6, init_lora_weights=False, target_modules=[
        "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"])
    text_config = LoraConfig(r=2, lora_alpha=3, init_lora_weights=False,
                             target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
    inject_adapter_in_model(unet_config, unet)
    inject_adapter_in_model(text_config, text)
    diffusers.StableDiffusionPipeline.save_lora_weights(
        path.parent, unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=get_peft_model_state_dict(text), unet_lora_adapter_metadata=unet_config.to_dict(),
        text_encoder_lora_adapter_metadata=text_config.to_dict(), weight_name=path.name)
    return path


def test_peft_lora_matches_diffusers(pipe, files, peft_file):
    keys = list(safetensors.torch.load_file(peft_file))
    assert any(k.startswith("unet.") and "lora_A" in k for k in keys), keys[:3]
    assert any(k.startswith("text_encoder.") for k in keys), keys[:3]
    reference = theirs(files[2])
    reference.load_lora_weights(str(peft_file))
    reference.fuse_lora(lora_scale=0.7)
    want = their_image(reference)
    pipe.load_lora(peft_file, scale=0.7)
    try:
        got = pipe.txt2img(PROMPT, **GEN)
    finally:
        pipe.unload_lora()
    assert psnr(pipe.txt2img(PROMPT, **GEN), want) < 25, "the PEFT LoRA hardly changes the image"
    assert_close_images(got, want, "PEFT LoRA (r != alpha, from diffusers' save_lora_weights) at 0.7")


def test_two_loras_match_diffusers_set_adapters(pipe, files, kohya, peft_file):
    reference = theirs(files[2])
    reference.load_lora_weights(str(kohya[0]), adapter_name="a")
    reference.load_lora_weights(str(peft_file), adapter_name="b")
    reference.set_adapters(["a", "b"], adapter_weights=[0.6, -0.5])
    want = their_image(reference)
    pipe.load_lora(kohya[0], scale=0.6, name="a")
    pipe.load_lora(peft_file, scale=-0.5, name="b")
    try:
        assert pipe.loras == {"a": 0.6, "b": -0.5}
        got = pipe.txt2img(PROMPT, **GEN)
    finally:
        pipe.unload_lora()
    assert_close_images(got, want, "two LoRAs at once (0.6 and -0.5)")


def test_attention_processor_names_equal_peft_names(pipe, peft_file, tmp_path):
    """diffusers' older format (….processor.to_q_lora.down.weight) names the same layers."""
    state = {k: v for k, v in safetensors.torch.load_file(peft_file).items()
             if k.startswith("unet.") and ".attn" in k and ".to_" in k}
    processor = {}
    for k, v in state.items():
        module, _, leaf = k.removesuffix(".weight").rpartition(".")
        block, proj = module.rsplit(".to_", 1)
        proj = "out" if proj == "out.0" else proj
        processor[f"{block}.processor.to_{proj}_lora.{'down' if leaf == 'lora_A' else 'up'}.weight"] = v
    peft_subset, old = tmp_path / "subset.safetensors", tmp_path / "processor.safetensors"
    safetensors.torch.save_file(state, peft_subset)
    safetensors.torch.save_file(processor, old)
    params = []
    for file in (peft_subset, old):
        pipe.load_lora(file, name="x")
        params.append(weights(pipe))
        pipe.unload_lora()
    differ = [k for k in params[0] if not torch.equal(params[0][k], params[1][k])]
    assert not differ, f"processor-style names patch other weights: {differ[:5]}"


# --- SD 2.x ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    """TINY_SD2 as an original single file, its text tower in OpenCLIP's layout (one packed in_proj per block, where
    the LoRAs' q/k/v updates go), and as a diffusers folder; our pipeline on the single file; a kohya LoRA of every
    layer a full LoRA patches, text q/k/v included, and a PEFT one."""
    root = tmp_path_factory.mktemp("lora-sd2")
    single, folder = root / "sd2.safetensors", root / "sd2-diffusers"
    ckpt = write_single_file(single, random_state(TINY_SD2, seed=2), open_clip=True)
    assert any(k.endswith("attn.in_proj_weight") for k in ckpt)
    write_diffusers_folder(folder, ckpt, TINY_SD2)
    kohya = root / "kohya.safetensors"
    write_kohya(kohya, random_lora(diffusers_modules(folder), seed=4))
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_k_proj.") for k in safetensors.torch.load_file(kohya))
    loras = {"kohya": kohya, "peft": write_peft(folder, root / "peft.safetensors")}
    return Pipeline.from_checkpoint(single, config=TINY_SD2), folder, loras


@pytest.mark.parametrize("kind", ["kohya", "peft"])
def test_sd2_loras_match_diffusers_on_the_packed_open_clip_tower(sd2, kind):
    """diffusers reads kohya's names (lora_te_text_model_encoder_layers_N_self_attn_q_proj, as AUTOMATIC1111 does for
    SD 2.x, onto OpenCLIP's in_proj) and PEFT's with its own conversion; the text conditioning and the image must
    equal ours, and unloading must give the packed file's weights back bit for bit."""
    pipe, folder, loras = sd2
    before, base_context = weights(pipe), pipe.encode_prompt(PROMPT)
    reference = theirs(folder, "sd2")
    reference.load_lora_weights(str(loras[kind]))
    reference.fuse_lora(lora_scale=0.8)
    want_context = reference.encode_prompt(PROMPT, "cpu", 1, False)[0]
    want = their_image(reference)
    pipe.load_lora(loras[kind], scale=0.8)
    try:
        context, got = pipe.encode_prompt(PROMPT), pipe.txt2img(PROMPT, **GEN)
    finally:
        pipe.unload_lora()
    assert_weights_equal(pipe, before, f"SD 2.x after unloading the {kind} LoRA")
    err = ((context - want_context).norm() / want_context.norm()).item()
    assert err <= 1e-5, f"{kind}: text conditioning with the LoRA differs from diffusers' by {err:.2e}"
    assert not torch.allclose(base_context, want_context, atol=1e-2), "the LoRA hardly changes the text conditioning"
    assert psnr(pipe.txt2img(PROMPT, **GEN), want) < 25, f"the {kind} LoRA hardly changes the image"
    assert_close_images(got, want, f"SD 2.x, {kind} LoRA at 0.8")


# --- other families' LoRAs -----------------------------------------------------------------------------------------

def wide(config, width: int):
    """A config at a real family's text width (SD 1.x 768, SD 2.x 1024) and otherwise tiny: the shapes a LoRA for
    that family has where it meets the text features."""
    text = dataclasses.replace(config.text, hidden_size=width, vocab_size=8, intermediate_size=64)
    return dataclasses.replace(config, text=text, unet=dataclasses.replace(config.unet, context_dim=width))


def family_lora(path, config):
    """A kohya LoRA of a text-encoder query and a UNet cross-attention key, for the model of `config`."""
    targets = lora_targets(StableDiffusion.on_meta(config))
    layers = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj": "text_encoder_encoder_layers_0_self_attn_q_proj",
              "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k":
                  "unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k"}
    write_kohya(path, random_lora({name: targets[t].shape for name, t in layers.items()}, seed=6), names=str)


@pytest.mark.parametrize("model_family, lora_family", [("SD 2.x", "SD 1.x"), ("SD 1.x", "SD 2.x")])
def test_a_lora_for_another_family_is_refused_and_changes_nothing(tmp_path, model_family, lora_family):
    configs = {"SD 1.x": wide(TINY, 768), "SD 2.x": wide(TINY_SD2, 1024)}
    widths = {"SD 1.x": 768, "SD 2.x": 1024}
    torch.manual_seed(0)
    pipe = Pipeline(StableDiffusion(configs[model_family]).eval(), CLIPTokenizer.default())
    family_lora(tmp_path / "own.safetensors", configs[model_family])
    family_lora(tmp_path / "other.safetensors", configs[lora_family])
    pipe.load_lora(tmp_path / "own.safetensors", scale=0.5)
    before = weights(pipe)
    with pytest.raises(CheckpointError) as e:
        pipe.load_lora(tmp_path / "other.safetensors")
    message = (f"other.safetensors: is a LoRA for {lora_family} (its cross-attention reads {widths[lora_family]}-wide "
               f"text features), but this model is {model_family}, whose text features are {widths[model_family]} wide")
    assert message in str(e.value), str(e.value)
    assert_weights_equal(pipe, before, f"{model_family} after refusing an {lora_family} LoRA")
    assert pipe.loras == {"own": 0.5}


# --- LyCORIS against the definitions -------------------------------------------------------------------------------

def _factors(g, *shapes):
    return [torch.randn(*s, generator=g, dtype=torch.float64) / s[-1] ** 0.5 for s in shapes]


def lycoris_layers(state) -> dict[str, tuple[str, dict, float]]:
    """{original checkpoint key: (kohya module name, float64 factors, alpha)}; layers of every shape the formats
    handle: rows of the joined q/k/v and k/v weights, a 3x3 convolution (Tucker cores), a 1x1 one, text layers."""
    g = torch.Generator().manual_seed(9)
    u, t = "model.diffusion_model.", "cond_stage_model.transformer.text_model."
    block = "input_blocks.1.1.transformer_blocks.0."
    loha = {
        u + block + "attn1.to_q": dict(zip(["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"], _factors(g, (32, 3), (3, 32), (32, 3), (3, 32)))),
        u + block + "attn1.to_v": dict(zip(["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"], _factors(g, (32, 2), (2, 32), (32, 2), (2, 32)))),
        u + block + "ff.net.2": dict(zip(["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"], _factors(g, (32, 4), (4, 128), (32, 4), (4, 128)))),
        u + "input_blocks.4.0.in_layers.2": dict(zip(  # Tucker: w_a [r, out], w_b [r, in], t [r, r, 3, 3]
            ["hada_w1_a", "hada_w1_b", "hada_t1", "hada_w2_a", "hada_w2_b", "hada_t2"],
            _factors(g, (3, 64), (3, 32), (3, 3, 3, 3), (3, 64), (3, 32), (3, 3, 3, 3)))),
        t + "encoder.layers.0.mlp.fc1": dict(zip(["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"], _factors(g, (64, 2), (2, 32), (64, 2), (2, 32)))),
    }
    lokr = {
        u + block + "attn2.to_k": dict(zip(["lokr_w1_a", "lokr_w1_b", "lokr_w2"], _factors(g, (4, 2), (2, 4), (8, 8)))),
        u + block + "attn2.to_v": dict(zip(["lokr_w1", "lokr_w2_a", "lokr_w2_b"], _factors(g, (2, 4), (16, 3), (3, 8)))),
        u + block + "attn2.to_out.0": dict(zip(["lokr_w1", "lokr_w2"], _factors(g, (4, 4), (8, 8)))),
        u + "input_blocks.1.1.proj_in": dict(zip(["lokr_w1", "lokr_w2"], _factors(g, (2, 2), (16, 16, 1, 1)))),
        u + "output_blocks.0.0.in_layers.2": dict(zip(["lokr_w1", "lokr_w2_a", "lokr_w2_b", "lokr_t2"],
                                                      _factors(g, (4, 4), (2, 16), (2, 32), (2, 2, 3, 3)))),
        t + "encoder.layers.1.self_attn.q_proj": dict(zip(["lokr_w1", "lokr_w2"], _factors(g, (4, 4), (8, 8)))),
    }
    locon = {  # LoCon with a Tucker core: down [r, in, 1, 1], mid [r, r, 3, 3], up [out, r, 1, 1]
        u + "input_blocks.2.0.in_layers.2": dict(zip(["lora_down.weight", "lora_mid.weight", "lora_up.weight"],
                                                     _factors(g, (3, 32, 1, 1), (3, 3, 3, 3), (32, 3, 1, 1)))),
    }
    loha |= locon
    assert all(k + ".weight" in state for k in {**loha, **lokr}), "a layer name is not in the checkpoint"

    def kohya(key):
        if key.startswith(u):
            return "lora_unet_" + key.removeprefix(u).replace(".", "_")
        return "lora_te_text_model_" + key.removeprefix(t).replace(".", "_")

    return {k: (kohya(k), f, 5.0) for k, f in {**loha, **lokr}.items()}


def merged_delta(factors: dict, alpha: float, shape) -> torch.Tensor:
    """ΔW by the LyCORIS definitions (as AUTOMATIC1111's network_lora.py, network_hada.py and network_lokr.py apply
    them)."""
    f = factors
    if "lora_mid.weight" in f:  # W[o, i, k, l] = Σ_nm up[o, n] mid[n, m, k, l] down[m, i]
        up, down = f["lora_up.weight"][:, :, 0, 0], f["lora_down.weight"][:, :, 0, 0]
        return torch.einsum("on,nmkl,mi->oikl", up, f["lora_mid.weight"], down) * (alpha / down.shape[0])
    if "hada_w1_a" in f:
        def product(i):
            if f"hada_t{i}" in f:  # W[p, q, k, l] = Σ_ij t[i, j, k, l] a[i, p] b[j, q]
                return torch.einsum("ip,jq,ijkl->pqkl", f[f"hada_w{i}_a"], f[f"hada_w{i}_b"], f[f"hada_t{i}"])
            return (f[f"hada_w{i}_a"] @ f[f"hada_w{i}_b"]).reshape(shape)
        return product(1) * product(2) * (alpha / f["hada_w1_b"].shape[0])
    w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
    if "lokr_t2" in f:
        w2 = torch.einsum("ip,jq,ijkl->pqkl", f["lokr_w2_a"], f["lokr_w2_b"], f["lokr_t2"])
    else:
        w2 = f["lokr_w2"] if "lokr_w2" in f else f["lokr_w2_a"] @ f["lokr_w2_b"]
    rank = f["lokr_w2_b"].shape[0] if "lokr_w2_b" in f else f["lokr_w1_b"].shape[0] if "lokr_w1_b" in f else None
    scale = alpha / rank if rank else 1.0
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]
    return (torch.kron(w1, w2) * scale).reshape(shape)


def test_loha_lokr_and_locon_tucker_equal_the_merged_checkpoint(pipe, files, tmp_path):
    root, _, _, state = files
    ckpt = original_checkpoint(state)
    layers = lycoris_layers(ckpt)
    lycoris, merged = {}, dict(ckpt)
    for key, (name, factors, alpha) in layers.items():
        lycoris |= {f"{name}.{leaf}": t.float() for leaf, t in factors.items()} | {f"{name}.alpha": torch.tensor(alpha)}
        w = ckpt[key + ".weight"]
        merged[key + ".weight"] = (w.double() + 0.9 * merged_delta(factors, alpha, w.shape)).float()
    safetensors.torch.save_file(lycoris, tmp_path / "lycoris.safetensors")
    safetensors.torch.save_file(merged, tmp_path / "merged.safetensors")
    want = Pipeline.from_checkpoint(tmp_path / "merged.safetensors", config=TINY).txt2img(PROMPT, **GEN)
    pipe.load_lora(tmp_path / "lycoris.safetensors", scale=0.9)
    try:
        got = pipe.txt2img(PROMPT, **GEN)
    finally:
        pipe.unload_lora()
    assert psnr(pipe.txt2img(PROMPT, **GEN), want) < 30, "the LyCORIS layers hardly change the image"
    assert_close_images(got, want, "LoHa + LoKr + LoCon (Tucker) against the merged checkpoint")


# --- switching -----------------------------------------------------------------------------------------------------

def test_set_scale_equals_loading_at_that_scale_and_unload_is_exact(pipe, kohya, peft_file):
    before, image = weights(pipe), pipe.txt2img(PROMPT, **GEN)
    pipe.load_lora(kohya[0], scale=0.3, name="k")
    at_03 = weights(pipe)
    pipe.unload_lora("k")
    pipe.load_lora(kohya[0], scale=1.0, name="k")
    pipe.load_lora(peft_file, scale=0.5, name="p")
    pipe.set_lora_scale("k", 0.3)
    pipe.unload_lora("p")
    assert pipe.loras == {"k": 0.3}
    differ = [k for k, v in pipe.model.named_parameters() if not torch.equal(v, at_03[k])]
    assert not differ, f"set_lora_scale(0.3) after other changes differs from loading at 0.3 in {differ[:5]}"
    pipe.set_lora_scale("k", 0.0)
    assert_weights_equal(pipe, before, "scale 0")
    pipe.unload_lora()
    assert pipe.loras == {}
    assert_weights_equal(pipe, before, "after unloading every LoRA")
    assert np.array_equal(pipe.txt2img(PROMPT, **GEN), image), "the image after unloading differs from before"


def test_the_result_does_not_depend_on_the_order_of_loading(pipe, kohya, peft_file):
    pipe.load_lora(kohya[0], name="a", scale=0.7)
    pipe.load_lora(peft_file, name="b", scale=1.1)
    first = weights(pipe)
    pipe.unload_lora()
    pipe.load_lora(peft_file, name="b", scale=1.1)
    pipe.load_lora(kohya[0], name="a", scale=0.7)
    try:
        differ = [k for k, v in pipe.model.named_parameters() if not torch.equal(v, first[k])]
    finally:
        pipe.unload_lora()
    assert not differ, f"loading in the other order gives other weights: {differ[:5]}"


def test_fp16_file_loaded_as_fp16_is_not_written_and_restores_exactly(files, kohya, tmp_path):
    """In float16 from a float16 file the weights are memory-mapped views of the file; patching them must not
    write into it."""
    path = tmp_path / "half.safetensors"
    write_single_file(path, {k: v.half() for k, v in files[3].items()})
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    half = Pipeline.from_checkpoint(path, dtype=torch.float16, config=TINY)
    before = weights(half)
    half.load_lora(kohya[0])
    changed = sum(not torch.equal(v, before[k]) for k, v in half.model.named_parameters())
    assert changed > 50, f"the LoRA changed only {changed} weights"
    half.set_lora_scale("kohya", -2.0)
    half.unload_lora()
    assert_weights_equal(half, before, "float16 after unloading")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, "applying a LoRA wrote into the checkpoint file"


def test_a_model_built_in_memory_keeps_copies_and_restores_exactly(files, kohya):
    from tritonsd import loader

    model, tokenizer = loader.load(files[1], config=TINY)
    built = Pipeline(model, tokenizer)
    before = weights(built)
    built.load_lora(kohya[0], scale=2.0)
    built.unload_lora()
    assert_weights_equal(built, before, "in-memory model after unloading")


def test_a_checkpoint_changed_on_disk_is_not_used_as_the_base(files, kohya, tmp_path):
    import os

    path = tmp_path / "copy.safetensors"
    path.write_bytes(files[1].read_bytes())
    copy = Pipeline.from_checkpoint(path, config=TINY)
    copy.load_lora(kohya[0])
    os.utime(path, ns=(0, 0))
    with pytest.raises(CheckpointError, match="changed on disk since it was loaded"):
        copy.unload_lora()


# --- prompt tags ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt, text, tags", [
    ("a cat <lora:style:0.8>, sharp", "a cat , sharp", [("style", 0.8)]),
    ("<lora:a b-c.v2>x<lyco:d:-1.5>", "x", [("a b-c.v2", 1.0), ("d", -1.5)]),
    ("no tags (word:1.2)", "no tags (word:1.2)", []),
])
def test_lora_tags_are_taken_out_of_the_prompt(prompt, text, tags):
    assert extract_lora_tags(prompt) == (text, tags)


@pytest.mark.parametrize("prompt, message", [
    ("<lora:x:0.5:1>", "separate text-encoder and UNet weights"),
    ("<lora:x:te=1>", "separate text-encoder and UNet weights"),
    ("<lora:x:strong>", "is not a number"),
    ("<lora:x:nan>", "must be finite"),
    ("<hypernet:x:1>", "only <lora:NAME:WEIGHT>"),
])
def test_bad_lora_tags_are_refused(prompt, message):
    with pytest.raises(ValueError, match=message):
        extract_lora_tags(prompt)


def test_prompt_tag_applies_the_lora_for_that_call_only(files, kohya, tmp_path):
    folder = tmp_path / "loras" / "sub"
    folder.mkdir(parents=True)
    (folder / "style.safetensors").write_bytes(kohya[0].read_bytes())
    tagged = Pipeline.from_checkpoint(files[1], config=TINY, lora_dirs=[tmp_path / "loras"])
    before = weights(tagged)
    got = tagged.txt2img(PROMPT + " <lora:style:0.8>", **GEN)
    assert_weights_equal(tagged, before, "after a call with a tag")
    tagged.load_lora(folder / "style.safetensors", scale=0.8)
    want = tagged.txt2img(PROMPT, **GEN)
    assert np.array_equal(got, want), "a <lora:style:0.8> tag differs from load_lora(scale=0.8)"
    # A tag naming a loaded LoRA sets its scale for the call.
    at_zero = tagged.txt2img(PROMPT + "<lora:style:0>", **GEN)
    assert tagged.loras == {"style": 0.8}, f"the tag's scale outlived the call: {tagged.loras}"
    tagged.unload_lora()
    assert np.array_equal(at_zero, tagged.txt2img(PROMPT, **GEN)), "<lora:style:0> on the loaded LoRA is not the base image"
    data = (folder / "style.safetensors").read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    assert tagged.lora_hashes(PROMPT + "<lora:style>") == {"style": hashlib.sha256(data[header:]).hexdigest()[:12]}
    with pytest.raises(ValueError, match="no LoRA named 'absent'"):
        tagged.txt2img(PROMPT + "<lora:absent:1>", **GEN)
    with pytest.raises(ValueError, match="name different LoRAs"):
        tagged.txt2img([PROMPT + "<lora:style:1>", PROMPT], **GEN)
    assert_weights_equal(tagged, before, "after refused calls")


# --- bad files -----------------------------------------------------------------------------------------------------

def _edit(change):
    def make(path, kohya):
        tensors = safetensors.torch.load_file(kohya[0])
        change(tensors)
        safetensors.torch.save_file(tensors, path)
    return make


def _first(tensors, suffix):
    return next(k for k in sorted(tensors) if k.endswith(suffix) and "attn1_to_k" in k)


def _bytes(data):
    def make(path, kohya):
        path.write_bytes(data(kohya[0].read_bytes()))
    return make


BAD = [
    ("empty file", _bytes(lambda _: b""), "not a checkpoint: it is an empty file"),
    ("no LoRA keys", _edit(lambda t: (t.clear(), t.update({"model.diffusion_model.out.2.weight": torch.zeros(4)}))),
     "not a LoRA: none of its 1 tensors"),
    ("truncated", _bytes(lambda d: d[: len(d) // 2]), "truncated or corrupt"),
    ("another size", _edit(lambda t: t.update({_first(t, "lora_up.weight"): torch.zeros(48, RANK)})),
     r"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k does not fit the model: it makes a 48-row "
     r"update of 1536 elements for unet.input_blocks.1.1.transformer_blocks.0.attn1.qkv rows 32:64, whose weight is \[32, 32\]"),
    ("another architecture", _edit(lambda t: t.update({"lora_unet_joint_blocks_0_x_attn_qkv.lora_down.weight": torch.zeros(2, 8),
                                                       "lora_unet_joint_blocks_0_x_attn_qkv.lora_up.weight": torch.zeros(8, 2)})),
     "1 of its layers name no layer of this model: lora_unet_joint_blocks_0_x_attn_qkv"),
    ("SDXL", _edit(lambda t: t.update({"lora_te2_text_model_x.lora_down.weight": torch.zeros(2, 8)})),
     r"is a LoRA for SDXL \(it patches two text encoders: lora_te2_\), but this model is SD 1.x"),
    ("NaN", _edit(lambda t: t[_first(t, "lora_down.weight")].view(-1).__setitem__(3, float("nan"))),
     "lora_down.weight holds NaN or infinite values"),
    ("DoRA", _edit(lambda t: t.update({_first(t, "lora_down.weight").replace("lora_down.weight", "dora_scale"): torch.ones(32, 1)})),
     r"holds DoRA \(weight-decomposed LoRA\)"),
    ("missing half", _edit(lambda t: t.pop(_first(t, "lora_up.weight"))), "attn1_to_k lacks lora_up.weight"),
]


@pytest.mark.parametrize("make, message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_lora_files_are_refused_and_change_nothing(pipe, kohya, peft_file, tmp_path, make, message):
    pipe.load_lora(peft_file, scale=0.5, name="loaded")
    try:
        before = weights(pipe)
        path = tmp_path / "bad.safetensors"
        make(path, kohya)
        with pytest.raises(CheckpointError, match=message) as e:
            pipe.load_lora(path)
        assert str(path) in str(e.value), f"the error does not name the file: {e.value}"
        assert_weights_equal(pipe, before, "after a refused LoRA")
        assert pipe.loras == {"loaded": 0.5}
    finally:
        pipe.unload_lora()


def test_bad_calls_are_refused(pipe, kohya, tmp_path):
    with pytest.raises(ValueError, match="no LoRA named 'nope' is loaded"):
        pipe.set_lora_scale("nope", 1.0)
    with pytest.raises(ValueError, match="no LoRA named 'nope' is loaded"):
        pipe.unload_lora("nope")
    with pytest.raises(CheckpointError, match="no such LoRA file"):
        pipe.load_lora(tmp_path / "absent.safetensors")
    pipe.load_lora(kohya[0])
    try:
        with pytest.raises(ValueError, match="already loaded"):
            pipe.load_lora(kohya[0])
        with pytest.raises(ValueError, match="finite number"):
            pipe.set_lora_scale("kohya", float("inf"))
    finally:
        pipe.unload_lora()


# --- command line --------------------------------------------------------------------------------------------------

def cli(capsys, *argv, status=0):
    from tritonsd.cli import main

    if status:
        with pytest.raises(SystemExit) as e:
            main([str(a) for a in argv])
        assert e.value.code == status, f"exit status {e.value.code}, expected {status}"
    else:
        main([str(a) for a in argv])
    return capsys.readouterr()


def test_cli_applies_loras_and_records_their_hashes(capsys, files, kohya, peft_file, tmp_path):
    from PIL import Image
    from tritonsd.pngmeta import parse_parameters

    root, single, _, _ = files
    (root / "tiny.json").write_text(TINY.to_json())
    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "style.safetensors").write_bytes(kohya[0].read_bytes())
    prompt = PROMPT + " <lora:style:0.8>"
    out = tmp_path / "a.png"
    cli(capsys, "txt2img", prompt, "--model", single, "--lora", f"{peft_file}:-0.5", "--lora-dir", tmp_path / "loras",
        "--steps", 3, "--seed", 5, "--width", 32, "--height", 32, "--device", "cpu", "-o", out, "--quiet")
    with Image.open(out) as im:
        parameters, got = parse_parameters(im.text["parameters"]), np.asarray(im.convert("RGB"))
    assert parameters["prompt"] == prompt, "the PNG should record the prompt as written, tags included"
    hashes = dict(item.split(": ") for item in parameters["Lora hashes"].split(", "))
    assert hashes.keys() == {"peft", "style"}, parameters["Lora hashes"]
    data = peft_file.read_bytes()
    assert hashes["peft"] == hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]

    api = Pipeline.from_checkpoint(single, lora_dirs=[tmp_path / "loras"])
    api.load_lora(peft_file, scale=-0.5)
    want = api.txt2img(prompt, steps=3, seed=5, width=32, height=32)[0]
    assert np.array_equal(got, np.asarray(want)), "the command line's image differs from the API's"


def sd15_lora(path, sdxl=False, width=768, layers=None):
    """A kohya LoRA for two full-size SD 1.5 layers (width 1024: SD 2.x's; or SDXL's: a CompVis-style UNet name and
    the second text encoder), or for the given {name: (rows, columns)}."""
    if layers is None:
        layers = ({"lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q": (640, 640),
                   "lora_te2_text_model_encoder_layers_0_mlp_fc1": (5120, 1280)} if sdxl else
                  {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (320, 320),
                   "lora_te_text_model_encoder_layers_0_mlp_fc1": (4 * width, width)})
    tensors = {}
    for name, (out, inp) in layers.items():
        tensors |= {f"{name}.lora_down.weight": torch.zeros(4, inp), f"{name}.lora_up.weight": torch.zeros(out, 4),
                    f"{name}.alpha": torch.tensor(4.0)}
    safetensors.torch.save_file(tensors, path)


def test_info_says_what_a_lora_or_vae_is_and_how_to_use_it(capsys, files, tmp_path):
    sd15_lora(tmp_path / "detail.safetensors")
    out = cli(capsys, "info", tmp_path / "detail.safetensors").out
    rows = dict(line.split(None, 1) for line in out.splitlines()[1:])
    assert rows["architecture"].startswith("a LoRA"), out
    assert rows["lora"] == "kohya for SD 1.x; layers: unet 1, text_encoder 1; rank 4", out
    sd15_lora(tmp_path / "sd2.safetensors", width=1024)
    out = cli(capsys, "info", tmp_path / "sd2.safetensors").out
    assert "  lora          kohya for SD 2.x; layers: unet 1, text_encoder 1; rank 4" in out, out
    unet_only = {k: v for k, v in safetensors.torch.load_file(tmp_path / "sd2.safetensors").items() if "unet" in k}
    safetensors.torch.save_file(unet_only, tmp_path / "unet.safetensors")
    out = cli(capsys, "info", tmp_path / "unet.safetensors").out
    assert "kohya for SD 1.x or SD 2.x; layers: unet 1; rank 4" in out, out
    assert "--lora PATH[:SCALE]" in rows["use"], out

    vae = {k.removeprefix("first_stage_model."): v for k, v in original_checkpoint(files[3]).items()
           if k.startswith("first_stage_model.")}
    safetensors.torch.save_file(vae, tmp_path / "vae.safetensors")
    out = cli(capsys, "info", tmp_path / "vae.safetensors").out
    assert "a VAE alone" in out and "--vae PATH" in out, out

    sd15_lora(tmp_path / "xl.safetensors", sdxl=True)
    described = json.loads(cli(capsys, "info", tmp_path / "xl.safetensors", "--json").out)
    assert described["lora"]["family"] == "SDXL", described["lora"]
    assert described["lora"]["layers"] == {"unet": 1, "text_encoder_2": 1}, described["lora"]
    # SD 1.5's UNet layer beside SDXL's second text encoder: a LoRA for no model.
    sd15_lora(tmp_path / "mixed.safetensors", layers={
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (320, 320),
        "lora_te2_text_model_encoder_layers_0_mlp_fc1": (5120, 1280)})
    err = cli(capsys, "info", tmp_path / "mixed.safetensors", status=2).err
    assert err.startswith("tritonsd: error: ") and "not a LoRA for any model tritonsd runs" in err, err
    assert "1 of its layers name no layer of this model" in err and "than this SDXL one" in err, err
    assert err.count("\n") == 1, err
    err = cli(capsys, "txt2img", "x", "--model", tmp_path / "detail.safetensors", "-o", tmp_path / "a.png", status=2).err
    assert "not a model but a LoRA" in err and "--lora" in err, err


@pytest.mark.parametrize("extra, message", [
    (["--lora", "{tmp}/absent.safetensors"], "--lora {tmp}/absent.safetensors: no such file"),
    (["--lora", "{tmp}/x.safetensors:inf"], "LoRA scale must be a finite number"),
    (["--lora-dir", "{tmp}/none"], "--lora-dir {tmp}/none: no such folder"),
    (["--vae", "{tmp}/vae.pt"], "--vae {tmp}/vae.pt: no such file or folder"),
    (["--prompt-tag", "<lora:style:1>"], "no LoRA named 'style' in no LoRA folders"),
    (["--prompt-tag", "<lora:style:1:2>"], "separate text-encoder and UNet weights are not supported"),
], ids=["missing-lora", "infinite-scale", "missing-lora-dir", "missing-vae", "tag-without-folders", "tag-two-weights"])
def test_cli_refuses_bad_lora_and_vae_options(capsys, tmp_path, extra, message):
    extra = [e.format(tmp=tmp_path) for e in extra]
    prompt = "a cube " + (extra.pop(1) if extra[0] == "--prompt-tag" else "")
    extra = [e for e in extra if e != "--prompt-tag"]
    err = cli(capsys, "txt2img", prompt, *extra, "-o", tmp_path / "a.png", status=2).err
    assert err.startswith("tritonsd: error: ") and err.count("\n") == 1, err
    assert message.format(tmp=tmp_path) in err, f"expected {message!r} in {err!r}"
    assert not (tmp_path / "a.png").exists()


# --- SDXL ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    """The tiny SDXL base as an original single file (its config beside it), and its weights."""
    from tiny import TINY_SDXL, original_sdxl_checkpoint

    root = tmp_path_factory.mktemp("xl-lora")
    state = random_state(TINY_SDXL, seed=11)
    ckpt = original_sdxl_checkpoint(state)
    single = root / "xl.safetensors"
    safetensors.torch.save_file(ckpt, single)
    single.with_suffix(".json").write_text(TINY_SDXL.to_json())
    return root, single, ckpt


def xl_diffusers(ckpt: dict) -> dict[str, torch.nn.Module]:
    """diffusers' UNet and transformers' two towers holding an original SDXL checkpoint's weights, converted by
    diffusers' own single-file code."""
    from diffusers.loaders import single_file_utils as sf
    from tiny import TINY_SDXL, diffusers_text_towers, unet_diffusers_config

    config = unet_diffusers_config(TINY_SDXL, ckpt)
    unet = diffusers.UNet2DConditionModel(**config)
    unet.load_state_dict(sf.convert_ldm_unet_checkpoint(ckpt, config), strict=True)
    return {"unet": unet, **diffusers_text_towers(ckpt, TINY_SDXL)}


def xl_fused(ckpt: dict, lora, scale: float) -> dict[str, dict]:
    """The weights diffusers' StableDiffusionXLPipeline has after load_lora_weights + fuse_lora at `scale`."""
    parts = xl_diffusers(ckpt)
    pipeline = diffusers.StableDiffusionXLPipeline(vae=None, tokenizer=None, tokenizer_2=None,
                                                   scheduler=diffusers.EulerDiscreteScheduler(), **parts)
    pipeline.load_lora_weights(str(lora))
    pipeline.fuse_lora(lora_scale=scale)
    pipeline.unload_lora_weights()
    return {name: module.state_dict() for name, module in parts.items()}


def xl_engine(single, lora, scale: float) -> tuple[dict, dict]:
    """The engine's weights with the LoRA applied (as diffusers names them, by diffusers' conversion of the original
    file the engine's weights make), and without it."""
    from tritonsd.engine.lora import CheckpointBase, LoraSet
    from tritonsd.loader import load
    from tritonsd.loader.convert import to_original

    model, _ = load(single)
    loras = LoraSet(model, CheckpointBase(single))
    loras.load(lora, scale)
    patched = {name: module.state_dict() for name, module in xl_diffusers(to_original(model.state_dict())).items()}
    loras.unload()
    base = {name: module.state_dict() for name, module in xl_diffusers(to_original(model.state_dict())).items()}
    return patched, base


def assert_xl_weights(got: dict, want: dict, base: dict, patched: int):
    changed = 0
    for part, tensors in want.items():
        for key, w in tensors.items():
            g = got[part][key]
            assert torch.allclose(g, w, rtol=1e-5, atol=1e-6), \
                f"{part}.{key}: max abs err {(g - w).abs().max():.2e} against diffusers"
            changed += not torch.equal(base[part][key], w)
    assert changed >= patched, f"only {changed} weights changed; the LoRA patches {patched}"


def xl_layers(ckpt: dict, compvis: bool = False) -> dict[str, tuple[str, torch.Size]]:
    """{kohya module name: weight shape} for every attention, feed-forward and projection layer of the UNet (and,
    with diffusers-style names, the first ResNet convolutions: LoCon) and every linear layer of both towers. compvis:
    the UNet's layers under their CompVis (sgm) names, read off diffusers' own single-file converter."""
    from diffusers.loaders import single_file_utils as sf
    from tiny import TINY_SDXL, unet_diffusers_config

    parts = xl_diffusers(ckpt)
    wanted = ("attn1.to_", "attn2.to_", "ff.net", "proj_in", "proj_out") + (() if compvis else ("resnets.0.conv1",))
    where = {}
    if compvis:
        converted = sf.convert_ldm_unet_checkpoint(ckpt, unet_diffusers_config(TINY_SDXL, ckpt))
        original = {t.data_ptr(): k.removeprefix("model.diffusion_model.") for k, t in ckpt.items()}
        where = {k.removesuffix(".weight"): original[t.data_ptr()].removesuffix(".weight") for k, t in converted.items()}
    layers = {"lora_unet_" + where.get(n, n).replace(".", "_"): m.weight.shape
              for n, m in parts["unet"].named_modules()
              if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and any(w in n for w in wanted)}
    for prefix, part in (("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2")):
        layers |= {prefix + "text_model_" + n.removeprefix("text_model.").replace(".", "_"): m.weight.shape
                   for n, m in parts[part].named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    return layers


@pytest.mark.parametrize("compvis", [False, True], ids=["diffusers-names", "compvis-names"])
def test_sdxl_kohya_lora_matches_diffusers(xl, compvis, tmp_path):
    """lora_unet_ in diffusers' or CompVis' module names (diffusers maps both for SDXL), lora_te1_ on CLIP ViT-L and
    lora_te2_ on bigG, whose q/k/v the original file packs into one in_proj."""
    _, single, ckpt = xl
    layers = xl_layers(ckpt, compvis)
    assert any(("input_blocks_7_1_transformer_blocks_1" if compvis else "down_blocks_2_attentions_0_transformer_blocks_1")
               in k for k in layers) and any(k.startswith("lora_te2_") for k in layers)
    path = tmp_path / "xl-kohya.safetensors"
    write_kohya(path, random_lora(layers, seed=2), names=lambda n: n)
    got, base = xl_engine(single, path, 0.8)
    assert_xl_weights(got, xl_fused(ckpt, path, 0.8), base, patched=len(layers))


def test_sdxl_peft_lora_matches_diffusers(xl, tmp_path):
    """unet., text_encoder. and text_encoder_2. adapters with lora_alpha != r, written by diffusers'
    save_lora_weights with its adapter metadata."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    _, single, ckpt = xl
    torch.manual_seed(4)
    parts = xl_diffusers(ckpt)
    configs = {"unet": LoraConfig(r=RANK, lora_alpha=6, init_lora_weights=False, target_modules=[
                   "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]),
               "text_encoder": LoraConfig(r=2, lora_alpha=3, init_lora_weights=False,
                                          target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]),
               "text_encoder_2": LoraConfig(r=2, lora_alpha=5, init_lora_weights=False,
                                            target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])}
    for name, config in configs.items():
        inject_adapter_in_model(config, parts[name])
    diffusers.StableDiffusionXLPipeline.save_lora_weights(
        tmp_path, weight_name="xl-peft.safetensors",
        **{f"{name}_lora_layers": get_peft_model_state_dict(parts[name]) for name in configs},
        **{f"{name}_lora_adapter_metadata": config.to_dict() for name, config in configs.items()})
    path = tmp_path / "xl-peft.safetensors"
    assert any(k.startswith("text_encoder_2.") for k in safetensors.torch.load_file(path))
    got, base = xl_engine(single, path, 0.7)
    assert_xl_weights(got, xl_fused(ckpt, path, 0.7), base, patched=1)


def test_loras_of_another_family_are_refused_by_name_and_change_nothing(files, xl, tmp_path):
    """An SDXL LoRA on SD 1.x and an SD 1.x LoRA (kohya's single lora_te_ tower, or UNet layers of SD 1.x's shapes)
    on SDXL."""
    from tritonsd.engine.lora import CopiedBase, LoraSet
    from tritonsd.loader import load

    _, single, ckpt = xl
    xl_lora = tmp_path / "xl.safetensors"
    write_kohya(xl_lora, random_lora(dict(list(xl_layers(ckpt).items())[::7]), seed=3), names=lambda n: n)
    sd1_lora = tmp_path / "sd1.safetensors"
    write_kohya(sd1_lora, random_lora(diffusers_modules(files[2]), seed=4))
    sd1_unet = tmp_path / "sd1-unet.safetensors"
    safetensors.torch.save_file({k: v for k, v in safetensors.torch.load_file(sd1_lora).items()
                                 if k.startswith("lora_unet_") and "attentions_0" in k}, sd1_unet)
    cases = [(files[1], TINY, xl_lora, "is a LoRA for SDXL .*, but this model is SD 1.x"),
             (single, None, sd1_lora, r"is a LoRA for SD 1.x or 2.x \(kohya's lora_te_ names a model with one text "
                                      "encoder\), but this model is SDXL"),
             (single, None, sd1_unet, "it is a LoRA for another (model|architecture) than this SDXL one")]
    for checkpoint, config, lora, message in cases:
        model, _ = load(checkpoint, config=config)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        loras = LoraSet(model, CopiedBase())
        with pytest.raises(CheckpointError, match=message):
            loras.load(lora)
        assert loras.scales == {} and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
