"""Skipping missing experts of low weight (ServeConfig.skip_miss_weight, serve/skip.py): which
experts go, how their tokens' weights move, and that the runtime computes exactly the MoE of
the routes so changed, copying fewer experts; off it is exact."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import serve.runtime as runtime  # noqa: E402
from serve.config import ServeConfig  # noqa: E402
from serve.generate import generate  # noqa: E402
from serve.runtime import OffloadedModel  # noqa: E402
from serve.skip import skip_missing  # noqa: E402
from tests.hf_models import hf_greedy, saved_hf  # noqa: E402


def test_a_missing_expert_goes_only_when_every_pair_weighs_little():
    ids = torch.tensor([[0, 1], [2, 1], [0, 3]])
    w = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.9, 0.1]])
    (out,), skipped = skip_missing([(ids, w)], [1, 3], 0.35, 4)
    assert skipped == {3}  # expert 1 has a pair of 0.4: it stays
    assert torch.equal(out[0], ids)
    torch.testing.assert_close(out[1], torch.tensor([[0.7, 0.3], [0.6, 0.4], [1.0, 0.0]]))
    # a token's first choice stays, however light (top-k weights not renormalized)
    light = (torch.tensor([[3, 0]]), torch.tensor([[0.2, 0.1]]))
    assert skip_missing([light], [3], 0.5, 4)[1] == set()
    ((_, w2),), skipped = skip_missing([light], [0], 0.5, 4)
    assert skipped == {0}
    torch.testing.assert_close(w2, torch.tensor([[0.3, 0.0]]))  # the same total weight
    # over every chunk of the step: a heavy pair in another chunk keeps the expert
    heavy = (torch.tensor([[1, 2]]), torch.tensor([[0.45, 0.55]]))
    assert skip_missing([(ids, w), heavy], [1, 3], 0.35, 4)[1] == {3}
    assert skip_missing([(ids, w)], [1, 3], 0.0, 4) == ([(ids, w)], set())
    assert skip_missing([(ids, w)], [], 0.9, 4)[1] == set()


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    d = tmp_path_factory.mktemp("skip")
    return saved_hf("mixtral", d, seed=2), d


def serve(d, **kw) -> OffloadedModel:
    return OffloadedModel(ServeConfig(model=str(d), max_context=64, dtype="float32", **kw))


def test_the_runtime_computes_the_moe_of_the_changed_routes(mixtral, monkeypatch):
    """A model with 4 of 24 slots that skips (bar 0.5: every missing second choice of a
    top-2 model) gives the logits of a model holding every expert whose routers return the
    routes the first one used; it copies fewer experts than exact serving."""
    hf, d = mixtral
    prompt = [5, 17, 99, 3, 250, 41]
    used = []  # the routes of each chunk of each MoE call, as changed, in order
    real = runtime.skip_missing

    def record(routes, missing, bar, n):
        out, skipped = real(routes, missing, bar, n)
        used.extend(out)
        return out, skipped

    monkeypatch.setattr(runtime, "skip_missing", record)
    budget = serve(d).fixed_bytes + 4 * serve(d).slot_bytes
    small = serve(d, memory_budget=budget, prefetch="none", skip_miss_weight=0.5)
    res = generate(small, [prompt], 8, keep_logits=True)
    assert res.stats["experts_skipped"] > 0
    exact = generate(serve(d, memory_budget=budget, prefetch="none"), [prompt], 8)
    assert exact.stats["experts_skipped"] == 0 and exact.token_ids == [hf_greedy(hf, prompt, 8)]
    assert res.stats["bytes_to_device"] < exact.stats["bytes_to_device"]
    monkeypatch.setattr(runtime, "skip_missing", real)
    # the same routes in a model that holds every expert, skips nothing and predicts nothing
    full = serve(d, prefetch="none")
    calls = iter(used)
    for block in full.model.layers:
        if block.is_moe:
            monkeypatch.setattr(block.mlp.router, "select", lambda f: next(calls))
    ref = generate(full, [prompt], 8, keep_logits=True)
    assert ref.token_ids == res.token_ids
    torch.testing.assert_close(ref.logits[0], res.logits[0], rtol=1e-5, atol=1e-5)


def test_the_prefetcher_copies_only_what_would_be_kept(mixtral):
    """With skipping on, the cross-layer prefetch names only predicted experts some token
    would keep (weight >= bar, or its first choice): at bar 0.5 of a top-2 model, first
    choices only, so fewer experts are predicted and fewer bytes move."""
    _, d = mixtral
    prompt = [5]  # one token a step, the prompt's too
    budget = serve(d).fixed_bytes + 4 * serve(d).slot_bytes
    runs, named = {}, {}
    for bar in (0.0, 0.5):
        m = serve(d, memory_budget=budget, skip_miss_weight=bar)
        runs[bar] = generate(m, [prompt], 8)
        named[bar] = m.counters()["predicted"]  # experts the predictor named, summed
    steps = 8 * 2  # 8 steps x 2 predicted MoE layers
    assert named[0.5] == steps  # its predicted first choice
    assert named[0.0] > steps
    assert runs[0.5].stats["bytes_to_device"] < runs[0.0].stats["bytes_to_device"]


def test_skip_miss_weight_is_a_weight():
    with pytest.raises(ValueError, match="skip_miss_weight must be a weight"):
        ServeConfig(model="m", skip_miss_weight=1.5).check()


def _round_trip_experts(hf, bits: int):
    """hf with each expert matrix replaced by its int<bits> round trip (kernels.quant: one
    scale per row and group, as a stand-in is quantized): quantizing it again changes
    nothing, so its low-precision stand-ins compute its own experts."""
    from kernels.quant import dequantize, quantize

    with torch.no_grad():
        for name, p in hf.named_parameters():
            if ".experts." in name:
                mats = p if p.dim() == 3 else p[None]
                for m in mats:  # [out, in] rows (transformers 5 stacks experts)
                    m.copy_(dequantize(quantize(m, bits), torch.float32))
    return hf


def test_stand_ins_run_the_light_missing_experts_from_their_quantized_copies(tmp_path):
    """miss_quant int8, bar 1 (every missing expert but a token's first choice): on a model
    whose experts survive an int8 round trip unchanged, the logits of exact serving, from
    fewer bytes; stand-ins counted, their pool in the memory plan."""
    hf = _round_trip_experts(saved_hf("mixtral", tmp_path / "a", seed=2), 8)
    hf.save_pretrained(tmp_path / "rt")
    d, prompt = tmp_path / "rt", [5, 17, 99, 3, 250, 41]
    base = serve(d)
    budget = base.fixed_bytes + 4 * base.slot_bytes
    exact = generate(serve(d, memory_budget=budget), [prompt], 8, keep_logits=True)
    assert exact.token_ids == [hf_greedy(hf, prompt, 8)]
    m = serve(d, memory_budget=budget, miss_quant="int8", miss_quant_weight=1.0)
    assert m.n_slots < 4 and "int8 stand-in slots" in m.budget_report  # its pool's room
    low = generate(m, [prompt], 8, keep_logits=True)
    assert low.stats["experts_low_precision"] > 0
    assert low.token_ids == exact.token_ids
    torch.testing.assert_close(low.logits[0], exact.logits[0], rtol=1e-4, atol=1e-4)
    per_expert = {m.slot_bytes, m.low_cache.store.expert_nbytes}
    assert len(per_expert) == 2 and m.low_cache.n_slots == 2  # top-2 x one row
    assert low.stats["bytes_to_device"] < exact.stats["bytes_to_device"]


def test_int4_stand_ins_move_fewer_bytes_and_stay_close(mixtral):
    """On a random model (not round-tripped) int4 stand-ins change the logits a little
    and move fewer bytes than exact serving; a bar no pair falls under changes nothing."""
    _, d = mixtral
    prompt = [5, 17, 99, 3, 250, 41]
    budget = serve(d).fixed_bytes + 6 * serve(d).slot_bytes
    exact = generate(serve(d, memory_budget=budget), [prompt], 8, keep_logits=True)
    low = generate(serve(d, memory_budget=budget, miss_quant="int4", miss_quant_weight=0.5),
                   [prompt], 8, keep_logits=True)
    assert low.stats["experts_low_precision"] > 0
    assert low.stats["bytes_to_device"] < exact.stats["bytes_to_device"]
    first = low.logits[0][0], exact.logits[0][0]  # the prompt's: the same routes before it
    assert 0 < (first[0] - first[1]).abs().max() < 0.1 * first[1].abs().max()
    none = generate(serve(d, memory_budget=budget, miss_quant="int4", miss_quant_weight=1e-6),
                    [prompt], 8, keep_logits=True)
    assert none.stats["experts_low_precision"] == 0 and none.token_ids == exact.token_ids


@pytest.mark.parametrize("kw,match", [
    ({"miss_quant": "int4"}, "go together"),
    ({"miss_quant_weight": 0.3}, "go together"),
    ({"miss_quant": "int2", "miss_quant_weight": 0.3}, "miss_quant must be one of"),
    ({"miss_quant": "int4", "miss_quant_weight": 2.0}, "must be a weight"),
    ({"miss_quant": "int4", "miss_quant_weight": 0.3, "quant": "int8"}, "packed already"),
    ({"miss_quant": "int4", "miss_quant_weight": 0.3, "miss_quant_slots": 0}, ">= 1")])
def test_bad_stand_in_settings_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        ServeConfig(model="m", **kw).check()
