"""SDXL base and refiner files as people have them: the original single file (sgm's conditioner embedders, bigG in
OpenCLIP's layout) and the diffusers folder (text_encoder_2, tokenizer_2, add_embedding; the refiner without
text_encoder) map onto the engine's tensors exactly, the diffusers side made by diffusers' own single-file conversion;
the configs come from config.json files and, with no config at all, from the full-size key sets, which have the
released parameter counts; `tritonsd info` and `convert` handle them."""

import json

import pytest
import safetensors.torch
import torch

from tritonsd import loader
from tritonsd.cli import main
from tritonsd.engine.config import SDXL, SDXL_REFINER, ModelConfig
from tritonsd.engine.model import StableDiffusion
from tritonsd.loader import CheckpointError
from tritonsd.loader.convert import SDXL_TOWERS, to_original
from test_loader import assert_same_tensors, check_loaded_model
from tiny import (
    SDXL_BIG_G_PREFIX, SDXL_CLIP_L_PREFIX, TINY_SDXL, TINY_SDXL_REFINER, linked_copy, original_sdxl_checkpoint,
    random_state, write_diffusers_folder,
)

CONFIGS = {"base": TINY_SDXL, "refiner": TINY_SDXL_REFINER}


@pytest.fixture(scope="module", params=["base", "refiner"])
def xl(request, tmp_path_factory):
    """(kind, config, engine state, original single file, diffusers folder) of the tiny SDXL base or refiner."""
    kind, config = request.param, CONFIGS[request.param]
    state = random_state(config, seed=7)
    root = tmp_path_factory.mktemp(kind)
    single = root / f"{kind}.safetensors"
    ckpt = original_sdxl_checkpoint(state)
    safetensors.torch.save_file(ckpt, single)
    folder = root / "diffusers"
    write_diffusers_folder(folder, ckpt, config)
    return kind, config, state, single, folder


def test_sdxl_prefixes_are_the_ones_diffusers_reads():
    """The loader's table against the keys diffusers recognises SDXL files by."""
    from diffusers.loaders import single_file_utils as sf

    keys = sf.CHECKPOINT_KEY_NAMES
    clip_l, clip_l_open = SDXL_TOWERS["SDXL"]["text_encoder"]
    big_g, big_g_open = SDXL_TOWERS["SDXL"]["text_encoder_2"]
    refiner, refiner_open = SDXL_TOWERS["SDXL refiner"]["text_encoder"]
    assert (clip_l_open, big_g_open, refiner_open) == (False, True, True)
    assert clip_l == sf.LDM_CLIP_PREFIX_TO_REMOVE[1] + "text_model." and keys["clip_sdxl"].startswith(clip_l)
    assert keys["open_clip_sdxl"] == big_g + "positional_embedding"
    assert keys["open_clip_sdxl_refiner"] == refiner + "text_projection"


def test_original_file_maps_onto_engine_exactly(xl):
    """bigG keeps every block and its text_projection (transposed to a Linear weight); logit_scale and CLIP-L's
    position_ids are left out."""
    kind, config, state, single, _ = xl
    raw = safetensors.torch.load_file(single)
    prefix = SDXL_BIG_G_PREFIX[kind]
    blocks = {k[len(prefix):].split(".")[2] for k in raw if k.startswith(prefix + "transformer.resblocks.")}
    tower = config.text_2 or config.text
    assert len(blocks) == tower.num_hidden_layers and prefix + "logit_scale" in raw
    fmt, got, _ = loader.load_state_dict(single)
    assert fmt == "single_file"
    assert_same_tensors(got, state, f"SDXL {kind} single file")


def test_to_original_writes_the_sdxl_layout(xl):
    kind, _, state, single, _ = xl
    want = {k: t for k, t in safetensors.torch.load_file(single).items()
            if not k.endswith(("logit_scale", "position_ids"))}
    assert_same_tensors(to_original(state), want, f"SDXL {kind} written as an original file")


def test_diffusers_folder_maps_onto_engine_exactly_with_its_config(xl):
    """The folder holds what diffusers' single-file conversion made of the original file; it converts back to the
    same tensors, and its config.json files give the whole config: heads, depth per level, label_emb's width and what
    it receives, the towers' projection, layer and padding, the VAE's scaling and float16 safety."""
    kind, config, state, _, folder = xl
    assert (folder / "text_encoder").is_dir() == (kind == "base") and (folder / "text_encoder_2").is_dir()
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    assert unet_config["addition_embed_type"] == "text_time", unet_config
    fmt, got, _ = loader.load_state_dict(folder)
    assert fmt == "diffusers"
    assert_same_tensors(got, state, f"SDXL {kind} diffusers folder")
    model, tokenizer = loader.load(folder)
    assert model.config == config, f"config from the folder {model.config} != {config}"
    # CLIP-L pads with its end token, bigG with "!" (id 0): the refiner's only tower is bigG.
    assert tokenizer.pad_id == (0 if kind == "refiner" else tokenizer.vocab["<|endoftext|>"])
    check_loaded_model(model, state)
    info = loader.describe(folder)
    assert info["architecture"] == ("SDXL" if kind == "base" else "SDXL refiner") and info["problem"] is None


@pytest.mark.parametrize("scheduler, spacing", [
    ({"timestep_spacing": "trailing"}, "trailing"),
    ({}, "default"),  # SD 1.x's and 2.x's configs name none: each sampler's own
    (None, "leading"),  # no scheduler config: the family's, SDXL's released one
], ids=["trailing", "unnamed", "no-scheduler"])
def test_diffusers_folder_s_scheduler_config_sets_the_timestep_spacing(xl, tmp_path, scheduler, spacing):
    kind, config, _, _, folder = xl
    file = folder / "scheduler" / "scheduler_config.json"
    assert json.loads(file.read_text())["timestep_spacing"] == config.timestep_spacing == "leading"
    written = {k: v for k, v in json.loads(file.read_text()).items() if k != "timestep_spacing"}
    copy = linked_copy(folder, tmp_path / kind, {} if scheduler is None else
                       {"scheduler/scheduler_config.json": json.dumps({**written, **scheduler})})
    if scheduler is None:
        (copy / "scheduler" / "scheduler_config.json").unlink()
        (copy / "scheduler").rmdir()
    model, _ = loader.load(copy)
    assert model.config.timestep_spacing == spacing


@pytest.mark.parametrize("value", ["uniform", "default", 1])
def test_unknown_timestep_spacing_is_refused(xl, tmp_path, value):
    kind, _, _, _, folder = xl
    written = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    copy = linked_copy(folder, tmp_path / kind, {"scheduler/scheduler_config.json": json.dumps(
        {**written, "timestep_spacing": value})})
    with pytest.raises(CheckpointError) as e:
        loader.load(copy)
    assert str(e.value) == (f"{copy}: scheduler/scheduler_config.json: timestep_spacing must be one of leading, "
                            f"linspace, trailing; got {value!r}")


def test_single_file_with_its_config_beside_loads(xl, tmp_path):
    kind, config, state, single, _ = xl
    path = tmp_path / single.name
    path.symlink_to(single)
    path.with_suffix(".json").write_text(config.to_json())
    model, _ = loader.load(path)
    assert model.config == config and model.config.family == ("SDXL" if kind == "base" else "SDXL refiner")
    check_loaded_model(model, state)


def test_vae_config_says_whether_it_is_float16_safe(xl, tmp_path):
    """The fp16-fix VAE's config.json says force_upcast false; SDXL's own VAE config says nothing (diffusers' default,
    true)."""
    from tritonsd.loader.vae import read_vae, read_vae_force_upcast

    _, config, state, single, folder = xl
    assert read_vae_force_upcast(folder) is True and read_vae_force_upcast(folder / "vae") is True
    assert read_vae_force_upcast(single) is None
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    fixed = linked_copy(folder / "vae", tmp_path / "fp16-fix", {"config.json": json.dumps({**vae_config,
                                                                                            "force_upcast": False})})
    assert read_vae_force_upcast(fixed) is False
    assert_same_tensors(read_vae(fixed), {k: t for k, t in state.items() if k.startswith("vae.")}, "the VAE folder")


@pytest.mark.parametrize("change, message", [
    (lambda c: c["unet"].update(projection_class_embeddings_input_dim=c["unet"]["projection_class_embeddings_input_dim"] + 8),
     r"projection_class_embeddings_input_dim \d+ is the pooled text embedding's 40 plus neither 6 \(SDXL\) nor 5"),
    (lambda c: c["unet"].update(addition_embed_type="image"), "addition_embed_type 'image' is not supported"),
    (lambda c: c["unet"].update(addition_time_embed_dim=128), "addition_time_embed_dim 128 is not SDXL's 256"),
], ids=["label-emb-width", "addition-type", "time-embed-width"])
def test_diffusers_configs_that_fit_no_sdxl_are_refused(xl, tmp_path, change, message):
    kind, _, _, _, folder = xl
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    configs = {"unet": unet_config}
    change(configs)
    copy = linked_copy(folder, tmp_path / kind, {"unet/config.json": json.dumps(configs["unet"])})
    with pytest.raises(CheckpointError, match=message):
        loader.load(copy)


def test_a_refiner_folder_needs_no_first_text_encoder_but_some_text_encoder(xl, tmp_path):
    kind, _, _, _, folder = xl
    copy = linked_copy(folder, tmp_path / kind, {})
    for file in (copy / "text_encoder_2").iterdir():
        file.unlink()
    (copy / "text_encoder_2").rmdir()
    if kind == "base":
        # CLIP-L alone is an SD 1.x tower beside an SDXL UNet: its label_emb has no pooled embedding to take.
        with pytest.raises(CheckpointError, match="pooled text embedding's 0 plus neither"):
            loader.load(copy)
    else:
        with pytest.raises(CheckpointError, match="missing subfolder.s. text_encoder or text_encoder_2"):
            loader.load(copy)


# --- full size -------------------------------------------------------------------------------------------------------

# The released files' parameter counts.
FULL_SIZE = {
    "base": (SDXL, {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                    "text_encoder_2": 694_659_840}),
    "refiner": (SDXL_REFINER, {"unet": 2_259_526_660, "vae": 83_653_863, "text_encoder": 694_659_840}),
}


@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_full_size_key_sets_load_with_real_sizes_and_no_config(tmp_path, monkeypatch, kind):
    """Every tensor of sd_xl_base_1.0.safetensors (or the refiner's), CLIP-L's position_ids and bigG's logit_scale
    included, each one float16 zero broadcast to its shape (no gigabytes of storage)."""
    want, counts = FULL_SIZE[kind]
    engine = StableDiffusion.on_meta(want).state_dict()
    zero = torch.zeros((), dtype=torch.float16)
    raw = {k: zero.expand(t.shape) if t.is_floating_point() else t for k, t in original_sdxl_checkpoint(engine).items()}
    assert (SDXL_CLIP_L_PREFIX + "embeddings.position_ids" in raw) == (kind == "base")
    assert sum(k.startswith(SDXL_BIG_G_PREFIX[kind] + "transformer.resblocks.") and k.endswith("in_proj_weight")
               for k in raw) == 32, "bigG has 32 blocks, all in the file"
    path = tmp_path / f"sd_xl_{kind}_1.0.safetensors"
    path.write_bytes(b"")
    monkeypatch.setattr(loader, "read_file", lambda *a, **kw: (raw, {}))

    model, tokenizer = loader.load(path, dtype=torch.float16)
    assert model.config == want, f"inferred {model.config}, expected {want}"
    got = {part: sum(p.numel() for p in getattr(model, part).parameters()) for part in counts}
    assert got == counts, f"parameter counts {got} != the released {counts}"
    assert tokenizer.pad_id == (0 if kind == "refiner" else tokenizer.vocab["<|endoftext|>"])
    info = loader.describe(path)
    assert info["architecture"] == want.family and info["missing"] == info["unexpected"] == info["wrong_shape"] == []
    assert info["prediction_source"] == f"{want.family} (noise-predicting)" and info["default_size"] == 1024
    assert info["parameters"] == counts


# --- the command line ------------------------------------------------------------------------------------------------

def test_info_and_convert_round_trip(xl, tmp_path, capsys):
    kind, config, state, single, _ = xl
    path = tmp_path / single.name
    path.symlink_to(single)
    path.with_suffix(".json").write_text(config.to_json())
    main(["info", str(path)])
    rows = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines()[1:])
    assert rows["architecture"].startswith(config.family + " ("), rows
    converted = tmp_path / "converted.safetensors"
    main(["convert", str(path), str(converted), "--dtype", "fp32"])
    capsys.readouterr()
    main(["info", str(converted), "--json"])
    described = json.loads(capsys.readouterr().out)
    assert ModelConfig.from_dict(described["config"]) == config and described["prediction_source"] == "the file's config"
    model, _ = loader.load(converted)
    check_loaded_model(model, state)
