"""Fill a Triton cache, on a machine without a GPU, with the builds one MoE layer's forward
and backward will need on one (kernels/triton/offline.py compiles them ahead of time, every
autotune config, nothing runs), so that a short GPU lease spends no time compiling them.

    TRITON_CACHE_DIR=.triton-cache python -m bench.prebuild --shapes mixtral,olmoe,qwen3 \
        --tokens 16384

A build is found again only under the same cache key: the same Triton (its version and
ptxas), the same kernel source, and the same specialisation of the launch (its constexprs,
dtypes, and which integers and pointers are divisible by 16). So the launches here are the
layer's own at the benchmark's shapes and token counts (bench/kernels.py), bf16: the router's
top-k and losses, the counting sort, the grouped GEMMs of both candidates (cp.async and TMA
tiles, plain and with the SwiGLU in their epilogues), SwiGLU and the combine, forward and
backward. Prints the builds it made and the ones
it found in the cache already.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator
from functools import partial

if os.environ.get("TRITON_INTERPRET") == "1":  # must be unset before triton is imported
    sys.exit("bench.prebuild compiles kernels: run it without TRITON_INTERPRET=1")

import torch  # noqa: E402


def layer_launches(shape: tuple, tokens: int) -> Iterator[tuple[str, Callable[[], object]]]:
    """(label, launch) for each Triton launch of one bf16 layer step at bench.kernels' `shape`
    (d, ffn, E, k, renormalize, family) and `tokens`, with the operands the layer passes."""
    from kernels import sort_by_expert
    from kernels.reference import topk_route_fwd
    from kernels.triton import combine, grouped_mm, grouped_tma, router_loss, routing, swiglu

    d, f, E, k, renorm, _ = shape
    T, M = tokens, tokens * k
    g = torch.Generator().manual_seed(0)
    bf = torch.bfloat16
    logits = torch.randn(T, E, generator=g)
    ids, wts = topk_route_fwd(logits, None, k, False, renorm, 1.0)
    disp = sort_by_expert(ids, E, backend="torch")
    x = torch.empty(T, d, dtype=bf)
    xg, y = torch.empty(M, d, dtype=bf), torch.empty(M, d, dtype=bf)
    h, a = torch.empty(M, 2 * f, dtype=bf), torch.empty(M, f, dtype=bf)
    w_in, w_out = torch.empty(E, 2 * f, d, dtype=bf), torch.empty(E, d, f, dtype=bf)
    counts = torch.bincount(ids.reshape(-1), minlength=E)[None]  # one sequence: the batch
    grad = torch.ones(())
    s2s, tma = grouped_mm._launch, grouped_tma.scatter2scatter
    yield from [
        ("router top-k fwd", partial(routing.topk_route_fwd, logits, None, k, False, renorm,
                                     1.0)),
        ("router losses fwd", partial(router_loss.router_losses_fwd, logits, ids, False, True)),
        ("sort by expert", partial(routing.sort_pairs, ids.reshape(-1), E, k)),
        ("fwd x -> h", partial(s2s, x, w_in, None, disp, False, True, k)),
        ("fwd x -> h, TMA", partial(tma, x, w_in, disp, False, True, k)),
        ("fwd x -> h, a (SwiGLU in the epilogue)",
         partial(s2s, x, w_in, None, disp, False, True, k, glu=1)),
        ("fwd x -> h, a (SwiGLU in the epilogue), TMA",
         partial(tma, x, w_in, disp, False, True, k, glu=1)),
        ("fwd swiglu", partial(swiglu.swiglu_fwd, h)),
        ("fwd a -> y", partial(s2s, a, w_out, None, disp, True, True, 1)),
        ("fwd a -> y, TMA", partial(tma, a, w_out, disp, True, True, 1)),
        ("fwd combine", partial(combine.weighted_combine, y, wts, disp, True)),
        ("bwd combine", partial(combine.weighted_combine_backward, x, y, wts, disp, True)),
        ("bwd dy -> da", partial(s2s, y, w_out.transpose(1, 2), None, disp, True, True, 1)),
        ("bwd dy -> da, TMA", partial(tma, y, w_out.transpose(1, 2), disp, True, True, 1)),
        ("bwd dy -> dh (SwiGLU backward in the epilogue)",
         partial(s2s, y, w_out.transpose(1, 2), None, disp, True, True, 1, glu=2, h=h)),
        ("bwd dy -> dh (SwiGLU backward in the epilogue), TMA",
         partial(tma, y, w_out.transpose(1, 2), disp, True, True, 1, glu=2, h=h)),
        ("bwd dout -> dh, dweights (SwiGLU and combine backward in the epilogue)",
         partial(s2s, x, w_out.transpose(1, 2), None, disp, False, True, k, glu=3, h=h,
                 wts=wts)),
        ("bwd dout -> dh, dweights (SwiGLU and combine backward in the epilogue), TMA",
         partial(tma, x, w_out.transpose(1, 2), disp, False, True, k, glu=3, h=h, wts=wts)),
        ("bwd combine, rows only", partial(combine.combine_grad_rows, x, wts, disp)),
        ("bwd swiglu + combine weights (after a GEMM without an epilogue)",
         partial(swiglu.swiglu_bwd_combined, a, h, wts, disp)),
        ("bwd dW_out", partial(grouped_mm._weight_grad, a, y, disp)),
        ("bwd dW_out, TMA", partial(grouped_tma.group_weight_grad, a, y, disp)),
        ("bwd swiglu", partial(swiglu.swiglu_bwd, h, a)),
        ("bwd dh -> dx", partial(s2s, h, w_in.transpose(1, 2), None, disp, True, False, 1)),
        ("bwd dh -> dx, TMA", partial(tma, h, w_in.transpose(1, 2), disp, True, False, 1)),
        ("bwd dW_in", partial(grouped_mm._weight_grad, xg, h, disp)),
        ("bwd dW_in, TMA", partial(grouped_tma.group_weight_grad, xg, h, disp)),
        ("router losses bwd", partial(router_loss.router_losses_bwd, logits, counts, k, grad,
                                      grad, grad, False, True)),
        ("router top-k bwd", partial(routing.topk_route_bwd, logits, ids, wts, wts, False,
                                     renorm, 1.0)),
    ]


def prebuild(shapes: list[str], tokens: list[int], arch: int = 90) -> list[dict]:
    """Build every launch of `layer_launches` for each shape and token count -> a row per
    launch: its label, the kernels it built (one per autotune config) and how many of the
    builds were new to the cache."""
    from bench.kernels import SHAPES
    from kernels.triton.offline import compile_only

    cache = os.environ.get("TRITON_CACHE_DIR") or os.path.expanduser("~/.triton/cache")
    entries = lambda: set(os.listdir(cache)) if os.path.isdir(cache) else set()  # noqa: E731
    rows = []
    with compile_only(arch) as builds:
        for name in shapes:
            for T in tokens:
                for label, launch in layer_launches(SHAPES[name], T):
                    before, n = entries(), len(builds)
                    launch()
                    rows.append({"launch": f"{name} T={T}: {label}",
                                 "kernels": [b.kernel for b in builds[n:]],
                                 "new": len(entries() - before)})
                    print(f"  {rows[-1]['launch']}: {len(builds) - n} build(s), "
                          f"{rows[-1]['new']} new", file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="mixtral,olmoe,qwen3")
    p.add_argument("--tokens", default="16384", help="comma-separated token counts")
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: Hopper)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    a = p.parse_args(argv)
    from bench.kernels import SHAPES

    shapes = [s for s in a.shapes.split(",") if s]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        sys.exit(f"unknown shape(s) {unknown}; choose from {list(SHAPES)}")
    rows = prebuild(shapes, [int(t) for t in a.tokens.split(",")], a.arch)
    if a.json:
        print(json.dumps(rows))
        return
    cache = os.environ.get("TRITON_CACHE_DIR") or "~/.triton/cache"
    print(f"{sum(len(r['kernels']) for r in rows)} builds for sm_{a.arch}, "
          f"{sum(r['new'] for r in rows)} new to the cache {cache}")


if __name__ == "__main__":
    main()
