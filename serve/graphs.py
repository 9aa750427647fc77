"""Decode steps replayed from CUDA graphs. Once every expert is resident, a decode step (one
new token a row) has fixed shapes when its attention reads a fixed number of keys under a
mask (the power of two at or above its context, from 256 keys): the host then launches one
graph instead of a hundred kernels a token, where batch-1 decode is bound by the host's
launches (bench/RESULTS.md, the second H200 lease's timeline: 1.4 ms of kernels in a 15 ms
token).

A step's fixed inputs live in device buffers of its own (serve.runtime.OffloadedModel.
_fixed_step): the host writes each step's tokens, positions and RoPE there, outside the
graph, then replays. One graph per key: the set of KV-cache rows (the runtime sorts a
step's rows; they are read as a view when consecutive) and the keys read (a power of two:
a graph per doubling of the context), the oldest dropped beyond `max_graphs`. On the CPU the
same fixed-shape step runs eagerly (what the tests check there).
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch


class DecodeGraphs:
    """Per key (a step's KV-cache rows and keys read): its fixed step (make(key) -> an object
    with the step's buffers) and, on CUDA, the graph of forward(fixed) -> logits [B, V],
    captured after `warmup` eager runs (which also let the kernel picker time its shapes, and
    Triton build its kernels, outside the capture). A capture that fails is said once, on
    stderr, and every step runs eagerly from then on (slower, still right)."""

    def __init__(self, device: torch.device, make: Callable[[Any], Any],
                 forward: Callable[[Any], torch.Tensor], max_graphs: int = 16,
                 warmup: int = 2, capture: Callable | None = None):
        """capture(forward, fixed) -> (a graph with replay(), its output): a CUDA graph's
        (None: on CUDA; elsewhere nothing is captured)."""
        if max_graphs < 1 or warmup < 1:
            raise ValueError(f"need max_graphs >= 1 and warmup >= 1, got {max_graphs}, "
                             f"{warmup}")
        self.device, self.make, self.forward = device, make, forward
        self.max_graphs, self.warmup = max_graphs, warmup
        self._steps: OrderedDict[Any, dict] = OrderedDict()
        self._pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None
        self.capture = capture or (self._capture if device.type == "cuda" else None)
        self.broken: str | None = None  # why a capture failed (then every step is eager)
        self.captured = 0  # graphs captured (dropped ones included)
        self.replayed = 0

    def fixed(self, key) -> Any:
        """The fixed step of key (made on first use), for the caller to fill."""
        entry = self._steps.get(key)
        if entry is None:
            while len(self._steps) >= self.max_graphs:
                _, old = self._steps.popitem(last=False)
                if old["graph"] is not None and hasattr(old["graph"], "reset"):
                    old["graph"].reset()
            entry = self._steps[key] = {"fixed": self.make(key), "graph": None, "out": None}
        self._steps.move_to_end(key)
        return entry["fixed"]

    def run(self, key, before_capture: Callable[[], Callable[[], None]] | None = None
            ) -> torch.Tensor:
        """The filled fixed step of key -> its logits [B, V] (a tensor of the caller's own).
        before_capture() runs before the first eager warm-up and returns what undoes the
        warm-ups' side effects but the KV entries (rewritten alike by the real step)."""
        entry = self._steps[key]
        if self.capture is None or self.broken is not None:
            return self.forward(entry["fixed"])
        if entry["graph"] is None:
            undo = before_capture() if before_capture is not None else None
            try:
                entry["graph"], entry["out"] = self.capture(self.forward, entry["fixed"])
                self.captured += 1
            except Exception as e:  # noqa: BLE001 - an op a graph cannot hold: run eagerly
                self.broken = f"{type(e).__name__}: {e}"
                print(f"moe-serve: a decode step's CUDA graph capture failed ({self.broken}); "
                      "decode steps run eagerly from now on", file=sys.stderr, flush=True)
            finally:
                if undo is not None:
                    undo()
            if self.broken is not None:
                return self.forward(entry["fixed"])
        entry["graph"].replay()
        self.replayed += 1
        return entry["out"].clone()  # the next replay overwrites the graph's own

    def _capture(self, forward: Callable, fixed) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """forward(fixed) warmed up on a side stream (as torch's docs do), then captured."""
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                forward(fixed)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a server's other threads may use CUDA meanwhile (not in it)
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            out = forward(fixed)
        return graph, out
