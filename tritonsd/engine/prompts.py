"""Prompts as AUTOMATIC1111's web UI reads them: attention weights, prompts past 77 tokens, BREAK and
textual-inversion embeddings.

- `(text)` multiplies the weight of its tokens by 1.1, `[text]` divides it by 1.1, `(text:1.3)` multiplies it by
  1.3; nesting multiplies. `\\(`, `\\)`, `\\[`, `\\]` and `\\\\` are the characters themselves. A bracket never
  closed applies to the rest of the prompt; a closing bracket never opened is text.
- Each run of text with one weight is tokenized on its own. The tokens are cut into chunks of 75; a chunk that
  fills up ends after its last comma when that comma is among its last 20 tokens, and `BREAK` (upper case, a word
  of its own) ends a chunk. An embedding's vectors never straddle two chunks.
- Each chunk is encoded alone as BOS, its 75 tokens (padded) and EOS; the hidden states are multiplied by the
  token weights and rescaled to the chunk's mean before weighting (A1111's "Original" emphasis), and the chunks
  of a prompt are concatenated: [77 * chunks, hidden].
- A model with two text towers (SDXL) gives both the same chunks, each padded with its own tower's pad token, and
  weights each tower's hidden states on their own; an embedding holds one set of vectors per tower. The pooled
  embedding is the first chunk's, as A1111 takes it.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tritonsd.engine.tokenizer import CLIPTokenizer

logger = logging.getLogger(__name__)

ROUND, SQUARE = 1.1, 1 / 1.1
# A chunk that fills up moves the tokens after its last comma to the next chunk when that comma is this close to
# its end (A1111's "comma_padding_backtrack" default).
COMMA_BACKTRACK = 20


class _Break:
    def __repr__(self) -> str:
        return "BREAK"


BREAK = _Break()

_SYNTAX = re.compile(r"""
    \\[()\[\]\\]              # an escaped bracket or backslash: the character itself
  | \\                        # any other backslash: dropped
  | \(                        # open round
  | \[                        # open square
  | :([+-]?[.\d]+)\)          # close round with an explicit weight
  | \)                        # close round
  | ]                         # close square
  | [^\\()\[\]:]+             # text
  | :                         # a colon that closes nothing: text
""", re.X)
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*")


def parse_attention(text: str) -> list[tuple[str, float] | _Break]:
    """The runs of text and their weights, in order, with BREAK between chunks. Runs of equal weight are joined
    (they are tokenized together); an empty prompt is [("", 1.0)]."""
    parts: list = []  # [text, weight] lists, multiplied in place as brackets close, and BREAKs
    rounds: list[int] = []
    squares: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for part in parts[start:]:
            if part is not BREAK:
                part[1] *= factor

    for m in _SYNTAX.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            parts.append([token[1:], 1.0])
        elif token == "(":
            rounds.append(len(parts))
        elif token == "[":
            squares.append(len(parts))
        elif weight is not None and rounds:
            multiply(rounds.pop(), _weight(weight, m))
        elif token == ")" and rounds:
            multiply(rounds.pop(), ROUND)
        elif token == "]" and squares:
            multiply(squares.pop(), SQUARE)
        else:
            for i, piece in enumerate(_BREAK_WORD.split(token)):
                if i:
                    parts.append(BREAK)
                parts.append([piece, 1.0])
    # Unclosed brackets apply to the end, outermost first, round before square (the order fixes the float rounding
    # that decides which runs are equal and joined).
    for start in rounds:
        multiply(start, ROUND)
    for start in squares:
        multiply(start, SQUARE)

    joined: list = []
    for part in parts or [["", 1.0]]:
        if part is not BREAK and joined and joined[-1] is not BREAK and joined[-1][1] == part[1]:
            joined[-1][0] += part[0]
        else:
            joined.append(part)
    return [part if part is BREAK else (part[0], part[1]) for part in joined]


def _weight(number: str, m: re.Match) -> float:
    try:
        value = float(number)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"prompt weight {number!r} in {m.string[max(0, m.start() - 20):m.end()]!r} is not a finite number")
    return value


@dataclass(frozen=True)
class Chunk:
    """One text-encoder input: BOS, the chunk's tokens, EOS and padding (ids and weights, 77 each for CLIP)."""

    ids: tuple[int, ...]
    weights: tuple[float, ...]
    length: int  # prompt tokens in it (an embedding's vectors count one each)

    def padded(self, pad_id: int) -> tuple[int, ...]:
        """The ids with the padding after the end token made pad_id (each text tower pads with its own token)."""
        end = self.length + 2
        return self.ids[:end] + (pad_id,) * (len(self.ids) - end)


@dataclass(frozen=True)
class _Embedding:
    first_id: int  # its vectors are ids first_id ... first_id + count - 1, past the vocabulary
    count: int


class PromptTokenizer:
    """Prompts -> chunks of token ids and weights, with the textual-inversion embeddings it has been given.

    An embedding is found by its name's tokens, as A1111 finds it: the name is tokenized like any text (so case
    does not matter), and wherever those tokens occur in a run of the prompt, the longest matching name wins and
    is replaced by its vectors. A name that is a word of the vocabulary replaces that word."""

    def __init__(self, tokenizer: CLIPTokenizer, vocab_size: int):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.room = tokenizer.max_length - 2
        self.comma = tokenizer.vocab.get(",</w>")
        self.empty = self._chunk([], [])
        self._vectors: dict[tuple[int, ...], tuple[str, tuple[torch.Tensor, ...]]] = {}
        self._found: dict[int, list[tuple[tuple[int, ...], _Embedding]]] = {}
        # Every embedding's vectors, one table per text tower: row i is id vocab_size + i.
        self.tables: tuple[torch.Tensor, ...] | None = None

    def add_embedding(self, name: str, vectors: torch.Tensor | tuple[torch.Tensor, ...]) -> None:
        """Make `name` in prompts stand for vectors [n, hidden], or one such tensor per text tower (the same n). A
        name whose tokens are an earlier one's replaces it."""
        if not isinstance(name, str):
            raise ValueError(f"an embedding's name must be a str, got {type(name).__name__}")
        vectors = (vectors,) if isinstance(vectors, torch.Tensor) else tuple(vectors)
        if self.tables is not None and len(vectors) != len(self.tables):
            raise ValueError(f"embedding {name!r} has vectors for {len(vectors)} text tower(s); the others have "
                             f"{len(self.tables)}")
        if len({len(v) for v in vectors}) != 1:
            raise ValueError(f"embedding {name!r} has a different number of vectors for each text tower: "
                             f"{[len(v) for v in vectors]}")
        pattern = tuple(self.tokenizer.encode(name))
        if not pattern:
            raise ValueError(f"embedding name {name!r} has no tokens to find in a prompt")
        if not 1 <= len(vectors[0]) <= self.room:
            raise ValueError(f"embedding {name!r} has {len(vectors[0])} vectors; a prompt chunk holds 1 to {self.room}")
        if len(pattern) == 1:
            logger.warning("embedding %r is a word of the vocabulary; prompts with that word get the embedding", name)
        previous = self._vectors.pop(pattern, None)
        if previous is not None and previous[0] != name:
            logger.warning("embedding %r replaces %r: both names have the same tokens", name, previous[0])
        self._vectors[pattern] = (name, vectors)
        self._found, first_id = {}, self.vocab_size
        for tokens, (_, vecs) in self._vectors.items():
            self._found.setdefault(tokens[0], []).append((tokens, _Embedding(first_id, len(vecs[0]))))
            first_id += len(vecs[0])
        for candidates in self._found.values():
            candidates.sort(key=lambda c: len(c[0]), reverse=True)
        self.tables = tuple(torch.cat(per_tower) for per_tower in zip(*(v for _, v in self._vectors.values())))

    @property
    def embeddings(self) -> list[str]:
        return [name for name, _ in self._vectors.values()]

    def _embedding_at(self, tokens: list[int], pos: int) -> tuple[int, _Embedding] | None:
        """(tokens the match covers, the embedding) of the longest name starting at tokens[pos]."""
        for pattern, entry in self._found.get(tokens[pos], ()):
            if tuple(tokens[pos:pos + len(pattern)]) == pattern:
                return len(pattern), entry
        return None

    def chunks(self, prompt: str) -> list[Chunk]:
        """The prompt's chunks, at least one."""
        done: list[Chunk] = []
        ids: list[int] = []
        weights: list[float] = []
        last_comma = -1

        def close() -> None:
            nonlocal ids, weights, last_comma
            done.append(self._chunk(ids, weights))
            ids, weights, last_comma = [], [], -1

        for part in parse_attention(prompt):
            if part is BREAK:
                close()
                continue
            text, weight = part
            tokens = self.tokenizer.encode(text)
            pos = 0
            while pos < len(tokens):
                if tokens[pos] == self.comma:
                    last_comma = len(ids)
                elif len(ids) == self.room and last_comma >= 0 and self.room - last_comma <= COMMA_BACKTRACK:
                    # The chunk ends after its last comma; what followed the comma opens the next one.
                    cut = last_comma + 1
                    moved = ids[cut:], weights[cut:]
                    del ids[cut:], weights[cut:]
                    close()
                    ids, weights = moved
                if len(ids) == self.room:
                    close()
                match = self._embedding_at(tokens, pos)
                if match is None:
                    ids.append(tokens[pos])
                    weights.append(weight)
                    pos += 1
                    continue
                covered, embedding = match
                if len(ids) + embedding.count > self.room:
                    close()
                ids += range(embedding.first_id, embedding.first_id + embedding.count)
                weights += [weight] * embedding.count
                pos += covered
        if ids or not done:
            close()
        return done

    def _chunk(self, ids: list[int], weights: list[float]) -> Chunk:
        t = self.tokenizer
        pad = self.room - len(ids)
        return Chunk(
            ids=(t.bos_id, *ids, t.eos_id, *[t.pad_id] * pad),
            weights=(1.0, *weights, 1.0, *[1.0] * pad),
            length=len(ids),
        )


def encode_chunks(
    batch: list[list[Chunk]], empty: Chunk, run: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]],
    pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """([B, 77 * n, hidden], the first chunk's pooled embedding [B, projection] or None) for B prompts' chunks
    padded with pad_id, n the most chunks any has; shorter prompts end in the empty prompt's chunk. `run` encodes
    ids [B, 77] (on the CPU) -> (hidden states [B, 77, hidden], pooled or None); it is called once per chunk
    position, and its output is consumed before the next call (a CUDA graph's output buffer may be reused)."""
    encoded, pooled = [], None
    for i in range(max(len(chunks) for chunks in batch)):
        rows = [chunks[i] if i < len(chunks) else empty for chunks in batch]
        hidden, pooled_i = run(torch.tensor([row.padded(pad_id) for row in rows]))
        encoded.append(emphasize(hidden, [row.weights for row in rows]))
        if i == 0 and pooled_i is not None:
            pooled = pooled_i.clone()
    return torch.cat(encoded, dim=1), pooled


def emphasize(hidden: torch.Tensor, weights: list[tuple[float, ...]]) -> torch.Tensor:
    """A1111's "Original" emphasis on a new tensor: each token's hidden state times its weight, then each row (one
    prompt's chunk) rescaled so its mean is the mean it had before. A1111 takes one mean over the whole batch it
    encodes at once; per row, a prompt's conditioning does not depend on the prompts beside it."""
    if all(w == 1.0 for row in weights for w in row):
        return hidden.clone()
    h = hidden.float()
    weighted = h * torch.tensor(weights, dtype=torch.float32).to(h.device)[..., None]
    weighted *= h.mean((1, 2), keepdim=True) / weighted.mean((1, 2), keepdim=True)
    return weighted.to(hidden.dtype)
