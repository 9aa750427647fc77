"""Every Triton kernel of the MoE path, built ahead of time for a GPU that is not here
(kernels/triton/offline.py): registers, spills, shared memory and tensor-core instructions of
each build and autotune config, as the launches of a training step and of serving make them.

    python -m bench.kernels_offline                 # sm_90 (H100 / H200), every config
    python -m bench.kernels_offline --arch 80 --first-config --json

The launches use small CPU tensors whose sizes and strides specialise as the real shapes do
(multiples of 16: d = 4096, ffn = 14336 / 1024 / 768), so the builds are the ones a GPU would
compile. Nothing runs: this checks what the compiler made of the kernels, not their speed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator
from functools import partial

if os.environ.get("TRITON_INTERPRET") == "1":  # must be unset before triton is imported
    sys.exit("bench.kernels_offline compiles kernels: run it without TRITON_INTERPRET=1")

import torch  # noqa: E402

from bench.common import append_results, command_line, markdown_table  # noqa: E402

TOKENS, EXPERTS, TOP_K, D, FFN = 40, 8, 2, 128, 128
COARSE = 1024  # tokens of a dispatch with >= 256 rows an expert (grouped_mm.pick_block_m)


def launches() -> Iterator[tuple[str, Callable[[], object]]]:
    """(label, launch) for each way the MoE path launches a Triton kernel."""
    from kernels import sort_by_expert
    from kernels.mxfp4 import mxfp4_quantize, mxfp4_weight
    from kernels.quant import fp8_weight, quantize
    from kernels.triton import (
        combine,
        grouped_mm,
        grouped_tma,
        router_loss,
        routing,
        schedule,
        swiglu,
    )
    from moe.hf_fp8 import fp8_quantize

    g = torch.Generator().manual_seed(0)
    fine = sort_by_expert(torch.randint(0, EXPERTS, (TOKENS, TOP_K), generator=g), EXPERTS)
    coarse = sort_by_expert(torch.randint(0, EXPERTS, (COARSE, TOP_K), generator=g),
                            EXPERTS)  # >= 256 rows an expert: 128-row blocks
    s2s, wgrad = grouped_mm._launch, grouped_mm._weight_grad
    M = TOKENS * TOP_K
    for dt in (torch.bfloat16, torch.float32):
        name = str(dt).replace("torch.", "")

        def rand(*shape, dt=dt):
            return torch.randn(*shape, generator=g).to(dt)

        x, h, a, y = rand(TOKENS, D), rand(M, 2 * FFN), rand(M, FFN), rand(M, D)
        w_in, w_out = rand(EXPERTS, 2 * FFN, D), rand(EXPERTS, D, FFN)
        wts = torch.rand(TOKENS, TOP_K, generator=g)
        yield from [
            (f"s2s {name} up (tokens -> grouped)",
             partial(s2s, x, w_in, None, fine, False, True, TOP_K)),
            (f"s2s {name} down (grouped -> tokens)", partial(s2s, a, w_out, None, fine, True,
                                                             False, 1)),
            (f"s2s {name} down (grouped -> grouped)", partial(s2s, a, w_out, None, fine, True,
                                                              True, 1)),
            (f"s2s {name} up, 128-row blocks",
             partial(s2s, rand(COARSE, D), w_in, None, coarse, False, True, TOP_K)),
            (f"s2s {name} down, 128-row blocks",
             partial(s2s, rand(COARSE * TOP_K, FFN), w_out, None, coarse, True, False, 1)),
            # backward: dx through the transposed weights (strided views)
            (f"s2s {name} dx (grouped, W^T)",
             partial(s2s, y, w_out.transpose(1, 2), None, fine, True, True, 1)),
            (f"s2s {name} dx (grouped -> tokens, W^T)",
             partial(s2s, h, w_in.transpose(1, 2), None, fine, True, False, 1)),
            # weight gradients read expert-ordered rows (grouped_mm.group_weight_grad
            # gathers others first): dW_in, dW_out
            # the SwiGLU in the epilogues: up projection -> (h, a); da -> dh
            (f"s2s {name} up + swiglu (tokens -> grouped)",
             partial(s2s, x, w_in, None, fine, False, True, TOP_K, glu=1)),
            (f"s2s {name} up + swiglu, 128-row blocks",
             partial(s2s, rand(COARSE, D), w_in, None, coarse, False, True, TOP_K, glu=1)),
            (f"s2s {name} da + swiglu bwd (grouped, W^T)",
             partial(s2s, y, w_out.transpose(1, 2), None, fine, True, True, 1, glu=2, h=h)),
            (f"s2s {name} dout + swiglu bwd + combine weights (tokens, W^T)",
             partial(s2s, rand(TOKENS, D), w_out.transpose(1, 2), None, fine, False, True,
                     TOP_K, glu=3, h=h, wts=wts)),
            (f"wgrad {name} in", partial(wgrad, rand(M, D), h, fine)),
            (f"wgrad {name} out", partial(wgrad, a, y, fine)),
            (f"swiglu {name} fwd", partial(swiglu.swiglu_fwd, h)),
            (f"swiglu {name} bwd", partial(swiglu.swiglu_bwd, h, a)),
            (f"swiglu {name} fwd, kept rows", partial(swiglu.swiglu_fwd, h,
                                                      coarse.expert_offsets[-1:])),
            (f"swiglu {name} bwd, kept rows", partial(swiglu.swiglu_bwd, h, a,
                                                      coarse.expert_offsets[-1:])),
            (f"swiglu {name} bwd + combine weights",
             partial(swiglu.swiglu_bwd_combined, a, h, wts, fine)),
            (f"combine {name} fwd", partial(combine.weighted_combine, y, wts, fine, True)),
            (f"combine {name} bwd",
             partial(combine.weighted_combine_backward, y[:TOKENS], y, wts, fine, True)),
            (f"combine {name} bwd, rows only",
             partial(combine.combine_grad_rows, y[:TOKENS], wts, fine)),
        ]
    # the TMA variant (sm_90+: bf16 / fp16 only), as the backend's "tma" candidate calls it
    tma = grouped_tma.scatter2scatter
    xb, ab = torch.randn(TOKENS, D, generator=g).bfloat16(), rand(M, FFN).bfloat16()
    hb, yb = rand(M, 2 * FFN).bfloat16(), rand(M, D).bfloat16()
    wib, wob = w_in.bfloat16(), w_out.bfloat16()
    yield from [
        ("tma s2s bfloat16 up (tokens -> grouped)", partial(tma, xb, wib, fine, False, True,
                                                             TOP_K)),
        ("tma s2s bfloat16 down (grouped -> tokens)", partial(tma, ab, wob, fine, True, False,
                                                               1)),
        ("tma s2s bfloat16 up, 128-row blocks",
         partial(tma, rand(COARSE, D).bfloat16(), wib, coarse, False, True, TOP_K)),
        ("tma s2s bfloat16 dx (grouped, W^T)",
         partial(tma, yb, wob.transpose(1, 2), fine, True, True, 1)),
        ("tma s2s bfloat16 dx (grouped -> tokens, W^T)",
         partial(tma, hb, wib.transpose(1, 2), fine, True, False, 1)),
        ("tma s2s bfloat16 up + swiglu (tokens -> grouped)",
         partial(tma, xb, wib, fine, False, True, TOP_K, glu=1)),
        ("tma s2s bfloat16 up + swiglu, 128-row blocks",
         partial(tma, rand(COARSE, D).bfloat16(), wib, coarse, False, True, TOP_K, glu=1)),
        ("tma s2s bfloat16 da + swiglu bwd (grouped, W^T)",
         partial(tma, yb, wob.transpose(1, 2), fine, True, True, 1, glu=2, h=hb)),
        ("tma s2s bfloat16 dout + swiglu bwd + combine weights (tokens, W^T)",
         partial(tma, xb, wob.transpose(1, 2), fine, False, True, TOP_K, glu=3, h=hb,
                 wts=torch.rand(TOKENS, TOP_K, generator=g))),
        ("tma wgrad bfloat16 in",
         partial(grouped_tma.group_weight_grad, rand(M, D).bfloat16(), hb, fine)),
        ("tma wgrad bfloat16 out", partial(grouped_tma.group_weight_grad, ab, yb, fine)),
    ]
    w = torch.randn(EXPERTS, 2 * FFN, D, generator=g)
    block = (128, 128)
    packed = {
        "int8": lambda: _stack([quantize(w[e], 8) for e in range(EXPERTS)]),
        "int4": lambda: _stack([quantize(w[e], 4) for e in range(EXPERTS)]),
        "mxfp4": lambda: mxfp4_weight(*mxfp4_quantize(w)),
        "fp8 e4m3": lambda: _stack([fp8_weight(*fp8_quantize(w[e], block), block)
                                    for e in range(EXPERTS)]),
        "fp8 e5m2": lambda: _stack([fp8_weight(*fp8_quantize(w[e], block, torch.float8_e5m2),
                                               block) for e in range(EXPERTS)]),
    }
    for fmt, make in packed.items():
        q = make()
        yield f"s2s bf16 x {fmt} up (serving)", partial(s2s, xb, q.data, q, fine, False, True,
                                                         TOP_K)
    for E, k, sigmoid in ((8, 2, False), (64, 8, False), (128, 8, False), (256, 8, True)):
        logits = torch.randn(TOKENS, E, generator=g)
        bias = torch.randn(E, generator=g) if sigmoid else None
        sel = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(TOKENS)])
        yield from [
            (f"router E={E} k={k} {'sigmoid+bias' if sigmoid else 'softmax'} fwd",
             partial(routing.topk_route_fwd, logits, bias, k, sigmoid, True, 1.0)),
            *([(f"router E={E} k={k} sigmoid+bias, 8 groups (top-2 scored), 4 kept fwd",
                partial(routing.topk_route_fwd, logits, bias, k, True, True, 2.5,
                        (8, 4, True)))] if sigmoid else []),
            (f"router E={E} k={k} bwd",
             partial(routing.topk_route_bwd, logits, sel, torch.rand(TOKENS, k, generator=g),
                     torch.randn(TOKENS, k, generator=g), sigmoid, True, 1.0)),
            (f"router losses E={E} k={k} fwd", partial(
                router_loss.router_losses_fwd, logits, sel, sigmoid, not sigmoid)),
            (f"router losses E={E} k={k} bwd", partial(
                router_loss.router_losses_bwd, logits,
                torch.randint(0, TOKENS, (1, E), generator=g), k,
                *torch.rand(3, generator=g).unbind(), sigmoid, not sigmoid)),
            (f"sort E={E} k={k}", partial(routing.sort_pairs, torch.randint(
                0, E, (TOKENS * k,), generator=g), E, k)),
            (f"sort E={E} k={k} decode", partial(routing.sort_pairs, torch.randint(
                0, E, (k,), generator=g), E, k)),  # one block: one program
            (f"block schedule E={E} k={k}", partial(
                schedule.block_schedule, sort_by_expert(torch.randint(
                    0, E, (TOKENS, k), generator=g), E), 128)),
        ]


def _stack(qs):
    """Per-expert QuantWeights -> one stack [E, ...]."""
    from dataclasses import replace

    return replace(qs[0], data=torch.stack([q.data for q in qs]),
                   scale=torch.stack([q.scale for q in qs]))


def compile_all(arch: int) -> list[dict]:
    """Build every launch for sm_<arch> -> a row per build (label, kernel, meta, usage)."""
    from kernels.triton.offline import SHARED_LIMIT, compile_only

    rows = []
    with compile_only(arch) as builds:
        for label, launch in launches():
            start = len(builds)
            launch()
            for b in builds[start:]:
                rows.append({"launch": label, "kernel": b.kernel, "meta": b.meta,
                             "num_warps": b.num_warps, "num_stages": b.num_stages,
                             "regs": b.regs, "spill_bytes": b.spill_bytes,
                             "shared_bytes": b.shared_bytes, "mma": b.mma,
                             "mma_overlap": b.mma_overlap, "loads": b.loads,
                             "shared_limit": SHARED_LIMIT.get(arch)})
            print(f"  {label}: {len(builds) - start} build(s)", file=sys.stderr, flush=True)
    return rows


def _blocks(meta: dict) -> str:
    return "x".join(str(meta[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in meta) \
        or ", ".join(f"{k}={v}" for k, v in meta.items() if k.startswith("BLOCK"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: Hopper)")
    p.add_argument("--first-config", action="store_true",
                   help="only each autotuned kernel's first config (what tests launch)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON, record nothing")
    p.add_argument("--out", default="bench/RESULTS.md")
    a = p.parse_args(argv)
    if a.first_config:
        os.environ["MOE_TRITON_AUTOTUNE"] = "0"  # read when the kernels' modules load
    rows = compile_all(a.arch)
    if a.json:
        print(json.dumps(rows))
        return
    table = markdown_table(
        ["launch", "kernel", "blocks", "warps", "stages", "registers", "spilled bytes",
         "shared KiB", "tensor-core dot", "tile loads"],
        [[r["launch"], r["kernel"].lstrip("_"), _blocks(r["meta"]), str(r["num_warps"]),
          str(r["num_stages"]), str(r["regs"]), str(r["spill_bytes"]),
          f"{r['shared_bytes'] / 1024:.1f}",
          (r["mma"] + (" (overlapped)" if r["mma_overlap"] else "")) or "-",
          r["loads"] or "-"] for r in rows])
    limit = rows[0]["shared_limit"] if rows else None
    body = (f"Builds for sm_{a.arch} made on this machine (Triton's compiler and ptxas; no GPU "
            f"ran them), {len(rows)} in all: {sum(r['spill_bytes'] > 0 for r in rows)} spill, "
            f"largest shared memory {max(r['shared_bytes'] for r in rows) / 1024:.1f} KiB"
            + (f" of {limit / 1024:.0f} KiB a block may have" if limit else "")
            + f", grouped GEMMs' dots: {_mma_summary(rows)}.\n\n{table}\n")
    print(body)
    append_results(a.out, f"Triton kernels built offline for sm_{a.arch} "
                   "(bench/kernels_offline.py)", command_line("bench.kernels_offline", argv),
                   torch.device("cpu"), body)


def _mma_summary(rows: list[dict]) -> str:
    gemms = [r for r in rows if r["kernel"] in ("_scatter2scatter_kernel", "_s2s_tma_kernel",
                                                "_group_weight_grad_kernel",
                                                "_wgrad_tma_kernel")]
    kinds: dict[str, int] = {}
    for r in gemms:
        kinds[r["mma"] or "none"] = kinds.get(r["mma"] or "none", 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))


if __name__ == "__main__":
    main()
