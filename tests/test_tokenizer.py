"""CLIPTokenizer against OpenAI's CLIP tokenizer and transformers' CLIPTokenizer, padding as SD 1.x does (with the
end token) and as SD 2.x's OpenCLIP does (with id 0)."""

import importlib.util
import json
import logging
import random
from pathlib import Path

import pytest
import torch

from tritonsd.engine.tokenizer import CLIPTokenizer

MAX_LEN = 77

SUBJECTS = [
    "a cat", "an astronaut riding a horse on the moon", "portrait of a young woman", "a castle on a hill",
    "cyberpunk city street at night", "a bowl of ramen", "1girl, solo, long hair", "a red fox in the snow",
    "the Eiffel Tower", "an old man's face", "two dogs playing", "a lighthouse during a storm",
    "ancient ruins overgrown with vines", "a robot reading a book", "mountains, lake, sunrise",
]
STYLES = [
    "oil painting", "trending on artstation", "by greg rutkowski", "8k", "unreal engine", "highly detailed",
    "4k uhd", "f/1.8", "35mm", "octane render", "studio ghibli", "masterpiece", "best quality",
    "sharp focus", "volumetric lighting", "concept art", "digital art", "hdr", "bokeh", "photorealistic",
]
# Text both references normalize the same way: NFC, whitespace collapsed, lowercased.
EXTRAS = [
    "café", "naïve", "Ångström", "猫", "東京", "🐱", "🔥🔥", "über", "São Paulo", "Zürich", "crème brûlée",
    "Привет", "ελληνικά", "한국어", "مرحبا", "👩‍🚀", "v1.5", "$100", "50%", "#hashtag", "@user", "C++",
    "don't", "it's", "we'll", "I'm", "they've", "you'd", "we're", "o'clock", "3.14159", "1920x1080",
    "<lora:add_detail:0.8>", "BREAK", "--no text", "...", "!!!", "e\u0301",
]
WRAPS = [
    lambda w, r: w,
    lambda w, r: f"({w}:{r.choice(['0.8', '1.1', '1.2', '1.5'])})",
    lambda w, r: f"[{w}]",
    lambda w, r: f"(({w}))",
    lambda w, r: f"{{{w}}}",
    lambda w, r: w.upper(),
    lambda w, r: w.title(),
]
SEPARATORS = [", ", ",", " | ", "; ", " ", "\n", "\t", "  ", " . ", ",\n  "]

HANDWRITTEN = [
    "",
    " ",
    "\n\t  \n",
    "a photo of a cat",
    "A PHOTO OF A CAT",
    "  a   photo\tof\n\na  cat  ",
    "(masterpiece:1.2), (best quality:1.1), [ugly], [[blurry]], ((detailed eyes))",
    "a cat; a dog! a bird? yes... no!!! 100% (really)",
    "0123456789 12.5 -3 1e10 2024-01-01",
    "café, naïve, Ångström, Æther, ØRSTED, ß",
    "cafe\u0301 nai\u0308ve",  # decomposed accents: both references compose them (NFC)
    "猫, 東京タワー, 北京, 서울",
    "emoji 🐱🐶🦊 👍🏽 🇯🇵 ❤️",
    "<|startoftext|>a cat<|endoftext|>",
    "Don't it's I'll we've they're she'd I'M",
    "word " * 40,
    ", ".join(STYLES * 3),
]

# OpenAI's tokenizer runs ftfy.fix_text and html.unescape twice before splitting; transformers 5's
# CLIPTokenizer only applies NFC, whitespace collapsing and lowercasing. These prompts tell the two
# apart, so they are compared with OpenAI's tokenizer alone, whose cleanup SD 1.x's CLIP was trained with.
CLEANUP = [
    "rock &amp; roll",
    "&lt;3 &quot;quoted&quot; &#39;single&#39; &#x27;hex&#x27;",
    "caf&eacute; &amp;amp; tea&nbsp;time",
    "don’t ‘single’ “double” „low”",
    "ＦＵＬＬ ＷＩＤＴＨ，１girl，ｓｏｌｏ　space",
    "ﬁne ﬂowers ﬀ ﬃ ﬄ",
    "\ufeffbyte order mark, zero\u00a0width\u200bspace",
    "control\x07 chars\x0b here\x7f",
]
# Left out on purpose: mojibake such as "cafÃ©" or "âœ”", which ftfy re-decodes ("café", "✔") and
# this tokenizer keeps as typed, and HTML escaped three or more times ("&amp;amp;amp;"), which ftfy
# unescapes to a fixed point while CLIP's cleanup unescapes twice. Neither is text people write.


def _generated(n: int, extras: list[str], seed: int) -> list[str]:
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        words = [rng.choice(SUBJECTS)] + rng.sample(STYLES, rng.randint(0, 12))
        words += rng.sample(extras, rng.randint(0, 3))
        rng.shuffle(words)
        sep = rng.choice(SEPARATORS)
        prompts.append(sep.join(rng.choice(WRAPS)(w, rng) for w in words) * rng.choice([1, 1, 1, 3]))
    return prompts


COMMON_PROMPTS = HANDWRITTEN + _generated(300, EXTRAS, seed=0)
OPENAI_ONLY_PROMPTS = CLEANUP + _generated(60, EXTRAS + CLEANUP, seed=1)


@pytest.fixture(scope="module")
def openai_clip():
    """OpenAI's SimpleTokenizer from the installed openai-clip package. `import clip` would load
    clip/clip.py, which needs torchvision, so the tokenizer module is loaded on its own."""
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("openai-clip is not installed (it is in tritonsd's [test] extra)")
    path = Path(next(iter(spec.submodule_search_locations))) / "simple_tokenizer.py"
    module_spec = importlib.util.spec_from_file_location("openai_clip_simple_tokenizer", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.SimpleTokenizer()


def _write_folder(folder: Path, ref, header: bool) -> Path:
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(ref.encoder), encoding="utf-8")
    merges = [" ".join(pair) for pair, _ in sorted(ref.bpe_ranks.items(), key=lambda kv: kv[1])]
    (folder / "merges.txt").write_text("\n".join((["#version: 0.2"] if header else []) + merges) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory, openai_clip):
    """A diffusers-style tokenizer/ folder derived from OpenAI's tables, as transformers' was."""
    return _write_folder(tmp_path_factory.mktemp("sd") / "tokenizer", openai_clip, header=True)


@pytest.fixture(scope="module")
def hf_clip(folder):
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPTokenizer.from_pretrained(str(folder))


def _openai_rows(ref, prompts: list[str], pad: int | None = None) -> torch.Tensor:
    """OpenAI's rows (clip.tokenize with the end token as padding, as SD 1.x pads); pad=0 gives OpenCLIP's
    open_clip.tokenize, which writes the same ids into a row of zeros."""
    sot, eot = ref.encoder["<|startoftext|>"], ref.encoder["<|endoftext|>"]
    rows = torch.full((len(prompts), MAX_LEN), eot if pad is None else pad, dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids = [sot, *ref.encode(prompt)[: MAX_LEN - 2], eot]
        rows[i, : len(ids)] = torch.tensor(ids)
    return rows


def _assert_rows_equal(ours: torch.Tensor, ref: torch.Tensor, prompts: list[str], who: str):
    assert ours.shape == ref.shape, f"shape {tuple(ours.shape)} != {who}'s {tuple(ref.shape)}"
    bad = (ours != ref).any(dim=1).nonzero().flatten().tolist()
    if bad:
        i = bad[0]
        col = int((ours[i] != ref[i]).nonzero()[0])
        raise AssertionError(
            f"{len(bad)}/{len(prompts)} prompts differ from {who}; first {prompts[i]!r} at position {col}:\n"
            f"ours {ours[i].tolist()}\n{who} {ref[i].tolist()}"
        )


def test_bundled_vocabulary_is_openai_clips(openai_clip):
    ours = Path(__file__).parents[1] / "tritonsd" / "engine" / "data" / "bpe_simple_vocab_16e6.txt.gz"
    theirs = Path(next(iter(importlib.util.find_spec("clip").submodule_search_locations))) / ours.name
    assert ours.read_bytes() == theirs.read_bytes(), f"{ours} is not a copy of {theirs}"


def test_default_vocabulary_matches_openai_tables(openai_clip):
    tok = CLIPTokenizer.default()
    assert tok.vocab == openai_clip.encoder, "vocabulary differs from OpenAI's encoder"
    assert tok.ranks == openai_clip.bpe_ranks, "merge ranks differ from OpenAI's bpe_ranks"
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (49406, 49407, 49407)


def test_default_is_cached():
    assert CLIPTokenizer.default() is CLIPTokenizer.default()


@pytest.mark.parametrize("prompts", [COMMON_PROMPTS, OPENAI_ONLY_PROMPTS], ids=["common", "cleanup"])
def test_encode_matches_openai(openai_clip, prompts):
    tok = CLIPTokenizer.default()
    for prompt in prompts:
        ours, ref = tok.encode(prompt), openai_clip.encode(prompt)
        assert ours == ref, f"encode({prompt!r}):\nours   {ours}\nopenai {ref}"


@pytest.mark.parametrize("prompts", [COMMON_PROMPTS, OPENAI_ONLY_PROMPTS], ids=["common", "cleanup"])
def test_batch_matches_openai(openai_clip, prompts):
    _assert_rows_equal(CLIPTokenizer.default()(prompts), _openai_rows(openai_clip, prompts), prompts, "openai")


@pytest.mark.parametrize("source", ["default", "from_folder"])
def test_batch_matches_transformers(hf_clip, folder, source):
    tok = CLIPTokenizer.default() if source == "default" else CLIPTokenizer.from_folder(folder)
    ref = hf_clip(COMMON_PROMPTS, padding="max_length", max_length=MAX_LEN, truncation=True, return_tensors="pt")
    _assert_rows_equal(tok(COMMON_PROMPTS), ref["input_ids"].long(), COMMON_PROMPTS, "transformers")


def test_sd2_padding_is_open_clips(openai_clip):
    tok = CLIPTokenizer.default().with_pad_token("!")
    assert tok.pad_id == 0 == openai_clip.encoder["!"], f"'!' pads with id {tok.pad_id}; OpenCLIP pads with 0"
    _assert_rows_equal(tok(COMMON_PROMPTS), _openai_rows(openai_clip, COMMON_PROMPTS, pad=0), COMMON_PROMPTS, "open_clip")


def test_sd2_padding_matches_transformers_with_diffusers_sd2_tokenizer(folder):
    """diffusers' SD 2.x tokenizer is transformers' CLIPTokenizer with pad_token "!". That makes "!" a special token,
    which transformers splits out of the prompt text as id 0, where OpenCLIP (the tokenizer SD 2.x was trained with,
    test above) reads it as text ("dog!" -> "dog", "!</w>" = 256): the two agree on prompts without "!"."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.CLIPTokenizer.from_pretrained(str(folder), pad_token="!")
    prompts = [p for p in COMMON_PROMPTS if "!" not in p]
    assert len(prompts) > 250, f"only {len(prompts)} prompts without '!'"
    ref = hf(prompts, padding="max_length", max_length=MAX_LEN, truncation=True, return_tensors="pt")
    tok = CLIPTokenizer.from_folder(folder).with_pad_token("!")
    _assert_rows_equal(tok(prompts), ref["input_ids"].long(), prompts, "transformers")
    assert hf("dog!").input_ids[-2] == 0 and tok.encode("dog!")[-1] == 256, "transformers' '!' quirk changed"


def test_with_pad_token_shares_everything_else():
    default = CLIPTokenizer.default()
    assert default.with_pad_token("<|endoftext|>") is default, "padding that does not change should not copy"
    sd2 = default.with_pad_token("!")
    assert (default.pad_id, sd2.pad_id) == (49407, 0), "with_pad_token changed the original's padding"
    assert sd2.vocab is default.vocab and sd2.ranks is default.ranks
    with pytest.raises(ValueError, match="pad token '<pad>' is not in the tokenizer's vocabulary"):
        default.with_pad_token("<pad>")


@pytest.mark.parametrize("header", [True, False], ids=["version-header", "no-header"])
def test_from_folder_reads_merges(openai_clip, tmp_path, header):
    tok = CLIPTokenizer.from_folder(_write_folder(tmp_path / "tokenizer", openai_clip, header))
    assert tok.ranks == openai_clip.bpe_ranks, "merge ranks read from merges.txt differ from OpenAI's"
    _assert_rows_equal(tok(HANDWRITTEN), _openai_rows(openai_clip, HANDWRITTEN), HANDWRITTEN, "openai")


def test_from_folder_rejects_malformed_merges(openai_clip, tmp_path):
    folder = _write_folder(tmp_path / "tokenizer", openai_clip, header=True)
    (folder / "merges.txt").write_text("#version: 0.2\nt h\nthe\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not a pair"):
        CLIPTokenizer.from_folder(folder)


def test_vocab_without_specials_is_rejected():
    with pytest.raises(ValueError, match="startoftext"):
        CLIPTokenizer({"a": 0, "<|endoftext|>": 1}, [])


@pytest.mark.parametrize("n_words", [0, 1, 74, 75, 76, 77, 200])
def test_truncation_keeps_eos_last_and_warns(openai_clip, caplog, n_words):
    prompt = " ".join(["cat"] * n_words)
    n_ids = len(openai_clip.encode(prompt))
    assert n_ids == n_words, "the test expects 'cat' to be one token"
    with caplog.at_level(logging.WARNING):
        row = CLIPTokenizer.default()(prompt)[0]
    dropped = max(0, n_ids - (MAX_LEN - 2))
    last = min(n_ids + 1, MAX_LEN - 1)
    assert row[last] == 49407, f"EOS should be at {last}, row is {row.tolist()}"
    assert (row[last + 1 :] == 49407).all(), "padding after EOS is not pad_id"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if dropped:
        assert len(warnings) == 1 and f"dropped its last {dropped} tokens" in warnings[0], warnings
    else:
        assert not warnings, f"no tokens were dropped but it warned: {warnings}"


def test_empty_prompt_is_bos_eos_padding():
    row = CLIPTokenizer.default()("")
    assert row.tolist() == [[49406] + [49407] * (MAX_LEN - 1)]


@pytest.mark.parametrize("prompts", ["a cat", ["a cat"], ("a cat", "a dog", ""), ["x"] * 5])
def test_shape_and_dtype(prompts):
    out = CLIPTokenizer.default()(prompts)
    batch = 1 if isinstance(prompts, str) else len(prompts)
    assert out.shape == (batch, MAX_LEN) and out.dtype == torch.long, f"{tuple(out.shape)} {out.dtype}"


@pytest.mark.parametrize(
    "prompts, type_name",
    [(42, "int"), (None, "NoneType"), (b"a cat", "bytes"), (["a cat", 3], "int"), (["a cat", None], "NoneType"),
     ({"a cat"}, "set")],
)
def test_non_string_prompt_is_rejected(prompts, type_name):
    with pytest.raises(ValueError, match=type_name):
        CLIPTokenizer.default()(prompts)


def test_encode_rejects_non_string():
    with pytest.raises(ValueError, match="int"):
        CLIPTokenizer.default().encode(7)


def test_empty_batch_is_rejected():
    with pytest.raises(ValueError, match="empty"):
        CLIPTokenizer.default()([])


def test_prompt_that_is_not_valid_unicode_is_rejected():
    with pytest.raises(ValueError, match="valid Unicode"):
        CLIPTokenizer.default()(["a cat", "a lone surrogate \ud800 here"])
