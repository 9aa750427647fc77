"""Fixed-shape decode steps (cuda_graphs, serve/graphs.py): once every expert is resident, a
decode step reads a power of two of keys under a mask and waits for nothing, so that a CUDA graph
can hold it. On the CPU the same step runs eagerly: its tokens are transformers', its counts
the eager steps'; on a GPU (marked gpu) the replayed graph gives the eager step's logits."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from serve.config import ServeConfig  # noqa: E402
from serve.generate import generate  # noqa: E402
from serve.graphs import DecodeGraphs  # noqa: E402
from serve.runtime import OffloadedModel  # noqa: E402
from tests.hf_models import build_hf, hf_greedy  # noqa: E402

NEW = 10
PROMPTS = [[5, 9, 13, 2], [7, 8], [1, 2, 3, 4, 5, 6, 7]]


def serve(d, **kw) -> OffloadedModel:
    kw = {"max_context": 64, "max_batch": 2, "dtype": "float32", **kw}
    return OffloadedModel(ServeConfig(model=str(d), **kw))


# sliding windows, attention sinks, latent attention, shared experts, QK norms
CASES = {"mixtral": ("mixtral", {}), "mixtral-window": ("mixtral", dict(sliding_window=5)),
         "gpt_oss": ("gpt_oss", {}), "deepseek_v3": ("deepseek_v3", {}),
         "qwen2_moe": ("qwen2_moe", {}), "qwen3_moe": ("qwen3_moe", {})}


@pytest.mark.parametrize("case", CASES)
def test_fixed_steps_give_transformers_tokens_and_the_eager_counts(tmp_path, case):
    """Three prompts on three KV-cache rows, the second ending first (rows 0 and 2 then
    decode together: read by index, not as a view), every expert fitting: the tokens are
    transformers', the steps after the prompts run fixed, and every expert a step uses is
    a hit or a miss as in eager steps; the first fixed step loads every expert (their
    bytes, no miss), after which nothing moves."""
    family, overrides = CASES[case]
    hf = build_hf(family, **overrides)
    hf.save_pretrained(tmp_path)
    limits = [NEW, 3, NEW]
    want = [hf_greedy(hf, p, n) for p, n in zip(PROMPTS, limits, strict=True)]
    eager, fixed = (serve(tmp_path, cuda_graphs=g, prefetch="none", max_batch=3)
                    for g in (False, True))
    runs = {name: [generate(m, PROMPTS, limits) for _ in range(2)]  # the second: warm
            for name, m in (("eager", eager), ("fixed", fixed))}
    for name, (first, second) in runs.items():
        assert first.token_ids == want and second.token_ids == want, name
    assert eager.graphs is None and fixed._tables is not None
    assert {(0, 1, 2), (0, 2)} <= {rows for rows, _ in fixed.graphs._steps}
    (e1, e2), (f1, f2) = ([r.stats for r in runs[k]] for k in ("eager", "fixed"))
    for e, f in ((e1, f1), (e2, f2)):
        assert f["expert_hits"] + f["expert_misses"] == e["expert_hits"] + e["expert_misses"]
    assert f1["expert_misses"] <= e1["expert_misses"]  # loaded at once, not missed
    assert f1["bytes_to_device"] == fixed.store.total_experts * fixed.slot_bytes
    assert f2["expert_misses"] == 0 and f2["bytes_to_device"] == 0


def test_fixed_steps_wait_for_nothing_and_read_nothing_back(tmp_path, monkeypatch):
    """A fixed decode step on the Triton backend (the GPU's launch sequence, under the CPU
    interpreter) runs no op that waits for the device and reads no device value: what a
    CUDA graph can capture; nor do the counts of its hits. The eager step reads each MoE
    layer's routing."""
    from tests.host_sync import no_host_sync

    build_hf("mixtral").save_pretrained(tmp_path)
    reads = []
    tolist, item = torch.Tensor.tolist, torch.Tensor.item
    for graphs in (True, False):  # experts in RAM, as on a GPU (no mmap reads to count)
        m = serve(tmp_path, cuda_graphs=graphs, kernel_backend="triton", max_batch=1,
                  host_budget=10**9)
        m.step(torch.tensor([[3, 4, 5]]), [0], [0], [3])  # the prompt, eager in both
        m.step(torch.tensor([[2]]), [0], [3], [1])  # fixed: loads every expert first
        monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(1) or tolist(t))
        monkeypatch.setattr(torch.Tensor, "item", lambda t: reads.append(1) or item(t))
        reads.clear()
        with no_host_sync():
            m.step(torch.tensor([[6]]), [0], [4], [1])
            if m.graphs is not None:  # the hits come from a host copy (a metrics scrape's
                m.counters()  # thread reads no device value and writes nothing)
        monkeypatch.undo()
        if m.graphs is not None:
            assert reads == [] and m._tables is not None
        else:
            assert len(reads) >= len(m.store.moe_layers)  # its routing, at least


def test_a_fixed_step_of_rows_out_of_order_answers_in_their_order(tmp_path):
    """Rows given as [1, 0] run as the set (0, 1) (one graph for both orders) and their
    logits come back in the order given: the eager step's."""
    build_hf("qwen3_moe").save_pretrained(tmp_path)
    logits = {}
    for graphs in (False, True):
        m = serve(tmp_path, cuda_graphs=graphs)
        m.step(torch.tensor([[3, 4, 5, 6], [7, 8, 9, 0]]), [0, 1], [0, 0], [4, 2])
        m.step(torch.tensor([[11], [12]]), [0, 1], [4, 2], [1, 1])
        logits[graphs] = m.step(torch.tensor([[13], [14]]), [1, 0], [3, 5], [1, 1])
    assert list(m.graphs._steps) == [((0, 1), 64)]
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_fixed_steps_read_the_keys_of_the_next_power_of_two(tmp_path, monkeypatch, family):
    """A fixed step reads its rows' first N keys, N the power of two at or above its context
    (from FIXED_MIN_KEYS, 4 here; at most the whole context): one graph per length the
    context doubles through, the tokens still transformers' (with attention sinks too)."""
    from serve import runtime

    monkeypatch.setattr(runtime, "FIXED_MIN_KEYS", 4)
    hf = build_hf(family)
    hf.save_pretrained(tmp_path)
    m = serve(tmp_path, cuda_graphs=True, max_batch=1, max_context=40)
    prompt = [5, 9, 13]
    assert generate(m, [prompt], 36).token_ids == [hf_greedy(hf, prompt, 36)]
    assert [n for _, n in m.graphs._steps] == [4, 8, 16, 32, 40]


def test_fixed_steps_wait_for_a_budget_that_holds_every_expert(tmp_path):
    """Slots for fewer than every expert: the steps stay eager (an expert may be evicted, so
    no slot table holds for good), with the same tokens; speculation's multi-token steps and
    scored steps stay eager too."""
    hf = build_hf("mixtral")
    hf.save_pretrained(tmp_path)
    probe = serve(tmp_path)
    m = serve(tmp_path, cuda_graphs=True, memory_budget=probe.fixed_bytes + 12 * probe.slot_bytes)
    assert generate(m, PROMPTS, NEW).token_ids == [hf_greedy(hf, p, NEW) for p in PROMPTS]
    assert m._tables is None and not m.graphs._steps
    s = serve(tmp_path, cuda_graphs=True, speculate=2)
    assert generate(s, [[1, 2, 3, 1, 2, 3, 1, 2]], NEW).token_ids == \
        [hf_greedy(hf, [1, 2, 3, 1, 2, 3, 1, 2], NEW)]


@pytest.mark.parametrize("heads, kv_heads, per_head", [(8, 2, False), (8, 2, True),
                                                     (4, 1, False), (4, 4, False)])
def test_decode_attention_of_grouped_queries_is_sdpa_with_gqa(heads, kv_heads, per_head):
    """One query a row under a mask, each KV head's query heads as its rows: SDPA with
    enable_gqa's output, for a mask shared by the heads or one per head (sinks)."""
    from moe.attention import additive_mask
    from serve.runtime import decode_attention

    g = torch.Generator().manual_seed(0)
    B, N = 3, 7
    q = torch.randn(B, heads, 1, 16, generator=g, dtype=torch.float64)
    k = torch.randn(B, kv_heads, N, 16, generator=g, dtype=torch.float64)
    v = torch.randn(B, kv_heads, N, 8, generator=g, dtype=torch.float64)
    seen = torch.arange(N) < torch.tensor([[3], [7], [1]])  # keys each row sees
    mask = additive_mask(seen[:, None, None], torch.float64)  # [B, 1, 1, N]
    if per_head:
        mask = mask.expand(B, heads, 1, N) + torch.randn(B, heads, 1, N, generator=g,
                                                         dtype=torch.float64)
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1),
        attn_mask=mask, scale=0.3)
    torch.testing.assert_close(decode_attention(q, k, v, mask, 0.3), want, rtol=1e-12,
                               atol=1e-12)


def test_decode_graphs_keep_the_latest_row_sets():
    """One fixed step per key, made once; beyond max_graphs the oldest is dropped."""
    made = []
    g = DecodeGraphs(torch.device("cpu"), lambda key: made.append(key) or {"key": key},
                     lambda fixed: torch.tensor([len(fixed["key"])]), max_graphs=2)
    assert g.fixed((0,)) is g.fixed((0,)) and made == [(0,)]
    g.fixed((0, 1))
    g.fixed((0,))  # the latest now
    g.fixed((1,))  # drops (0, 1)
    assert list(g._steps) == [(0,), (1,)] and g.run((1,)).tolist() == [1]
    with pytest.raises(ValueError, match="max_graphs"):
        DecodeGraphs(torch.device("cpu"), dict, len, max_graphs=0)


def test_a_failed_capture_is_said_once_and_steps_run_eagerly(capsys):
    """The graph path with a stand-in capture: a captured step replays (its output a copy of
    the graph's own); a capture that fails is said once on stderr, its warm-ups' effects are
    undone, and every step runs eagerly from then on."""
    calls, undone = [], []

    class Graph:
        def __init__(self, out):
            self.out = out

        def replay(self):
            calls.append("replay")
            self.out += 1

    def capture(forward, fixed):
        out = forward(fixed)
        return Graph(out), out

    forward = lambda fixed: calls.append("eager") or torch.zeros(1)  # noqa: E731
    g = DecodeGraphs(torch.device("cpu"), lambda key: key, forward, capture=capture)
    g.fixed("a")
    first = g.run("a")
    assert first.tolist() == [1.0] and g.run("a").tolist() == [2.0]
    assert calls == ["eager", "replay", "replay"] and g.captured == 1 and g.replayed == 2
    first += 10
    assert g._steps["a"]["out"].tolist() == [2.0]  # the caller's copy is its own

    def fails(forward, fixed):
        forward(fixed)
        raise RuntimeError("operation not permitted when stream is capturing")

    calls.clear()
    g = DecodeGraphs(torch.device("cpu"), lambda key: key, forward, capture=fails)
    for key in ("a", "b", "a"):
        g.fixed(key)
        assert g.run(key, lambda k=key: lambda: undone.append(k)).tolist() == [0.0]
    assert g.broken == "RuntimeError: operation not permitted when stream is capturing"
    assert calls == ["eager"] * 4 and undone == ["a"] and g.captured == 0
    err = capsys.readouterr().err
    assert err.count("capture failed") == 1 and "run eagerly from now on" in err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_replayed_graphs_give_the_eager_steps_logits(tmp_path):
    """On a GPU: decode steps replayed from CUDA graphs (captured once per row set) give the
    eager steps' logits, in float32 and in bf16 (the kernels' own rounding; the attention
    of a fixed step is masked over a power of two of keys, the eager one's unmasked), compared up
    to the first token where greedy choices part (after it the contexts differ)."""
    hf = build_hf("mixtral")
    hf.save_pretrained(tmp_path)
    for dtype, tol in (("float32", 1e-4), ("bfloat16", 5e-2)):
        runs = {}
        for graphs in (False, True):
            m = serve(tmp_path, device="cuda", dtype=dtype, cuda_graphs=graphs,
                      prefetch="none")
            runs[graphs] = generate(m, PROMPTS, NEW, keep_logits=True)
        assert m.graphs.captured >= 2 and m.graphs.replayed > m.graphs.captured
        for a, b, ta, tb in zip(runs[True].logits, runs[False].logits, runs[True].token_ids,
                                runs[False].token_ids, strict=True):
            n = min(len(ta), len(tb))
            n = next((j + 1 for j in range(n) if ta[j] != tb[j]), n)
            torch.testing.assert_close(a[:n], b[:n], rtol=tol, atol=tol)
        if dtype == "float32":
            assert runs[True].token_ids == runs[False].token_ids
