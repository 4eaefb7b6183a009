"""Replaying a step function as one CUDA graph: one launch per update, no Python between the kernels.

Not tensordict's ``CudaGraphModule``: it removes TensorDict from torch's pytree registry for the whole process,
which breaks vmapped seeds (``torch.vmap`` over TensorDicts).
"""
from __future__ import annotations

import torch
from tensordict import TensorDictBase
from torch import Tensor

__all__ = ["CudaGraphStep", "input_structure", "structure_change"]


class CudaGraphStep:
    """``fn`` (of one tensor or TensorDict) run ``warmup`` times on a side stream (where it compiles), then captured
    once with ``torch.cuda.graph``; each later call copies its input into the captured one and replays.

    Every call does one call's work (a capture is followed by a replay on its input) and returns a copy of the
    output. The graph reads the tensors ``fn`` read when captured: state ``fn`` keeps must be updated in place.
    ``baked`` (optional), called after a capture, returns a reader of the Python values the capture baked in;
    when one changed before a replay, the graph is dropped and ``fn`` warmed up and captured anew.
    """

    def __init__(self, fn, *, warmup: int = 3, baked=None):
        if warmup < 1:
            raise ValueError(f"warmup must be at least 1 (a compiled fn compiles there), got {warmup}.")
        self.fn = fn
        self.warmup = warmup
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_input = None
        self.static_structure = None
        self.static_output = None
        self.baked = baked
        self.captures = 0
        self._read_baked = None
        self._baked_values = None
        self._current = False  # will_build() found the graph current: the next call need not read again

    def will_build(self) -> bool:
        """Whether the next call warms up or captures rather than replays (a stale graph is dropped here; the next
        call skips reading the baked values again)."""
        self._drop_if_stale()
        self._current = self.graph is not None
        return not self._current

    def _drop_if_stale(self) -> None:
        if self.graph is not None and self._read_baked is not None and self._read_baked() != self._baked_values:
            self.graph, self.calls = None, 0  # a value the graph baked in changed: warm up (recompile) and capture anew

    def __call__(self, x: Tensor | TensorDictBase):
        if not x.is_cuda:
            raise ValueError(f"a CUDA graph step needs its input on a CUDA device, got one on {x.device}.")
        if not self._current:
            self._drop_if_stale()
        self._current = False
        if self.graph is None:
            self.calls += 1
            if self.calls <= self.warmup:
                return self._warm_up(x)
            self._capture(x)
        elif (change := structure_change(self.static_structure, input_structure(x))) is not None:
            raise ValueError(f"a CUDA graph replays the input it was captured with: {change}. Keep the batch's "
                             "size, entries and dtypes fixed for the run.")
        self.static_input.copy_(x)
        self.graph.replay()
        return self.static_output.clone()

    def _warm_up(self, x):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = self.fn(x)
        torch.cuda.current_stream().wait_stream(side)
        return out

    def _capture(self, x):
        self.static_input = x.clone()
        self.static_structure = input_structure(x)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_output = self.fn(self.static_input)
        self.captures += 1
        if self.baked is not None:
            self._read_baked = self.baked()
            self._baked_values = self._read_baked()


def input_structure(x: Tensor | TensorDictBase) -> dict:
    """Each entry of ``x`` (``()`` for a tensor) with its shape and dtype: what a replay's input must keep (a copy
    into the captured input would cast another dtype and leave a missing entry as captured)."""
    if isinstance(x, Tensor):
        return {(): (tuple(x.shape), x.dtype)}
    return {key: (tuple(v.shape), v.dtype) for key, v in x.items(True, True)}


def structure_change(captured: dict, now: dict) -> str | None:
    """The first difference between two :func:`input_structure` results, in words; ``None`` when they agree."""
    for key in captured.keys() - now.keys():
        return f"it lacks the entry {key!r}"
    for key in now.keys() - captured.keys():
        return f"it has an entry the captured input lacked, {key!r}"
    for key, (shape, dtype) in captured.items():
        if now[key] != (shape, dtype):
            name = "the input" if key == () else f"entry {key!r}"
            return f"{name} was {list(shape)} {dtype} when captured, now {list(now[key][0])} {now[key][1]}"
    return None
