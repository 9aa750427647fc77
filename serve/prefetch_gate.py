"""Whether the cross-layer prefetch's copies pay, layer by layer, from its measured precision.

At batch-1 decode the PCIe link is the bottleneck: a right prediction only hides a copy the
layer would have made anyway behind the little compute before it, while a wrong one costs a
whole expert's copy, shares the link with the demand copies after it and evicts an expert
that may have hit. On the lent H200 (bench/RESULTS.md, 2026-11-30, Mixtral-8x7B layer shapes,
random weights) predictions of precision 0.53 made decode 0.82x as fast as no prefetch with a
quarter of the experts cached, 0.90x with half (the 0.46x first measured included cuDNN
attention plans built per key count, which the first setting of a run paid alone), and 0.64
(gated by weight) 0.91x. So a layer's predictions are copied only while the share of its
recently predicted experts that the layer then used reaches `min_precision`; below it (and
until `warmup` predicted experts have been scored) they are still made and scored, without
copies, so the prefetch resumes when they improve.
"""

from __future__ import annotations

from collections import deque

# the default bar: above the break-even seen on the H200 (between 0.64 and 0.75 precision)
MIN_PRECISION = 0.75


class PrefetchGate:
    """Per target layer, the last `window` predicted experts (at least) and how many of them
    the layer used; allow(layer) once `warmup` of them are scored and their precision reaches
    min_precision. min_precision 0 allows every layer from the start (prefetch always)."""

    def __init__(self, min_precision: float = MIN_PRECISION, window: int = 64,
                 warmup: int = 16):
        if not 0 <= min_precision <= 1:
            raise ValueError(f"min_precision must be in [0, 1], got {min_precision!r}")
        if warmup < 1 or window < warmup:
            raise ValueError(f"need 1 <= warmup <= window, got warmup={warmup}, "
                             f"window={window}")
        self.min_precision, self.window, self.warmup = min_precision, window, warmup
        self._steps: dict[int, deque[tuple[int, int]]] = {}  # (predicted, correct) per step
        self._sums: dict[int, list[int]] = {}  # [predicted, correct] over the steps kept

    def record(self, layer: int, predicted: int, correct: int) -> None:
        """One prediction for `layer`: `predicted` experts named, `correct` of them used."""
        if not 0 <= correct <= predicted:
            raise ValueError(f"need 0 <= correct <= predicted, got {correct}, {predicted}")
        steps = self._steps.setdefault(layer, deque())
        sums = self._sums.setdefault(layer, [0, 0])
        steps.append((predicted, correct))
        sums[0] += predicted
        sums[1] += correct
        while len(steps) > 1 and sums[0] - steps[0][0] >= self.window:  # keep >= window
            p, c = steps.popleft()
            sums[0] -= p
            sums[1] -= c

    def precision(self, layer: int) -> float | None:
        """The layer's recent precision; None before `warmup` predicted experts are scored."""
        p, c = self._sums.get(layer, (0, 0))
        return c / p if p >= self.warmup else None

    def allow(self, layer: int) -> bool:
        """Copy the layer's predicted experts ahead of it?"""
        if self.min_precision == 0:
            return True
        prec = self.precision(layer)
        return prec is not None and prec >= self.min_precision
