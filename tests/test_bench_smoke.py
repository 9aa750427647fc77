"""The benchmarks still run (tiny CPU shapes): they are not timed here, only exercised."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.forked import run_module
from tests.seeds import fresh_seed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kernels_bench_smoke(tmp_path):
    out = tmp_path / "results.md"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    proc = run_module("bench.kernels", [
        "--smoke", "--impls", "ours,ours-apart,ours-torch-gemm,ours-loop-gemm,reference,loop,dense",
        "--out", out], cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    for name in ("ours (triton backend)", "ours, SwiGLU and combine as separate kernels",
                 "ours, torch._grouped_mm GEMMs",
                 "ours, a cuBLAS GEMM per expert",
                 "ours, torch reference", "loop over experts", "dense GEMM"):
        assert name in text
    assert "max rel err" in proc.stdout
    assert "| fwd+bwd ms | host ms |" in text  # how long the host took to issue each step
    row = next(line for line in text.splitlines() if "| ours (triton backend) |" in line)
    assert float(row.split("|")[5]) > 0, row


def test_kernels_breakdown_times_every_stage():
    """--breakdown times each primitive of ours alone (the GEMM candidates forced), none of
    them failing (a cuBLAS GEMM per expert writes with out=, so no graph may be built)."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    proc = run_module("bench.kernels", ["--breakdown", "--smoke"], cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| stage |")]
    assert len(rows) >= 20 and not any("failed" in r for r in rows), proc.stdout
    assert any(r.startswith("| bwd dW_in, a cuBLAS GEMM per expert |") for r in rows)


def test_serve_bench_smoke(tmp_path):
    out = tmp_path / "results.md"
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = run_module("bench.serve", [
        "--smoke", "--layers", "2", "--new-tokens", "6", "--prefetch-fractions", "0.5",
        "--out", out, "--dir", tmp_path / "model"], cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert "Offloaded decode" in text and "4/16 (25%)" in text and "8/16 (50%)" in text
    assert "prefetch of 0.5 of each expert, no precision gate" in text
    assert "failed" not in text  # the transformers baseline ran too
    assert "Batched decode" in text and "| 25% | none | 4 | 4 |" in text


def test_serve_bench_smoke_at_deepseek_shapes(tmp_path):
    """The DeepSeek-V2-Lite-shaped model (MLA, shared experts, a dense first layer) is written
    in a layout transformers loads (its baseline runs) and served; columns for gated prefetch
    and for misses run on the host."""
    from bench.serve import main

    out, js = tmp_path / "results.md", tmp_path / "r.json"
    main(["--smoke", "--shape", "deepseek-v2-lite", "--layers", "2", "--new-tokens", "4",
          "--batches", "1", "--quants", "none", "--prefetch-min-weights", "0.5,2",
          "--host-compute-tokens", "4", "--speculate", "2", "--skip-miss-weights", "0.5",
          "--stand-in-weights", "0.5", "--out", str(out),
          "--dir", str(tmp_path / "m"),
          "--json-out", str(js)])
    text = out.read_text()
    assert "deepseek-v2-lite (deepseek_v3 layout)" in text and "4/16 (25%)" in text
    assert "failed" not in text
    assert "prefetch gated at 0.5" in text and "prefetch gated at 2:" in text
    assert "misses of <= 4 tokens on the host:" in text and "speculating 2:" in text
    assert "skipping misses below 0.5 (approx.):" in text
    assert "int4 stand-ins below 0.5 (approx.):" in text
    for r in json.loads(js.read_text()):  # a bar above 1 prefetches nothing: no-prefetch bytes
        gated = r["variants"]["prefetch gated at 2"]
        assert gated["bytes_to_device_per_token"] == r["no_prefetch"]["bytes_to_device_per_token"]
        assert gated["expert_hit_rate"] == r["no_prefetch"]["expert_hit_rate"]
        host = r["variants"]["misses of <= 4 tokens on the host"]
        assert host["bytes_to_device_per_token"] < r["ours"]["bytes_to_device_per_token"]


def test_serve_bench_keeps_its_rows_when_one_setting_fails(tmp_path, monkeypatch):
    """A setting that raises (a path never run on this device, say) fills its own cells with
    the reason; the other columns and the table are still written."""
    import bench.serve as bs

    measure = bs._measure_ours

    def failing(base, budget, quant, store, prefetch, a, batch=1, **over):
        if over.get("host_compute_tokens"):
            raise RuntimeError("boom on this device")
        return measure(base, budget, quant, store, prefetch, a, batch, **over)

    monkeypatch.setattr(bs, "_measure_ours", failing)
    out = tmp_path / "results.md"
    bs.main(["--smoke", "--layers", "2", "--new-tokens", "3", "--batches", "1", "--quants",
             "none", "--prefetch-min-weights", "0.5", "--host-compute-tokens", "2",
             "--skip-hf", "--out", str(out), "--dir", str(tmp_path / "m")])
    rows = [line for line in out.read_text().splitlines() if line.startswith("| 4/16")]
    assert len(rows) == 1 and "failed: RuntimeError: boom on this device" in rows[0], rows
    gated = rows[0].split("|")[-3]  # the gated-prefetch column, measured
    assert "failed" not in gated and gated.count("/") == 2, rows[0]


def test_serve_bench_smoke_at_gpt_oss_shapes(tmp_path):
    """The GPT-OSS-shaped model is written as the Hub stores it (MXFP4 experts), transformers
    loads it (its baseline runs), and our packed MXFP4 slots fit every expert in the budget
    that holds a quarter of them decoded."""
    from bench.serve import main

    out = tmp_path / "results.md"
    main(["--smoke", "--shape", "gpt-oss-20b", "--layers", "2", "--new-tokens", "4",
          "--batches", "1", "--quants", "mxfp4,none", "--out", str(out),
          "--dir", str(tmp_path / "m")])
    text = out.read_text()
    assert "gpt-oss-20b (gpt_oss layout)" in text and "failed" not in text
    assert "| 4/16 (25%) | 0.00 | mxfp4 | 16/16 |" in text
    assert "| 4/16 (25%) | 0.00 | none | 4/16 |" in text


def test_serve_load_bench_smoke(tmp_path):
    """Sequential, static and continuous batching (prompts read in the decode forward, or in
    forwards of their own) over the same Poisson arrivals. They come far faster than a
    request is served (5000/s: 0.2 ms apart), so that the batching modes batch however fast
    the machine decodes (at 200/s a fast moment served each request before the next came)."""
    from bench.serve_load import main

    out = tmp_path / "results.md"
    main(["--smoke", "--layers", "2", "--requests", "6", "--rate", "5000", "--prompt-len", "4,8",
          "--new-tokens", "2,6", "--out", str(out), "--dir", str(tmp_path / "model")])
    text = out.read_text()
    rows = {line.split("|")[1].strip(): line.split("|") for line in text.splitlines()
            if line.startswith("| s") or line.startswith("| c")}
    assert set(rows) == {"sequential", "static", "continuous-split", "continuous"}, text
    assert float(rows["sequential"][8]) == 1.0  # mean batch
    assert all(float(rows[m][8]) > 1.0 for m in ("static", "continuous-split", "continuous"))


def test_serve_turns_bench_smoke(tmp_path):
    """Later turns reuse the conversation so far with prefix reuse and read it whole without;
    the same prompts both ways."""
    from bench.serve_turns import main

    out = tmp_path / "results.md"
    main(["--smoke", "--layers", "2", "--turns", "3", "--first-tokens", "12",
          "--message-tokens", "5", "--answer-tokens", "3", "--out", str(out),
          "--dir", str(tmp_path / "model")])
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines()
            if line[:4] in ("| 1 ", "| 2 ", "| 3 ")]
    assert [int(r[1]) for r in rows] == [12, 20, 28]  # + 3 answer + 5 message tokens a turn
    assert [int(r[2]) for r in rows] == [0, 14, 22]  # all but the last answer token and message


def _stopped_after(args: list[str], env: dict, marker: str, on_stderr: bool = False,
                   seconds: float = 300) -> str:
    """Run `python -m args` (as `timeout` would find it), send SIGTERM once `marker` shows on
    its stdout (or stderr) -> its stderr, after checking it exited as stopped (128 + 15)."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stream = proc.stderr if on_stderr else proc.stdout
    deadline, seen = time.time() + seconds, ""
    while marker not in seen and time.time() < deadline:
        seen += stream.readline()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    return stderr


def test_kernels_bench_writes_its_rows_when_a_timeout_stops_it(tmp_path):
    """`timeout` sends SIGTERM: the rows measured so far still land in the results file."""
    out = tmp_path / "results.md"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    _stopped_after(["bench.kernels", "--smoke", "--tokens", "16,32,64,128,256,512", "--impls",
                    "dense,reference", "--out", str(out)], env, "T=16")  # one row measured
    text = out.read_text()
    assert "**Partial**: stopped by SIGTERM" in text
    assert "| smoke | 16 | dense GEMM" in text


def test_policies_bench_counts_decode_steps_on_a_warm_cache(tmp_path):
    """bench/policies.py: a row per budget and policy; its counts are the decode steps'
    (every greedy token after the first, each using top-k experts a layer), summed over
    prompts on one cache; without prefetch every byte moved is a miss's expert."""
    from bench.policies import decode_counts, held_out_prompts, main
    from serve.config import ServeConfig
    from serve.runtime import OffloadedModel
    from serve.text import TextCodec
    from tests.hf_models import save_served_model

    hf = save_served_model(tmp_path / "m", seed=5)
    out = tmp_path / "results.md"
    main(["--model", str(tmp_path / "m"), "--prompts", "2", "--prompt-len", "8",
          "--new-tokens", "5", "--fractions", "0.5", "--policies", "lru,next-use",
          "--quants", "none,int8", "--min-weights", "0,0.5", "--out", str(out)])
    text = out.read_text()
    for policy in ("lru", "next-use"):
        for bar in ("0", "0.5"):
            assert f"| 12/24 (50%) | none | 12 | {policy} | {bar} |" in text
    int8 = [line.split(" | ") for line in text.splitlines() if "| int8 |" in line]
    assert len(int8) == 5 and all(int(r[2]) > 12 for r in int8)  # packed: more slots
    for q in ("none", "int8"):  # the offline floor: no policy hits more often
        rows = [line.split(" | ") for line in text.splitlines() if f"| {q} |" in line]
        best = [r for r in rows if r[3] == "fewest possible (offline)"]
        assert len(best) == 1
        floor = float(best[0][5].split(" / ")[1])
        assert all(float(r[5].split(" / ")[1]) <= floor for r in rows)
    prompts = held_out_prompts(TextCodec(tmp_path / "m"), 2, 8)
    assert len({tuple(p) for p in prompts}) == 2 and all(len(p) == 8 for p in prompts)
    cfg = ServeConfig(model=str(tmp_path / "m"), device="cpu", dtype="float32",
                      memory_budget="500KiB", prefetch="none", max_context=32)
    model = OffloadedModel(cfg)
    c = decode_counts(model, prompts, 5)
    layers, k = hf.config.num_hidden_layers, hf.config.num_experts_per_tok
    # one token a step uses k distinct experts a layer; prefill (8 tokens) would add more
    assert c["hits"] + c["misses"] == 2 * 5 * layers * k
    assert c["misses"] > 0 and c["bytes_to_device"] == c["misses"] * model.slot_bytes


def _fewest_misses(trace, slots: int) -> int:
    """An exhaustive search over every eviction choice: the fewest counted misses."""
    import functools

    @functools.cache
    def fewest(i: int, resident: frozenset) -> int:
        if i == len(trace):
            return 0
        key, counted = trace[i]
        if key in resident:
            return fewest(i + 1, resident)
        if len(resident) < slots:
            return counted + fewest(i + 1, resident | {key})
        return counted + min(fewest(i + 1, (resident - {v}) | {key}) for v in resident)

    return fewest(0, frozenset())


def test_fewest_misses_are_the_fewest_any_eviction_choice_gives():
    """fewest_misses against an exhaustive search over every eviction choice, on random
    short access sequences (only the marked accesses count)."""
    import random

    from serve.replay import fewest_misses

    rng = random.Random(fresh_seed())
    for _ in range(40):
        n, slots = rng.randint(4, 12), rng.randint(1, 3)
        trace = [((0, rng.randint(0, 4)), rng.random() < 0.7) for _ in range(n)]
        assert fewest_misses(trace, slots) == _fewest_misses(trace, slots), (trace, slots)


def test_serve_bench_keeps_our_rows_when_a_time_limit_stops_the_baseline(tmp_path,
                                                                         monkeypatch):
    """The transformers + accelerate baseline runs after our rows of a budget: a SIGTERM
    during it still writes those rows (the baseline marked stopped) and exits 143."""
    from bench import serve
    from bench.common import Stopped

    def stopped(*args, **kwargs):
        raise Stopped

    monkeypatch.setattr(serve, "hf_decode_tokens_per_s", stopped)
    out = tmp_path / "results.md"
    with pytest.raises(SystemExit) as exit_info:
        serve.main(["--smoke", "--layers", "2", "--new-tokens", "4", "--quants", "none",
                    "--out", str(out), "--dir", str(tmp_path / "m")])
    assert exit_info.value.code == 143
    text = out.read_text()
    assert "**Partial**" in text and "stopped by the time limit" in text
    assert "4/16 (25%)" in text and "8/16 (50%)" not in text  # the next budget never ran
    assert "Batched decode" not in text


def test_serve_score_bench_smoke(tmp_path):
    """Scoring continuations of shared contexts: reuse reads fewer prompt tokens and gives
    the scores of whole reads."""
    from bench.serve_score import main

    out = tmp_path / "results.md"
    main(["--smoke", "--layers", "2", "--questions", "2", "--choices", "3",
          "--context-tokens", "20", "--continuation-tokens", "4", "--out", str(out),
          "--dir", str(tmp_path / "model")])
    rows = {line.split("|")[1].strip(): line.split("|") for line in out.read_text().splitlines()
            if line.startswith("| whole") or line.startswith("| reuse")}
    assert set(rows) == {"whole", "reuse, one at a time", "reuse, together"}
    assert int(rows["whole"][4]) == 2 * 3 * 24
    for mode in ("reuse, one at a time", "reuse, together"):
        assert int(rows[mode][4]) == 2 * (24 + 2 * 5)  # the context less one token taken
        assert float(rows[mode][7]) < 1e-4


def test_serve_speculate_bench_smoke(tmp_path):
    """Speculation compared with decoding a token a step: the same tokens, a row per K."""
    from bench.serve_speculate import main
    from tests.hf_models import save_served_model

    save_served_model(tmp_path / "m", seed=2)
    out, prompts = tmp_path / "results.md", tmp_path / "prompts.txt"
    prompts.write_text("def f(a):\n    return a\ndef f(a):\n---\nimport os\nimport os\n")
    main(["--model", str(tmp_path / "m"), "--device", "cpu", "--speculate", "2",
          "--prompts", str(prompts), "--new-tokens", "12", "--out", str(out), "--predict"])
    rows = [line.split("|") for line in out.read_text().splitlines()
            if line.startswith("| 0") or line.startswith("| 2 ")]
    assert len(rows) == 4 and all(r[3].strip() == "yes" for r in rows)
    whole = next(r for r in rows if r[1].strip() == "0, the answer predicted")
    kept, drafted = map(int, whole[5].split("/"))
    assert kept == drafted > 0 and float(whole[4]) < 0.5  # every predicted token kept
    # the model as its own draft, its bytes beside the budget: the same expert slots
    out.unlink()
    main(["--model", str(tmp_path / "m"), "--device", "cpu", "--speculate", "2",
          "--prompts", str(prompts), "--new-tokens", "12", "--out", str(out),
          "--draft-model", str(tmp_path / "m"), "--draft-min-prob", "0", "--draft-beside",
          "--memory-budget", "600KiB", "--batch", "2"])
    text = out.read_text()
    rows = [line.split("|") for line in text.splitlines()
            if line.startswith("| 0 ") or line.startswith("| 2 ")]
    assert "Speculation by a draft model" in text and "on top of the budget" in text
    assert len(rows) == 2 and rows[0][2] == rows[1][2] and all(r[3].strip() == "yes"
                                                             for r in rows)
    batched, one_by_one = map(int, rows[1][6].replace("(", "").replace(")", "").split())
    assert 0 < batched < one_by_one  # the two prompts' drafts in shared forwards


def test_serve_skip_bench_smoke(tmp_path):
    """Skipping, stand-ins and every expert quantized beside exact serving: a row each,
    exact agreeing with itself."""
    from bench.serve_skip import main
    from tests.hf_models import save_served_model

    save_served_model(tmp_path / "m", seed=2)
    out, prompts = tmp_path / "results.md", tmp_path / "prompts.txt"
    prompts.write_text("def f(a):\n    return a\n---\nimport os\n")
    main(["--model", str(tmp_path / "m"), "--device", "cpu", "--weights", "0.5",
          "--stand-in-weights", "0.5", "--quant-everywhere", "int4", "--kv-int8",
          "--new-tokens", "6", "--memory-budget", "600KiB", "--prompts", str(prompts),
          "--out", str(out)])
    rows = {r[1].strip(): r for r in (line.split("|") for line in out.read_text().splitlines())
            if len(r) > 10 and r[1].strip() not in ("serving", "---")}
    assert list(rows) == ["exact", "skip below 0.5", "int4 stand-ins below 0.5",
                          "every expert int4", "int8 KV cache"]
    assert rows["exact"][9].strip() == "1.000"  # argmax agreement with itself
    assert float(rows["skip below 0.5"][3]) > 0 and float(rows["skip below 0.5"][4]) == 0
    assert float(rows["int4 stand-ins below 0.5"][4]) > 0


def test_serve_bench_smoke_with_fp8_experts(tmp_path):
    """--fp8 writes the experts as an FP8 block-scaled checkpoint: ours with them kept FP8 on
    the wire (fp8) beside them widened at read (none), the first moving fewer bytes."""
    from bench.serve import main

    out = tmp_path / "results.md"
    main(["--smoke", "--layers", "2", "--new-tokens", "4", "--batches", "1", "--fp8",
          "--quants", "fp8,none", "--fractions", "0.5", "--out", str(out),
          "--dir", str(tmp_path / "m")])
    rows = {r[3].strip(): r for r in (line.split("|") for line in out.read_text().splitlines())
            if len(r) > 13 and r[3].strip() in ("fp8", "none")}
    moved = {q: float(r[13].split("/")[0]) for q, r in rows.items()}
    assert set(moved) == {"fp8", "none"} and moved["fp8"] < 0.5 * moved["none"]


def test_layer_launches_bench_counts_no_host_waits(tmp_path):
    """bench/layer_launches.py counts launches and host waits per layer step; no case waits."""
    out = tmp_path / "results.md"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    proc = run_module("bench.layer_launches", ["--tokens", "4", "--max-experts", "16",
                                               "--out", out], cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split(" | ") for line in out.read_text().splitlines()
            if line.startswith("| this commit |")]
    assert len(rows) == 4 and all(r[-1] == "0 |" for r in rows), rows
    assert all(int(r[2]) > int(r[4]) > 0 for r in rows), rows  # launches > Triton kernels


def test_decode_launches_bench_holds_a_decode_tokens_launch_budget(tmp_path):
    """bench/decode_launches.py counts a decode token's launches by phase; no case waits
    for the device and each MoE layer reads from it once, and a resident MoE layer's decode
    stays within its budget of launches (attention 13: the fused RMSNorm counts one, one
    q / k / v GEMM, no mask; MoE glue 4; experts 6)."""
    out = tmp_path / "results.md"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    proc = run_module("bench.decode_launches", ["--layers", "2", "--tokens", "2",
                                                "--timed-tokens", "4", "--out", out,
                                                "--dir", tmp_path / "m"], cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r[1]: r for r in (line.split(" | ") for line in out.read_text().splitlines()
                              if line.startswith("| this commit |"))}
    # no waits for the device but one read a MoE layer (its routing) and one a step
    batched = rows.pop("4 rows at 4 positions, all resident (a step / 4)")
    # fixed-shape steps (--cuda-graphs) read the sample only (and, once, the hits counted)
    fixed = rows.pop("all experts resident, fixed steps (--cuda-graphs: on a GPU one graph's "
                     "kernels)")
    assert fixed[4] == "0" and 1 <= float(fixed[5]) < 2, fixed
    assert len(rows) == 3 and all(r[4:6] == ["0", "3"] for r in rows.values()), rows
    assert batched[4:6] == ["0", "0.75"], batched
    resident = rows["all experts resident"]
    assert all(float(a) <= b for a, b in zip(resident[7:10], (13, 4, 6), strict=True)), \
        resident
    assert float(resident[-1].rstrip(" |")) > 0  # ms a token, timed


def test_scratch_dir_is_removed_when_the_process_exits(tmp_path):
    """A benchmark's temporary model folder (gigabytes at real shapes) goes when its process
    ends, also after an error; a folder the user named stays."""
    script = ("import sys\nfrom bench.common import scratch_dir\n"
              "r = scratch_dir(None, 'moe-test-')\n(r / 'w').write_text('x')\nprint(r)\n"
              "kept = scratch_dir(sys.argv[1], 'moe-test-')\n(kept / 'w').write_text('x')\n"
              "if sys.argv[2] == 'fail':\n    raise RuntimeError('boom')\n")
    env = dict(os.environ, PYTHONPATH=ROOT)
    for how in ("ok", "fail"):
        kept = tmp_path / how
        kept.mkdir()
        p = subprocess.run([sys.executable, "-c", script, str(kept), how], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == (1 if how == "fail" else 0), p.stderr[-2000:]
        made = p.stdout.strip().splitlines()[-1]
        assert made.startswith("/") and not os.path.exists(made), made
        assert (kept / "w").exists()


def test_train_memory_bench_smoke(tmp_path):
    """bench.train_memory at tiny shapes: a row per precision and recompute mode, each
    recompute mode keeping less than the one before it, appended to its results file."""
    from bench.train_memory import main

    out = tmp_path / "RESULTS.md"
    main(["--smoke", "--out", str(out)])
    text = out.read_text()
    assert "Activation memory and step time by recompute mode" in text
    rows = [ln.split("|")[1:-1] for ln in text.splitlines() if ln.startswith("| float32")
            or ln.startswith("| bf16")]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [
        (p, m) for p in ("float32", "bf16 autocast") for m in ("none", "moe_act", "mlp", "block")]
    for i in (0, 4):
        kept = [float(rows[i + j][2]) for j in range(4)]
        assert kept[0] > kept[1] > kept[2] > kept[3], kept


@pytest.mark.parametrize("key", ["reference", "loop", "hf"])
def test_kernel_bench_steps_start_from_no_gradients(key):
    """Each timed step of bench.kernels writes its gradients as a training step after
    optimizer.zero_grad() does: a second call's gradients equal the first's, not twice them
    (an accumulation would add a read and write of every weight gradient to each row)."""
    from bench.kernels import IMPLS, SHAPES

    step = IMPLS[key][1](SHAPES["smoke"], 16, torch.float32, torch.device("cpu"))
    assert len(step.leaves) >= 3
    step()
    first = [t.grad.clone() for t in step.leaves]
    step()
    for t, g in zip(step.leaves, first, strict=True):
        torch.testing.assert_close(t.grad, g)


def test_busy_time_is_the_union_of_spans():
    from bench.serve_timeline import busy_ns

    assert busy_ns([]) == 0
    assert busy_ns([(5, 9), (0, 2), (1, 3), (8, 12), (20, 21)]) == 3 + 7 + 1
    assert busy_ns([(0, 10), (2, 4)]) == 10


def test_idle_link_time_gives_the_prefetch_fraction_that_fills_it():
    """40 ms a token with the link busy 27 ms over 4 MoE layers: 3.25 ms idle a layer, in
    which 55 GB/s move 178.75 MB, 0.51 of a 352 MB expert (capped at 1); no copies, none."""
    from bench.serve_timeline import idle_and_fill

    r = idle_and_fill({"ms_per_token": 40.0, "h2d_ms_per_token": 27.0, "h2d_gb_per_s": 55.0},
                      4, 352_000_000)
    assert r["link_idle_ms_per_layer"] == pytest.approx(3.25)
    assert r["fill_fraction"] == pytest.approx(178.75 / 352)
    assert idle_and_fill({"ms_per_token": 40.0, "h2d_ms_per_token": 1.0,
                          "h2d_gb_per_s": 55.0}, 1, 1000)["fill_fraction"] == 1.0
    assert idle_and_fill({"ms_per_token": 9.0, "h2d_gb_per_s": None}, 4, 1) == {
        "link_idle_ms_per_layer": None, "fill_fraction": None}


def test_serve_timeline_writes_its_rows_when_a_timeout_stops_it(tmp_path):
    """A SIGTERM after the first profiled setting: its row lands in the results file (marked
    partial) and in the JSON, and the exit status says the run was stopped."""
    out, js = tmp_path / "r.md", tmp_path / "r.json"
    _stopped_after(["bench.serve_timeline", "--smoke", "--layers", "2", "--tokens", "3",
                    "--fractions", "0.25,0.5,0.75,1.0", "--dir", str(tmp_path / "m"), "--out",
                    str(out), "--json-out", str(js)], dict(os.environ, PYTHONPATH=ROOT),
                   "ms/token", on_stderr=True)  # one setting profiled
    text = out.read_text()
    assert "**Partial**: stopped by SIGTERM" in text and "| 4/16, none |" in text
    assert "16/16" not in text
    assert "4/16, none" in json.loads(js.read_text())


def test_serve_timeline_smoke(tmp_path):
    """bench/serve_timeline.py end to end on the CPU (host ops only): a row per budget and
    prefetch mode, and the all-resident one with fixed-shape steps (--cuda-graphs), the
    all-resident ones moving nothing."""
    out, js = tmp_path / "r.md", tmp_path / "r.json"
    p = run_module("bench.serve_timeline", ["--smoke", "--layers", "2", "--tokens", "3",
                                            "--dir", tmp_path / "m", "--out", out,
                                            "--json-out", js], timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    text = out.read_text()
    assert "Offloaded decode timeline" in text and "| 4/16, none |" in text
    r = json.loads(js.read_text())
    assert set(r) == {"4/16, none", "4/16, cross-layer", "16/16, none", "16/16, cross-layer",
                      "16/16, none, CUDA graphs"}
    assert all(v["tokens"] == 3 and v["ms_per_token"] > 0 and v["unprofiled_ms_per_token"] > 0
               for v in r.values())
    assert r["16/16, none"]["mib_per_token"] == 0 and r["4/16, none"]["mib_per_token"] > 0
    assert r["16/16, none, CUDA graphs"]["mib_per_token"] == 0
    assert r["4/16, none"]["prefetch_copied"] == 0
