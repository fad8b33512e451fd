"""CLIP's byte-level BPE tokenizer, the text front end of Stable Diffusion 1.x and 2.x."""

import copy
import functools
import gzip
import html
import logging
import math
import unicodedata
from pathlib import Path

import regex
import torch

from tritonsd.engine.config import read_json

logger = logging.getLogger(__name__)

_DEFAULT_BPE = Path(__file__).with_name("data") / "bpe_simple_vocab_16e6.txt.gz"
_N_MERGES = 49152 - 256 - 2  # CLIP's vocabulary: 512 byte symbols + merges + 2 specials = 49408
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
_WORD_END = "</w>"
_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")
# CLIP's vocab.json is 1.6 MB and merges.txt 0.5 MB; far larger files are not a tokenizer.
MAX_TOKENIZER_BYTES = 16 << 20
# Distinct words whose BPE ids are kept; beyond that the least recently used are dropped (a prompt of random text
# cannot grow memory without bound). Real prompts draw on a few thousand words.
BPE_CACHE_WORDS = 4096


def _byte_symbols() -> list[str]:
    """The symbol for each byte value: printable bytes stand for themselves, the others
    are shifted past U+00FF so that no symbol is whitespace or a control character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in symbols):
        symbols[b] = chr(256 + n)
    return [symbols[b] for b in range(256)]


def _ftfy_char_fixes() -> dict[int, str | None]:
    """The character-level repairs of ftfy.fix_text, which OpenAI's tokenizer applies to every
    prompt: straight quotes for curly ones, standard-width forms for fullwidth/halfwidth ones
    (Chinese and Japanese input methods type "，" and "１"), Latin ligatures split, and
    invisible control characters (a pasted byte-order mark) dropped. ftfy's mojibake repair,
    re-decoding text that went through the wrong codec, is not done: it is a heuristic that
    needs ftfy, and prompts people type are not mojibake."""
    table: dict[int, str | None] = {0x3000: " "}
    for c in range(0xFF01, 0xFFF0):
        if (standard := unicodedata.normalize("NFKC", chr(c))) != chr(c):
            table[c] = standard
    table.update({c: "'" for c in (0x02BC, 0x2018, 0x2019, 0x201A, 0x201B)})
    table.update({c: '"' for c in (0x201C, 0x201D, 0x201E, 0x201F)})
    table.update(zip(map(ord, "ﬀﬁﬂﬃﬄﬅﬆ"), ("ff", "fi", "fl", "ffi", "ffl", "ſt", "st")))
    controls = [*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF, *range(0xFFF9, 0xFFFD)]
    table.update(dict.fromkeys(controls))
    return table


_BYTE_SYMBOLS = _byte_symbols()
_CHAR_FIXES = _ftfy_char_fixes()


def _clean(text: str) -> str:
    # Web captions in CLIP's training data were often escaped twice ("&amp;amp;").
    text = html.unescape(html.unescape(text))
    text = unicodedata.normalize("NFC", text.translate(_CHAR_FIXES))
    return _WHITESPACE.sub(" ", text).strip().lower()


def _check_prompt(prompt) -> None:
    if not isinstance(prompt, str):
        raise ValueError(f"a prompt must be a str, got {type(prompt).__name__}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"a prompt must be valid Unicode text: {e.reason} at position {e.start}") from None


class CLIPTokenizer:
    """Turns prompts into the [B, max_length] token ids that CLIP's text encoder reads:
    BOS, the BPE ids, EOS, then padding: EOS for SD 1.x, "!" (id 0, OpenCLIP's padding) for SD 2.x."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], max_length: int = 77):
        for special in (_BOS, _EOS):
            if special not in vocab:
                raise ValueError(f"vocabulary has no {special!r} token")
        # Every symbol a merge can produce needs an id, or encoding a word that reaches it would fail.
        symbols = [*_BYTE_SYMBOLS, *(s + _WORD_END for s in _BYTE_SYMBOLS), *("".join(pair) for pair in merges)]
        missing = [s for s in symbols if s not in vocab]
        if missing:
            raise ValueError(f"vocabulary lacks {len(missing)} symbol(s) the byte alphabet and merges produce, "
                             f"such as {missing[0]!r}")
        if max_length < 2:
            raise ValueError(f"max_length must leave room for BOS and EOS, got {max_length}")
        self.vocab = dict(vocab)
        self.ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
        self.bos_id = self.vocab[_BOS]
        self.eos_id = self.vocab[_EOS]
        self.pad_id = self.eos_id
        self.max_length = max_length
        # Keyed by byte-symbol word; the specials are words of their own, never split.
        self._specials = {_BOS: [self.bos_id], _EOS: [self.eos_id]}
        self._cached_bpe = functools.lru_cache(maxsize=BPE_CACHE_WORDS)(self._merge)

    @classmethod
    @functools.cache
    def default(cls) -> "CLIPTokenizer":
        """CLIP's own vocabulary, shipped with the engine."""
        lines = gzip.decompress(_DEFAULT_BPE.read_bytes()).decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : _N_MERGES + 1]]
        # CLIP lists the byte symbols printable bytes first, which is code-point order.
        symbols = sorted(_BYTE_SYMBOLS)
        symbols += [s + _WORD_END for s in symbols]
        symbols += ["".join(pair) for pair in merges]
        symbols += [_BOS, _EOS]
        return cls({s: i for i, s in enumerate(symbols)}, merges)

    @classmethod
    def from_folder(cls, path) -> "CLIPTokenizer":
        """A diffusers/transformers tokenizer folder: vocab.json and merges.txt. Bad files are a ValueError naming
        the file."""
        path = Path(path)
        try:
            vocab = read_json(path / "vocab.json", MAX_TOKENIZER_BYTES)
        except ValueError as e:
            raise ValueError(f"{path / 'vocab.json'}: {e}") from None
        if not (isinstance(vocab, dict) and all(isinstance(k, str) and type(v) is int and 0 <= v for k, v in vocab.items())):
            raise ValueError(f"{path / 'vocab.json'}: must map each token (a string) to its id (an integer from 0)")
        try:
            with open(path / "merges.txt", "rb") as f:
                data = f.read(MAX_TOKENIZER_BYTES + 1)
            if len(data) > MAX_TOKENIZER_BYTES:
                raise ValueError(f"larger than {MAX_TOKENIZER_BYTES >> 20} MiB")
            lines = data.decode("utf-8").splitlines()
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"{path / 'merges.txt'}: cannot read it ({e})") from None
        if lines and lines[0].startswith("#version"):
            lines = lines[1:]
        merges = []
        for n, line in enumerate(filter(None, lines)):
            pair = tuple(line.split())
            if len(pair) != 2:
                raise ValueError(f"{path / 'merges.txt'}: merge {n} is not a pair of symbols: {line!r}")
            merges.append(pair)
        return cls(vocab, merges)

    def with_pad_token(self, token: str) -> "CLIPTokenizer":
        """This tokenizer padding with `token` instead (the model config's text.pad_token); itself if it already does."""
        if token not in self.vocab:
            raise ValueError(f"pad token {token!r} is not in the tokenizer's vocabulary")
        if self.vocab[token] == self.pad_id:
            return self
        padded = copy.copy(self)  # the vocabulary, merges and BPE cache are shared, not copied
        padded.pad_id = self.vocab[token]
        return padded

    def _bpe(self, word: str) -> list[int]:
        return self._specials.get(word) or self._cached_bpe(word)

    def _merge(self, word: str) -> list[int]:
        parts = [*word[:-1], word[-1] + _WORD_END]
        while len(parts) > 1:
            ranks = [self.ranks.get(pair, math.inf) for pair in zip(parts, parts[1:])]
            best = min(range(len(ranks)), key=ranks.__getitem__)
            if ranks[best] == math.inf:
                break
            first, second = parts[best], parts[best + 1]
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return [self.vocab[p] for p in parts]

    def encode(self, text: str) -> list[int]:
        """BPE ids of one prompt, without BOS/EOS and without truncation."""
        _check_prompt(text)
        ids = []
        for token in _PATTERN.findall(_clean(text)):
            ids += self._bpe("".join(_BYTE_SYMBOLS[b] for b in token.encode("utf-8")))
        return ids

    def __call__(self, prompts: str | list[str]) -> torch.Tensor:
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise ValueError(f"prompts must be a str or a list of str, got {type(prompts).__name__}")
        if not prompts:
            raise ValueError("prompts is an empty list")
        for prompt in prompts:
            _check_prompt(prompt)
        out = torch.full((len(prompts), self.max_length), self.pad_id, dtype=torch.long)
        room = self.max_length - 2
        for row, prompt in enumerate(prompts):
            ids = self.encode(prompt)
            if len(ids) > room:
                logger.warning(
                    "prompt %d is %d tokens long; dropped its last %d tokens to fit the %d-token context",
                    row, len(ids), len(ids) - room, self.max_length,
                )
                ids = ids[:room]
            out[row, : len(ids) + 2] = torch.tensor([self.bos_id, *ids, self.eos_id])
        return out
