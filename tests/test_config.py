"""Model configs: every field is held to its type and a sane range, from every place a config comes from (the API,
--config, a NAME.json beside a checkpoint, a tritonsd file's metadata, a diffusers folder's config.json files), with a
ValueError naming the field; and a config must agree with the tensors it describes before any module is built."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import safetensors.torch

from tritonsd import loader
from tritonsd.cli import main
from tritonsd.engine.config import FAMILIES, LIMITS, ModelConfig, PARTS
from tritonsd.engine.model import StableDiffusion
from tritonsd.loader import CheckpointError
from tiny import TINY, linked_copy, original_checkpoint, random_state

DEEP_LIST = [[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]

# (part, field, value): zero, negative, huge, mistyped (str, float or bool for an int, a list of lists), nested, NaN.
BAD_FIELDS = [
    ("unet", "model_channels", 0),
    ("unet", "model_channels", -320),
    ("unet", "model_channels", 10**9),
    ("unet", "model_channels", "320"),
    ("unet", "model_channels", 320.0),
    ("unet", "model_channels", True),
    ("unet", "model_channels", {"value": {"value": 320}}),
    ("unet", "channel_mult", [[1, 2]]),
    ("unet", "channel_mult", DEEP_LIST),
    ("unet", "channel_mult", []),
    ("unet", "channel_mult", [1, 0]),
    ("unet", "channel_mult", "12"),
    ("unet", "num_res_blocks", 0),
    ("unet", "num_heads", 0),  # was a ZeroDivisionError
    ("unet", "norm_groups", 0),  # likewise
    ("unet", "transformer_depth", 10**6),
    ("unet", "attention_resolutions", [[2]]),
    ("unet", "sample_size", -64),
    ("vae", "ch", 0),
    ("vae", "ch_mult", [1, -2]),
    ("vae", "z_channels", 2.5),
    ("vae", "scaling_factor", float("nan")),
    ("vae", "scaling_factor", float("inf")),
    ("vae", "scaling_factor", 0),
    ("vae", "scaling_factor", "0.18215"),
    ("vae", "norm_groups", None),
    ("text", "num_hidden_layers", 1_000_000),
    ("text", "num_attention_heads", 0),
    ("text", "hidden_size", -768),
    ("text", "vocab_size", 49408.0),
    ("text", "intermediate_size", [3072]),
    ("text", "max_position_embeddings", 10**40),
    ("text", "hidden_act", 1),
    ("text", "hidden_act", "relu"),
    ("text", "layer_norm_eps", -1e-5),
]
IDS = [f"{part}.{name}={str(value)[:20]}" for part, name, value in BAD_FIELDS]


def bad_dict(part, name, value) -> dict:
    d = TINY.to_dict()
    d[part][name] = value
    return d


def bad_json(part, name, value) -> str:
    return json.dumps(bad_dict(part, name, value))  # NaN and Infinity as JSON's extension writes and reads them


@pytest.fixture(scope="module")
def tiny_state():
    return random_state(TINY, seed=0)


@pytest.fixture(scope="module")
def single_file(tmp_path_factory, tiny_state):
    path = tmp_path_factory.mktemp("single") / "tiny.safetensors"
    safetensors.torch.save_file(original_checkpoint(tiny_state, extras=False), path)
    return path


def diffusers_copy(folder, tmp_path, part, changes) -> object:
    """The folder with one part's config.json changed: {key: value} merged into it, or a whole JSON value instead."""
    config = json.loads((folder / part / "config.json").read_text())
    config = {**config, **changes} if isinstance(changes, dict) else changes
    return linked_copy(folder, tmp_path / "model", {f"{part}/config.json": json.dumps(config)})


def test_every_field_has_a_rule_and_the_defaults_keep_them():
    for name, part_cls in PARTS.items():
        fields = {f.name for f in dataclasses.fields(part_cls)}
        assert set(LIMITS[name]) == fields, (
            f"LIMITS[{name!r}] covers {sorted(LIMITS[name])}, the fields are {sorted(fields)}")
    ModelConfig()
    ModelConfig.from_dict(TINY.to_dict())


@pytest.mark.parametrize("part, name, value", BAD_FIELDS, ids=IDS)
def test_bad_field_from_dict(part, name, value):
    with pytest.raises(ValueError, match=rf"^{part}\.{name} must be "):
        ModelConfig.from_dict(bad_dict(part, name, value))


@pytest.mark.parametrize("part, name, value", BAD_FIELDS, ids=IDS)
def test_bad_field_in_the_constructors(part, name, value):
    """dataclasses.replace and the part constructors check too: no invalid config can exist."""
    with pytest.raises(ValueError, match=rf"^{part}\.{name} must be "):
        dataclasses.replace(getattr(TINY, part), **{name: value})


@pytest.mark.parametrize("part, name, value", BAD_FIELDS, ids=IDS)
def test_bad_field_in_a_config_file_on_the_command_line(capsys, tmp_path, single_file, part, name, value):
    config = tmp_path / "config.json"
    config.write_text(bad_json(part, name, value))
    with pytest.raises(SystemExit) as exit_info:
        main(["txt2img", "a cube", "--config", str(config), "--model", str(single_file), "-o", str(tmp_path / "a.png"),
              "--steps", "2", "--width", "32", "--height", "32", "--device", "cpu"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, f"exit {exit_info.value.code}: {err!r}"
    assert err.startswith(f"tritonsd: error: model config {config}: {part}.{name} must be "), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"], "a refused run wrote files"


@pytest.mark.parametrize("part, name, value", BAD_FIELDS, ids=IDS)
def test_bad_field_in_a_json_beside_the_checkpoint(tmp_path, single_file, part, name, value):
    path = tmp_path / single_file.name
    os.symlink(single_file, path)
    path.with_suffix(".json").write_text(bad_json(part, name, value))
    want = f"{path}: tiny.json beside it: {part}.{name} must be "
    with pytest.raises(CheckpointError) as e:
        loader.load(path)
    assert str(e.value).startswith(want), str(e.value)
    assert loader.describe(path)["problem"] == str(e.value)


@pytest.mark.parametrize("part, name, value", BAD_FIELDS, ids=IDS)
def test_bad_field_in_a_tritonsd_files_metadata(tmp_path, tiny_state, part, name, value):
    path = tmp_path / "tiny.safetensors"
    metadata = {"format": "tritonsd", "config": bad_json(part, name, value)}
    safetensors.torch.save_file(tiny_state, path, metadata=metadata)
    want = f"{path}: the model config in its metadata: {part}.{name} must be "
    with pytest.raises(CheckpointError) as e:
        loader.load(path)
    assert str(e.value).startswith(want), str(e.value)
    assert loader.describe(path)["problem"] == str(e.value)


BAD_DIFFUSERS = [
    ("unet", {"block_out_channels": [0, 64]}, "unet/config.json: block_out_channels must be a non-empty list of positive integers; got [0, 64]"),
    ("unet", {"block_out_channels": ["32", "64"]}, "unet/config.json: block_out_channels must be a non-empty list"),
    ("unet", {"block_out_channels": [32, 48]}, "unet/config.json: block_out_channels [32, 48] are not multiples of the first"),
    ("unet", {"block_out_channels": 32}, "unet/config.json: block_out_channels must be a non-empty list"),
    ("unet", {"layers_per_block": 2.0}, "unet/config.json: layers_per_block must be a positive integer; got 2.0"),
    ("unet", {"layers_per_block": True}, "unet/config.json: layers_per_block must be a positive integer; got True"),
    ("unet", {"attention_head_dim": 0}, "unet/config.json: attention_head_dim must be a positive integer; got 0"),
    ("unet", {"attention_head_dim": []}, "unet/config.json: attention_head_dim must be a non-empty list of positive integers; got []"),
    ("unet", {"down_block_types": [["CrossAttnDownBlock2D"], "DownBlock2D"]}, "unet/config.json: down_block_types must be a list of strings"),
    ("unet", {"down_block_types": ["CrossAttnDownBlock2D"]}, "unet/config.json: 1 down_block_types for 2 block_out_channels"),
    ("unet", {"cross_attention_dim": "32"}, "unet/config.json: cross_attention_dim must be a positive integer; got '32'"),
    ("unet", {"norm_num_groups": 0}, "unet/config.json: norm_num_groups must be a positive integer; got 0"),
    ("unet", {"norm_num_groups": 3}, "describe an unsupported model: unet channels 32 not divisible by norm_groups 3"),
    ("unet", {"block_out_channels": [32, 64 * 10**6]}, "describe an unsupported model: unet.channel_mult must be a list"),
    ("unet", [1, 2], "unet/config.json must hold a JSON object; it holds list"),
    ("vae", {"scaling_factor": "0.18"}, "vae/config.json: scaling_factor must be a number; got '0.18'"),
    ("vae", {"scaling_factor": float("nan")}, "describe an unsupported model: vae.scaling_factor must be a number"),
    ("vae", {"latent_channels": 0}, "vae/config.json: latent_channels must be a positive integer; got 0"),
    ("vae", {"norm_num_groups": None}, "vae/config.json: norm_num_groups must be a positive integer; got None"),
    ("text_encoder", {"num_hidden_layers": 1_000_000}, "unsupported model: text.num_hidden_layers must be an integer in [1, 256]"),
    ("text_encoder", {"hidden_size": "32"}, "unsupported model: text.hidden_size must be an integer"),
    ("text_encoder", {"num_attention_heads": 0}, "unsupported model: text.num_attention_heads must be an integer"),
    ("text_encoder", "CLIPTextModel", "text_encoder/config.json must hold a JSON object; it holds str"),
]


@pytest.mark.parametrize("part, changes, message", BAD_DIFFUSERS, ids=[
    f"{part}-{next(iter(changes)) if isinstance(changes, dict) else type(changes).__name__}" for part, changes, _ in BAD_DIFFUSERS])
def test_bad_entry_in_a_diffusers_config(tmp_path, tiny_diffusers, part, changes, message):
    path = diffusers_copy(tiny_diffusers, tmp_path, part, changes)
    with pytest.raises(CheckpointError) as e:
        loader.load(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value), f"{str(e.value)!r} lacks {message!r}"
    assert loader.describe(path)["problem"] == str(e.value)


def test_diffusers_configs_held_in_memory_take_tuples(tiny_diffusers):
    """diffusers keeps a model's config with tuples where config.json has lists; both describe the same model."""
    from tritonsd.loader.infer import config_from_diffusers

    configs = {part: json.loads((tiny_diffusers / part / "config.json").read_text())
               for part in ("unet", "vae", "text_encoder")}
    in_memory = {part: {k: tuple(v) if isinstance(v, list) else v for k, v in c.items()} for part, c in configs.items()}
    assert config_from_diffusers(in_memory) == config_from_diffusers(configs) == TINY


def test_diffusers_config_nested_too_deeply(tmp_path, tiny_diffusers):
    path = diffusers_copy(tiny_diffusers, tmp_path, "unet", {})
    (path / "unet" / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match=r"unet/config.json: cannot read the part's config \(not valid JSON: nested too deeply\)"):
        loader.load(path)


@pytest.mark.parametrize("text, message", [
    ("[" * 100_000 + "]" * 100_000, "not valid JSON: nested too deeply"),
    ('{"unet": {"model_channels": ' + "9" * 5000 + "}}", "not valid JSON: Exceeds the limit (4300 digits)"),
    ("{" + " " * (1 << 20) + "}", "larger than 1 MiB"),
    (b"\xff\xfe{}".decode("latin-1"), "not UTF-8 text (invalid start byte at byte 0)"),
    ("unet: {model_channels: 320}", "not valid JSON: Expecting value: line 1 column 1 (char 0)"),
], ids=["deep", "5000-digit int", "huge", "not utf-8", "yaml"])
def test_unreadable_config_file(tmp_path, text, message):
    config = tmp_path / "config.json"
    config.write_text(text, encoding="latin-1")
    with pytest.raises(ValueError) as e:
        ModelConfig.from_json(config)
    assert str(e.value).startswith(f"cannot read model config {config}: ") and message in str(e.value), str(e.value)


@pytest.mark.parametrize("changes, message", [
    (dict(unet=dict(num_heads=3)), "unet channels 32 not divisible by num_heads 3"),
    (dict(unet=dict(attention_resolutions=[4])), "unet.attention_resolutions [4] must be downsampling factors of the UNet's 2 levels, [1, 2]"),
    (dict(unet=dict(out_channels=8)), "unet.out_channels 8 differs from in_channels 4: the UNet predicts noise of the latents' shape"),
    (dict(unet=dict(model_channels=4096, channel_mult=[8, 8], num_heads=8, norm_groups=8)), "unet's widest level has 32768 channels; at most 16384"),
    (dict(text=dict(hidden_size=48)), "unet.context_dim 32 differs from the text towers' width 48"),
], ids=["heads", "attention level", "out channels", "widest", "context"])
def test_fields_that_disagree_with_each_other(changes, message):
    d = TINY.to_dict()
    for part, fields in changes.items():
        d[part].update(fields)
    with pytest.raises(ValueError) as e:
        ModelConfig.from_dict(d)
    assert str(e.value) == message


@pytest.mark.parametrize("d, message", [
    ([TINY.to_dict()], "model config must be a dict of parts (unet, vae, text, text_2); got [{'conditioning': 'none', 'prediction_type': 'epsilon', 'text': {...}, 'text_2': None, ...}] (list)"),
    ({"unet": [32]}, "model config part 'unet' must be a dict of fields; got [32] (list)"),
    ({"unet": {}, "lora": {}}, "unknown model config part(s) ['lora']; expected ['text', 'text_2', 'unet', 'vae'] and prediction_type, conditioning, timestep_spacing"),
    ({"vae": {"channels": 3, 7: 1}}, "unknown field(s) ['7', 'channels'] in model config part 'vae'"),
    ({"timestep_spacing": "uniform"},
     "timestep_spacing must be one of default, leading, linspace, trailing; got 'uniform' (str)"),
], ids=["list", "part not a dict", "unknown part", "unknown fields", "timestep spacing"])
def test_config_shape(d, message):
    with pytest.raises(ValueError) as e:
        ModelConfig.from_dict(d)
    assert str(e.value) == message


def test_timestep_spacing_is_each_sampler_s_own_but_for_sdxl():
    """SDXL's released scheduler config says "leading"; SD 1.x's and 2.x's name none. A config written before the field
    existed keeps each sampler's own."""
    assert {name: c.timestep_spacing for name, c in FAMILIES.items()} == {
        "SD 1.x": "default", "SD 2.x": "default", "SDXL": "leading", "SDXL refiner": "leading"}
    d = TINY.to_dict()
    del d["timestep_spacing"]
    assert ModelConfig.from_dict(d).timestep_spacing == "default"


# --- a config must agree with the tensors ---------------------------------------------------------------------------

def _metadata_file(tmp_path, state, config: dict):
    path = tmp_path / "tiny.tsd.safetensors"
    safetensors.torch.save_file(state, path, metadata={"format": "tritonsd", "config": json.dumps(config)})
    return path


def test_config_larger_than_the_file_is_refused_before_any_module_is_built(tmp_path, tiny_state, monkeypatch):
    config = TINY.to_dict()
    config["text"]["num_hidden_layers"] = 256  # in range, but the file holds 2 layers
    config["unet"]["transformer_depth"] = 64
    path = _metadata_file(tmp_path, tiny_state, config)

    def never(*args, **kwargs):
        raise AssertionError("a model was built for a config that disagrees with the file")

    monkeypatch.setattr(StableDiffusion, "on_meta", never)
    want = (f"{path}: its config does not match its tensors: unet.transformer_depth is [64, 64] in the config, [1, 1] in the "
            "tensors; text.num_hidden_layers is 256 in the config, 2 in the tensors")
    with pytest.raises(CheckpointError) as e:
        loader.load(path)
    assert str(e.value) == want
    assert loader.describe(path)["problem"] == want


def test_info_on_a_file_whose_metadata_claims_a_million_layers_answers_at_once(tmp_path, tiny_state):
    """A 3-byte edit of the metadata once made `tritonsd info` build a text encoder of a million layers."""
    config = TINY.to_dict()
    config["text"]["num_hidden_layers"] = 1_000_000
    path = _metadata_file(tmp_path, tiny_state, config)
    done = subprocess.run([sys.executable, "-m", "tritonsd", "info", str(path)], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "TRITONSD_KERNELS": "torch"})
    assert done.returncode == 2, f"info exited {done.returncode}: {done.stderr[-2000:]}"
    assert done.stderr == (f"tritonsd: error: {path}: the model config in its metadata: text.num_hidden_layers must "
                           "be an integer in [1, 256]; got 1000000 (int)\n"), done.stderr


def test_explicit_config_is_held_to_the_tensors_too(single_file):
    wrong = dataclasses.replace(TINY, vae=dataclasses.replace(TINY.vae, ch=64, norm_groups=8))
    with pytest.raises(CheckpointError, match="vae.ch is 64 in the config, 32 in the tensors"):
        loader.load(single_file, config=wrong)
