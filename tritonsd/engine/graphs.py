"""CUDA-graph capture of the engine's fixed-shape calls (the denoising step, the VAE decode, the text encoder).

A call of a few hundred small kernels spends most of its eager time launching them from Python. A CUDA graph
records the launches once and replays them with one call. `GraphCache` captures a function the first time it
sees a signature (the shapes, dtypes and devices of its tensor arguments, and its other arguments) and replays it
after that: the new inputs are copied into the captured input buffers, the graph runs, and the captured output
buffers are returned. Those buffers are overwritten by the next replay of the same graph.

All graphs of a cache allocate from one memory pool. Each graph's own inputs and outputs stay referenced by the
cache, so no capture can reuse them; only intermediates, which are dead after every replay, are shared.

A cache keeps at most MAX_GRAPHS graphs: capturing one more drops the least recently replayed, and with it the
buffers it holds (an output a caller still holds stays valid). An image size takes three or four (text encoder, denoising step, VAE decode; a sampler
that adds noise or carries a previous prediction has its own step), so about two sizes stay captured at once.
"""

import warnings
from collections import OrderedDict
from collections.abc import Callable

import torch

from tritonsd.kernels.launch import precompile


def _signature(args: tuple) -> tuple:
    return tuple(
        (tuple(a.shape), a.dtype, a.device, a.stride()) if isinstance(a, torch.Tensor) else (type(a), a) for a in args
    )


MAX_GRAPHS = 8


class GraphCache:
    def __init__(self):
        self.pool = None
        self.graphs: OrderedDict[tuple, tuple[torch.cuda.CUDAGraph, tuple, object]] = OrderedDict()

    def __call__(self, name: str, fn: Callable, *args):
        """fn(*args) for CUDA tensor args, replayed from a graph. fn must not sync with the host, draw random
        numbers or depend on tensor values through Python; its non-tensor arguments become part of the key."""
        key = (name, _signature(args))
        entry = self.graphs.get(key)
        if entry is None:
            if len(self.graphs) >= MAX_GRAPHS:
                self.graphs.popitem(last=False)
            entry = self.graphs[key] = self._capture(fn, args)
        self.graphs.move_to_end(key)
        graph, static_args, static_out = entry
        for dst, src in zip(static_args, args):
            if isinstance(dst, torch.Tensor) and dst.data_ptr() != src.data_ptr():
                dst.copy_(src)
        graph.replay()
        return static_out

    def drop(self, which: Callable[[object], bool]) -> None:
        """Forget the graphs whose name `which` selects, as when a tensor they read (not an argument) was replaced;
        the next call captures again."""
        self.graphs = {key: entry for key, entry in self.graphs.items() if not which(key[0])}

    def _capture(self, fn: Callable, args: tuple):
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        static_args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
        # Eager runs first, on a side stream as capture requires: one under `precompile`, which compiles all the
        # call's Triton kernels in parallel, then a real one, which lets cuBLAS and cuDNN set up their workspaces.
        # None of that may happen during capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            try:
                with precompile():
                    fn(*static_args)
            except Exception as e:  # it only saves time: the run below compiles whatever is still missing
                warnings.warn(f"parallel kernel compilation failed ({type(e).__name__}: {e}); "
                              "kernels compile one by one at their first launch", RuntimeWarning, stacklevel=2)
            fn(*static_args)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            static_out = fn(*static_args)
        return graph, static_args, static_out
