"""Every Triton kernel builds for Hopper (sm_90), on this CPU-only machine: Triton's compiler
and ptxas, through the launches the MoE path makes (bench/kernels_offline.py), each
autotuned kernel at every config its autotuner may try. What the builds use is checked
where a change would cost the GPU dearly and no CPU test would see it: tensor-core dots
(wgmma) in the bf16 and packed-weight GEMMs, tiles by TMA in the TMA variant, no register
spills, shared memory within what a block may have."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

GEMMS = ("_scatter2scatter_kernel", "_s2s_tma_kernel", "_group_weight_grad_kernel",
         "_wgrad_tma_kernel")


def offline(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-m", "bench.kernels_offline", "--arch", "90", *args],
                       capture_output=True, text=True, timeout=1200, env=env)
    assert p.returncode == 0, p.stderr[-4000:]
    return p


@pytest.fixture(scope="module")
def builds() -> list[dict]:
    return json.loads(offline("--json").stdout)


def test_every_launch_builds_for_hopper_within_its_shared_memory(builds):
    launches = {b["launch"] for b in builds}
    for kind in ("s2s bfloat16", "s2s float32", "wgrad bfloat16", "wgrad float32", "swiglu",
                 "combine", "router", "sort", "int8", "int4", "mxfp4", "fp8 e4m3",
                 "fp8 e5m2", "128-row blocks", "tma s2s", "tma wgrad"):
        assert any(kind in name for name in launches), kind
    assert {b["kernel"] for b in builds} >= {
        *GEMMS, "_swiglu_fwd_kernel", "_swiglu_bwd_kernel", "_combine_kernel",
        "_combine_bwd_kernel", "_topk_route_kernel", "_topk_route_bwd_kernel",
        "_block_hist_kernel", "_scan_kernel", "_place_kernel", "_sort_one_block_kernel",
        "_schedule_kernel"}
    for b in builds:
        assert 0 < b["regs"] <= 255 and b["shared_bytes"] <= b["shared_limit"], b


def test_bf16_and_packed_weight_gemms_use_wgmma_without_spilling(builds):
    """A 16-bit or packed-weight GEMM that falls back from wgmma to mma.sync, spills, loads
    its tiles through registers or waits for each wgmma loses much of Hopper's throughput."""
    gemms = [b for b in builds if b["kernel"] in GEMMS and "float32" not in b["launch"]]
    assert len(gemms) >= 12
    for b in gemms:
        tiles = "tma" if "tma" in b["kernel"] else "cp.async"
        assert b["mma"] == "wgmma" and b["spill_bytes"] == 0 and b["loads"] == tiles, b
        # one wgmma in flight while the next issues; a packed weight tile is dequantized
        # in registers and stored to shared memory first, which ends each wgmma's flight
        assert b["mma_overlap"] == ("serving" not in b["launch"]), b
    assert any(b["meta"].get("BLOCK_M") == 128 for b in gemms)  # coarse experts' blocks


def test_bf16_gemms_keep_a_tile_of_each_operand_per_pipeline_stage(builds):
    """Software pipelining holds num_stages tiles of both operands in shared memory, so the
    loads of later K-steps overlap the dots of earlier ones. (A weight gradient that gathered
    its rows inside the loop held one: its launcher gathers them first.)"""
    checked = 0
    for b in builds:
        m = b["meta"]
        if b["kernel"] not in GEMMS or "bfloat16" not in b["launch"]:
            continue
        if "wgrad" in b["kernel"] or "weight_grad" in b["kernel"]:
            tiles = m["BLOCK_M"] * (m["BLOCK_N"] + m["BLOCK_K"])
        else:
            tiles = m["BLOCK_K"] * (m["BLOCK_M"] + m["BLOCK_N"])
        assert b["shared_bytes"] >= b["num_stages"] * tiles * 2, b
        checked += 1
    assert checked >= 30


def test_float32_and_elementwise_kernels_keep_their_registers(builds):
    """float32 dots run without tensor cores and hold their tiles in registers: 128-row and
    256-column blocks spilled up to 13 KiB a thread, so float32 takes 64 rows (pick_block_m)
    and narrower tiles (the autotuners' prunes)."""
    for b in builds:
        if b["kernel"] in GEMMS and "float32" in b["launch"]:
            assert b["mma"] == "" and b["meta"].get("BLOCK_M", 64) <= 64, b
            assert b["meta"]["BLOCK_N"] * b["meta"]["BLOCK_K"] <= 64 * 64, b
        assert b["spill_bytes"] == 0, b


def test_the_bench_records_its_table(builds, tmp_path):
    """The table and its record (the builds come from Triton's cache by now)."""
    out = tmp_path / "RESULTS.md"
    text = offline("--out", str(out)).stdout
    assert "Builds for sm_90 made on this machine" in text and "| wgmma |" in text
    assert "kernels built offline for sm_90" in out.read_text()
    assert text.count("\n| ") == len(builds) + 1  # a row a build, after the header


def test_compile_only_says_what_the_interpreter_stops():
    """In this (interpreted) test process there is nothing to compile: the error says so."""
    from kernels.triton.offline import compile_only

    with pytest.raises(RuntimeError, match="unset TRITON_INTERPRET"):
        with compile_only():
            pass


def test_grouped_gemms_build_once_for_any_expert_count_and_dispatch():
    """A new expert count or dispatch (blocks in the grid divisible by 16 or not) reuses the
    build: on a fresh GPU each build costs seconds of the first step."""
    script = """
import torch
from kernels import sort_by_expert
from kernels.triton import grouped_mm, grouped_tma
from kernels.triton.offline import compile_only
g = torch.Generator().manual_seed(0)
w = torch.randn(16, 256, 128).bfloat16()
with compile_only(90):
    for T, E in ((40, 8), (256, 8), (40, 16)):  # 10, 16 and 18 row blocks in the grid
        d = sort_by_expert(torch.randint(0, E, (T, 2), generator=g), E)
        x = torch.randn(T, 128).bfloat16()
        grouped_mm._launch(x, w[:E], None, d, False, True, 2)
        grouped_tma.scatter2scatter(x, w[:E], d, False, True, 2)
for k in (grouped_mm._scatter2scatter_kernel, grouped_tma._s2s_tma_kernel):
    print(sum(len(c[0]) for c in k.fn.device_caches.values()))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["MOE_TRITON_AUTOTUNE"] = "0"
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-4000:]
    assert p.stdout.split() == ["1", "1"], p.stdout


def test_prebuilt_cache_holds_every_kernel_of_a_layer_step(tmp_path):
    """bench/prebuild.py fills a Triton cache with one layer step's builds (carried to a GPU
    lease so that it compiles nothing): every kernel the step launches is among them, and a
    second run finds all of its builds in the cache (the same launches, the same keys)."""
    from bench.layer_launches import count

    step = {k.split(":", 1)[1] for k in count(96, 8, 64, dict(top_k=2)) if ":" in k}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    env["MOE_TRITON_AUTOTUNE"] = "0"  # one config a kernel: the same launches, fewer builds
    runs = []
    for _ in range(2):
        p = subprocess.run([sys.executable, "-m", "bench.prebuild", "--shapes", "smoke",
                            "--tokens", "64", "--json"], capture_output=True, text=True,
                           timeout=600, env=env)
        assert p.returncode == 0, p.stderr[-4000:]
        runs.append(json.loads(p.stdout))
    built = {k for row in runs[0] for k in row["kernels"]}
    assert step and step <= built, step - built
    assert sum(r["new"] for r in runs[0]) > 20 and sum(r["new"] for r in runs[1]) == 0
