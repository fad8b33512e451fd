"""The checkpoint loader: every format people have maps onto the engine's tensors exactly, the engine's own file
round-trips, and every bad input is refused with a message that says what is wrong.

The diffusers folders are written by diffusers' own single-file conversion, so the check that diffusers' conversion
followed by ours gives back the original tensors is a check of our rule table against theirs."""

import dataclasses
import json
import os
import pickle
from collections import OrderedDict

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from tritonsd import loader
from tritonsd.engine.config import ModelConfig
from tritonsd.engine.model import StableDiffusion
from tritonsd.engine.tokenizer import CLIPTokenizer
from tritonsd.loader import CheckpointError
from tiny import TINY, original_checkpoint, random_state, write_diffusers_folder, write_single_file

# Three levels, attention only at full resolution (so the upsamplers sit right after a ResBlock), one res block per
# level, two transformer blocks, and a three-level VAE whose decoder order diffusers reverses.
DEEP = ModelConfig.from_dict({
    "unet": dict(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(1,), num_heads=4,
                 transformer_depth=2, context_dim=32, norm_groups=16),
    "vae": dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, norm_groups=32),
    "text": dict(vocab_size=49408, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48),
})


def assert_same_tensors(got: dict, want: dict, what: str):
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    assert not missing and not extra, f"{what}: {len(missing)} missing {missing[:5]}, {len(extra)} unexpected {extra[:5]}"
    differ = []
    for k, w in want.items():
        g = got[k]
        if g.shape != w.shape or g.dtype != w.dtype or not torch.equal(g, w):
            err = (g.double() - w.double()).abs().max().item() if g.shape == w.shape else float("nan")
            differ.append(f"{k} (shape {list(g.shape)} vs {list(w.shape)}, {g.dtype} vs {w.dtype}, max abs err {err:.2e})")
    assert not differ, f"{what}: {len(differ)} tensors differ: {differ[:5]}"


@pytest.fixture(scope="module")
def tiny_state():
    return random_state(TINY, seed=0)


def check_loaded_model(model, want: dict, dtype=torch.float32):
    assert not model.training, "loaded model is in training mode"
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    assert all(not t.requires_grad for t in tensors.values()), "loaded parameters require grad"
    on_meta = [k for k, t in tensors.items() if t.is_meta]
    assert not on_meta, f"{len(on_meta)} tensors left on the meta device: {on_meta[:5]}"
    assert_same_tensors(model.state_dict(), {k: t.to(dtype) for k, t in want.items()}, "model after load")


# --- original single files -----------------------------------------------------------------------------------------

def test_original_prefixes_are_the_ones_diffusers_reads():
    """The test files are written with the loader's own prefix table, so the table is checked against diffusers'."""
    from diffusers.loaders import single_file_utils as sf

    from tritonsd.loader.convert import ORIGINAL_PREFIXES

    assert ORIGINAL_PREFIXES["unet"] == (sf.LDM_UNET_KEY,)
    assert ORIGINAL_PREFIXES["vae"] == (sf.LDM_VAE_KEYS[0],)
    clip = sf.LDM_CLIP_PREFIX_TO_REMOVE[0]
    assert ORIGINAL_PREFIXES["text_encoder"] == (clip + "text_model.", clip), ORIGINAL_PREFIXES["text_encoder"]
    assert sf.CHECKPOINT_KEY_NAMES["clip"].startswith(ORIGINAL_PREFIXES["text_encoder"][0])


@pytest.mark.parametrize("fmt, wrap", [("safetensors", False), ("ckpt", True), ("ckpt", False), ("ckpt-legacy", True)])
@pytest.mark.parametrize("text_prefix", [True, False], ids=["text_model", "old_clip_names"])
def test_single_file_maps_onto_engine_exactly(tmp_path, tiny_state, fmt, wrap, text_prefix):
    path = tmp_path / f"model.{fmt}"
    written = write_single_file(path, tiny_state, fmt, text_prefix=text_prefix, wrap=wrap, extras=True)
    assert any(k.startswith("model_ema.") for k in written) and "alphas_cumprod" in written

    fmt_name, state, _ = loader.load_state_dict(path)
    assert fmt_name == "single_file"
    assert_same_tensors(state, tiny_state, f"{fmt} (wrapped={wrap}, text_model.={text_prefix})")


def test_load_builds_the_model_from_a_single_file(tmp_path, tiny_state):
    path = tmp_path / "model.safetensors"
    write_single_file(path, tiny_state)
    model, tokenizer = loader.load(path, dtype=torch.float16)
    check_loaded_model(model, tiny_state, torch.float16)
    assert tokenizer is CLIPTokenizer.default(), "a single file has no tokenizer; expected the default one"
    want = loader.infer_config(tiny_state)
    assert model.config == want, f"config {model.config} != inferred {want}"


def test_config_json_beside_single_file_wins(tmp_path, tiny_state):
    path = tmp_path / "model.ckpt"
    write_single_file(path, tiny_state, "ckpt")
    (tmp_path / "model.json").write_text(TINY.to_json())
    model, _ = loader.load(path)
    assert model.config == TINY, f"config {model.config} is not the one in model.json"


# --- diffusers folders ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config, weights", [(TINY, "safetensors"), (TINY, "bin"), (TINY, "fp16"), (DEEP, "safetensors")],
                         ids=["tiny-safetensors", "tiny-bin", "tiny-fp16-variant", "deep-safetensors"])
def test_diffusers_folder_round_trips_to_the_original_tensors(tmp_path, config, weights):
    state = random_state(config, seed=1)
    write_diffusers_folder(tmp_path, original_checkpoint(state), config, weights=weights)
    want = {k: t.half() for k, t in state.items()} if weights == "fp16" else state

    fmt, got, _ = loader.load_state_dict(tmp_path)
    assert fmt == "diffusers"
    assert_same_tensors(got, want, f"diffusers folder ({weights}) converted back")

    model, tokenizer = loader.load(tmp_path)
    assert model.config == config, f"config from config.json files {model.config} != {config}"
    check_loaded_model(model, want)
    vocab = json.loads((tmp_path / "tokenizer" / "vocab.json").read_text(encoding="utf-8"))
    assert tokenizer is not CLIPTokenizer.default() and tokenizer.vocab == vocab, "tokenizer not read from tokenizer/"


def test_diffusers_folder_with_older_vae_attention_names(tmp_path, tiny_state):
    """diffusers before 0.15 wrote the VAE attention as query/key/value/proj_attn beside group_norm."""
    write_diffusers_folder(tmp_path, original_checkpoint(tiny_state, extras=False), TINY, tokenizer=False)
    vae_file = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    old_names = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}
    vae = safetensors.torch.load_file(vae_file)
    renamed = {}
    for k, t in vae.items():
        for new, old in old_names.items():
            k = k.replace(f"attentions.0.{new}", f"attentions.0.{old}")
        renamed[k] = t
    assert sum(".query." in k or ".proj_attn." in k for k in renamed) == 8, "expected 2 x 4 renamed VAE attention tensors"
    safetensors.torch.save_file(renamed, vae_file)
    _, state, _ = loader.load_state_dict(tmp_path)
    assert_same_tensors(state, tiny_state, "diffusers folder with older VAE attention names")


def test_diffusers_folder_without_tokenizer_uses_default(tmp_path, tiny_state):
    write_diffusers_folder(tmp_path, original_checkpoint(tiny_state, extras=False), TINY, tokenizer=False)
    _, tokenizer = loader.load(tmp_path)
    assert tokenizer is CLIPTokenizer.default()


# --- the engine's own file -----------------------------------------------------------------------------------------

def test_tritonsd_file_round_trips_with_its_config(tmp_path, tiny_state):
    model = StableDiffusion.on_meta(TINY)
    model.load_state_dict(tiny_state, assign=True)
    path = tmp_path / "tiny.tsd.safetensors"
    loader.save(model, TINY, path, dtype=torch.float16)
    assert os.listdir(tmp_path) == [path.name], f"save left {os.listdir(tmp_path)}"

    fmt, state, metadata = loader.load_state_dict(path)
    assert fmt == "tritonsd" and metadata["format"] == "tritonsd"
    assert_same_tensors(state, {k: t.half() for k, t in tiny_state.items()}, "tritonsd file")
    # TINY's heads, groups and scaling factor cannot be read off shapes: only the metadata can give them back.
    loaded, _ = loader.load(path)
    assert loaded.config == TINY, f"config {loaded.config} != saved {TINY}"
    info = loader.describe(path)
    assert info["format"] == "tritonsd" and info["config"] == TINY.to_dict() and info["dtypes"] == {"float16": len(state)}


def test_attention_projections_are_fused_but_files_keep_the_checkpoint_names(tmp_path, tiny_state):
    """The UNet's attention holds the projections of one input as one weight (one matrix product): q, k and v of
    self-attention, k and v of cross-attention. State dicts and files still hold to_q, to_k and to_v."""
    model = StableDiffusion.on_meta(TINY)
    model.load_state_dict(tiny_state, strict=True, assign=True)
    prefix = "unet.input_blocks.1.1.transformer_blocks.0."
    block = model.get_submodule(prefix[:-1])
    qkv = torch.cat([tiny_state[f"{prefix}attn1.to_{p}.weight"] for p in "qkv"])
    kv = torch.cat([tiny_state[f"{prefix}attn2.to_{p}.weight"] for p in "kv"])
    assert torch.equal(block.attn1.qkv, qkv), "self-attention's fused weight is not [to_q; to_k; to_v]"
    assert torch.equal(block.attn2.kv, kv), "cross-attention's fused weight is not [to_k; to_v]"
    path = tmp_path / "float32.safetensors"  # the model's own dtype: nothing is cast on the way out
    loader.save(model, TINY, path)
    assert_same_tensors(loader.load_state_dict(path)[1], tiny_state, "file saved from the fused model")


@pytest.mark.parametrize("low_byte", [0x80, 0x00, 0x08])
def test_safetensors_is_recognised_whatever_its_header_length(tmp_path, low_byte):
    """A safetensors file begins with its header's length; a length whose low byte is 0x80 begins like a pickle."""
    from tritonsd.loader.formats import read_file

    path, tensors = tmp_path / "t.safetensors", {"w": torch.arange(4.0)}
    for pad in range(512):
        safetensors.torch.save_file(tensors, path, metadata={"pad": "x" * pad})
        if path.read_bytes()[0] == low_byte:
            break
    else:
        pytest.fail(f"no padding gives a header length with low byte {low_byte:#x}")
    state, metadata = read_file(path)
    assert torch.equal(state["w"], tensors["w"]) and metadata["pad"] == "x" * pad, f"header low byte {low_byte:#x}: misread"


def test_save_is_atomic(tmp_path, tiny_state, monkeypatch):
    path = tmp_path / "model.safetensors"
    loader.save(tiny_state, TINY, path)
    before = path.read_bytes()

    def fail_midway(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        loader.save(tiny_state, TINY, path)
    assert path.read_bytes() == before, "a failed save changed the existing file"
    with pytest.raises(OSError, match="disk full"):
        loader.save(tiny_state, TINY, tmp_path / "new.safetensors")
    assert os.listdir(tmp_path) == [path.name], f"a failed save left {os.listdir(tmp_path)}"


def test_save_refuses_state_that_does_not_match_config(tmp_path, tiny_state):
    state = dict(tiny_state)
    del state["unet.out.2.bias"]
    with pytest.raises(CheckpointError, match=r"1 missing tensor\(s\): unet\.out\.2\.bias"):
        loader.save(state, TINY, tmp_path / "bad.safetensors")
    assert not os.listdir(tmp_path)


# --- config inference ----------------------------------------------------------------------------------------------

def _inferable(unet: dict, vae: dict, text: dict) -> ModelConfig:
    """A config whose unreadable fields hold the SD1.x fallbacks, so inference must give it back exactly."""
    return ModelConfig.from_dict({"unet": dict(num_heads=8, **unet), "vae": vae,
                                  "text": dict(num_attention_heads=text["hidden_size"] // 64, **text)})


@pytest.mark.parametrize("config", [
    ModelConfig(),
    _inferable(dict(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2, 1), context_dim=64),
               dict(ch=32, ch_mult=(1, 2), num_res_blocks=1),
               dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, intermediate_size=128)),
    _inferable(dict(model_channels=64, channel_mult=(1, 2, 3), num_res_blocks=3, attention_resolutions=(4, 1),
                    transformer_depth=2, context_dim=128),
               dict(ch=64, ch_mult=(1, 1, 2), num_res_blocks=2, z_channels=8, embed_dim=4),
               dict(vocab_size=500, hidden_size=128, num_hidden_layers=3, intermediate_size=256,
                    max_position_embeddings=33)),
    _inferable(dict(model_channels=64, channel_mult=(1,), num_res_blocks=2, attention_resolutions=(), context_dim=64),
               dict(ch=32, ch_mult=(1,), num_res_blocks=1, in_channels=1, out_ch=1),
               dict(vocab_size=100, hidden_size=64, num_hidden_layers=1, intermediate_size=64)),
], ids=["sd15", "two-levels", "three-levels-depth2", "one-level-no-attention"])
def test_infer_config_recovers_config_from_shapes(config):
    state = StableDiffusion.on_meta(config).state_dict()
    assert loader.infer_config(state) == config


def test_infer_config_uses_sd1_values_for_what_shapes_cannot_tell(tiny_state):
    got = loader.infer_config(tiny_state)
    want = dataclasses.replace(
        TINY,
        unet=dataclasses.replace(TINY.unet, num_heads=8, norm_groups=32),
        vae=dataclasses.replace(TINY.vae, scaling_factor=0.18215, norm_groups=32),
        text=dataclasses.replace(TINY.text, num_attention_heads=1),
    )
    assert got == want


# --- SD1.5 at full size --------------------------------------------------------------------------------------------

SD15_PARAMETERS = {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863}


@pytest.fixture(scope="module")
def sd15_file(tmp_path_factory):
    """Every SD1.5 tensor under its original name, fp16, each filled with its own index so swaps are visible."""
    names = StableDiffusion.on_meta(ModelConfig()).state_dict()
    state = {k: torch.full(t.shape, float(i % 2000), dtype=torch.float16) for i, (k, t) in enumerate(names.items())}
    path = tmp_path_factory.mktemp("sd15") / "sd15.safetensors"
    safetensors.torch.save_file(original_checkpoint(state, extras=False), path)
    return path, list(names)


def test_sd15_single_file_loads_with_real_sizes(sd15_file):
    path, names = sd15_file
    model, _ = loader.load(path, dtype=torch.float16)
    assert model.config == ModelConfig(), f"inferred {model.config}, expected SD1.x defaults"
    counts = {part: sum(p.numel() for p in getattr(model, part).parameters()) for part in SD15_PARAMETERS}
    assert counts == SD15_PARAMETERS, f"parameter counts {counts} != SD1.5's {SD15_PARAMETERS}"
    params = model.state_dict()
    wrong = [k for i, k in enumerate(names) if params[k].flatten()[-1].item() != float(i % 2000)]
    assert not wrong, f"{len(wrong)} tensors hold another tensor's values: {wrong[:5]}"

    info = loader.describe(path)
    assert info["architecture"] == "SD 1.x" and info["format"] == "single_file"
    assert info["parameters"] == SD15_PARAMETERS and info["dtypes"] == {"float16": len(names)}
    assert info["missing"] == info["unexpected"] == info["wrong_shape"] == []


# --- describe ------------------------------------------------------------------------------------------------------

def test_describe_reports_mismatches_without_raising(tmp_path, tiny_state):
    path = tmp_path / "model.safetensors"
    ckpt = original_checkpoint(tiny_state, extras=False)
    del ckpt["model.diffusion_model.out.2.bias"]
    ckpt["model.diffusion_model.extra.weight"] = torch.zeros(3)
    safetensors.torch.save_file(ckpt, path)
    (tmp_path / "model.json").write_text(TINY.to_json())
    info = loader.describe(path)
    assert info["config"] == TINY.to_dict()
    assert info["missing"] == ["unet.out.2.bias"] and info["unexpected"] == ["unet.extra.weight"], info
    want = {part: sum(t.numel() for k, t in tiny_state.items() if k.startswith(part + ".")) for part in SD15_PARAMETERS}
    want["unet"] += 3 - tiny_state["unet.out.2.bias"].numel()
    assert info["parameters"] == want


# --- refused inputs ------------------------------------------------------------------------------------------------

def test_mismatching_tensors_are_listed_in_one_error(tmp_path, tiny_state):
    ckpt = original_checkpoint(tiny_state)
    removed = [k for k in ckpt if ".attn1.to_q." in k]  # not needed to infer the config
    for k in removed:
        del ckpt[k]
    ckpt["model.diffusion_model.input_blocks.1.1.extra.weight"] = torch.zeros(2)
    ckpt["first_stage_model.decoder.conv_out.bias"] = torch.zeros(5)
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(ckpt, path)
    with pytest.raises(CheckpointError) as e:
        loader.load(path)
    msg = str(e.value)
    assert str(path) in msg
    assert f"{len(removed)} missing tensor(s): unet.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight" in msg, msg
    assert "1 unexpected tensor(s): unet.input_blocks.1.1.extra.weight" in msg, msg
    assert "1 wrongly shaped tensor(s): vae.decoder.conv_out.bias (file [5], model [3])" in msg, msg


def test_tensor_needed_to_infer_the_config_is_named(tmp_path, tiny_state):
    ckpt = original_checkpoint(tiny_state)
    del ckpt["first_stage_model.post_quant_conv.weight"]
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(ckpt, path)
    with pytest.raises(CheckpointError, match="cannot infer the model config: tensor vae.post_quant_conv.weight is missing"):
        loader.load(path)


def test_config_that_disagrees_with_shapes_names_the_fields(tmp_path, tiny_state):
    path = tmp_path / "model.safetensors"
    write_single_file(path, tiny_state)
    wrong = dataclasses.replace(TINY, unet=dataclasses.replace(TINY.unet, num_res_blocks=1, channel_mult=(1, 2, 2),
                                                                  transformer_depth=1),
                                text=dataclasses.replace(TINY.text, num_hidden_layers=200))
    with pytest.raises(CheckpointError) as e:
        loader.load(path, config=wrong)
    assert str(e.value) == (
        f"{path}: its config does not match its tensors: unet.channel_mult is [1, 2, 2] in the config, [1, 2] in the "
        "tensors; unet.num_res_blocks is 1 in the config, 2 in the tensors; unet.transformer_depth is [1, 1, 1] in "
        "the config, [1, 1] in the tensors; text.num_hidden_layers is 200 in the config, 2 in the tensors"), str(e.value)


def test_many_missing_tensors_are_counted_not_all_listed(tmp_path, tiny_state):
    ckpt = original_checkpoint(tiny_state)
    removed = [k for k in ckpt if k.startswith("model.diffusion_model.output_blocks.")]
    for k in removed:
        del ckpt[k]
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(ckpt, path)
    with pytest.raises(CheckpointError, match=rf"{len(removed)} missing tensor\(s\): .*\({len(removed) - 10} more\)"):
        loader.load(path, config=TINY)


def _truncated(tmp_path, tiny_state, fmt):
    path = tmp_path / f"model.{fmt}"
    write_single_file(path, tiny_state, fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _bad_file(name: str, data: bytes):
    def make(tmp_path, tiny_state):
        (tmp_path / name).write_bytes(data)
        return tmp_path / name
    return make


def _png(tmp_path, tiny_state):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "model.safetensors", format="PNG")
    return tmp_path / "model.safetensors"


def _unrelated_safetensors(tmp_path, tiny_state):
    safetensors.torch.save_file({"fc.weight": torch.zeros(2, 2), "fc.bias": torch.zeros(2)}, tmp_path / "m.safetensors")
    return tmp_path / "m.safetensors"


def _folder_with(*parts):
    def make(tmp_path, tiny_state):
        for part in parts:
            (tmp_path / "model" / part).mkdir(parents=True)
            (tmp_path / "model" / part / "config.json").write_text("{}")
        (tmp_path / "model").mkdir(exist_ok=True)
        return tmp_path / "model"
    return make


@pytest.mark.parametrize("make, message", [
    (lambda tmp_path, s: _truncated(tmp_path, s, "safetensors"), "truncated or corrupt"),
    (lambda tmp_path, s: _truncated(tmp_path, s, "ckpt"), "truncated or corrupt"),
    (_bad_file("model.ckpt", bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))),
     "not a checkpoint: it is unrecognised binary data"),
    (_bad_file("model.safetensors", b"prompt: a photo of a cat\nsteps: 20\n"), "not a checkpoint: it is a text file"),
    (_bad_file("model.ckpt", b""), "not a checkpoint: it is an empty file"),
    (_png, "not a checkpoint: it is a PNG image"),
    (_unrelated_safetensors, "not a Stable Diffusion checkpoint"),
    (lambda tmp_path, s: tmp_path / "absent.safetensors", "no such file"),
    (_folder_with(), "not a diffusers model"),
    (_folder_with("unet"), "missing subfolder(s) vae, text_encoder"),
    (_folder_with("unet", "vae", "text_encoder"), "no weights file"),
], ids=["truncated-safetensors", "truncated-ckpt", "random-bytes", "text", "empty", "png", "unrelated-tensors",
        "no-file", "empty-folder", "only-unet", "no-weights"])
def test_bad_inputs_are_refused_with_the_reason(tmp_path, tiny_state, make, message):
    path = make(tmp_path, tiny_state)
    with pytest.raises(CheckpointError) as e:
        loader.load(path)
    assert message in str(e.value) and str(path) in str(e.value), f"message {str(e.value)!r} lacks {message!r}"


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class CustomDict(OrderedDict):
    pass


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump", "custom-class"])
def test_pickled_code_is_refused_and_never_run(tmp_path, tiny_state, how):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.ckpt"
    ckpt = original_checkpoint(tiny_state, extras=False)
    if how == "torch.save":
        torch.save({"state_dict": ckpt, "payload": RunsCode(marker)}, path)
    elif how == "pickle.dump":
        path.write_bytes(pickle.dumps(RunsCode(marker), protocol=2))
    else:
        torch.save({"state_dict": CustomDict(ckpt)}, path)
    with pytest.raises(CheckpointError, match="pickled code or objects that are not plain tensors"):
        loader.load(path)
    assert not marker.exists(), "loading the checkpoint ran pickled code"


def _with(*changes):
    """Tensors added to (or replacing) a checkpoint's: (name, shape) pairs."""
    def change(ckpt):
        return ckpt | {key: torch.zeros(shape) for key, shape in changes}
    return change


# SD 2.x's UNet: Linear transformer projections.
SD2_UNET = ("model.diffusion_model.middle_block.1.proj_in.weight", (64, 64))


@pytest.mark.parametrize("change, name", [
    (_with(("model.diffusion_model.input_blocks.0.0.weight", (32, 9, 3, 3))), "SD 1.x inpainting"),
    (_with(SD2_UNET, ("model.diffusion_model.input_blocks.0.0.weight", (32, 9, 3, 3))), "SD 2.x inpainting"),
    (_with(("model.diffusion_model.label_emb.0.0.weight", (128, 2816)),
           ("model.diffusion_model.input_blocks.0.0.weight", (32, 9, 3, 3))), "SDXL inpainting"),
    (_with(("depth_model.model.pretrained.act_postprocess3.0.project.0.bias", (256,)),
           ("model.diffusion_model.input_blocks.0.0.weight", (32, 5, 3, 3))), "SD 2.x depth"),
    (_with(SD2_UNET, ("model.diffusion_model.input_blocks.0.0.weight", (32, 5, 3, 3))), "SD 2.x depth"),
    (_with(("embedder.model.ln_final.weight", (1024,)), ("noise_augmentor.betas", (1000,)),
           ("model.diffusion_model.label_emb.0.0.weight", (128, 2048))), "SD 2.x unCLIP"),
    (_with(("low_scale_model.betas", (350,)), ("model.diffusion_model.input_blocks.0.0.weight", (32, 7, 3, 3))),
     "SD 2.x x4 upscaler"),
], ids=["sd1-inpainting", "sd2-inpainting", "sdxl-inpainting", "sd2-depth", "sd2-depth-channels", "sd2-unclip",
        "sd2-x4-upscaler"])
def test_other_architectures_are_named(tmp_path, tiny_state, change, name):
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(change(original_checkpoint(tiny_state, extras=False)), path)
    with pytest.raises(CheckpointError, match=f"looks like {name} .*tritonsd runs SD 1.x, SD 2.x, SDXL and SDXL refiner "
                                              "text-to-image models"):
        loader.load(path)
    assert loader.describe(path)["architecture"] == name
