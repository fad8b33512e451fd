"""The engine's caches are bounded: the tokenizer's BPE word cache and the CUDA graphs captured per call shape."""

import numpy as np
import torch

from tritonsd.engine import graphs, tokenizer
from tritonsd.engine.tokenizer import CLIPTokenizer


def random_words(n: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return " ".join("".join(rng.choice(letters, rng.integers(3, 11))) for _ in range(n))


def test_bpe_cache_keeps_a_bounded_number_of_words(monkeypatch):
    default = CLIPTokenizer.default()
    merges = sorted(default.ranks, key=default.ranks.get)
    prompt = random_words(5000)
    ours = CLIPTokenizer(default.vocab, merges)
    ids = ours.encode(prompt)
    size = ours._cached_bpe.cache_info().currsize
    assert size == tokenizer.BPE_CACHE_WORDS < 5000, f"{size} words cached after 5000 distinct ones"
    # Evicted words are merged again when they come back, to the same ids as with no cache at all.
    monkeypatch.setattr(tokenizer, "BPE_CACHE_WORDS", 0)
    uncached = CLIPTokenizer(default.vocab, merges)
    assert ours.encode(prompt) == ids == uncached.encode(prompt), "ids differ once words were evicted"
    assert uncached._cached_bpe.cache_info().currsize == 0


class FakeGraph:
    """Stands in for a captured CUDA graph: replaying runs the function on the static inputs."""

    def __init__(self, fn, args):
        self.fn, self.args, self.out = fn, args, None

    def replay(self):
        self.out.copy_(self.fn(*self.args))


def test_graph_cache_drops_the_least_recently_used(monkeypatch):
    captured = []

    def capture(self, fn, args):
        static = tuple(a.clone() for a in args)
        graph = FakeGraph(fn, static)
        graph.out = fn(*static)
        captured.append(tuple(args[0].shape))
        return graph, static, graph.out

    monkeypatch.setattr(graphs.GraphCache, "_capture", capture)
    cache = graphs.GraphCache()
    sizes = [torch.ones(n) for n in range(1, graphs.MAX_GRAPHS + 1)]
    for x in sizes:
        cache("double", lambda t: t * 2, x)
    assert len(captured) == graphs.MAX_GRAPHS
    out = cache("double", lambda t: t * 2, torch.full((1,), 5.0))  # replayed, and now the most recently used
    assert out.tolist() == [10.0] and len(captured) == graphs.MAX_GRAPHS, "a cached shape was captured again"

    cache("double", lambda t: t * 2, torch.ones(100))  # one more shape: the least recently used, size 2, goes
    assert len(cache.graphs) == graphs.MAX_GRAPHS
    kept = sorted(key[1][0][0][0] for key in cache.graphs)
    assert kept == [1, *range(3, graphs.MAX_GRAPHS + 1), 100], f"kept shapes {kept}"
    cache("double", lambda t: t * 2, torch.ones(2))
    assert captured[-1] == (2,), "the dropped shape was not captured again"
