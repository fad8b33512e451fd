"""SD 2.x files as people have them: every layout maps onto the engine's tensors exactly, the full SD 2.1 key set loads
with SD 2.1's sizes and no config, what the UNet predicts is found where people keep it (or, for a file that says
nothing, by AUTOMATIC1111's test evaluation), the command line runs them, and the SD 2.x variants the engine does not
run are refused by name. Parity with diffusers' pipelines is in test_parity.py."""

import dataclasses
import json
import logging
import shutil

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from tritonsd import loader
from tritonsd.cli import main
from tritonsd.engine.config import SD2, SD2_V, ModelConfig
from tritonsd.engine.model import StableDiffusion
from tritonsd.engine.pipeline import Pipeline
from tritonsd.loader import CheckpointError
from tritonsd.loader import infer
from tritonsd.pngmeta import parse_parameters
from test_loader import assert_same_tensors, check_loaded_model
from tiny import TINY, TINY_SD2, TINY_SD2_V, original_checkpoint, random_state, write_diffusers_folder, write_single_file

# An SD 2.x model whose every field shapes can tell, or takes the SD 2.x value shapes cannot tell (heads 64 wide,
# 32 GroupNorm groups, 0.18215 latent scaling, GELU and "!" padding): a bare file of it loads with no config.
BARE = ModelConfig.from_dict({
    "unet": dict(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2, 1), num_heads=-1,
                 num_head_channels=64, context_dim=64, use_linear_in_transformer=True),
    "vae": dict(ch=32, ch_mult=(1, 2), num_res_blocks=1),
    "text": dict(vocab_size=49408, hidden_size=64, num_hidden_layers=1, num_attention_heads=1, intermediate_size=128,
                 hidden_act="gelu", pad_token="!"),
})


@pytest.fixture(scope="module")
def sd2_state():
    return random_state(TINY_SD2, seed=3)


@pytest.fixture(scope="module")
def sd2_folder(tmp_path_factory, sd2_state):
    """TINY_SD2 as a diffusers folder; tests that change it take a copy (copy_folder)."""
    folder = tmp_path_factory.mktemp("sd2") / "diffusers"
    write_diffusers_folder(folder, original_checkpoint(sd2_state, open_clip=True), TINY_SD2)
    return folder


def copy_folder(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / folder.name)


def constant_output_state(config: ModelConfig, value: float) -> dict:
    """Weights whose UNet returns `value` everywhere, whatever it is given (zero output convolution, bias `value`):
    the model AUTOMATIC1111's test sees as noise-predicting (its output minus its 0.5 input averages value - 0.5)
    or as v-predicting (below -1)."""
    state = random_state(config, seed=5)
    state["unet.out.2.weight"] = torch.zeros_like(state["unet.out.2.weight"])
    state["unet.out.2.bias"] = torch.full_like(state["unet.out.2.bias"], value)
    return state


EPS_LIKE, V_LIKE = 0.5, -1.0  # AUTOMATIC1111's statistic: 0.0 and -1.5


def latent_size(config: ModelConfig) -> int:
    return config.unet.sample_size


# --- layouts ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_original_file_maps_onto_engine_exactly(tmp_path, sd2_state, fmt):
    """The OpenCLIP tower's packed q/k/v are unpacked, its last block, text_projection and logit_scale left out."""
    path = tmp_path / f"sd2.{fmt}"
    written = write_single_file(path, sd2_state, fmt, open_clip=True)
    last = TINY_SD2.text.num_hidden_layers
    assert f"cond_stage_model.model.transformer.resblocks.{last}.attn.in_proj_weight" in written
    assert "cond_stage_model.model.text_projection" in written and "model_ema.decay" in written
    fmt_name, state, _ = loader.load_state_dict(path)
    assert fmt_name == "single_file"
    assert_same_tensors(state, sd2_state, f"SD 2.x {fmt}")


@pytest.mark.parametrize("config", [TINY_SD2, TINY_SD2_V], ids=["epsilon", "v"])
def test_diffusers_folder_round_trips_with_its_config(tmp_path, sd2_state, sd2_folder, config):
    folder = sd2_folder
    if config is TINY_SD2_V:
        folder = tmp_path / "v"
        write_diffusers_folder(folder, original_checkpoint(sd2_state, open_clip=True), config)
    fmt, state, _ = loader.load_state_dict(folder)
    assert fmt == "diffusers"
    assert_same_tensors(state, sd2_state, "SD 2.x diffusers folder converted back")
    model, tokenizer = loader.load(folder)
    # Heads per level (2 and 4 of 16 wide), Linear projections, the scheduler's prediction type, the tokenizer's pad.
    assert model.config == config, f"config from the folder {model.config} != {config}"
    assert tokenizer.pad_id == 0, f"SD 2.x pads with id 0, the folder's tokenizer pads with {tokenizer.pad_id}"
    check_loaded_model(model, sd2_state)


def test_tritonsd_file_keeps_the_prediction_type(tmp_path, sd2_state):
    model = StableDiffusion.on_meta(TINY_SD2_V)
    model.load_state_dict(sd2_state, assign=True)
    path = tmp_path / "sd2v.safetensors"
    loader.save(model, TINY_SD2_V, path, dtype=torch.float16)
    loaded, tokenizer = loader.load(path)
    assert loaded.config == TINY_SD2_V and tokenizer.pad_id == 0
    info = loader.describe(path)
    assert (info["architecture"], info["prediction_source"]) == ("SD 2.x", "the file's config"), info


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_infer_config_recovers_an_sd2_config_from_shapes(prediction_type):
    want = dataclasses.replace(BARE, prediction_type=prediction_type)
    if prediction_type == "v_prediction":  # SD 2.x's v-prediction models draw at 768 (96 latents)
        want = dataclasses.replace(want, unet=dataclasses.replace(want.unet, sample_size=96))
    state = StableDiffusion.on_meta(BARE).state_dict()
    assert loader.infer_config(state, prediction_type) == want


# --- SD 2.1 at full size ---------------------------------------------------------------------------------------------

SD21_PARAMETERS = {"unet": 865_910_724, "text_encoder": 340_387_840, "vae": 83_653_863}


@pytest.mark.parametrize("modelspec, want", [("v", SD2_V), ("epsilon", SD2)], ids=["768-v", "512-base"])
def test_sd21_key_set_loads_with_real_sizes_and_no_config(tmp_path, monkeypatch, modelspec, want):
    """Every tensor of an SD 2.1 original file (24 OpenCLIP blocks, text_projection, logit_scale), each one float16
    zero broadcast to its shape (no gigabytes of storage), read as a safetensors file whose ModelSpec metadata gives
    the prediction type."""
    engine = StableDiffusion.on_meta(SD2).state_dict()
    zero = torch.zeros((), dtype=torch.float16)
    raw = {k: zero.expand(t.shape) for k, t in original_checkpoint(engine, extras=False, open_clip=True).items()}
    assert sum(k.startswith("cond_stage_model.model.transformer.resblocks.") and k.endswith("in_proj_weight")
               for k in raw) == 24, "SD 2.1's original files hold 24 text blocks"
    path = tmp_path / "v2-1.safetensors"
    path.write_bytes(b"")
    monkeypatch.setattr(loader, "read_file", lambda *a, **kw: (raw, {"modelspec.prediction_type": modelspec}))

    model, tokenizer = loader.load(path, dtype=torch.float16)
    assert model.config == want, f"inferred {model.config}, expected {want}"
    counts = {part: sum(p.numel() for p in getattr(model, part).parameters()) for part in SD21_PARAMETERS}
    assert counts == SD21_PARAMETERS, f"parameter counts {counts} != SD 2.1's {SD21_PARAMETERS}"
    assert len(model.text_encoder.encoder.layers) == 23 and tokenizer.pad_id == 0
    info = loader.describe(path)
    assert info["architecture"] == "SD 2.x" and info["missing"] == info["unexpected"] == info["wrong_shape"] == []
    assert info["prediction_source"] == "the file's metadata"
    side = SD2_V.unet.sample_size if modelspec == "v" else SD2.unet.sample_size
    assert Pipeline(model, tokenizer).default_size == 8 * side == (768 if modelspec == "v" else 512)


# --- what the UNet predicts ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, want", [(EPS_LIKE, "epsilon"), (V_LIKE, "v_prediction")], ids=["eps-like", "v-like"])
def test_a_bare_sd2_file_is_put_to_automatic1111s_test(tmp_path, caplog, value, want):
    path = tmp_path / "bare.safetensors"
    write_single_file(path, constant_output_state(BARE, value), open_clip=True)
    with caplog.at_level(logging.WARNING):
        model, _ = loader.load(path)
    assert model.config.prediction_type == want
    assert latent_size(model.config) == (96 if want == "v_prediction" else 64), "default size does not follow the type"
    statistic = value - 0.5
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and f"mean output - input {statistic:.2f}" in warned[0] and want in warned[0], warned
    info = loader.describe(path)
    assert info["config"]["prediction_type"] == want, info
    assert f"a test evaluation of its UNet (mean output - input {statistic:.2f}" in info["prediction_source"]


def test_the_test_evaluates_the_unet_as_automatic1111_does(tmp_path, monkeypatch):
    """One call: an 8x8 latent of 0.5s, timestep 999, a 2-token context of 0.5s."""
    path = tmp_path / "bare.safetensors"
    write_single_file(path, constant_output_state(BARE, V_LIKE), open_clip=True)
    calls = []
    forward = infer.torch.nn.Module.__call__

    def spy(module, *args, **kwargs):
        if type(module).__name__ == "UNet":
            calls.append(args)
        return forward(module, *args, **kwargs)

    monkeypatch.setattr(infer.torch.nn.Module, "__call__", spy)
    loader.load(path)
    assert len(calls) == 1, f"the UNet ran {len(calls)} times while loading"
    x, t, context = calls[0]
    assert x.shape == (1, 4, 8, 8) and (x == 0.5).all() and t.tolist() == [999.0]
    assert context.shape == (1, 2, BARE.unet.context_dim) and (context == 0.5).all()


def no_probe(monkeypatch):
    def fail(*args):
        raise AssertionError("the UNet was tested though the checkpoint says what it predicts")
    monkeypatch.setattr(loader, "probe_prediction_type", fail)


@pytest.mark.parametrize("metadata, marker, want", [
    ({"modelspec.prediction_type": "v"}, False, "v_prediction"),
    ({"modelspec.prediction_type": "epsilon"}, False, "epsilon"),
    ({}, True, "v_prediction"),
], ids=["modelspec-v", "modelspec-epsilon", "comfyui-v_pred"])
def test_a_single_files_own_metadata_decides(tmp_path, monkeypatch, metadata, marker, want):
    """The UNet is one the test would call the other way, so only the metadata can give the answer."""
    path = tmp_path / "model.safetensors"
    state = constant_output_state(BARE, EPS_LIKE if want == "v_prediction" else V_LIKE)
    ckpt = original_checkpoint(state, open_clip=True) | ({"v_pred": torch.tensor([])} if marker else {})
    safetensors.torch.save_file(ckpt, path, metadata=metadata)
    no_probe(monkeypatch)
    model, _ = loader.load(path)
    assert model.config.prediction_type == want
    assert loader.describe(path)["prediction_source"] == "the file's metadata"


def test_a_config_beside_the_file_decides(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    write_single_file(path, constant_output_state(BARE, EPS_LIKE), open_clip=True)
    path.with_suffix(".json").write_text(json.dumps({**BARE.to_dict(), "prediction_type": "v_prediction"}))
    no_probe(monkeypatch)
    model, _ = loader.load(path)
    assert model.config == dataclasses.replace(BARE, prediction_type="v_prediction")
    assert loader.describe(path)["prediction_source"] == "model.json"


@pytest.mark.parametrize("scheduler", [True, False], ids=["scheduler-config", "no-scheduler"])
def test_a_diffusers_folder_is_decided_by_its_scheduler_config(tmp_path, monkeypatch, scheduler):
    """A folder without scheduler/ says nothing; its UNet is tested like a bare file's (and keeps its sample size)."""
    ckpt = original_checkpoint(constant_output_state(BARE, V_LIKE), open_clip=True)
    write_diffusers_folder(tmp_path, ckpt, BARE, scheduler=scheduler)  # BARE's scheduler says epsilon
    if scheduler:
        no_probe(monkeypatch)
    model, _ = loader.load(tmp_path)
    assert model.config.prediction_type == ("epsilon" if scheduler else "v_prediction")
    assert latent_size(model.config) == BARE.unet.sample_size


def test_sd1_files_predict_noise_without_a_test(tmp_path, monkeypatch):
    path = tmp_path / "sd1.safetensors"
    write_single_file(path, random_state(TINY))
    no_probe(monkeypatch)
    model, _ = loader.load(path)
    assert model.config.prediction_type == "epsilon"
    assert loader.describe(path)["prediction_source"] == "SD 1.x (noise-predicting)"


def test_an_explicit_prediction_type_wins(tmp_path, monkeypatch):
    """A v-prediction file forced to epsilon is allowed (its images are then wrong, not refused); the default size
    follows the type given."""
    path = tmp_path / "model.safetensors"
    write_single_file(path, constant_output_state(BARE, V_LIKE), open_clip=True,
                      metadata={"modelspec.prediction_type": "v"})
    no_probe(monkeypatch)
    model, _ = loader.load(path, prediction_type="epsilon")
    assert model.config == BARE, f"{model.config} is not the epsilon config inferred from the shapes"
    pipe = Pipeline.from_checkpoint(path, prediction_type="epsilon")
    assert pipe.config.prediction_type == "epsilon" and pipe.default_size == 2 * 64
    given = Pipeline.from_checkpoint(path, config=BARE, prediction_type="v_prediction")
    assert given.config.prediction_type == "v_prediction" and given.config.unet == BARE.unet, "a given config is kept"


@pytest.mark.parametrize("make, message", [
    (lambda path: write_single_file(path, random_state(BARE), open_clip=True,
                                    metadata={"modelspec.prediction_type": "sample"}),
     "modelspec.prediction_type 'sample', which is neither epsilon nor v"),
    (lambda path: (write_single_file(path, random_state(BARE), open_clip=True),
                   path.with_suffix(".json").write_text(json.dumps({"prediction_type": "v"}))),
     "prediction_type must be one of epsilon, v_prediction; got 'v'"),
], ids=["unknown-modelspec", "bad-json"])
def test_bad_prediction_types_are_refused(tmp_path, make, message):
    path = tmp_path / "model.safetensors"
    make(path)
    with pytest.raises(CheckpointError, match=message):
        loader.load(path)


def test_bad_prediction_type_argument_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    write_single_file(path, random_state(BARE), open_clip=True)
    with pytest.raises(ValueError, match="prediction_type must be one of epsilon, v_prediction; got 'v'"):
        Pipeline.from_checkpoint(path, prediction_type="v")


@pytest.mark.parametrize("heads, message", [
    ([2, 3], r"heads \[2, 3\] for channels \[32, 64\] share neither a count nor a width"),
    ([2, 0], r"attention_head_dim must be a non-empty list of positive integers; got \[2, 0\]"),
    ([2], r"head counts \[2\] are not one positive count per level"),
])
def test_diffusers_head_counts_that_fit_no_config_are_refused(tmp_path, sd2_folder, heads, message):
    folder = copy_folder(sd2_folder, tmp_path)
    config = json.loads((folder / "unet" / "config.json").read_text())
    assert config["attention_head_dim"] == [2, 4], "TINY_SD2's heads: 2 and 4 of 16 wide"
    (folder / "unet" / "config.json").write_text(json.dumps({**config, "attention_head_dim": heads}))
    with pytest.raises(CheckpointError, match=message):
        loader.load(folder)


def test_an_unclip_diffusers_folder_is_refused_by_name(tmp_path, sd2_folder):
    folder = copy_folder(sd2_folder, tmp_path)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    unet = safetensors.torch.load_file(weights)
    unet["class_embedding.linear_1.weight"] = torch.zeros(128, 64)
    safetensors.torch.save_file(unet, weights)
    with pytest.raises(CheckpointError, match="looks like SD 2.x unCLIP"):
        loader.load(folder)


# --- prompts: textual inversion and clip skip ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd2_pipe(sd2_folder):
    return Pipeline.from_checkpoint(sd2_folder)


def their_pipeline(folder):
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    return diffusers.StableDiffusionPipeline(
        unet=diffusers.UNet2DConditionModel.from_pretrained(folder / "unet"),
        vae=diffusers.AutoencoderKL.from_pretrained(folder / "vae"),
        text_encoder=transformers.CLIPTextModel.from_pretrained(folder / "text_encoder").eval(),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer", model_max_length=77),
        scheduler=diffusers.DDIMScheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_an_sd2_embedding_conditions_as_diffusers_load_textual_inversion(tmp_path, sd2_folder, suffix):
    """An A1111 embedding as SD 2.x's are (vectors as wide as the OpenCLIP tower: 1024 at full size), in both of
    A1111's formats; diffusers' load_textual_inversion reads both and gives the reference conditioning."""
    from test_prompts import write_a1111_pt, write_a1111_safetensors

    ours = Pipeline.from_checkpoint(sd2_folder)
    table = ours.text_encoder.embeddings.token_embedding.weight
    vectors = torch.randn(3, table.shape[1], generator=torch.Generator().manual_seed(1)) * table.std()
    path = tmp_path / f"tsdstyle{suffix}"
    (write_a1111_pt if suffix == ".pt" else write_a1111_safetensors)(path, vectors)
    theirs = their_pipeline(sd2_folder)
    theirs.load_textual_inversion(str(path), token="tsdstyle")
    assert ours.load_textual_inversion(path) == "tsdstyle"
    prompts = ["a tsdstyle photograph of a cat, tsdstyle", "tsdstyle"]
    with torch.no_grad():
        want = torch.cat([theirs.encode_prompt(p, "cpu", 1, False)[0] for p in prompts])
    got = ours.encode_prompt(prompts)
    err = ((got - want).norm() / want.norm()).item()
    assert err <= 1e-5, f"{suffix}: conditioning with the embedding differs from diffusers' by {err:.2e}"
    without = ours.encode_prompt("a photograph of a cat")
    assert not torch.allclose(got[0], without[0], atol=1e-3), "the embedding hardly changes the conditioning"


@pytest.mark.parametrize("width", [768, 1024])
def test_embeddings_of_another_width_are_refused_by_the_sd2_pipeline(tmp_path, sd2_folder, width):
    pipe = Pipeline.from_checkpoint(sd2_folder)
    before = pipe.encode_prompt("a cat")
    torch.save({"string_to_param": {"*": torch.zeros(2, width)}}, tmp_path / "other.pt")
    family = {768: "SD 1.x", 1024: "SD 2.x"}[width]
    with pytest.raises(CheckpointError, match=rf"size {width} \(an {family} embedding\), but this model's text encoder "
                                              rf"has hidden size {TINY_SD2.text.hidden_size};"):
        pipe.load_textual_inversion(tmp_path / "other.pt")
    assert pipe.prompt_tokenizer.embeddings == [] and pipe.text_encoder.embeddings.extra is None
    assert torch.equal(pipe.encode_prompt("a cat"), before)


def test_clip_skip_is_ignored_on_sd2_as_automatic1111_ignores_it(sd2_pipe, caplog):
    """A1111 never reads "Clip skip" for OpenCLIP (sd_hijack_open_clip.py): an SD 2.x prompt encodes the same at every
    clip skip, with one warning; the text encoder itself still stops where it is told."""
    ids = sd2_pipe.tokenizer(["a red cube"])
    with torch.no_grad():
        assert not torch.allclose(sd2_pipe.text_encoder(ids, clip_skip=2)[0], sd2_pipe.text_encoder(ids)[0]), \
            "the test needs clip skip 2 to change the text encoder's output"
    base = sd2_pipe.encode_prompt("a red cube")
    with caplog.at_level(logging.WARNING, logger="tritonsd"):
        for clip_skip in (2, 2, TINY_SD2.text.num_hidden_layers):
            assert torch.equal(sd2_pipe.encode_prompt("a red cube", clip_skip=clip_skip), base), clip_skip
    warnings = [r.getMessage() for r in caplog.records if "clip_skip" in r.getMessage()]
    assert len(warnings) == 1 and "ignored" in warnings[0] and "AUTOMATIC1111" in warnings[0], warnings
    gen = dict(steps=2, width=32, height=32, seed=3, output_type="np")
    assert np.array_equal(sd2_pipe.txt2img("a red cube", clip_skip=2, **gen), sd2_pipe.txt2img("a red cube", **gen))
    with pytest.raises(ValueError, match="clip_skip 3 is past the text encoder's first layer"):
        sd2_pipe.encode_prompt("a red cube", clip_skip=TINY_SD2.text.num_hidden_layers + 1)


# --- the command line --------------------------------------------------------------------------------------------------

def run(capsys, *argv) -> tuple[str, str]:
    main([str(a) for a in argv])
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_command_line_runs_batches_describes_and_converts_sd2(capsys, tmp_path):
    model = tmp_path / "sd2v.safetensors"
    write_single_file(model, random_state(TINY_SD2_V, seed=1), open_clip=True)
    model.with_suffix(".json").write_text(TINY_SD2_V.to_json())
    fast = ["--steps", "2", "--width", "32", "--height", "32", "--device", "cpu", "--seed", "4"]

    out = tmp_path / "a.png"
    run(capsys, "txt2img", "a red cube", "--model", model, "-o", out, *fast)
    settings = parse_parameters(Image.open(out).text["parameters"])
    assert (settings["model"], settings["width"], settings["seed"]) == ("sd2v", 32, 4), settings

    stdout, _ = run(capsys, "info", model)
    rows = dict(line.split(None, 1) for line in stdout.splitlines()[1:])
    assert rows["architecture"].startswith("SD 2.x") and rows["prediction"] == "v_prediction (from sd2v.json)", rows
    assert "num_head_channels=16" in rows["config.unet"] and "pad_token=!" in rows["config.text"], rows

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\nblue sphere\n")
    stdout, _ = run(capsys, "batch", prompts, "--out", tmp_path / "batch", "--model", model, *fast)
    written = [tmp_path / "batch" / f"0000{n}.png" for n in (1, 2)]
    assert stdout.split() == [str(p) for p in written], stdout
    recorded = [parse_parameters(Image.open(p).text["parameters"]) for p in written]
    got = [(r["prompt"], r["seed"], r["model"]) for r in recorded]
    assert got == [("a red cube", 5, "sd2v"), ("blue sphere", 6, "sd2v")], f"batch PNGs record {got}"

    # Forced to epsilon, the same seed gives another picture.
    run(capsys, "txt2img", "a red cube", "--model", model, "-o", tmp_path / "eps.png", "--prediction-type", "epsilon",
        *fast)
    a, eps = (np.asarray(Image.open(p), dtype=int) for p in (out, tmp_path / "eps.png"))
    assert np.abs(a - eps).max() > 10, "the prediction type did not change the image"

    bare = tmp_path / "bare.safetensors"
    write_single_file(bare, constant_output_state(BARE, V_LIKE), open_clip=True)
    converted = tmp_path / "converted.safetensors"
    run(capsys, "convert", bare, converted, "--prediction-type", "epsilon")
    stdout, _ = run(capsys, "info", converted, "--json")
    described = json.loads(stdout)
    assert described["config"] == json.loads(BARE.to_json()) and described["prediction_source"] == "the file's config"


def test_command_line_refuses_a_bad_prediction_type(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["txt2img", "a cube", "--prediction-type", "v", "-o", str(tmp_path / "a.png")])
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2 and stderr.count("\n") == 1, stderr
    assert "argument --prediction-type: invalid choice: 'v'" in stderr and not list(tmp_path.iterdir())
