"""SDXL's generation path against diffusers and transformers on the same weights: both text towers and the pooled
embedding, the UNet with label_emb, whole txt2img and img2img runs of the base and the refiner for every sampler,
the size/crop/aesthetic conditioning, the base+refiner handoff (denoising_end / denoising_start), textual inversion
on both towers, and what is refused. The engine's models are built straight from random weights; diffusers' side
comes from the original single file through diffusers' own single-file conversion (tests/tiny.py)."""

import copy
import dataclasses

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from tritonsd.engine.config import SDXL
from tritonsd.engine.model import StableDiffusion
from tritonsd.engine.pipeline import Pipeline, conditioning_vector
from tritonsd.engine.prompts import parse_attention
from tritonsd.engine.samplers import SAMPLERS
from tritonsd.engine.settings import SettingError, Settings
from tritonsd.engine.tokenizer import CLIPTokenizer
from tritonsd.loader.formats import CheckpointError
from tiny import (
    SD15_SCHEDULER_CONFIG, SDXL_SCHEDULER_CONFIG, TINY, TINY_SDXL, TINY_SDXL_REFINER, diffusers_scheduler,
    diffusers_sdxl_parts, original_sdxl_checkpoint, psnr, random_state, rel_err,
)

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

CONFIGS = {"base": TINY_SDXL, "refiner": TINY_SDXL_REFINER}


def engine(config, state, dtype=torch.float32) -> Pipeline:
    model = StableDiffusion.on_meta(config)
    model.load_state_dict({k: t.to(dtype) for k, t in state.items()}, assign=True)
    return Pipeline(model.eval(), CLIPTokenizer.default().with_pad_token(config.text.pad_token))


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """sdxl(kind) -> (our pipeline, diffusers' parts) for "base" (weights seed 0) or "refiner" (seed 1)."""
    built = {}
    tokenizers = tmp_path_factory.mktemp("sdxl-tokenizers")

    def get(kind: str):
        if kind not in built:
            config = CONFIGS[kind]
            state = random_state(config, seed=0 if kind == "base" else 1)
            built[kind] = engine(config, state), diffusers_sdxl_parts(config, original_sdxl_checkpoint(state), tokenizers)
        return built[kind]

    return get


def diffusers_pipeline(parts, kind: str, sampler: str, img2img: bool, scheduler_config: dict = SDXL_SCHEDULER_CONFIG):
    """diffusers' SDXL pipeline as the released models' model_index.json configure it: the base zeros an empty
    negative prompt, the refiner (aesthetic score) does not; each sampler's scheduler from the released scheduler
    config ("leading" timestep spacing, as the engine's SDXL configs)."""
    scheduler = diffusers_scheduler(sampler, config=scheduler_config)
    if kind == "refiner":
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline(**parts, scheduler=scheduler, add_watermarker=False,
                                                          requires_aesthetics_score=True,
                                                          force_zeros_for_empty_prompt=False)
    else:
        cls = diffusers.StableDiffusionXLImg2ImgPipeline if img2img else diffusers.StableDiffusionXLPipeline
        pipe = cls(**parts, scheduler=scheduler, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def their_negative(negative):
    """Our empty negative prompt is diffusers' None (no negative prompt), which the base conditions on zeros."""
    return None if negative == "" or negative == [""] * len(negative) else negative


# --- components --------------------------------------------------------------------------------------------------

PROMPTS = ["a photograph of an astronaut riding a horse", "", "x " * 60]


@pytest.mark.parametrize("kind", CONFIGS)
def test_towers_and_pooled_embedding_match_transformers(sdxl, kind):
    """Each tower's token ids (CLIP-L padding with its end token, bigG with "!"), its penultimate hidden states, and
    bigG's pooled embedding, against transformers' CLIPTextModel(WithProjection) on the same ids."""
    ours, theirs = sdxl(kind)
    towers = [("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")][2 - len(ours.text_encoders):]
    hidden = []
    for (model, tokenizer), encoder, pad_id in zip(towers, ours.text_encoders, ours.pad_ids):
        want_ids = theirs[tokenizer](PROMPTS, padding="max_length", max_length=77, truncation=True,
                                     return_tensors="pt").input_ids
        ids = torch.tensor([chunk.padded(pad_id) for text in PROMPTS for chunk in ours.prompt_tokenizer.chunks(text)])
        assert torch.equal(ids, want_ids), f"{model}: token ids differ from transformers' (pad {pad_id})"
        with torch.no_grad():
            out = theirs[model](want_ids, output_hidden_states=True)
            got, pooled = encoder(ids)
        assert rel_err(got, out.hidden_states[-2]) <= 1e-4, f"{model}: rel err {rel_err(got, out.hidden_states[-2]):.2e}"
        if model == "text_encoder_2":
            assert rel_err(pooled, out.text_embeds) <= 1e-4, f"pooled: rel err {rel_err(pooled, out.text_embeds):.2e}"
        hidden.append(got)
    context, pooled = ours.encode(PROMPTS)
    assert context.shape == (3, 77, ours.config.unet.context_dim)
    assert torch.equal(context, torch.cat(hidden, dim=-1)), "encode does not concatenate the towers in order"


@pytest.mark.parametrize("kind", CONFIGS)
def test_prompts_condition_as_diffusers_encode_prompt(sdxl, kind):
    ours, theirs = sdxl(kind)
    prompts, negatives = ["a red circle on a blue background", "a small yellow square"], ["blurry", "low quality"]
    pipe = diffusers_pipeline(theirs, kind, "euler", img2img=True)
    want, want_negative, want_pooled, want_negative_pooled = pipe.encode_prompt(
        prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt=negatives)
    context, pooled = ours.encode(negatives + prompts)
    for name, got, w in (("context", context, torch.cat([want_negative, want])),
                         ("pooled", pooled, torch.cat([want_negative_pooled, want_pooled]))):
        assert rel_err(got, w) <= 1e-5, f"{name}: rel err {rel_err(got, w):.2e} against diffusers' encode_prompt"


def test_clip_skip_is_diffusers_clip_skip_plus_one_on_both_towers(sdxl):
    ours, theirs = sdxl("base")
    pipe = diffusers_pipeline(theirs, "base", "euler", img2img=False)
    prompt = "a lighthouse on a cliff"
    want, _, want_pooled, _ = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                                 do_classifier_free_guidance=False, clip_skip=1)
    context, pooled = ours.encode(prompt, clip_skip=2)
    assert rel_err(context, want) <= 1e-5, f"rel err {rel_err(context, want):.2e} against diffusers' clip_skip=1"
    assert rel_err(pooled, want_pooled) <= 1e-5, "the pooled embedding is the last layer's whatever the clip skip"
    assert rel_err(ours.encode(prompt)[0], want) > 1e-2, "clip skip changed nothing"


def test_long_weighted_prompt_conditions_both_towers_as_a1111_defines(sdxl):
    """A1111's conditioning from its definitions on transformers' towers: the same 75-token chunks for both,
    each padded with its tower's pad token, each tower's hidden states weighted and rescaled to their own mean
    (float64), the towers concatenated; the pooled embedding is the first chunk's."""
    ours, theirs = sdxl("base")
    prompt = "(masterpiece:1.2) " + " ".join(["a lighthouse on a cliff above the stormy sea at dusk"] * 8) + " [fog]"
    pieces = parse_attention(prompt)
    towers = []
    pooled = None
    for model, tokenizer_name in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        tokenizer = theirs[tokenizer_name]
        tokens = [(t, w) for text, w in pieces for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
        assert 75 < len(tokens) <= 150
        chunks = []
        for i in range(2):
            part = tokens[75 * i:75 * (i + 1)]
            pad = 75 - len(part)
            ids = [tokenizer.bos_token_id, *[t for t, _ in part], tokenizer.eos_token_id,
                   *[tokenizer.pad_token_id] * pad]
            weights = torch.tensor([1.0, *[w for _, w in part], *[1.0] * (pad + 1)], dtype=torch.float64)[:, None]
            with torch.no_grad():
                out = theirs[model](torch.tensor([ids]), output_hidden_states=True)
            z = out.hidden_states[-2][0].double()
            chunks.append(z * weights * (z.mean() / (z * weights).mean()))
            if i == 0 and model == "text_encoder_2":
                pooled = out.text_embeds
        towers.append(torch.cat(chunks))
    context, got_pooled = ours.encode(prompt)
    want = torch.cat(towers, dim=-1)[None]
    assert context.shape == want.shape == (1, 154, 80)
    assert rel_err(context, want) <= 1e-5, f"rel err {rel_err(context, want):.2e} against the A1111 construction"
    assert rel_err(got_pooled, pooled) <= 1e-5, "the pooled embedding is not the first chunk's"


@pytest.mark.parametrize("kind", CONFIGS)
def test_unet_with_label_emb_matches_diffusers(sdxl, kind):
    """Our conditioning vector (pooled embedding and 256-wide sinusoids of the size numbers) into label_emb against
    diffusers' text_time addition (add_time_proj, add_embedding) on the same numbers."""
    ours, theirs = sdxl(kind)
    g = torch.Generator().manual_seed(1)
    config = CONFIGS[kind]
    x = torch.randn(2, 4, 12, 10, generator=g)
    t = torch.tensor([3.0, 700.0])
    context = torch.randn(2, 77, config.unet.context_dim, generator=g)
    pooled = torch.randn(2, config.towers[-1].projection_dim, generator=g)
    numbers = ([[1024.0, 768.0, 0.0, 32.0, 896.0, 640.0], [64.0, 48.0, 16.0, 8.0, 48.0, 40.0]] if kind == "base"
               else [[1024.0, 768.0, 0.0, 32.0, 6.0], [64.0, 48.0, 16.0, 8.0, 2.5]])
    numbers = torch.tensor(numbers)
    with torch.no_grad():
        want = theirs["unet"](x, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": numbers}).sample
        got = ours.unet(x, t, context, conditioning_vector(pooled, numbers))
    assert rel_err(got, want) <= 1e-4, f"UNet rel err {rel_err(got, want):.2e}"


def test_empty_negative_prompt_is_zeros_on_the_base_and_encoded_on_the_refiner(sdxl):
    settings = Settings(["a cat", "a dog"], ["", "blurry"], seed=0)
    for kind in CONFIGS:
        ours, _ = sdxl(kind)
        context, y = ours._conditioning(list(settings.prompts), list(settings.negative_prompts), settings, 32, 32)
        width = ours.config.towers[-1].projection_dim
        encoded, pooled = ours.encode(["", "blurry", "a cat", "a dog"])
        if kind == "base":
            assert not context[0].any() and not y[0, :width].any(), "an empty negative prompt is not zeros"
            assert y[0, width:].any(), "the size conditioning of the negative prompt was zeroed too"
            assert torch.equal(context[1:], encoded[1:]) and torch.equal(y[1:, :width], pooled[1:])
        else:
            assert torch.equal(context, encoded) and torch.equal(y[:, :width], pooled), \
                "the refiner encodes the empty negative prompt (force_zeros_for_empty_prompt is off in its config)"


# --- whole runs --------------------------------------------------------------------------------------------------

# (sampler, guidance, prompts, negatives, batch, height, width, size conditioning)
CUSTOM_SIZE = dict(original_size=(96, 64), crops_coords_top_left=(8, 16), target_size=(48, 40))
ALL_NEGATIVE = dict(CUSTOM_SIZE, negative_original_size=(40, 48), negative_crops_coords_top_left=(4, 0),
                    negative_target_size=(32, 32))
TXT2IMG = (
    [(s, 7.5, ["a red circle"], [""], 1, 32, 32, {}) for s in SAMPLERS]
    + [("euler", 1.0, ["a red circle", "a blue square"], ["", ""], 2, 32, 32, {}),
       ("dpmpp_2m", 5.0, ["a red circle", "a blue square"], ["blurry", "low quality"], 2, 32, 48, {}),
       ("euler_a", 7.5, ["a red circle"], [""], 1, 32, 32, CUSTOM_SIZE),
       ("ddim", 7.5, ["a red circle"], ["blurry"], 1, 32, 32, ALL_NEGATIVE)]
)


@pytest.mark.parametrize("sampler,guidance,prompts,negatives,batch,height,width,sizes", TXT2IMG,
                         ids=[f"{c[0]}-cfg{c[1]}-batch{c[4]}{'-sizes' if c[7] else ''}" for c in TXT2IMG])
def test_txt2img_matches_diffusers(sdxl, sampler, guidance, prompts, negatives, batch, height, width, sizes):
    ours, theirs = sdxl("base")
    want = diffusers_pipeline(theirs, "base", sampler, img2img=False)(
        prompts, negative_prompt=their_negative(negatives), num_inference_steps=4, guidance_scale=guidance,
        height=height, width=width, num_images_per_prompt=batch, output_type="np",
        generator=torch.Generator().manual_seed(7), **sizes,
    ).images
    got = ours.txt2img(prompts, negative_prompt=negatives, steps=4, guidance_scale=guidance, sampler=sampler, seed=7,
                       width=width, height=height, batch_size=batch, output_type="np", **sizes)
    assert got.shape == want.shape, f"image batch shape {got.shape} != diffusers' {want.shape}"
    value = psnr(got, want)
    assert value >= 40.0, f"{sampler} cfg={guidance} batch={batch} {sizes}: PSNR {value:.1f} dB against diffusers"


def test_sdxl_spacing_is_what_tells_the_images_apart(sdxl):
    """The same model with each sampler's own spacing ("default", as SD 1.5's scheduler config gives) matches diffusers
    on SD 1.5's scheduler config and draws a clearly different image than with SDXL's "leading"."""
    ours, theirs = sdxl("base")
    default = engine(dataclasses.replace(TINY_SDXL, timestep_spacing="default"), random_state(TINY_SDXL, seed=0))
    args = dict(num_inference_steps=4, guidance_scale=7.5, height=32, width=32, output_type="np")
    images = {}
    for name, config in (("leading", SDXL_SCHEDULER_CONFIG), ("default", SD15_SCHEDULER_CONFIG)):
        pipe = diffusers_pipeline(theirs, "base", "euler", img2img=False, scheduler_config=config)
        images[name] = pipe("a red circle", generator=torch.Generator().manual_seed(7), **args).images
    got = default.txt2img("a red circle", steps=4, seed=7, width=32, height=32, output_type="np")
    assert psnr(got, images["default"]) >= 40.0, f"default spacing: PSNR {psnr(got, images['default']):.1f} dB"
    assert psnr(images["leading"], images["default"]) < 25.0, (
        f"leading and default spacing give images {psnr(images['leading'], images['default']):.1f} dB apart")


def test_size_conditioning_changes_the_image(sdxl):
    ours, _ = sdxl("base")
    plain = ours.txt2img("a red circle", steps=2, seed=7, width=32, height=32, output_type="np")
    sized = ours.txt2img("a red circle", steps=2, seed=7, width=32, height=32, output_type="np", **CUSTOM_SIZE)
    assert psnr(plain, sized) < 40.0, "original_size, crop and target size changed nothing"


IMG2IMG = [("base", s, {}) for s in SAMPLERS] + [("refiner", s, {}) for s in SAMPLERS] + [
    ("refiner", "euler", dict(aesthetic_score=8.0, negative_aesthetic_score=1.0, original_size=(64, 64),
                              crops_coords_top_left=(2, 4), negative_original_size=(40, 40),
                              negative_crops_coords_top_left=(0, 0))),
]


@pytest.mark.parametrize("kind,sampler,options", IMG2IMG, ids=[f"{k}-{s}{'-options' if o else ''}" for k, s, o in IMG2IMG])
def test_img2img_matches_diffusers(sdxl, kind, sampler, options):
    ours, theirs = sdxl(kind)
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (37, 45, 3), dtype=np.uint8))
    want = diffusers_pipeline(theirs, kind, sampler, img2img=True)(
        "a green triangle", image=image, strength=0.6, num_inference_steps=4, guidance_scale=7.5,
        num_images_per_prompt=2, output_type="np", generator=torch.Generator().manual_seed(11), **options,
    ).images
    got = ours.img2img(image, "a green triangle", strength=0.6, steps=4, sampler=sampler, seed=11, batch_size=2,
                       output_type="np", **options)
    assert got.shape == want.shape, f"image batch shape {got.shape} != diffusers' {want.shape}"
    value = psnr(got, want)
    assert value >= 40.0, f"{kind} img2img {sampler} {options}: PSNR {value:.1f} dB against diffusers"


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_base_then_refiner_matches_diffusers_ensemble_of_experts(sdxl, sampler):
    """The base stops at denoising_end=0.75 and gives latents; the refiner continues them from denoising_start=0.75
    without adding noise. Each side's generator starts from the seed, in both implementations."""
    base, base_parts = sdxl("base")
    refiner, refiner_parts = sdxl("refiner")
    prompt, steps, cut = "a house by a lake", 8, 0.75
    want_latents = diffusers_pipeline(base_parts, "base", sampler, img2img=False)(
        prompt, num_inference_steps=steps, guidance_scale=7.5, height=32, width=32, denoising_end=cut,
        output_type="latent", generator=torch.Generator().manual_seed(5),
    ).images
    want = diffusers_pipeline(refiner_parts, "refiner", sampler, img2img=True)(
        prompt, image=want_latents, num_inference_steps=steps, guidance_scale=7.5, denoising_start=cut,
        output_type="np", generator=torch.Generator().manual_seed(5),
    ).images
    latents = base.txt2img(prompt, steps=steps, sampler=sampler, seed=5, width=32, height=32, denoising_end=cut,
                           output_type="latent")
    assert rel_err(latents, want_latents) <= 1e-4, f"base latents rel err {rel_err(latents, want_latents):.2e}"
    got = refiner.img2img(latents, prompt, steps=steps, sampler=sampler, seed=5, denoising_start=cut, output_type="np")
    value = psnr(got, want)
    assert value >= 40.0, f"{sampler}: base+refiner PSNR {value:.1f} dB against diffusers"


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_the_two_sides_of_a_cut_make_the_whole_run(sdxl, sampler):
    """A one-step sampler that draws no noise per step: the base cut at 0.6 and continued by itself from 0.6 is the
    uncut run. (DPM++ 2M starts the second side with a first-order step, as diffusers' does; DDPM and Euler a draw
    the second side's noise from a new generator.)"""
    ours, _ = sdxl("base")
    args = dict(steps=6, sampler=sampler, seed=3, width=32, height=32)
    whole = ours.txt2img("a red circle", output_type="latent", **args)
    first = ours.txt2img("a red circle", output_type="latent", denoising_end=0.6, **args)
    args.pop("width"), args.pop("height")
    second = ours.img2img(first, "a red circle", output_type="latent", denoising_start=0.6, **args)
    assert rel_err(second, whole) <= 1e-6, f"rel err {rel_err(second, whole):.2e}"
    assert rel_err(first, whole) > 1e-2


# --- textual inversion ---------------------------------------------------------------------------------------------

def test_sdxl_embedding_conditions_both_towers_as_diffusers(sdxl, tmp_path):
    """diffusers' documented way for SDXL embeddings: clip_g into text_encoder_2, clip_l into text_encoder."""
    ours, theirs = sdxl("base")
    g = torch.Generator().manual_seed(5)
    vectors = {"clip_l": torch.randn(2, 32, generator=g), "clip_g": torch.randn(2, 48, generator=g)}
    path = tmp_path / "tsdxl.safetensors"
    safetensors.torch.save_file(vectors, path)
    parts = dict(theirs, **{k: copy.deepcopy(theirs[k]) for k in ("text_encoder", "text_encoder_2", "tokenizer",
                                                                   "tokenizer_2")})
    pipe = diffusers_pipeline(parts, "base", "euler", img2img=False)
    pipe.load_textual_inversion(vectors["clip_g"], token="tsdxl", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    pipe.load_textual_inversion(vectors["clip_l"], token="tsdxl", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    prompt = "a tsdxl on a blue background"
    want, _, want_pooled, _ = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                                 do_classifier_free_guidance=False)
    ours = engine(TINY_SDXL, random_state(TINY_SDXL, seed=0))
    assert ours.load_textual_inversion(path) == "tsdxl"
    context, pooled = ours.encode(prompt)
    assert rel_err(context, want) <= 1e-5, f"rel err {rel_err(context, want):.2e} against diffusers"
    assert rel_err(pooled, want_pooled) <= 1e-5, f"pooled rel err {rel_err(pooled, want_pooled):.2e}"
    assert rel_err(context, ours.encode("a on a blue background")[0]) > 1e-2


def test_the_refiner_reads_an_sdxl_embedding_s_clip_g(sdxl, tmp_path):
    ours = engine(TINY_SDXL_REFINER, random_state(TINY_SDXL_REFINER, seed=1))
    path = tmp_path / "g.safetensors"
    clip_g = torch.randn(1, 48)
    safetensors.torch.save_file({"clip_l": torch.randn(1, 32), "clip_g": clip_g}, path)
    ours.load_textual_inversion(path)
    assert torch.equal(ours.text_encoder.embeddings.extra, clip_g)


@pytest.mark.parametrize("vectors, model, message", [
    ({"clip_l": torch.zeros(1, 32)}, "base", "has no clip_g vectors"),
    ({"clip_l": torch.zeros(1, 32), "clip_g": torch.zeros(2, 48)}, "base", "different vector counts: clip_l 1, clip_g 2"),
    ({"clip_l": torch.zeros(1, 32), "clip_g": torch.zeros(1, 32)}, "base", "clip_g: embedding vectors of size 32"),
    ({"emb_params": torch.zeros(1, 32)}, "base", "not an SDXL embedding"),
    ({"emb_params": torch.zeros(1, 48)}, "refiner", "not an SDXL embedding"),
    ({"clip_l": torch.zeros(1, 32), "clip_g": torch.zeros(1, 48)}, "sd1", "an SDXL embedding"),
])
def test_embeddings_for_another_family_are_refused(tmp_path, vectors, model, message):
    config = {"base": TINY_SDXL, "refiner": TINY_SDXL_REFINER, "sd1": TINY}[model]
    path = tmp_path / "emb.safetensors"
    safetensors.torch.save_file(vectors, path)
    ours = engine(config, random_state(config))
    with pytest.raises(CheckpointError, match=message):
        ours.load_textual_inversion(path)
    assert ours.prompt_tokenizer.embeddings == []


# --- settings, refusals, VAE precision -----------------------------------------------------------------------------

@pytest.mark.parametrize("kind, options, message", [
    ("base", dict(width=36), "width must be a positive multiple of 8"),
    ("base", dict(original_size=(100_000, 1024)), r"original_size must be a \(height, width\) pair of integers in \[1, 16384\]"),
    ("base", dict(original_size=(0, 1024)), "original_size must be"),
    ("base", dict(target_size=(1024,)), "target_size must be"),
    ("base", dict(original_size=(1024.0, 1024)), "original_size must be"),
    ("base", dict(crops_coords_top_left=(-8, 0)), r"crops_coords_top_left must be a \(top, left\) pair"),
    ("base", dict(aesthetic_score=7.0), "aesthetic_score does not apply to this SDXL model"),
    ("refiner", dict(target_size=(64, 64)), "target_size does not apply to this SDXL refiner model"),
    ("refiner", dict(aesthetic_score=11.0), r"aesthetic_score must be a number in \[0, 10\]"),
    ("sd1", dict(original_size=(64, 64)), "original_size does not apply to this SD 1.x model"),
    ("sd1", dict(crops_coords_top_left=(8, 8)), "crops_coords_top_left does not apply"),
    ("base", dict(denoising_start=0.5), "denoising_start applies to img2img"),
    ("base", dict(denoising_end=1.0), r"denoising_end must be in \(0, 1\)"),
    ("base", dict(denoising_end=0.4, sampler="ddim", steps=2), "denoising_end 0.4 with 2 steps leaves no denoising step"),
])
def test_bad_settings_are_refused_before_any_work(sdxl, kind, options, message):
    ours = engine(TINY, random_state(TINY)) if kind == "sd1" else sdxl(kind)[0]
    with pytest.raises(ValueError, match=message):
        ours.txt2img("a cat", **{"steps": 2, "seed": 0, "width": 32, "height": 32, **options})


def test_img2img_refusals(sdxl):
    ours, _ = sdxl("refiner")
    latents = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match="denoising_start 0.7 must be below denoising_end 0.5"):
        ours.img2img(latents, "a cat", steps=4, denoising_start=0.7, denoising_end=0.5)
    with pytest.raises(SettingError, match=r"image given as a tensor must be latents \[1 or 2, 4, h, w\]"):
        ours.img2img(torch.zeros(1, 3, 8, 8), "a cat", steps=4, batch_size=2)
    with pytest.raises(SettingError, match="holds 3 latents for 2 images"):
        ours.img2img(torch.zeros(3, 4, 8, 8), "a cat", steps=4, batch_size=2)
    with pytest.raises(SettingError, match="latents hold NaN"):
        ours.img2img(torch.full((1, 4, 8, 8), float("nan")), "a cat", steps=4)


def test_default_size_is_1024_for_sdxl():
    with torch.device("meta"):
        model = StableDiffusion(SDXL)
    pipe = Pipeline(model, CLIPTokenizer.default())
    assert pipe.default_size == 1024
    assert pipe.pad_ids == (49407, 0), "CLIP-L pads with its end token, bigG with '!'"


def test_an_sdxl_vae_decodes_in_bfloat16_under_a_float16_model(sdxl, tmp_path):
    """Only the routing can be checked on a CPU: which dtype each VAE runs in (the overflow itself needs the real
    weights)."""
    state = random_state(TINY_SDXL)
    half = engine(TINY_SDXL, state, torch.float16)
    assert half.vae_dtype == torch.bfloat16 and half.dtype == torch.float16
    assert engine(TINY_SDXL, state).vae_dtype == torch.float32
    assert engine(TINY, random_state(TINY), torch.float16).vae_dtype == torch.float16, "an SD 1.x VAE runs in float16"
    latents = torch.randn(1, 4, 8, 8)
    image = half.decode(latents)
    want = engine(TINY_SDXL, state).decode(latents)
    assert image.dtype == torch.float32 and (image - want).abs().max() < 0.05
    # A diffusers VAE folder that says force_upcast false (the fp16-fix VAE's config) runs in the model's dtype.
    _, theirs = sdxl("base")
    vae = copy.deepcopy(theirs["vae"])
    vae.register_to_config(force_upcast=False)
    vae.save_pretrained(tmp_path / "vae-fp16-fix")
    half.load_vae(tmp_path / "vae-fp16-fix")
    assert half.vae_dtype == torch.float16


# --- command line ------------------------------------------------------------------------------------------------

def test_command_line_sdxl_options_become_settings():
    from tritonsd.cli import _parser, _sdxl_settings

    args = _parser().parse_args([
        "img2img", "in.png", "a cat", "--original-size", "2048x1536", "--crop-top-left", "16,32",
        "--negative-original-size", "512x512", "--aesthetic-score", "7.5", "--negative-aesthetic-score", "1",
        "--denoising-start", "0.8"])
    assert _sdxl_settings(args) == dict(original_size=(1536, 2048), crops_coords_top_left=(16, 32),
                                        negative_original_size=(512, 512), aesthetic_score=7.5,
                                        negative_aesthetic_score=1.0, denoising_start=0.8)
    args = _parser().parse_args(["txt2img", "a cat", "--target-size", "1024x768", "--denoising-end", "0.8"])
    assert _sdxl_settings(args) == dict(target_size=(768, 1024), denoising_end=0.8)


@pytest.mark.parametrize("argv, message", [
    (["txt2img", "a cat", "--original-size", "1024"], "--original-size: expected WIDTHxHEIGHT"),
    (["txt2img", "a cat", "--original-size", "100000x1024"], "--original-size must be a (height, width) pair"),
    (["txt2img", "a cat", "--denoising-end", "1.5"], "denoising_end must be in (0, 1), got 1.5"),
    (["txt2img", "a cat", "--denoising-start", "0.5"], "unrecognized arguments: --denoising-start"),
    (["txt2img", "a cat", "--aesthetic-score", "7", "--steps", "1", "--width", "32", "--height", "32",
      "--device", "cpu"], "--aesthetic-score does not apply to this SD 1.x model"),
])
def test_command_line_refuses_bad_sdxl_options(argv, message, capsys, tmp_path):
    from tritonsd.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["-o", str(tmp_path / "out.png")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err, err
    assert not (tmp_path / "out.png").exists()
