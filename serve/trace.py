"""The expert-access trace (`--trace-experts FILE`): which experts each forward pass asked the
device cache for, in order, as JSON lines, for `moe-serve plan --trace` to replay against
other budgets and policies (serve/replay.py).

The first line describes the model: {"moe_layers": [...], "num_experts": E, "top_k": k}.
Each later line is one forward pass: {"tokens": T, "rows": R, "groups": [[layer, [e, ...]],
...]}: the experts each MoE layer ran from the device cache (the runtime makes them resident
a group of slots at a time; experts run on the host or by stand-ins are not in it). A pass
with one token a row is a decode step.
"""

from __future__ import annotations

import json
from pathlib import Path

Key = tuple[int, int]  # (layer, expert)


class ExpertTrace:
    """Writes the trace to path (replacing it), a line a pass, flushed as written."""

    def __init__(self, path: str | Path, moe_layers: list[int], num_experts: int, top_k: int):
        self.path = Path(path)
        self._file = self.path.open("w", buffering=1)
        self._file.write(json.dumps({"moe_layers": moe_layers, "num_experts": num_experts,
                                     "top_k": top_k}) + "\n")
        self._pass: dict | None = None

    def begin(self, tokens: int, rows: int) -> None:
        """A forward pass of `tokens` tokens over `rows` rows starts."""
        self._pass = {"tokens": tokens, "rows": rows, "groups": []}

    def add(self, layer: int, experts: list[int]) -> None:
        """MoE layer `layer` of this pass ran these experts from the device cache."""
        if self._pass is not None and experts:
            self._pass["groups"].append([layer, list(experts)])

    def end(self) -> None:
        if self._pass is not None:
            self._file.write(json.dumps(self._pass, separators=(",", ":")) + "\n")
            self._pass = None

    def close(self) -> None:
        self._file.close()


def read_trace(path: str | Path) -> tuple[dict, list[dict]]:
    """-> (the model line, the passes); ValueError names a file that is not a trace."""
    lines = Path(path).read_text().splitlines()
    try:
        head, passes = json.loads(lines[0]), [json.loads(x) for x in lines[1:] if x.strip()]
    except (IndexError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not an expert trace (moe-serve --trace-experts): {e}") \
            from None
    if not {"moe_layers", "num_experts"} <= set(head) \
            or any(not {"tokens", "rows", "groups"} <= set(p) for p in passes):
        raise ValueError(f"{path} is not an expert trace (moe-serve --trace-experts)")
    return head, passes


def is_decode(p: dict) -> bool:
    """Whether pass p is a decode step: one token a row."""
    return p["tokens"] == p["rows"]


def accesses(passes: list[dict]) -> list[tuple[list[Key], bool]]:
    """Each pass's layers' experts in order, each with whether a decode step asked."""
    return [([(layer, e) for e in experts], is_decode(p))
            for p in passes for layer, experts in p["groups"]]
