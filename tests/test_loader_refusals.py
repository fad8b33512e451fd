"""What the loader refuses beyond unreadable files: tensors that are not weights (integer, bool, complex, sparse, meta),
tensors not named by strings; what it ignores: AUTOMATIC1111's notes on a model in NAME.json. `tritonsd info` runs
the very checks `load` runs, so it exits 2, with load's message, for every file load refuses."""

import json
import logging

import pytest
import safetensors.torch
import torch

from tritonsd import loader
from tritonsd.cli import main
from tritonsd.loader import CheckpointError
from tiny import TINY, linked_copy, original_checkpoint, random_state, write_single_file

WEIGHT = "model.diffusion_model.out.2.bias"  # its engine name: unet.out.2.bias


@pytest.fixture(scope="module")
def tiny_state():
    return random_state(TINY, seed=0)


def _safetensors_with(name: str, tensor):
    def make(tmp_path, state):
        path = tmp_path / "model.safetensors"
        ckpt = original_checkpoint(state, extras=False)
        ckpt[WEIGHT] = tensor(ckpt[WEIGHT])
        safetensors.torch.save_file(ckpt, path)
        path.with_suffix(".json").write_text(TINY.to_json())
        return path
    make.__name__ = name
    return make


def _ckpt_with(name: str, change):
    def make(tmp_path, state):
        path = tmp_path / "model.ckpt"
        ckpt = original_checkpoint(state, extras=True)  # with the int64 position_ids and EMA counters real files have
        change(ckpt)
        torch.save({"state_dict": ckpt, "global_step": 10}, path)
        path.with_suffix(".json").write_text(TINY.to_json())
        return path
    make.__name__ = name
    return make


def _replace(transform):
    def change(ckpt):
        ckpt[WEIGHT] = transform(ckpt[WEIGHT])
    return change


# (file maker, the message load gives)
TENSOR_KINDS = [
    (_safetensors_with("int64", lambda t: (t * 100).long()), "unet.out.2.bias (int64)"),
    (_safetensors_with("int32", lambda t: t.int()), "unet.out.2.bias (int32)"),
    (_safetensors_with("uint8", lambda t: t.to(torch.uint8)), "unet.out.2.bias (uint8)"),
    (_safetensors_with("bool", lambda t: t > 0), "unet.out.2.bias (bool)"),
    (_ckpt_with("complex", _replace(lambda t: t.to(torch.complex64))), "unet.out.2.bias (complex64)"),
    (_ckpt_with("sparse", _replace(lambda t: t.to_sparse())), "unet.out.2.bias (sparse_coo)"),
    (_ckpt_with("meta", _replace(lambda t: t.to("meta"))), "unet.out.2.bias (a meta tensor, with no data)"),
]


@pytest.mark.parametrize("make, kind", TENSOR_KINDS, ids=[make.__name__ for make, _ in TENSOR_KINDS])
def test_tensors_that_are_not_weights_are_refused_by_name(tmp_path, tiny_state, make, kind):
    path = make(tmp_path, tiny_state)
    want = f"{path}: 1 tensor(s) cannot be weights, which must be dense and floating point: {kind}"
    with pytest.raises(CheckpointError) as e:
        loader.load(path)
    assert str(e.value) == want
    with pytest.raises(CheckpointError) as e:
        loader.load_state_dict(path)
    assert str(e.value) == want


def test_tensor_names_must_be_strings(tmp_path, tiny_state):
    path = _ckpt_with("int key", lambda ckpt: ckpt.update({7: torch.zeros(3)}))(tmp_path, tiny_state)
    with pytest.raises(CheckpointError) as e:
        loader.load(path)
    assert str(e.value) == f"{path}: tensors must be named by strings; 1 are not, the first being 7 (int)"


def test_non_weight_entries_of_real_files_still_load(tmp_path, tiny_state):
    """position_ids (int64), EMA counters (int32) and the training schedule are dropped before the check."""
    path = tmp_path / "model.ckpt"
    written = write_single_file(path, tiny_state, "ckpt", extras=True)
    kinds = {str(t.dtype) for t in written.values()}
    assert {"torch.int64", "torch.int32"} <= kinds, f"the file holds only {kinds}"
    path.with_suffix(".json").write_text(TINY.to_json())
    model, _ = loader.load(path)
    assert model.config == TINY


# --- AUTOMATIC1111's NAME.json --------------------------------------------------------------------------------------

A1111_NOTES = {"description": "shapes, trained on a CPU", "sd version": "SD1", "activation text": "a red circle",
               "preferred weight": 0, "negative text": "", "notes": "from tools/train_demo.py"}


def test_a1111_notes_beside_a_checkpoint_are_not_a_config(tmp_path, tiny_state, caplog):
    path = tmp_path / "model.safetensors"
    write_single_file(path, tiny_state)
    (tmp_path / "model.json").write_text(json.dumps(A1111_NOTES))
    with caplog.at_level(logging.INFO, logger="tritonsd.loader"):
        model, _ = loader.load(path)
    assert model.config == loader.infer_config(tiny_state), "the config was not read off the tensor shapes"
    notes = [r for r in caplog.records if r.name == "tritonsd.loader" and r.levelno == logging.INFO]
    assert len(notes) == 1 and str(tmp_path / "model.json") in notes[0].getMessage(), [r.getMessage() for r in notes]
    assert "not a model config, ignored" in notes[0].getMessage(), notes[0].getMessage()
    assert loader.describe(path)["problem"] is None


def test_a_config_with_unknown_keys_is_still_an_error(tmp_path, tiny_state):
    path = tmp_path / "model.safetensors"
    write_single_file(path, tiny_state)
    (tmp_path / "model.json").write_text(json.dumps({**TINY.to_dict(), "description": "mine"}))
    with pytest.raises(CheckpointError) as e:
        loader.load(path)
    assert str(e.value) == (f"{path}: model.json beside it: unknown model config part(s) ['description']; "
                            "expected ['text', 'text_2', 'unet', 'vae'] and prediction_type, conditioning, timestep_spacing")


# --- a diffusers folder's tokenizer ---------------------------------------------------------------------------------

def _tokenizer_file(name: str, edit):
    """The diffusers folder with tokenizer/<name> replaced by edit(its text)."""
    def make(tmp_path, state, folder):
        text = (folder / "tokenizer" / name).read_text(encoding="utf-8")
        return linked_copy(folder, tmp_path / "model", {f"tokenizer/{name}": edit(text)})
    return make


def _drop_token(token: str):
    def edit(text):
        vocab = json.loads(text)
        del vocab[token]
        return json.dumps(vocab)
    return edit


def _renumber(text):
    vocab = json.loads(text)
    return json.dumps({k: v + 1000 for k, v in vocab.items()})


BAD_TOKENIZERS = [
    (_tokenizer_file("vocab.json", lambda text: "[" * 100_000 + "]" * 100_000), "not valid JSON: nested too deeply"),
    (_tokenizer_file("vocab.json", lambda text: json.dumps(list(json.loads(text)))),
     "must map each token (a string) to its id (an integer from 0)"),
    (_tokenizer_file("vocab.json", lambda text: text.replace(": 0,", ": -1,", 1)), "an integer from 0"),
    (_tokenizer_file("vocab.json", _drop_token("the</w>")), "vocabulary lacks 1 symbol(s) the byte alphabet and merges "
                                                          "produce, such as 'the</w>'"),
    (_tokenizer_file("vocab.json", _renumber), "its tokenizer's ids go up to 50407, but its text encoder has 49408 token "
                                                "embeddings"),
    (_tokenizer_file("merges.txt", lambda text: text + "a b c\n"), "is not a pair of symbols"),
]


@pytest.mark.parametrize("make, message", BAD_TOKENIZERS, ids=["deep", "list", "negative id", "missing symbol",
                                                               "ids past the embedding", "bad merge"])
def test_bad_tokenizer_is_refused_before_the_weights_load(tmp_path, tiny_state, tiny_diffusers, make, message):
    path = make(tmp_path, tiny_state, tiny_diffusers)
    with pytest.raises(CheckpointError) as e:
        loader.load(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value), str(e.value)
    assert loader.describe(path)["problem"] == str(e.value)


# --- info refuses what load refuses, in load's words ----------------------------------------------------------------

def _sdxl(tmp_path, state):
    ckpt = original_checkpoint(state, extras=False)
    ckpt["conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"] = torch.zeros(10, 32)
    path = tmp_path / "sdxl.safetensors"
    safetensors.torch.save_file(ckpt, path)
    return path


def _missing_tensor(tmp_path, state):
    ckpt = original_checkpoint(state, extras=False)
    del ckpt["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"]
    path = tmp_path / "missing.safetensors"
    safetensors.torch.save_file(ckpt, path)
    return path


def _config_unlike_the_tensors(tmp_path, state):
    path = tmp_path / "deeper.safetensors"
    write_single_file(path, state, extras=False)
    config = TINY.to_dict()
    config["unet"]["transformer_depth"] = 3
    path.with_suffix(".json").write_text(json.dumps(config))
    return path


def _bad_side_json(tmp_path, state):
    path = tmp_path / "model.safetensors"
    write_single_file(path, state, extras=False)
    path.with_suffix(".json").write_text('{"unet": {"model_channels": 0}}')
    return path


REFUSED = [make for make, _ in TENSOR_KINDS] + [
    _ckpt_with("int key", lambda ckpt: ckpt.update({7: torch.zeros(3)})), _sdxl, _missing_tensor,
    _config_unlike_the_tensors, _bad_side_json,
]


@pytest.mark.parametrize("make", REFUSED, ids=[make.__name__.strip("_") for make in REFUSED])
def test_info_exits_2_with_the_message_load_gives(capsys, tmp_path, tiny_state, make):
    path = make(tmp_path, tiny_state)
    with pytest.raises(CheckpointError) as e:
        loader.load(path)
    with pytest.raises(SystemExit) as exit_info:
        main(["info", str(path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, f"info exited {exit_info.value.code} for a file load refuses: {e.value}"
    assert err == f"tritonsd: error: {e.value}\n", f"info said {err!r}; load said {str(e.value)!r}"
