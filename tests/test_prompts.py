"""The prompt language: AUTOMATIC1111's attention syntax on its own documented examples, chunking into 75-token
chunks (comma backtrack, BREAK, embeddings kept whole), the emphasis, textual-inversion files, clip skip and what
is refused. Conditioning against transformers and diffusers is in test_parity.py."""

import logging
import math
import time

import pytest
import safetensors.torch
import torch

from tritonsd import CheckpointError
from tritonsd.engine.pipeline import Pipeline
from tritonsd.engine.prompts import BREAK, PromptTokenizer, emphasize, parse_attention
from tritonsd.engine.tokenizer import CLIPTokenizer
from tritonsd.loader.embeddings import read_embedding
from tiny import TINY, random_state, write_single_file

BOS, EOS, COMMA = 49406, 49407, 267
VOCAB = 49408
HIDDEN = TINY.text.hidden_size


# AUTOMATIC1111's parse_prompt_attention docstring: its inputs and the [text, weight] pairs it lists for them.
A1111_EXAMPLES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).", [
        ("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
        (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1),
    ]),
]

EDGE_CASES = [
    ("", [("", 1.0)]),
    ("[faded]", [("faded", 1 / 1.1)]),
    ("((a))", [("a", 1.1 * 1.1)]),
    ("[(a:1.5)]", [("a", 1.5 / 1.1)]),
    ("(a:-0.5) b", [("a", -0.5), (" b", 1.0)]),
    ("(a:.5)", [("a", 0.5)]),
    ("\\\\ and \\[x\\)", [("\\ and [x)", 1.0)]),
    ("a\\b", [("ab", 1.0)]),  # a backslash before anything but a bracket or backslash is dropped
    ("a) b] c", [("a) b] c", 1.0)]),  # closing what was never opened: text
    ("time 10:30", [("time 10:30", 1.0)]),
    ("a:1.5) b", [("a:1.5) b", 1.0)]),  # a weight with no open round bracket: text
    ("(a:1.5", [("a:1.5", 1.1)]),  # never closed: the weight is text, the bracket adds 1.1
    ("[a (b", [("a ", 1 / 1.1), ("b", 1.1 / 1.1)]),  # unclosed round applies before unclosed square
    ("cat BREAK dog", [("cat", 1.0), BREAK, ("dog", 1.0)]),
    ("BREAK dog", [("", 1.0), BREAK, ("dog", 1.0)]),
    ("cat BREAK", [("cat", 1.0), BREAK, ("", 1.0)]),
    ("cat\nBREAK\ndog", [("cat", 1.0), BREAK, ("dog", 1.0)]),
    ("cat break dog, BREAKFAST", [("cat break dog, BREAKFAST", 1.0)]),
    ("(cat BREAK dog)", [("cat", 1.1), BREAK, ("dog", 1.1)]),
]


@pytest.mark.parametrize("text, expected", A1111_EXAMPLES + EDGE_CASES, ids=[t for t, _ in A1111_EXAMPLES + EDGE_CASES])
def test_parse_attention(text, expected):
    got = parse_attention(text)
    assert len(got) == len(expected), f"{text!r}: parsed into {got}, expected {expected}"
    for g, e in zip(got, expected):
        if e is BREAK:
            assert g is BREAK, f"{text!r}: {g} where BREAK was expected; got {got}"
        else:
            assert g[0] == e[0] and math.isclose(g[1], e[1], rel_tol=1e-12), f"{text!r}: {g} != {e}; got {got}"


def test_parse_attention_reproduces_a1111_float_weights_exactly():
    """Weights multiply in A1111's order, so runs A1111 finds equal (and tokenizes together) are equal here too."""
    got = dict(p for p in parse_attention(A1111_EXAMPLES[-1][0]) if p is not BREAK)
    assert got["house"] == 1.5730000000000004 and got["sky"] == 1.4641000000000006, got


@pytest.mark.parametrize("text", ["(a:1.2.3)", "(a:.)", "(a:" + "9" * 400 + ")"])
def test_a_weight_that_is_not_a_finite_number_is_refused(text):
    with pytest.raises(ValueError, match="prompt weight .* is not a finite number"):
        parse_attention(text)


@pytest.fixture(scope="module")
def words():
    """PromptTokenizer with the real CLIP vocabulary and a 3-vector embedding named tsdemb."""
    words = PromptTokenizer(CLIPTokenizer.default(), VOCAB)
    words.add_embedding("tsdemb", torch.zeros(3, HIDDEN))
    return words


CAT = 2368  # "cat" is one token
EMB = [VOCAB, VOCAB + 1, VOCAB + 2]


def chunk(ids, weights=None):
    """A chunk as A1111 lays it out: BOS, the tokens, EOS, padding; weight 1 outside the tokens."""
    weights = [1.0] * len(ids) if weights is None else weights
    pad = 75 - len(ids)
    return (BOS, *ids, EOS, *[EOS] * pad), (1.0, *weights, 1.0, *[1.0] * pad)


def chunks_of(words, prompt):
    return [(c.ids, c.weights) for c in words.chunks(prompt)]


def cats(n: int) -> str:
    return " ".join(["cat"] * n)


@pytest.mark.parametrize("n, sizes", [(0, [0]), (1, [1]), (74, [74]), (75, [75]), (76, [75, 1]), (150, [75, 75]),
                                      (300, [75, 75, 75, 75])])
def test_tokens_are_cut_into_chunks_of_75(words, n, sizes):
    assert chunks_of(words, cats(n)) == [chunk([CAT] * size) for size in sizes]


def test_a_full_chunk_ends_after_a_comma_among_its_last_20_tokens(words):
    # The comma is token 56 of the chunk (index 55), 20 from its end: the 19 cats after it move on.
    prompt = f"{cats(55)}, {cats(30)}"
    assert chunks_of(words, prompt) == [chunk([CAT] * 55 + [COMMA]), chunk([CAT] * 30)]


def test_a_comma_21_tokens_from_the_end_does_not_move_anything(words):
    prompt = f"{cats(54)}, {cats(31)}"
    assert chunks_of(words, prompt) == [chunk([CAT] * 54 + [COMMA] + [CAT] * 20), chunk([CAT] * 11)]


def test_a_prompt_that_fits_is_not_cut_at_its_comma(words):
    assert chunks_of(words, f"{cats(60)}, {cats(14)}") == [chunk([CAT] * 60 + [COMMA] + [CAT] * 14)]


def test_break_ends_a_chunk(words):
    assert chunks_of(words, "cat BREAK cat cat") == [chunk([CAT]), chunk([CAT, CAT])]
    assert chunks_of(words, "BREAK cat") == [chunk([]), chunk([CAT])], "BREAK first: an empty chunk, then the text"
    assert chunks_of(words, "cat BREAK") == [chunk([CAT])], "BREAK last adds nothing"
    assert chunks_of(words, "BREAK") == [chunk([])]
    assert chunks_of(words, f"{cats(75)} BREAK cat") == [chunk([CAT] * 75), chunk([CAT])], (
        "BREAK after a full chunk ends that chunk; it adds no empty one"
    )


def test_weights_follow_their_tokens(words):
    (ids, weights), = chunks_of(words, "(cat:1.5) cat [cat]")
    assert ids[:5] == (BOS, CAT, CAT, CAT, EOS)
    assert weights[:5] == (1.0, 1.5, 1.0, 1 / 1.1, 1.0), weights[:5]


def test_an_embedding_is_its_vectors_and_takes_the_weight_of_its_text(words):
    assert chunks_of(words, "cat (TsdEmb:1.2) cat") == [chunk([CAT, *EMB, CAT], [1.0, 1.2, 1.2, 1.2, 1.0])]


def test_an_embedding_that_does_not_fit_moves_whole_to_the_next_chunk(words):
    assert chunks_of(words, f"{cats(72)} tsdemb") == [chunk([CAT] * 72 + EMB)], "72 + 3 vectors fit in 75"
    assert chunks_of(words, f"{cats(73)} tsdemb cat") == [chunk([CAT] * 73), chunk([*EMB, CAT])]


def test_an_embedding_after_a_backtracked_comma_moves_with_its_text(words):
    prompt = f"{cats(55)}, {cats(19)} tsdemb"
    assert chunks_of(words, prompt) == [chunk([CAT] * 55 + [COMMA]), chunk([CAT] * 19 + EMB)]


def test_the_longest_embedding_name_wins():
    words = PromptTokenizer(CLIPTokenizer.default(), VOCAB)
    words.add_embedding("neg", torch.zeros(1, HIDDEN))
    words.add_embedding("neg-v2", torch.zeros(2, HIDDEN))
    ids = [c.ids[1:c.length + 1] for c in words.chunks("neg-v2 neg")][0]
    assert ids == (VOCAB + 1, VOCAB + 2, VOCAB), f"neg-v2 then neg should be 2 + 1 vectors, got {ids}"


def test_an_embedding_named_like_a_word_replaces_the_word(caplog):
    words = PromptTokenizer(CLIPTokenizer.default(), VOCAB)
    with caplog.at_level(logging.WARNING):
        words.add_embedding("cat", torch.zeros(2, HIDDEN))
    assert "is a word of the vocabulary" in caplog.text
    assert chunks_of(words, "cat") == [chunk([VOCAB, VOCAB + 1])]


def test_loading_a_name_again_replaces_its_vectors():
    words = PromptTokenizer(CLIPTokenizer.default(), VOCAB)
    words.add_embedding("tsdemb", torch.zeros(3, HIDDEN))
    words.add_embedding("other", torch.ones(1, HIDDEN))
    words.add_embedding("tsdemb", torch.full((2, HIDDEN), 2.0))
    assert words.embeddings == ["other", "tsdemb"]
    assert [t.shape for t in words.tables] == [(3, HIDDEN)]
    assert chunks_of(words, "tsdemb other") == [chunk([VOCAB + 1, VOCAB + 2, VOCAB])]
    assert (words.tables[0][1:] == 2.0).all()


@pytest.mark.parametrize("name, vectors, message", [
    ("", torch.zeros(1, HIDDEN), "has no tokens"),
    ("big", torch.zeros(76, HIDDEN), "has 76 vectors; a prompt chunk holds 1 to 75"),
    ("none", torch.zeros(0, HIDDEN), "has 0 vectors"),
])
def test_embeddings_that_cannot_be_used_are_refused(name, vectors, message):
    with pytest.raises(ValueError, match=message):
        PromptTokenizer(CLIPTokenizer.default(), VOCAB).add_embedding(name, vectors)


def test_emphasis_is_a1111_original_per_row():
    """Each row: hidden states times weights, rescaled to the row's mean before weighting; float64 reference."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 77, 8, generator=g) + 0.3
    weights = [tuple(1.0 + 0.5 * (i % 3 == 0) for i in range(77)), tuple([1.0] * 77)]
    got = emphasize(hidden, weights)
    h = hidden.double()
    w = torch.tensor(weights, dtype=torch.float64)[..., None]
    want = torch.stack([(h[i] * w[i]) * (h[i].mean() / (h[i] * w[i]).mean()) for i in range(2)])
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6), f"max diff {(got.double() - want).abs().max():.2e}"
    assert torch.equal(got[1], hidden[1]), "a row of weight 1 must not change"
    assert math.isclose(got[0].mean().item(), hidden[0].mean().item(), rel_tol=1e-5)


# Embedding files, as each tool writes them.

def write_a1111_pt(path, vectors):
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "ignored", "step": 100,
                "sd_checkpoint": None, "sd_checkpoint_name": None}, path)


def write_a1111_safetensors(path, vectors):
    safetensors.torch.save_file({"emb_params": vectors}, path)


def write_diffusers(path, vectors):
    torch.save({"<tsd>": vectors[0]}, path)


@pytest.mark.parametrize("writer, suffix, n", [(write_a1111_pt, ".pt", 3), (write_a1111_safetensors, ".safetensors", 2),
                                               (write_diffusers, ".bin", 1)])
def test_embedding_files_read_in_each_format(tmp_path, writer, suffix, n):
    vectors = torch.randn(n, HIDDEN)
    path = tmp_path / f"emb{suffix}"
    writer(path, vectors.half() if suffix == ".safetensors" else vectors)
    got = read_embedding(path, HIDDEN)
    want = vectors.half().float() if suffix == ".safetensors" else vectors
    assert got.dtype == torch.float32 and torch.equal(got, want), f"{suffix}: vectors differ"


class Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_text("not an embedding\n"), "it is a text file"),
    (lambda p: safetensors.torch.save_file({"a": torch.zeros(1, HIDDEN), "b": torch.zeros(1, HIDDEN)}, p),
     "not a textual-inversion embedding: expected string_to_param .* it holds 2 entries: a, b"),
    (lambda p: torch.save({"string_to_param": {"*": torch.zeros(1, HIDDEN), "x": torch.zeros(1, HIDDEN)}}, p),
     "string_to_param should hold one tensor; it holds 2 entries"),
    (lambda p: torch.save([torch.zeros(1, HIDDEN)], p), "holds a list, not a dict"),
    (lambda p: torch.save({"emb": Payload()}, p), "pickled code or objects"),
    (lambda p: safetensors.torch.save_file({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, p),
     "an SDXL embedding"),
    (lambda p: torch.save({"t": torch.zeros(2, 3, HIDDEN)}, p), r"shape \[2, 3, 32\], not floating-point vectors"),
    (lambda p: torch.save({"t": torch.zeros(2, HIDDEN, dtype=torch.long)}, p), "torch.int64 tensor"),
    (lambda p: torch.save({"emb_params": torch.zeros(2, 1024)}, p),
     r"embedding vectors of size 1024 \(an SD 2.x embedding\), but this model's text encoder has hidden size 32;"),
    (lambda p: torch.save({"emb_params": torch.tensor([[math.nan] * HIDDEN])}, p), "NaN or infinite"),
], ids=["text", "two-tensors", "two-terms", "list", "pickled-code", "sdxl", "3d", "integer", "hidden-size", "nan"])
def test_bad_embedding_files_are_refused(tmp_path, make, message, capsys):
    path = tmp_path / "bad.pt"
    make(path)
    with pytest.raises(CheckpointError, match=message):
        read_embedding(path, HIDDEN)
    assert "pickled code ran" not in capsys.readouterr().out


@pytest.mark.parametrize("writer", [write_a1111_pt, write_a1111_safetensors])
@pytest.mark.parametrize("width, hidden, message", [
    (768, 1024, r"size 768 \(an SD 1.x embedding\), but this model's text encoder has hidden size 1024 \(SD 2.x\)"),
    (1024, 768, r"size 1024 \(an SD 2.x embedding\), but this model's text encoder has hidden size 768 \(SD 1.x\)"),
], ids=["sd1-on-sd2", "sd2-on-sd1"])
def test_an_embedding_for_another_family_is_refused_by_family(tmp_path, writer, width, hidden, message):
    path = tmp_path / "other.pt"
    writer(path, torch.zeros(2, width))
    with pytest.raises(CheckpointError, match=message):
        read_embedding(path, hidden)


def test_a_missing_embedding_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="absent.pt: no such embedding file"):
        read_embedding(tmp_path / "absent.pt", HIDDEN)


# The pipeline: clip skip, embeddings in the text encoder, long prompts.

@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "tiny.safetensors"
    write_single_file(path, random_state(TINY, seed=0))
    return path


@pytest.fixture(scope="module")
def pipe(model):
    return Pipeline.from_checkpoint(model, config=TINY)


@pytest.fixture
def fresh(model):
    """A pipeline of its own, for a test that loads embeddings into it."""
    return Pipeline.from_checkpoint(model, config=TINY)


@pytest.mark.parametrize("clip_skip", [0, -1, 3, 1.0, True, "2"])
def test_clip_skip_outside_the_layers_is_refused(pipe, clip_skip):
    with pytest.raises(ValueError, match="clip_skip"):
        pipe.encode_prompt("a cat", clip_skip=clip_skip)
    with pytest.raises(ValueError, match="clip_skip"):
        pipe.txt2img("a cat", steps=1, width=16, height=16, seed=0, clip_skip=clip_skip)


def test_clip_skip_runs_only_the_layers_it_uses(pipe, monkeypatch):
    ran = []
    for i, layer in enumerate(pipe.text_encoder.encoder.layers):
        monkeypatch.setattr(layer, "forward", lambda x, _i=i, _f=layer.forward: ran.append(_i) or _f(x))
    pipe.encode_prompt("a cat", clip_skip=2)
    assert ran == [0], f"clip_skip 2 of 2 layers should run layer 0 only, ran {ran}"


def test_an_embedding_named_like_a_word_wins_over_the_word(fresh, tmp_path):
    """A1111's rule: with an embedding called "red" holding the token vector of "blue", "red" means blue."""
    blue, = fresh.tokenizer.encode("blue")
    write_a1111_pt(tmp_path / "red.pt", fresh.text_encoder.embeddings.token_embedding.weight[blue][None].clone())
    before = fresh.encode_prompt("a red circle")
    assert fresh.load_textual_inversion(tmp_path / "red.pt") == "red"
    got, want = fresh.encode_prompt(["a red circle", "a blue circle"])
    assert torch.allclose(got, want, atol=1e-6), f"'red' should encode as 'blue': max diff {(got - want).abs().max():.2e}"
    assert not torch.allclose(before[0], want), "the test needs 'red' and 'blue' to encode differently"


def test_load_textual_inversion_names_the_embedding_by_file_or_token(fresh, tmp_path):
    write_a1111_safetensors(tmp_path / "EasyThing.safetensors", torch.randn(2, HIDDEN))
    assert fresh.load_textual_inversion(tmp_path / "EasyThing.safetensors") == "EasyThing"
    assert fresh.load_textual_inversion(tmp_path / "EasyThing.safetensors", token="tsdother") == "tsdother"
    lengths = [c.length for c in fresh.prompt_tokenizer.chunks("easything, TSDOTHER")]
    assert lengths == [5], f"two 2-vector embeddings and a comma are 5 tokens, got {lengths}"


def test_a_wrong_hidden_size_embedding_is_refused_by_the_pipeline(fresh, tmp_path):
    torch.save({"string_to_param": {"*": torch.zeros(4, 768)}}, tmp_path / "sd15.pt")
    with pytest.raises(CheckpointError, match=r"size 768 \(an SD 1.x embedding\), but this model's text encoder has hidden size 32;"):
        fresh.load_textual_inversion(tmp_path / "sd15.pt")
    assert fresh.prompt_tokenizer.embeddings == [] and fresh.text_encoder.embeddings.extra is None


def test_a_prompt_and_a_negative_of_other_lengths_share_a_chunk_count(pipe):
    context = pipe.encode_prompt(["", cats(80), "cat BREAK cat BREAK cat"])
    assert context.shape == (3, 3 * 77, HIDDEN), context.shape
    empty = pipe.encode_prompt("")
    assert empty.shape == (1, 77, HIDDEN)
    for row, chunks in ((0, 1), (1, 2)):
        for i in range(chunks, 3):
            pad = context[row, 77 * i:77 * (i + 1)]
            assert torch.allclose(pad, empty[0], atol=1e-6), f"prompt {row} chunk {i} is not the empty prompt's"


def test_a_5000_token_prompt_works(pipe):
    prompt = ", ".join(["(cat:1.1) dog"] * 1667)  # 5,000 tokens
    start = time.perf_counter()
    chunks = pipe.prompt_tokenizer.chunks(prompt)
    parsed = time.perf_counter() - start
    context = pipe.encode_prompt(prompt)
    print(f"\n5,000 tokens: {len(chunks)} chunks, parsed and chunked in {parsed:.3f} s, "
          f"tiny-model conditioning {tuple(context.shape)} in {time.perf_counter() - start:.3f} s")
    assert sum(c.length for c in chunks) == 5000
    assert context.shape == (1, 77 * len(chunks), HIDDEN) and torch.isfinite(context).all()
    image = pipe.txt2img(prompt, steps=1, width=16, height=16, seed=0, output_type="np")
    assert image.shape == (1, 16, 16, 3)
