"""The engine against the ecosystem's own code on the same weights: transformers' CLIPTextModel, diffusers' UNet,
AutoencoderKL and whole StableDiffusion(Img2Img)Pipeline runs, for a tiny SD 1.x model and tiny SD 2.x models of
both prediction types. The diffusers side is produced from the original single-file checkpoint by diffusers' own
conversion functions (tests/tiny.py), never by our converter."""

import numpy as np
import pytest
import torch
from PIL import Image

from tritonsd.engine.pipeline import Pipeline
from tritonsd.engine.samplers import SAMPLERS
from tritonsd.loader.convert import OPEN_CLIP_PREFIX
from tiny import (
    SCHEDULERS, SD15_SCHEDULER_CONFIG, TINY, TINY_SD2, TINY_SD2_V, psnr, random_state, rel_err, write_diffusers_folder,
    write_single_file,
)

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

# SD 2.x's scheduler config is SD 1.5's with the model's prediction type.
FAMILIES = {"sd1": TINY, "sd2": TINY_SD2, "sd2-v": TINY_SD2_V}


def families(*names: str):
    return pytest.mark.parametrize("family", names)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """models(family) -> (original checkpoint, our pipeline on its single file, diffusers' and transformers' parts
    from its diffusers folder); each family's built once per module. models.files(family) -> (single file, folder)."""
    built, files = {}, {}

    def get(family: str):
        if family not in built:
            root = tmp_path_factory.mktemp(f"parity-{family}")
            config = FAMILIES[family]
            single, folder = root / "tiny.safetensors", root / "tiny-diffusers"
            ckpt = write_single_file(single, random_state(config, seed=0), open_clip=config.unet.use_linear_in_transformer)
            write_diffusers_folder(folder, ckpt, config)
            theirs = dict(
                unet=diffusers.UNet2DConditionModel.from_pretrained(folder / "unet").eval(),
                vae=diffusers.AutoencoderKL.from_pretrained(folder / "vae").eval(),
                text_encoder=transformers.CLIPTextModel.from_pretrained(folder / "text_encoder").eval(),
                tokenizer=transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer", model_max_length=77),
            )
            built[family] = ckpt, Pipeline.from_checkpoint(single, config=config), theirs
            files[family] = single, folder
        return built[family]

    def paths(family: str) -> tuple:
        """(single file, diffusers folder) of a family, for tests that load their own copies."""
        get(family)
        return files[family]

    get.files = paths
    return get


PROMPTS = ["a photograph of an astronaut riding a horse", "", "x " * 100]


@families("sd1", "sd2")
def test_text_encoder_matches_transformers(models, family):
    _, ours, theirs = models(family)
    ids = ours.tokenizer(PROMPTS)
    want_ids = theirs["tokenizer"](PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(ids, want_ids.input_ids), f"token ids differ from transformers' (pad {ours.tokenizer.pad_id})"
    with torch.no_grad():
        want = theirs["text_encoder"](ids).last_hidden_state
        got, _ = ours.text_encoder(ids)
    assert rel_err(got, want) <= 1e-4, f"text encoder rel err {rel_err(got, want):.2e} > 1e-4"


@families("sd2")
def test_text_encoder_is_the_open_clip_towers_penultimate_block_then_its_final_norm(models, family):
    """SD 2.x's conditioning by its definition, on the whole tower of the original file: transformers' CLIPTextModel
    with every block (diffusers' OpenCLIP conversion, nothing left out), the second-to-last hidden state, then the
    final layer norm."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    ckpt, ours, _ = models(family)
    t = TINY_SD2.text
    blocks = len({k.split(".")[4] for k in ckpt if k.startswith(OPEN_CLIP_PREFIX + "transformer.resblocks.")})
    assert blocks == t.num_hidden_layers + 1, f"the original file holds {blocks} blocks"
    whole = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, num_hidden_layers=blocks, hidden_act="gelu",
        num_attention_heads=t.num_attention_heads, intermediate_size=t.intermediate_size,
    ))
    wrapped = hasattr(whole, "text_model")
    converted = convert_open_clip_checkpoint(whole, ckpt)
    whole.load_state_dict({k if wrapped else k.removeprefix("text_model."): v for k, v in converted.items()}, strict=True)
    ids = ours.tokenizer(PROMPTS)
    with torch.no_grad():
        out = whole(ids, output_hidden_states=True)
        want = (whole.text_model if wrapped else whole).final_layer_norm(out.hidden_states[-2])
        got, _ = ours.text_encoder(ids)
    assert rel_err(got, want) <= 1e-4, f"text encoder rel err {rel_err(got, want):.2e} > 1e-4 against the penultimate block"


@families("sd1", "sd2")
@pytest.mark.parametrize("size", [(16, 16), (13, 9)], ids=["16x16", "odd-13x9"])
def test_unet_matches_diffusers(models, family, size):
    _, ours, theirs = models(family)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, *size, generator=g)
    t = torch.tensor([1.0, 500.0, 999.0])
    context = torch.randn(3, 77, FAMILIES[family].unet.context_dim, generator=g)
    with torch.no_grad():
        want = theirs["unet"](x, t, context).sample
        got = ours.unet(x, t, context)
    assert rel_err(got, want) <= 1e-4, f"UNet rel err {rel_err(got, want):.2e} > 1e-4 at latent size {size}"


@families("sd1")
@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
def test_vae_matches_diffusers(models, family, size):
    _, ours, theirs = models(family)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, *size, generator=g) * 2 - 1
    with torch.no_grad():
        posterior = theirs["vae"].encode(x).latent_dist
        mean, logvar = ours.vae.encode(x)
        z = torch.randn(2, 4, size[0] // 2, size[1] // 2, generator=g)
        want_image = theirs["vae"].decode(z).sample
        got_image = ours.vae.decode(z)
    for name, got, want in (("mean", mean, posterior.mean), ("logvar", logvar, posterior.logvar), ("decode", got_image, want_image)):
        assert rel_err(got, want) <= 1e-4, f"VAE {name} rel err {rel_err(got, want):.2e} > 1e-4 at image size {size}"
    assert ours.vae.scaling_factor == theirs["vae"].config.scaling_factor


def diffusers_pipeline(theirs, family: str, sampler: str, img2img: bool):
    cls_name, extra = SCHEDULERS[sampler]
    prediction = {"prediction_type": FAMILIES[family].prediction_type}
    scheduler = getattr(diffusers, cls_name).from_config({**SD15_SCHEDULER_CONFIG, **extra, **prediction})
    cls = diffusers.StableDiffusionImg2ImgPipeline if img2img else diffusers.StableDiffusionPipeline
    pipe = cls(**theirs, scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# (family, sampler, guidance, batch, steps, height, width). SD 1.x: every sampler and batching at 6 steps; SD 2.x's
# v-prediction model, whose plans differ from the noise-predicting ones only in their coefficients: every sampler,
# guided and not, at 3 steps and 32x32 (enough for DPM++'s second-order step); its noise-predicting model: two.
TXT2IMG = (
    [("sd1", s, 7.5, 1, 6, 32, 40) for s in SAMPLERS]
    + [("sd1", *case, 6, 32, 40) for case in (("euler", 1.0, 1), ("dpmpp_2m", 1.0, 2), ("euler_a", 5.0, 2), ("ddim", 3.0, 2))]
    + [("sd2-v", s, 7.5, 1, 3, 32, 32) for s in SAMPLERS]
    + [("sd2-v", "euler", 1.0, 1, 3, 32, 32), ("sd2-v", "dpmpp_2m", 1.0, 2, 3, 32, 32)]
    + [("sd2", "ddim", 7.5, 1, 3, 32, 32), ("sd2", "dpmpp_2m_karras", 1.0, 1, 3, 32, 32)]
)


@pytest.mark.parametrize("family,sampler,guidance,batch,steps,height,width", TXT2IMG,
                         ids=["-".join(map(str, case[:4])) for case in TXT2IMG])
def test_txt2img_matches_diffusers(models, family, sampler, guidance, batch, steps, height, width):
    _, ours, theirs = models(family)
    args = dict(negative_prompt=["blurry", ""], num_inference_steps=steps, guidance_scale=guidance, height=height,
                width=width)
    prompts = ["a red circle on a blue background", "a small yellow square"]
    want = diffusers_pipeline(theirs, family, sampler, img2img=False)(
        prompts, num_images_per_prompt=batch, output_type="np", generator=torch.Generator("cpu").manual_seed(7), **args
    ).images
    got = ours.txt2img(
        prompts, negative_prompt=args["negative_prompt"], steps=steps, guidance_scale=guidance, sampler=sampler,
        seed=7, width=width, height=height, batch_size=batch, output_type="np",
    )
    assert got.shape == want.shape, f"image batch shape {got.shape} != diffusers' {want.shape}"
    value = psnr(got, want)
    assert value >= 40.0, f"{family} {sampler} cfg={guidance} batch={batch}: PSNR {value:.1f} dB against diffusers < 40 dB"


# (family, sampler, strength, steps)
IMG2IMG = (
    [("sd1", s, 0.6, 8) for s in SAMPLERS] + [("sd1", "euler", 1.0, 8), ("sd1", "ddim", 0.3, 8)]
    + [("sd2-v", s, 0.7, 3) for s in SAMPLERS]
)


@pytest.mark.parametrize("family,sampler,strength,steps", IMG2IMG, ids=["-".join(map(str, case[:3])) for case in IMG2IMG])
def test_img2img_matches_diffusers(models, family, sampler, strength, steps):
    _, ours, theirs = models(family)
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (37, 45, 3), dtype=np.uint8))  # odd sides: resized down
    want = diffusers_pipeline(theirs, family, sampler, img2img=True)(
        "a green triangle", image=image, strength=strength, num_inference_steps=steps, guidance_scale=7.5,
        num_images_per_prompt=2, output_type="np", generator=torch.Generator("cpu").manual_seed(11),
    ).images
    got = ours.img2img(
        image, "a green triangle", strength=strength, steps=steps, guidance_scale=7.5, sampler=sampler, seed=11,
        batch_size=2, output_type="np",
    )
    assert got.shape == want.shape, f"image batch shape {got.shape} != diffusers' {want.shape}"
    value = psnr(got, want)
    assert value >= 40.0, f"{family} img2img {sampler} strength={strength}: PSNR {value:.1f} dB against diffusers < 40 dB"


# Conditioning: encode_prompt against diffusers' encode_prompt and a construction from A1111's definitions on
# transformers' CLIPTextModel, on the SD 1.x model.

@pytest.fixture(scope="module")
def ours(models):
    return models("sd1")[1]


@pytest.fixture(scope="module")
def theirs(models):
    return models("sd1")[2]


def hf_hidden(theirs, ids: list[list[int]], clip_skip: int = 1) -> torch.Tensor:
    """transformers' CLIPTextModel; clip skip n takes the hidden states n from the end and the final layer norm."""
    text = theirs["text_encoder"]
    with torch.no_grad():
        out = text(torch.tensor(ids), output_hidden_states=True)
        if clip_skip == 1:
            return out.last_hidden_state
        return getattr(text, "text_model", text).final_layer_norm(out.hidden_states[-clip_skip])


def reference_conditioning(theirs, pieces: list[tuple[str, float]], chunks: int, clip_skip: int = 1) -> torch.Tensor:
    """A1111's conditioning, written from its definitions: each piece tokenized alone, the tokens cut into chunks of
    75 (the pieces here have no commas and no BREAK), each chunk BOS + tokens + EOS padding, encoded alone, scaled by
    the token weights and rescaled to its unweighted mean (float64); `chunks` chunks in all, the missing ones the
    empty prompt's."""
    tokenizer = theirs["tokenizer"]
    tokens = [(t, w) for text, w in pieces for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
    out = []
    for i in range(chunks):
        part = tokens[75 * i:75 * (i + 1)]
        pad = 75 - len(part)
        ids = [tokenizer.bos_token_id, *[t for t, _ in part], *[tokenizer.eos_token_id] * (pad + 1)]
        weights = torch.tensor([1.0, *[w for _, w in part], *[1.0] * (pad + 1)], dtype=torch.float64)[:, None]
        z = hf_hidden(theirs, [ids], clip_skip)[0].double()
        out.append(z * weights * (z.mean() / (z * weights).mean()))
    return torch.cat(out)[None]


LONG_PIECES = [("masterpiece", 1.2), (" ".join(["a lighthouse on a cliff above the stormy sea at dusk"] * 8), 1.0),
               ("glowing windows", 1.1 * 1.1), ("fog", 1 / 1.1)]
LONG_PROMPT = "(masterpiece:1.2) " + LONG_PIECES[1][0] + " ((glowing windows)) [fog]"
NEGATIVE_PIECES = [("blurry ", 1.0), ("lowres", 1.3)]
NEGATIVE_PROMPT = "blurry (lowres:1.3)"


def test_plain_prompts_condition_as_diffusers_encode_prompt(ours, theirs):
    prompt, negative = "a photograph of an astronaut riding a horse", "blurry, low quality"
    want, want_negative = diffusers_pipeline(theirs, "sd1", "euler", img2img=False).encode_prompt(
        prompt, "cpu", 1, True, negative_prompt=negative)
    got = ours.encode_prompt([negative, prompt])
    assert got.shape == (2, 77, TINY.text.hidden_size), got.shape
    for name, g, w in (("prompt", got[1:], want), ("negative prompt", got[:1], want_negative)):
        assert rel_err(g, w) <= 1e-6, f"{name}: rel err {rel_err(g, w):.2e} against diffusers' encode_prompt"


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_long_weighted_prompts_condition_as_a1111_defines(ours, theirs, clip_skip):
    """Prompt of 2 chunks, negative of 1 padded with the empty prompt's chunk."""
    got = ours.encode_prompt([LONG_PROMPT, NEGATIVE_PROMPT], clip_skip=clip_skip)
    assert got.shape == (2, 154, TINY.text.hidden_size), got.shape
    for row, pieces in enumerate((LONG_PIECES, NEGATIVE_PIECES)):
        want = reference_conditioning(theirs, pieces, chunks=2, clip_skip=clip_skip)
        err = rel_err(got[row:row + 1], want)
        assert err <= 1e-5, f"clip_skip {clip_skip}, prompt {row}: rel err {err:.2e} against the A1111 construction"


def test_clip_skip_2_is_the_penultimate_layer_normalised(ours, theirs):
    ids = ours.tokenizer(["a red circle on a blue background"])
    want = hf_hidden(theirs, ids.tolist(), clip_skip=2)
    got = ours.encode_prompt("a red circle on a blue background", clip_skip=2)
    assert rel_err(got, want) <= 1e-6, f"rel err {rel_err(got, want):.2e}"
    assert rel_err(ours.encode_prompt("a red circle on a blue background"), want) > 1e-2, "clip skip changed nothing"


def write_embedding(path, fmt: str, vectors: torch.Tensor) -> None:
    if fmt == "a1111-pt":
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "x", "step": 10}, path)
    elif fmt == "a1111-safetensors":
        import safetensors.torch

        safetensors.torch.save_file({"emb_params": vectors}, path)
    else:
        torch.save({"<x>": vectors[0]}, path)


@pytest.mark.parametrize("fmt, suffix, n", [("a1111-pt", ".pt", 3), ("a1111-safetensors", ".safetensors", 2),
                                            ("diffusers", ".bin", 1)])
def test_textual_inversion_conditions_as_diffusers(models, fmt, suffix, n, tmp_path):
    single, folder = models.files("sd1")
    path = tmp_path / f"tsdtest{suffix}"
    write_embedding(path, fmt, torch.randn(n, TINY.text.hidden_size, generator=torch.Generator().manual_seed(5)))
    text_encoder = transformers.CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer", model_max_length=77)
    pipe = diffusers.StableDiffusionPipeline(
        unet=None, vae=None, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=None, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.load_textual_inversion(str(path), token="tsdtest")
    prompt = "a tsdtest on a blue background"
    want, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
    ours = Pipeline.from_checkpoint(single, config=TINY)
    assert ours.load_textual_inversion(path) == "tsdtest"
    got = ours.encode_prompt(prompt)
    assert rel_err(got, want) <= 1e-6, f"{fmt}: rel err {rel_err(got, want):.2e} against diffusers"


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_long_weighted_prompt_image_matches_diffusers_given_our_conditioning(ours, theirs, sampler):
    """diffusers' pipeline given our conditioning as prompt_embeds draws our image: the UNet attends to all
    154 keys and the negative prompt's padding as diffusers' does."""
    context = ours.encode_prompt([NEGATIVE_PROMPT, LONG_PROMPT])
    want = diffusers_pipeline(theirs, "sd1", sampler, img2img=False)(
        prompt_embeds=context[1:], negative_prompt_embeds=context[:1], num_inference_steps=3, guidance_scale=7.5,
        height=32, width=32, output_type="np", generator=torch.Generator("cpu").manual_seed(3),
    ).images
    got = ours.txt2img(LONG_PROMPT, negative_prompt=NEGATIVE_PROMPT, steps=3, sampler=sampler, seed=3, width=32,
                       height=32, output_type="np")
    value = psnr(got, want)
    assert value >= 40.0, f"{sampler}: PSNR {value:.1f} dB against diffusers with our conditioning < 40 dB"
