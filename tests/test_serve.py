"""Offloaded serving: greedy tokens and logits equal transformers' generate for tiny models of
eight families (and config variants: RoPE scalings, sliding windows, clipping), with and
without a budget, for every cache policy, with and without prefetch; tiers, quantization,
sampling, stop tokens and the errors users hit."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kernels.quant import dequantize, quantize  # noqa: E402
from serve.config import ServeConfig  # noqa: E402
from serve.generate import DecodeBatch, generate  # noqa: E402
from serve.prefetch_gate import PrefetchGate  # noqa: E402
from serve.runtime import BudgetError, OffloadedModel  # noqa: E402
from serve.sampling import SamplingConfig  # noqa: E402
from serve.store import ModelDirError  # noqa: E402
from serve.units import parse_size  # noqa: E402
from tests.hf_models import build_hf, hf_greedy, save_gpt_oss_mxfp4  # noqa: E402

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3",
            "glm4_moe", "glm4_moe_lite", "dots1", "gpt_oss", "ernie4_5_moe", "minimax_m2"]
NEW = 8


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    """family -> (family, model dir, prompts, transformers' greedy tokens [B, NEW], logits),
    built once per module."""
    cache = {}

    def get(family: str):
        if family not in cache:
            d = tmp_path_factory.mktemp(family)
            hf = build_hf(family)
            hf.save_pretrained(d, max_shard_size="40KB")  # sharded, with an index, as on the Hub
            gen = torch.Generator().manual_seed(1)
            a = torch.randint(1, 300, (9,), generator=gen).tolist()
            b = torch.randint(1, 300, (5,), generator=gen).tolist()
            ids = torch.tensor([a, [0] * 4 + b])  # left-padded batch
            mask = (torch.arange(9) >= torch.tensor([[0], [4]])).long()
            with torch.no_grad():
                ref = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW,
                                  do_sample=False, output_logits=True,
                                  return_dict_in_generate=True)
            cache[family] = (family, d, [a, b], ref.sequences[:, 9:].tolist(),
                             torch.stack(ref.logits, 1))
        return cache[family]

    return get


@pytest.fixture(params=FAMILIES)
def family_ref(request, refs):
    return refs(request.param)


def serve(model_dir, **kw) -> OffloadedModel:
    kw.setdefault("max_context", 64)
    kw.setdefault("max_batch", 2)
    kw.setdefault("dtype", "float32")  # parity at float32 tolerance, on cuda too
    # prefetch copies whatever it predicts: the copy path is what these tests check (the
    # precision gate, serve/prefetch_gate.py, has tests of its own)
    kw.setdefault("prefetch_min_precision", 0.0)
    return OffloadedModel(ServeConfig(model=str(model_dir), **kw))


def budget_for(model_dir, slots: int, **kw) -> int:
    """The budget that leaves exactly `slots` expert slots."""
    probe = serve(model_dir, **kw)
    return probe.fixed_bytes + slots * probe.slot_bytes


# Config options of real checkpoints that change the maths: RoPE scalings, sliding windows
# (every layer, or Qwen2-MoE's per-layer pattern), OLMoE's q/k/v clipping, DeepSeek's greedy
# routing, YaRN with its softmax correction and RoPE rows that are not interleaved.
VARIANTS = {
    "mixtral-window": ("mixtral", dict(sliding_window=5)),
    "mixtral-linear-rope": ("mixtral", dict(rope_parameters={
        "rope_type": "linear", "rope_theta": 10000.0, "factor": 3.0})),
    "qwen3-yarn-window": ("qwen3_moe", dict(
        use_sliding_window=True, sliding_window=6,
        rope_scaling={"rope_type": "yarn", "factor": 4.0,
                      "original_max_position_embeddings": 16})),
    "qwen2-window-some-layers": ("qwen2_moe", dict(use_sliding_window=True, sliding_window=4,
                                                   max_window_layers=3)),
    "olmoe-clip": ("olmoe", dict(clip_qkv=0.4)),
    "deepseek-v2-greedy-yarn": ("deepseek_v2", dict(topk_method="greedy", rope_scaling={
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "mscale": 0.707,
        "mscale_all_dim": 1.0})),
    "deepseek-v3-not-interleaved": ("deepseek_v3", dict(rope_interleave=False, n_group=1,
                                                        topk_group=1)),
    "gpt-oss-no-biases-full-attention": ("gpt_oss", dict(
        attention_bias=False, layer_types=["full_attention"] * 3)),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_variants_equal_transformers(tmp_path, variant):
    """Chunked prefill (chunks of 4) and decode in KV rows with different positions give
    transformers' greedy tokens and logits; so does the training model's import."""

    family, overrides = VARIANTS[variant]
    hf = build_hf(family, **overrides)
    hf.save_pretrained(tmp_path)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 300, (n,), generator=gen).tolist() for n in (11, 3)]
    m = serve(tmp_path, prefill_chunk=4, memory_budget=budget_for(tmp_path, 5))
    cfg = m.cfg
    if variant.startswith("gpt-oss"):
        assert cfg.sliding_window is None and not cfg.qkv_bias and not cfg.o_bias
    if "window" in variant:
        assert cfg.sliding_window is not None
        if variant.startswith("qwen2"):
            assert cfg.sliding_window_layers == [0, 2]
    if cfg.mla is not None:  # the cache holds latents, not every head's keys and values
        assert m.kv.v is None
        assert m.kv.k.shape[2:] == (1, 64, cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim)
    assert_generates_like(hf, m, prompts, 10)
    # one row alone: its decode steps run attention unmasked until a window hides keys
    assert_generates_like(hf, m, prompts[:1], 10)
    assert_imports_like(hf, tmp_path, torch.randint(0, 300, (2, 15), generator=gen))


def test_a_steps_context_masks_only_where_a_key_is_hidden(refs):
    """_context builds a step's indices on the host: one row's decode step needs no mask
    (until a window hides keys) and no gather of its positions; rows of two lengths and
    padded rows get masks and index tensors that say which positions are real; RoPE's cos /
    sin are the model's."""
    from moe.attention import rope_cos_sin

    m = serve(refs("mixtral")[1])
    one = torch.zeros(1, 1, dtype=torch.long)
    c = m._context(one, [0], [7], [1])
    assert c.full and c.sees_all and c.valid is None
    assert c.mask_for(None) is None and c.mask_for(8) is None
    assert c.mask_for(3)[0, 0, 0].tolist() == [False] * 5 + [True] * 3
    c = m._context(torch.zeros(2, 1, dtype=torch.long), [0, 1], [7, 3], [1, 1])
    assert c.full and not c.sees_all
    assert c.mask_for(None)[1, 0, 0].tolist() == [True] * 4 + [False] * 4
    c = m._context(torch.zeros(2, 3, dtype=torch.long), [0, 1], [0, 5], [3, 1])
    assert not c.full and not c.sees_all
    assert [t.tolist() for t in c.valid] == [[0, 0, 0, 1], [0, 1, 2, 0]]
    assert c.q_valid.tolist() == [[True] * 3, [True, False, False]]
    assert c.last.tolist() == [2, 0] and c.q_pos.tolist() == [[0, 1, 2], [5, 6, 7]]
    assert c.w_rows.tolist() == [0, 0, 0, 1] and c.w_pos.tolist() == [0, 1, 2, 5]
    mask = c.mask_for(None)  # every query, padding too, sees key 0 (no row of -inf only)
    assert mask.shape == (2, 1, 3, 6) and bool(mask[..., 0].all())
    assert mask[0, 0, 2].tolist() == [True] * 3 + [False] * 3
    cfg = m.cfg
    cos, sin = rope_cos_sin(c.q_pos.reshape(-1), cfg.rope_dim, cfg.rope_theta, m.dtype,
                            cfg.rope_scaling)
    assert torch.equal(c.cos.reshape(cos.shape), cos) and torch.equal(
        c.sin.reshape(sin.shape), sin)


def assert_generates_like(hf, m: OffloadedModel, prompts: list[list[int]], n: int):
    """Our batched greedy tokens and logits equal transformers' generate of each prompt
    alone -> our GenerationResult."""
    res = generate(m, prompts, n, keep_logits=True)
    for p, toks, logits in zip(prompts, res.token_ids, res.logits, strict=True):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False,
                              output_logits=True, return_dict_in_generate=True)
        assert toks == ref.sequences[0, len(p):].tolist()
        torch.testing.assert_close(logits, torch.cat(ref.logits), rtol=1e-4, atol=1e-4)
    return res


def assert_imports_like(hf, model_dir, ids: torch.Tensor) -> None:
    """model_dir imported into the training model gives hf's logits on ids."""
    from moe.hf_import import import_hf
    from moe.model import MoETransformer

    cfg, state = import_hf(model_dir)
    model = MoETransformer(cfg)
    model.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5)


def test_unsupported_config_options_are_refused(tmp_path):
    build_hf("qwen3_moe").save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    base = json.loads(path.read_text())
    for extra, match in [
            ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "'dynamic'.*not supp"),
            ({"rope_scaling": {"type": "longrope", "factor": 2.0}}, "'longrope'"),
            ({"rope_scaling": {"rope_type": "linear"}}, "linear RoPE scaling without a factor"),
            ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
            ({"attention_bias": True}, "attention_bias"),
            ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
            ({"quantization_config": {"quant_method": "gptq"}}, "quantized checkpoint.*'gptq'"),
            ({"quantization_config": {"quant_method": "fp8"}}, "per-tensor FP8"),
            ({"mlp_bias": True}, "mlp_bias")]:
        path.write_text(json.dumps({**base, **extra}))
        with pytest.raises(ModelDirError, match=match):
            serve(tmp_path)
    build_hf("ernie4_5_moe").save_pretrained(tmp_path)  # ERNIE-4.5's own options
    base = json.loads(path.read_text())
    for extra, match in [
            ({"use_bias": True}, "use_bias=true"),
            ({"moe_layer_start_index": [1, 1]}, "single integers"),
            ({"moe_layer_end_index": 1}, r"dense layers \[0, 2\] are not a leading block")]:
        path.write_text(json.dumps({**base, **extra}))
        with pytest.raises(ModelDirError, match=match):
            serve(tmp_path)


# Without a budget nothing is evicted, so the policies differ only under one.
SETTINGS = [(None, "lru")] + [(0.25, p) for p in ("lru", "lfu", "layer", "next-use")]


@pytest.mark.parametrize("prefetch", ["none", "cross-layer"])
@pytest.mark.parametrize("fraction,policy", SETTINGS)
def test_greedy_tokens_and_logits_equal_transformers(family_ref, fraction, policy, prefetch):
    family, d, prompts, ref_ids, ref_logits = family_ref
    budget = None
    if fraction is not None:
        budget = budget_for(d, 4, prefetch=prefetch)  # 4 of the 16-24 experts
    m = serve(d, memory_budget=budget, cache_policy=policy, prefetch=prefetch)
    total = len(m.store.moe_layers) * 8
    assert m.n_slots == (4 if fraction else total)
    res = generate(m, prompts, NEW, keep_logits=True)
    assert res.token_ids == ref_ids
    torch.testing.assert_close(torch.stack(res.logits), ref_logits,
                               rtol=1e-4, atol=1e-4)
    st = res.stats
    assert st["bytes_to_device"] > 0 and 0 <= st["expert_hit_rate"] <= 1
    if fraction:
        assert st["expert_misses"] > 0 and st["expert_hit_rate"] < 1
    else:  # every expert is copied at most once
        assert st["expert_misses"] + st["experts_prefetched"] <= total
        assert st["expert_hit_rate"] > 0.5
    if prefetch == "none":
        assert st["experts_prefetched"] == 0 and st["prefetch_recall"] == 0
    else:
        assert st["experts_prefetched"] > 0
        assert 0 < st["prefetch_precision"] <= 1 and 0 < st["prefetch_recall"] <= 1


@pytest.mark.parametrize("prefetch", ["none", "cross-layer"])
def test_reader_threads_read_the_disk_tier_to_the_same_answers(family_ref, prefetch):
    """disk_readers: the experts read from the memory-mapped files (every one, on the CPU)
    by reader threads, several at once: transformers' tokens and logits, and the same
    copies as reading each in the serving thread."""
    family, d, prompts, ref_ids, ref_logits = family_ref
    budget = budget_for(d, 4, prefetch=prefetch)
    runs = {}
    for n in (0, 3):
        m = serve(d, memory_budget=budget, prefetch=prefetch, disk_readers=n)
        assert (m.cache._pool is not None) == (n > 0)
        runs[n] = generate(m, prompts, NEW, keep_logits=True)
        assert runs[n].token_ids == ref_ids
        torch.testing.assert_close(torch.stack(runs[n].logits), ref_logits,
                                   rtol=1e-4, atol=1e-4)
    for key in ("bytes_to_device", "expert_misses", "experts_prefetched"):
        assert runs[3].stats[key] == runs[0].stats[key], key


def test_a_failed_disk_read_is_raised_and_its_slot_not_served(refs, monkeypatch):
    """A reader's error surfaces in the step that needs the expert; the slot it was filling
    is not taken for that expert afterwards, so the next answer is right."""
    family, d, prompts, ref_ids, _ = refs("mixtral")
    m = serve(d, memory_budget=budget_for(d, 4), prefetch="none", disk_readers=2)
    real, calls = m.store.expert, []

    def flaky(i, e):
        calls.append((i, e))
        if len(calls) == 3:
            raise OSError("disk gone")
        return real(i, e)

    monkeypatch.setattr(m.store, "expert", flaky)
    with pytest.raises(OSError, match="disk gone"):
        generate(m, prompts, NEW)
    assert calls[2] not in m.cache.slot_of
    monkeypatch.setattr(m.store, "expert", real)
    assert generate(m, prompts, NEW).token_ids == ref_ids


def test_reader_threads_read_quantized_experts_from_their_file(refs):
    """int4 experts beyond RAM live in a file written at load; readers copy them packed."""
    family, d, prompts, _, _ = refs("mixtral")
    budget = budget_for(d, 3, quant="int4")
    runs = {n: generate(serve(d, quant="int4", memory_budget=budget, disk_readers=n),
                        prompts, NEW, keep_logits=True) for n in (0, 3)}
    assert runs[3].token_ids == runs[0].token_ids
    torch.testing.assert_close(torch.stack(runs[3].logits), torch.stack(runs[0].logits))
    assert runs[3].stats["bytes_to_device"] == runs[0].stats["bytes_to_device"]


@pytest.mark.parametrize("prefetch", ["none", "cross-layer"])
@pytest.mark.parametrize("family", ["mixtral", "deepseek_v2", "gpt_oss"])
def test_missing_experts_of_few_tokens_run_on_the_host(refs, family, prefetch):
    """host_compute_tokens: a missing expert that at most 2 of a step's (token, expert)
    pairs use runs on the host from its host copy instead of crossing to the device (shared
    experts, GPT-OSS's biases and clamped SwiGLU too) rather than evict a resident one:
    transformers' tokens and logits, with fewer bytes moved than copying every miss in."""
    family, d, prompts, ref_ids, ref_logits = refs(family)
    budget = budget_for(d, 4, prefetch=prefetch)
    got = {}
    for most in (0, 2):
        m = serve(d, memory_budget=budget, prefetch=prefetch, host_compute_tokens=most)
        res = generate(m, prompts, NEW, keep_logits=True)
        assert res.token_ids == ref_ids
        torch.testing.assert_close(torch.stack(res.logits), ref_logits, rtol=1e-4, atol=1e-4)
        got[most] = res.stats
    assert got[0]["experts_on_host"] == 0 < got[2]["experts_on_host"]
    assert got[2]["bytes_to_device"] < got[0]["bytes_to_device"]
    assert got[2]["expert_misses"] < got[0]["expert_misses"]
    # with a slot for every expert a miss evicts nothing: it is copied in, never run on the host
    roomy = generate(serve(d, prefetch=prefetch, host_compute_tokens=2), prompts, NEW)
    assert roomy.token_ids == ref_ids and roomy.stats["experts_on_host"] == 0


@pytest.mark.parametrize("family,block,kept", [("qwen3_moe", (16, 16), False),
                                              ("qwen3_moe", (8, 8), True),
                                              ("deepseek_v3", (16, 16), True)])
def test_fp8_checkpoints_serve_as_their_dequantized_weights(tmp_path, family, block, kept):
    """An FP8 block-scaled directory (as DeepSeek-V3 and Qwen3-FP8 ship) gives transformers'
    tokens and logits for its dequantized weights, under a budget, with the prefetcher. By
    default its experts stay FP8 in RAM, on the wire and in their slots, dequantized in the
    expert GEMMs (the same answers as dequantizing them when read; fewer bytes moved, more
    slots in the same budget), unless their sizes are not multiples of the block (then
    --quant fp8 is refused by name)."""
    from tests.hf_models import save_fp8

    ref = save_fp8(build_hf(family), tmp_path, block)
    prompt = [5, 17, 99, 3, 250, 41, 8]
    budget = budget_for(tmp_path, 4)
    m = serve(tmp_path, memory_budget=budget, prefetch="cross-layer")
    assert m.store.quant == ("fp8" if kept else "none") and m.store.fp8_block == block
    res = generate(m, [prompt], NEW, keep_logits=True)
    with torch.no_grad():
        want = ref.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False,
                            output_logits=True, return_dict_in_generate=True)
    assert res.token_ids == [want.sequences[0, len(prompt):].tolist()]
    torch.testing.assert_close(res.logits[0], torch.cat(want.logits), rtol=1e-4, atol=1e-4)
    if not kept:
        with pytest.raises(ModelDirError, match="not multiples of its block"):
            serve(tmp_path, quant="fp8")
        return
    assert m.n_slots == 4 and m.cache.w_in.fp8 == "e4m3"
    wide_m = serve(tmp_path, memory_budget=budget, prefetch="cross-layer", quant="none")
    assert wide_m.n_slots < m.n_slots  # float32 slots: four bytes a weight against one
    wide = generate(wide_m, [prompt], NEW, keep_logits=True)
    assert wide.token_ids == res.token_ids
    torch.testing.assert_close(wide.logits[0], res.logits[0], rtol=1e-6, atol=1e-6)
    moved = [r.stats["bytes_to_device"] / (r.stats["expert_misses"]
                                           + r.stats["experts_prefetched"]) for r in (res, wide)]
    assert moved[0] < 0.3 * moved[1]  # an fp8 byte and its scales against float32's 4
    host = generate(serve(tmp_path, memory_budget=budget, host_compute_tokens=2), [prompt],
                    NEW, keep_logits=True)  # the host widens its own copies
    assert host.stats["experts_on_host"] > 0 and host.token_ids == res.token_ids
    low = serve(tmp_path, memory_budget=budget_for(tmp_path, 6), miss_quant="int4",
                miss_quant_weight=1.0)
    assert generate(low, [prompt], NEW).stats["experts_low_precision"] > 0


def test_an_fp8_copy_of_a_sharded_checkpoint_keeps_its_layout_and_serves(tmp_path,
                                                                        monkeypatch):
    """write_fp8_checkpoint (moe-serve convert) over a sharded Mixtral: each linear weight
    becomes e4m3 codes with its scales in the same shard (the index says so), routers, norms
    and embeddings stay as they were, the tokenizer files come along, and the copy serves with
    its experts FP8 in their slots the answers of dequantizing it at read. A copy that fails
    half way leaves nothing behind."""
    from safetensors import safe_open

    from moe import hf_fp8
    from moe.hf_fp8 import fp8_quantizable, fp8_quantize, write_fp8_checkpoint

    src, dst = tmp_path / "src", tmp_path / "fp8"
    build_hf("mixtral").save_pretrained(src, max_shard_size="100KB")
    (src / "tokenizer_config.json").write_text("{}")
    done = write_fp8_checkpoint(src, dst, (8, 8), verbose=False)
    assert done["bytes_after"] < 0.5 * done["bytes_before"] and done["weights_fp8"] > 0
    assert (dst / "tokenizer_config.json").exists()
    where = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    was = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(where) == set(was) | {n + "_scale_inv" for n in where if n + "_scale_inv"
                                     in where}
    for name, shard in was.items():
        with safe_open(str(src / shard), "pt") as f, safe_open(str(dst / where[name]), "pt") as g:
            t, u = f.get_tensor(name), g.get_tensor(name)
            if fp8_quantizable(name, t):
                assert u.dtype == torch.float8_e4m3fn and where[name + "_scale_inv"] == shard
            else:
                assert torch.equal(t, u) and "_scale_inv" not in name, name
    assert any("gate.weight" in n and n + "_scale_inv" not in where for n in where)  # routers
    prompt = [5, 17, 99, 3, 250, 41, 8]
    m = serve(dst, memory_budget=budget_for(dst, 6), prefetch="cross-layer")
    assert m.store.quant == "fp8"
    got = generate(m, [prompt], NEW, keep_logits=True)
    wide = generate(serve(dst, quant="none"), [prompt], NEW, keep_logits=True)
    assert got.token_ids == wide.token_ids
    torch.testing.assert_close(got.logits[0], wide.logits[0], rtol=1e-5, atol=1e-5)
    only = tmp_path / "experts-fp8"  # attention and the rest as they were
    write_fp8_checkpoint(src, only, (8, 8), verbose=False, experts_only=True)
    where = json.loads((only / "model.safetensors.index.json").read_text())["weight_map"]
    scaled = {n[:-len("_scale_inv")] for n in where if n.endswith("_scale_inv")}
    assert scaled and all(".experts." in n for n in scaled)
    assert scaled == {n for n in was if ".experts." in n and n.endswith(".weight")}
    assert serve(only).store.quant == "fp8"
    with pytest.raises(ValueError, match="quantized already"):
        write_fp8_checkpoint(dst, tmp_path / "again")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        write_fp8_checkpoint(src, dst)
    calls = []

    def failing(*args):  # the third weight fails: nothing half-written is left
        calls.append(args)
        if len(calls) == 3:
            raise OSError("disk full")
        return fp8_quantize(*args)

    monkeypatch.setattr(hf_fp8, "fp8_quantize", failing)
    with pytest.raises(OSError, match="disk full"):
        write_fp8_checkpoint(src, tmp_path / "cut", verbose=False)
    assert not (tmp_path / "cut").exists() and not (tmp_path / "cut.partial").exists()


@pytest.mark.parametrize("policy", ["lru", "lfu", "layer", "next-use"])
def test_the_expert_trace_replays_to_the_caches_own_counts(tmp_path, policy):
    """--trace-experts: replaying the trace (serve/replay.py) at the run's slots and policy
    gives the device cache's own hits and misses, prefill and decode, for every policy; the
    fewest possible misses are no more than any policy's."""
    from serve.replay import fewest_misses, flat, replay
    from serve.trace import accesses, read_trace

    d = tmp_path / "m"
    build_hf("qwen3_moe").save_pretrained(d)
    trace = tmp_path / "trace.jsonl"
    m = serve(d, memory_budget=budget_for(d, 5), prefetch="none", cache_policy=policy,
              trace_experts=str(trace))
    generate(m, [[5, 17, 99, 3, 250, 41, 8], [7, 7, 1, 2]], NEW)
    m.trace.close()
    head, passes = read_trace(trace)
    assert head["moe_layers"] == m.store.moe_layers and len(passes) == 1 + NEW - 1
    assert [q["tokens"] for q in passes[1:]] == [2] * (NEW - 1)  # both rows, a token each
    everything = [(keys, True) for keys, _ in accesses(passes)]
    hits, misses = replay(everything, m.n_slots, policy, m.cfg.n_layers)
    st = m.cache.stats
    assert (hits, misses) == (st.hits, st.misses) and misses > 0
    assert fewest_misses(flat(everything), m.n_slots) <= misses
    with pytest.raises(ValueError, match="not an expert trace"):
        (tmp_path / "bad").write_text("{}\n")
        read_trace(tmp_path / "bad")


@pytest.mark.parametrize("family,every", [
    ("ernie4_5_moe", {"moe_layer_interval": 2}),
    ("qwen2_moe", {"decoder_sparse_step": 2, "mlp_only_layers": []})])
def test_moe_every_other_layer_serves_as_transformers(tmp_path, family, every):
    """MoE layers every second layer (ERNIE's moe_layer_interval, Qwen-MoE's
    decoder_sparse_step): transformers' greedy tokens, under a budget, with each MoE layer's
    experts predicted from the MoE layer before it."""
    hf = build_hf(family, num_hidden_layers=4, **every)
    hf.save_pretrained(tmp_path)
    prompt = [5, 17, 99, 3, 250, 41, 8]
    m = serve(tmp_path, memory_budget=budget_for(tmp_path, 4), prefetch="cross-layer")
    assert m.store.moe_layers == [1, 3]
    res = generate(m, [prompt], NEW)
    assert res.token_ids == [hf_greedy(hf, prompt, NEW)]
    assert res.stats["experts_prefetched"] > 0


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_packed_experts_run_on_the_host_as_on_the_device(refs, quant):
    """Quantized experts that run on the host are dequantized there: the tokens and logits of
    a run whose misses all cross to the device."""
    family, d, prompts, *_ = refs("olmoe")
    budget = budget_for(d, 4, quant=quant)
    runs = [generate(serve(d, memory_budget=budget, quant=quant, host_compute_tokens=most),
                     prompts, NEW, keep_logits=True) for most in (0, 4)]
    assert runs[1].stats["experts_on_host"] > 0
    assert runs[0].token_ids == runs[1].token_ids
    torch.testing.assert_close(torch.stack(runs[1].logits), torch.stack(runs[0].logits),
                               rtol=1e-4, atol=1e-4)


def test_host_compute_tokens_is_a_count():
    with pytest.raises(ValueError, match="host_compute_tokens must be >= 0"):
        ServeConfig(model="m", host_compute_tokens=-1).check()


def test_gpt_oss_mxfp4_checkpoint_serves_as_transformers_dequantizes_it(tmp_path):
    """A GPT-OSS directory as on the Hub (MXFP4 experts, quantization_config) gives the
    greedy tokens and logits of transformers loading it dequantized, under a budget with
    chunked prefill; its experts imported into the training model agree too; int8 on top
    stays close."""

    hf = build_hf("gpt_oss", intermediate_size=32)
    hf_dir = tmp_path / "bf16"
    hf.save_pretrained(hf_dir)
    save_gpt_oss_mxfp4(hf, tmp_path)
    ref = transformers.GptOssForCausalLM.from_pretrained(
        tmp_path, quantization_config=transformers.Mxfp4Config(dequantize=True),
        dtype=torch.float32).eval()
    ids = torch.randint(1, 300, (2, 15), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (ref(ids).logits - hf(ids).logits).abs().max() > 1e-3  # the experts changed
    prompts = [ids[0, :11].tolist(), ids[1, :4].tolist()]
    m = serve(tmp_path, prefill_chunk=4, memory_budget=budget_for(tmp_path, 5, quant="none"),
              quant="none")
    res = assert_generates_like(ref, m, prompts, NEW)
    assert_imports_like(ref, tmp_path, ids)
    q = generate(serve(tmp_path, quant="int8"), prompts, NEW, keep_logits=True)
    got, want = q.logits[0], res.logits[0]
    assert (got - want).norm() / want.norm() < 0.02
    with pytest.raises(ModelDirError, match="not one; use int4"):
        serve(hf_dir, quant="mxfp4")


def test_gpt_oss_mxfp4_experts_stay_packed(tmp_path):
    """--quant auto keeps an MXFP4 checkpoint's experts packed as stored, on the host, over
    the link and in their slots (a slot ~1/6 of float32), from RAM or from the disk tier,
    and gives the tokens and logits of decoding them at load."""
    hf = build_hf("gpt_oss", intermediate_size=32)
    save_gpt_oss_mxfp4(hf, tmp_path / "mx")
    prompts = [[5, 17, 33, 2, 90, 41, 7, 8, 9], [3, 4]]
    plain = serve(tmp_path / "mx", quant="none", memory_budget=budget_for(
        tmp_path / "mx", 5, quant="none"))
    want = generate(plain, prompts, NEW, keep_logits=True)
    for host in (10**9, 0):  # all experts in RAM, or none
        m = serve(tmp_path / "mx", host_budget=host, offload_dir=str(tmp_path / "off"),
                  memory_budget=budget_for(tmp_path / "mx", 5))
        assert m.store.quant == "mxfp4" and m.cache.w_in.fp4
        assert m.store.n_disk == (24 if host == 0 else 0)
        assert not (tmp_path / "off").exists()  # the disk tier is the checkpoint itself
        assert m.slot_bytes * 5 < plain.slot_bytes
        got = generate(m, prompts, NEW, keep_logits=True)
        assert got.token_ids == want.token_ids
        torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits),
                                   rtol=1e-5, atol=1e-5)
        assert got.stats["bytes_to_device"] * 4 < want.stats["bytes_to_device"]


def test_a_dense_layer_before_the_first_moe_layer_prefetches_for_it(tmp_path):
    """DeepSeek / GLM start with dense layers: the one before the first MoE layer applies
    that layer's gate to its residual stream, so even a model whose only MoE layer comes
    after a dense one prefetches (and still gives transformers' tokens)."""
    hf = build_hf("deepseek_v3", num_hidden_layers=2)  # dense, then MoE
    hf.save_pretrained(tmp_path)
    prompt = torch.randint(1, 300, (6,), generator=torch.Generator().manual_seed(5)).tolist()
    ref = hf_greedy(hf, prompt, 8)
    for prefetch in ("none", "cross-layer"):
        m = serve(tmp_path, prefetch=prefetch,
                  memory_budget=budget_for(tmp_path, 3, prefetch=prefetch))
        assert m.store.moe_layers == [1] and m.next_moe == {0: 1}
        res = generate(m, [prompt], 8)
        assert res.token_ids == [ref]
        st = res.stats
        if prefetch == "none":
            assert st["experts_prefetched"] == 0
        else:
            assert st["experts_prefetched"] > 0 and st["prefetch_recall"] > 0


@pytest.mark.parametrize("slots", [8, 3])
def test_a_long_prompt_is_read_layer_by_layer(refs, slots):
    """Read in chunks of 4 with no row decoding, a prompt's chunks pass each layer before the
    next, and the layer's experts serve all of them a group of slots at a time: under a
    budget of one layer's experts (8) or fewer (3), every expert moves once per layer, as
    when the prompt is one chunk, where chunk after chunk through all layers moves them again
    for every chunk; the first token and its logits are transformers'."""
    family, d, *_ = refs("mixtral")
    prompt = torch.randint(1, 300, (24,), generator=torch.Generator().manual_seed(8)).tolist()
    misses = {}
    for name, chunk in (("layer by layer", 4), ("one chunk", 64), ("chunk by chunk", 4)):
        m = serve(d, memory_budget=budget_for(d, slots, prefetch="none", prefill_chunk=chunk),
                  prefetch="none", prefill_chunk=chunk, max_batch=1)
        if name == "chunk by chunk":  # each chunk through every layer, as a step reads it
            for a in range(0, len(prompt), chunk):
                m.step(torch.tensor([prompt[a:a + chunk]]), [0], [a], [chunk])
            misses[name] = m.stats()["expert_misses"]
            continue
        res = generate(m, [prompt], 1, keep_logits=True)
        misses[name] = res.stats["expert_misses"]
        hf = build_hf(family)
        with torch.no_grad():
            want = hf(torch.tensor([prompt])).logits[0, -1]
        torch.testing.assert_close(res.logits[0][0], want, rtol=1e-4, atol=1e-4)
    assert misses["layer by layer"] == misses["one chunk"] < misses["chunk by chunk"] / 2


def test_a_layer_split_in_groups_copies_only_its_missing_experts(tmp_path, monkeypatch):
    """When a layer's experts outnumber the slots (3 here, for a one-layer model: a 2-row
    decode step names up to 4 experts), its resident experts serve first, so the copies of
    the later groups evict none of them before their use: each step misses exactly the
    experts that were not resident when it started, and the tokens stay transformers'."""
    hf = build_hf("mixtral", num_hidden_layers=1)
    hf.save_pretrained(tmp_path)
    m = serve(tmp_path, memory_budget=budget_for(tmp_path, 3, prefetch="none"),
              prefetch="none")
    steps = []
    run = OffloadedModel._in_groups

    def spy(self, i, experts, cache, *a, **k):
        before, absent = cache.stats.misses, sum(not cache.resident((i, e)) for e in experts)
        n = run(self, i, experts, cache, *a, **k)
        steps.append((n, absent, cache.stats.misses - before))
        return n

    monkeypatch.setattr(OffloadedModel, "_in_groups", spy)
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, 300, (n,), generator=gen).tolist() for n in (3, 5)]
    assert generate(m, prompts, 16).token_ids == [hf_greedy(hf, p, 16) for p in prompts]
    assert any(n > 1 and 0 < absent < 3 for n, absent, _ in steps)  # hits and misses split
    assert [got for *_, got in steps] == [absent for _, absent, _ in steps]


def test_a_prompt_joining_running_rows_is_read_in_their_decode_forward(refs):
    """A prompt that arrives while a row decodes is read whole in the step that decodes it,
    one forward for both: under a budget of one layer's experts (8 of 3 x 8; prefetch off)
    every expert crosses once per layer for the prompt's six chunks and the decode token
    (24 copies at most), where a chunk a step, each beside a decode forward of its own, moves
    them again and again; both give the tokens they give alone."""
    family, d, *_ = refs("mixtral")
    gen = torch.Generator().manual_seed(9)
    first, second = (torch.randint(1, 300, (n,), generator=gen).tolist() for n in (5, 24))
    kw = dict(prefetch="none", prefill_chunk=4, max_batch=2)
    m = serve(d, memory_budget=budget_for(d, 8, **kw), **kw)
    alone = [generate(m, [p], 6).token_ids[0] for p in (first, second)]
    misses = {}
    for joint in (True, False):
        batch = DecodeBatch(m, reuse_prefix=False, joint=joint)
        rows = batch.add([first], [6])
        batch.step()
        rows += batch.add([second], [6])
        before = m.counters()["misses"]
        steps = 0
        while rows[1].pending:
            batch.step()
            steps += 1
        misses[joint] = m.counters()["misses"] - before
        assert steps == (1 if joint else 6)
        while batch.live:
            batch.step()
        assert [r.out for r in rows] == alone
    assert misses[True] <= 24 < misses[False] / 2


def test_prefetch_raises_the_hit_rate_and_counts_bytes(tmp_path):
    build_hf("mixtral").save_pretrained(tmp_path)
    budget = budget_for(tmp_path, 12)
    prompts = [[5, 17, 33, 2, 90, 41]]
    rates = {}
    for pf in ("none", "cross-layer"):
        m = serve(tmp_path, memory_budget=budget, prefetch=pf, max_batch=1)
        st = generate(m, prompts, 12).stats
        rates[pf] = st["expert_hit_rate"]
        # every miss or prefetch moved exactly one expert
        assert st["bytes_to_device"] == m.store.expert_nbytes * (
            st["expert_misses"] + st["experts_prefetched"])
    assert rates["cross-layer"] > rates["none"]


def mixtral_at_12_slots(tmp_path):
    """A tiny Mixtral saved to tmp_path -> (it, the budget of 12 expert slots, a prompt,
    transformers' 10 greedy tokens after it)."""
    hf = build_hf("mixtral")
    hf.save_pretrained(tmp_path)
    prompt = [5, 17, 33, 2, 90, 41]
    return hf, budget_for(tmp_path, 12), prompt, hf_greedy(hf, prompt, 10)


def test_prefetch_of_part_of_each_expert_copies_the_rest_when_used(tmp_path):
    """prefetch_fraction 0.5: each predicted expert's first half is copied ahead, the rest
    when its layer uses it; a wrong prediction moved only that half. The cache makes the
    same choices as with whole copies, the tokens stay transformers', and the bytes are the
    whole copies' less the unused halves. Quantized slots are copied whole."""
    hf, budget, prompt, ref = mixtral_at_12_slots(tmp_path)
    st = {}
    for fraction in (1.0, 0.5):
        m = serve(tmp_path, memory_budget=budget, max_batch=1, prefetch_fraction=fraction)
        res = generate(m, [prompt], 10)
        assert res.token_ids == [ref]
        st[fraction] = res.stats
    whole, half = st[1.0], st[0.5]
    for key in ("expert_hits", "expert_misses", "experts_prefetched"):
        assert half[key] == whole[key] > 0, key
    completed = m.cache.stats.completed
    assert 0 < completed < half["experts_prefetched"]  # some predictions right, some wrong
    part = m.cache._rows_nbytes(m.cache._part_rows(0.5))
    nbytes = m.store.expert_nbytes
    assert 0.5 * nbytes <= part < 0.6 * nbytes
    assert half["bytes_to_device"] == whole["bytes_to_device"] - (
        half["experts_prefetched"] - completed) * (nbytes - part)
    q = serve(tmp_path, memory_budget=budget, max_batch=1, prefetch_fraction=0.5, quant="int8")
    qs = generate(q, [prompt], 10).stats
    assert q.cache.stats.completed == 0 and qs["bytes_to_device"] == q.store.expert_nbytes * (
        qs["expert_misses"] + qs["experts_prefetched"])
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match="prefetch_fraction"):
            serve(tmp_path, prefetch_fraction=bad)


def test_prefetch_min_weight_copies_only_confident_predictions(tmp_path):
    """prefetch_min_weight: only experts predicted with at least that weight are copied
    ahead (top-2 renormalised: a bar of 0.5 keeps each token's first choice, one above 1
    keeps none); the tokens stay transformers'."""
    hf, budget, prompt, ref = mixtral_at_12_slots(tmp_path)
    got = {}
    for bar in (0.0, 0.5, 1.01):
        m = serve(tmp_path, memory_budget=budget, max_batch=1, prefetch_min_weight=bar)
        res = generate(m, [prompt], 10)
        assert res.token_ids == [ref]
        got[bar] = (m.prefetch_stats.predicted, res.stats["experts_prefetched"])
    assert got[0.0][0] > got[0.5][0] > 0
    assert got[1.01] == (0, 0)
    # the experts named for 5 tokens' hidden states: every top-2 choice, or (bar 0.5, top-2
    # weights renormalised) each token's first choice only
    x = torch.randn(5, hf.config.hidden_size, generator=torch.Generator().manual_seed(2))
    nxt = m.model.layers[1]
    ids, _ = nxt.mlp.router.select(nxt.mlp_norm(x))
    for bar, want in ((0.0, set(ids.flatten().tolist())), (0.5, set(ids[:, 0].tolist()))):
        m.scfg.prefetch_min_weight = bar
        m._prefetch_next(0, x, set())
        assert m._predicted[1] == want
    with pytest.raises(ValueError, match="prefetch_min_weight"):
        serve(tmp_path, prefetch_min_weight=-0.1)


def test_experts_from_ram_tier_and_disk_tier_give_the_same_tokens(refs):
    family, d, prompts, ref_ids, _ = refs("mixtral")
    probe = serve(d)
    for host in (0, 5 * probe.store.expert_nbytes, None):
        m = serve(d, host_budget=host if host is not None else 10**9)
        assert m.store.n_host == (0 if host == 0 else 5 if host else 24)
        assert generate(m, prompts, NEW).token_ids == ref_ids


@pytest.mark.parametrize("quant,bits,tol", [("int8", 8, 0.02), ("int4", 4, 0.2)])
def test_quantized_experts_move_fewer_bytes_and_stay_close(refs, tmp_path, quant, bits, tol):
    family, d, prompts, ref_ids, ref_logits = refs("qwen2_moe")
    full = serve(d)
    m = serve(d, quant=quant, host_budget=3 * full.store.expert_nbytes // 2,
              offload_dir=str(tmp_path), memory_budget=budget_for(d, 6, quant=quant))
    assert m.store.n_disk > 0 and list(tmp_path.glob("*.safetensors"))
    assert m.store.expert_nbytes < full.store.expert_nbytes * (bits / 32 + 0.1)
    res = generate(m, prompts, NEW, keep_logits=True)
    got = torch.stack(res.logits)
    rel = (got - ref_logits).norm() / ref_logits.norm()
    assert rel < tol, f"{quant} logits rel. error {rel:.3g}"


def test_temporary_quantized_disk_tier_is_removed_with_its_model(refs):
    import gc

    _, d, prompts, _, _ = refs("mixtral")
    m = serve(d, quant="int8", host_budget=0)
    root = m.store.offload_root
    assert m.store.n_disk == 24 and list(root.glob("*.safetensors"))
    generate(m, prompts, 2)
    del m
    gc.collect()
    assert not root.exists(), f"{root} left behind"


@pytest.mark.parametrize("quant,gain", [("int8", 3), ("int4", 5)])
@pytest.mark.parametrize("prefetch", ["none", "cross-layer"])
def test_quantized_experts_stay_packed_in_more_slots(refs, quant, gain, prefetch):
    """Packed slots: an int8 / int4 slot takes >= gain x fewer bytes than a float32 one, and
    evicting and refilling them (3 slots of 24) gives the logits of holding them all."""
    family, d, prompts, _, _ = refs("mixtral")
    budget = budget_for(d, 3, quant=quant, prefetch=prefetch)
    packed, plain = serve(d, quant=quant), serve(d)
    assert packed.slot_bytes == packed.store.expert_nbytes
    assert packed.slot_bytes * gain <= plain.slot_bytes
    few = serve(d, quant=quant, memory_budget=budget, prefetch=prefetch)
    full = serve(d, quant=quant)
    assert few.n_slots == 3 and full.n_slots == 24
    got = generate(few, prompts, NEW, keep_logits=True)
    want = generate(full, prompts, NEW, keep_logits=True)
    assert got.stats["expert_misses"] > 0
    assert got.token_ids == want.token_ids
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits),
                               rtol=1e-5, atol=1e-5)


# SwiGLU also runs over the unkept rows of a chunk (never read after); under the interpreter
# their uninitialised memory can overflow numpy's float32 and warn.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("quant", ["none", "int4"])
def test_triton_kernels_serve_like_the_torch_path(refs, quant):
    """The GPU path (Triton routing, sort, grouped GEMMs with in-kernel dequantization, under
    the interpreter here) against the torch path, with 3 slots of 24 and prefetch."""
    pytest.importorskip("triton")
    family, d, prompts, _, _ = refs("mixtral")
    budget = budget_for(d, 3, quant=quant)
    runs = {b: generate(serve(d, quant=quant, memory_budget=budget, kernel_backend=b),
                        prompts, 4, keep_logits=True) for b in ("torch", "triton")}
    assert runs["triton"].token_ids == runs["torch"].token_ids
    torch.testing.assert_close(torch.stack(runs["triton"].logits),
                               torch.stack(runs["torch"].logits), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_roundtrip(bits):
    w = torch.randn(37, 75)  # columns off the group size
    q = quantize(w, bits)
    back = dequantize(q, torch.float32)
    assert back.shape == w.shape
    rel = ((back - w).norm() / w.norm()).item()
    assert rel < (0.01 if bits == 8 else 0.12), rel
    assert q.nbytes < w.nbytes * (bits / 32 + 0.12)


def test_parse_size():
    assert parse_size("300KiB") == 300 * 1024
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("8GiB") == 8 * 2**30
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("1234") == 1234
    assert parse_size("1.5k") == 1536
    for bad in ("", "12XB", "-3", "GiB"):
        with pytest.raises(ValueError, match="invalid size"):
            parse_size(bad)


def test_sampling_is_seeded_and_top_k_1_is_greedy(refs):
    family, d, prompts, ref_ids, _ = refs("olmoe")
    m = serve(d)
    s = SamplingConfig(temperature=0.9, top_p=0.9, seed=7)
    a = generate(m, prompts, NEW, s).token_ids
    assert a == generate(m, prompts, NEW, SamplingConfig(temperature=0.9, top_p=0.9,
                                                           seed=7)).token_ids
    # prompt b draws with seed + b: the second row is what it draws alone with seed 8
    assert a[1] == generate(m, prompts[1:], NEW, SamplingConfig(temperature=0.9, top_p=0.9,
                                                                seed=8)).token_ids[0]
    assert generate(m, prompts, NEW, SamplingConfig(1.0, top_k=1, seed=3)).token_ids == ref_ids
    assert generate(m, prompts, NEW, SamplingConfig(1.0, top_p=1e-6, seed=3)).token_ids == \
        ref_ids
    # logprobs kept change nothing drawn; each token's is among its row's distribution
    kept = generate(m, prompts, NEW, SamplingConfig(temperature=0.9, top_p=0.9, seed=7,
                                                    logprobs=2))
    assert kept.token_ids == a
    for ids, lps in zip(a, kept.logprobs, strict=True):
        assert len(lps) == len(ids)
        for lp, alts in lps:
            assert len(alts) == 2 and alts[0][1] >= alts[1][1] and lp <= alts[0][1] + 1e-6
    with pytest.raises(ValueError, match="logprobs"):
        SamplingConfig(logprobs=21).check()


def test_sample_probs_is_transformers_warpers():
    """Temperature, then top-k, then top-p leave the distribution transformers' logits
    warpers leave; at ties on the top-p bound as many tokens (which of equal tokens is
    arbitrary): two tokens of mass 0.5 each under top_p 0.5 keep one, as transformers."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    from serve.sampling import sample_probs

    def warped(rows, t, k, p):
        want = TemperatureLogitsWarper(t)(None, rows.clone())
        want = TopKLogitsWarper(k)(None, want) if k else want
        return (TopPLogitsWarper(p)(None, want) if p < 1 else want).softmax(-1)

    g = torch.Generator().manual_seed(0)
    rows = torch.randn(6, 40, generator=g, dtype=torch.float64) * 3
    for t, k, p in ((1.0, 0, 0.5), (0.7, 0, 0.9), (1.3, 5, 1.0), (0.9, 3, 0.6), (1.0, 0, 0.25)):
        torch.testing.assert_close(sample_probs(rows, SamplingConfig(t, top_k=k, top_p=p)),
                                   warped(rows, t, k, p), atol=1e-12, rtol=0)
    ties = torch.tensor([[0.0, 0.0] + [-1e9] * 38, [1.0] * 4 + [0.0] * 36], dtype=torch.float64)
    for p in (0.5, 0.25, 0.75):
        kept = (sample_probs(ties, SamplingConfig(1.0, top_p=p)) > 0).sum(-1)
        assert kept.tolist() == (warped(ties, 1.0, 0, p) > 0).sum(-1).tolist(), p


def test_stop_token_ends_a_row(refs):
    family, d, prompts, ref_ids, _ = refs("qwen3_moe")
    stop = ref_ids[0][2]
    res = generate(serve(d), prompts, NEW, stop_ids=[stop])
    assert res.token_ids[0] == ref_ids[0][:ref_ids[0].index(stop) + 1]
    assert res.finish_reasons[0] == "stop"
    if stop not in ref_ids[1]:
        assert res.token_ids[1] == ref_ids[1] and res.finish_reasons[1] == "length"


@pytest.mark.parametrize("step_tokens", [None, 4])
def test_rows_joining_and_leaving_a_running_batch_match_running_alone(refs, step_tokens):
    """Continuous batching: sequences that start at different steps, in KV-cache rows that are
    not contiguous (a middle row ended), each give the tokens and logits they give alone; a
    long prompt is read whole (chunk by chunk, layer by layer) in the forward that decodes
    the running rows, or, with prefill_step_tokens, a chunk per step beside them; a freed row
    is reused (no prefix reuse: their runs alone left the prompts in the KV cache)."""
    family, d, _, _, _ = refs("qwen2_moe")
    kw = dict(max_batch=3, prefill_chunk=4, prefill_step_tokens=step_tokens)
    m = serve(d, memory_budget=budget_for(d, 6, **kw), **kw)
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, 300, (n,), generator=gen).tolist() for n in (7, 3, 11, 5)]
    limits = [12, 2, 6, 5]
    alone = [generate(m, [p], n, keep_logits=True) for p, n in zip(prompts, limits, strict=True)]
    batch = DecodeBatch(m, keep_logits=True, reuse_prefix=False)
    rows = batch.add(prompts[:1], limits[:1])
    batch.step()
    assert len(rows[0].out) == 1 and rows[0].length == 7  # both chunks of 7 tokens at once
    rows += batch.add(prompts[1:3], limits[1:3])
    batch.step()  # row 0 gains a token a step; row 2 reads its 11 tokens whole or 4 of them
    assert rows[0].length == 8 and rows[2].length == (11 if step_tokens is None else 4)
    for _ in range(2):
        batch.step()
    assert len(rows[0].out) == 4 and len(rows[2].out) == (3 if step_tokens is None else 1)
    assert rows[1].done and rows[1].out and [r.kv_row for r in batch.live] == [0, 2]
    rows += batch.add(prompts[3:], limits[3:])
    assert rows[3].kv_row == 1
    while batch.live:
        batch.step()
    for r, a in zip(rows, alone, strict=True):
        assert r.out == a.token_ids[0] and r.finish_reason == "length"
        torch.testing.assert_close(torch.stack(r.logits), a.logits[0], rtol=1e-4, atol=1e-4)
    assert rows[3].peak_batch == 3
    with pytest.raises(ValueError, match="2 prompts but 1 free rows of 3"):
        batch.add(prompts[:2], limits[:2])
        batch.add(prompts[:2], limits[:2])


def test_without_a_budget_the_free_device_memory_is_the_budget(refs, monkeypatch):
    """No --memory-budget: 90% of what the device has free; every expert gets a slot when all
    fit, as many as fit otherwise (same tokens), and a model that cannot fit is refused by
    name."""
    import serve.runtime as rt

    family, d, prompts, ref_ids, _ = refs("mixtral")
    probe = serve(d)
    assert probe.n_slots == 24  # this machine has room for all
    for free, slots in ((probe.fixed_bytes + 5.5 * probe.slot_bytes) / 0.9, 5), (2**40, 24):
        monkeypatch.setattr(rt, "free_memory", lambda dev, f=free: int(f))
        m = serve(d)
        assert m.n_slots == slots and "no budget given" in m.budget_report
        assert generate(m, prompts, NEW).token_ids == ref_ids
    monkeypatch.setattr(rt, "free_memory", lambda dev: probe.fixed_bytes)
    with pytest.raises(BudgetError, match="does not fit the .* free on cpu"):
        serve(d)


def test_the_cuda_memory_plan_counts_cublas_workspace(refs, monkeypatch):
    """On CUDA the plan counts the cuBLAS workspace that torch allocates through its caching
    allocator for the GEMMs (it is inside the device's peak): 32 MiB on Hopper and later,
    8 MiB + 128 KiB before, or what CUBLAS_WORKSPACE_CONFIG sets; and cuBLASLt's, 1 MiB or
    CUBLASLT_WORKSPACE_SIZE KiB."""
    from types import SimpleNamespace

    import serve.runtime as rt

    _, d, *_ = refs("mixtral")
    cfg = ServeConfig(model=str(d), memory_budget="1GiB")
    store = rt.WeightStore(d, torch.float32, "none", tiers=False)
    plain, slot, parts = rt.memory_plan(store, cfg, torch.float32, 1, 64)
    assert "cuBLAS" not in parts
    monkeypatch.setattr(rt, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.delenv("CUBLASLT_WORKSPACE_SIZE", raising=False)
    lt = 2**20
    for major, want in ((9, 32 * 2**20 + lt), (10, 32 * 2**20 + lt),
                        (8, 8 * 2**20 + 128 * 2**10 + lt)):
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda dev, m=major: SimpleNamespace(major=m))
        fixed, slot2, parts = rt.memory_plan(store, cfg, torch.float32, 1, 64)
        assert (fixed - plain, slot2) == (want, slot), major
        assert "cuBLAS workspace" in parts
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # deterministic mode's setting
    monkeypatch.setenv("CUBLASLT_WORKSPACE_SIZE", "4096")
    assert rt.memory_plan(store, cfg, torch.float32, 1, 64)[0] - plain == 128 * 2**10 + 4 * 2**20
    assert rt.cublas_workspace_bytes(torch.device("cuda"), ":4096:2:16:8") \
        == 8320 * 2**10 + 4 * 2**20


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ModelDirError, match="does not exist"):
        serve(tmp_path / "nope")
    d = tmp_path / "m"
    build_hf("mixtral").save_pretrained(d, max_shard_size="40KB")
    # a budget below the non-expert weights
    with pytest.raises(BudgetError, match="too small.*non-expert weights"):
        serve(d, memory_budget="10KiB")
    m = serve(d, max_context=16, max_batch=1)
    with pytest.raises(ValueError, match="longer than the context of 16"):
        generate(m, [list(range(1, 20))], 4)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(m, [[1, 2, 999]], 4)
    with pytest.raises(ValueError, match="3 max_new_tokens values for 2 prompts"):
        generate(m, [[1], [2]], [4, 4, 4])
    # more prompts than KV rows (1) take turns, each giving what it gives alone
    three = [[1, 2], [3, 4, 5], [6]]
    assert generate(m, three, 3).token_ids == [generate(m, [p], 3).token_ids[0] for p in three]
    # a partial directory: one shard gone
    part = tmp_path / "partial"
    shutil.copytree(d, part)
    shard = sorted(part.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ModelDirError, match=f"partial model directory.*{shard.name}"):
        serve(part)
    # a directory whose index was lost, leaving files that lack some tensors
    (part / "model.safetensors.index.json").unlink()
    with pytest.raises(ModelDirError, match="tensor\\(s\\) missing"):
        serve(part)
    # another architecture
    arch = tmp_path / "llama"
    arch.mkdir()
    (arch / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelDirError, match="unsupported architecture model_type='llama'"):
        serve(arch)
    with pytest.raises(ModelDirError, match="no config.json"):
        serve(tmp_path)


def test_a_row_runs_to_the_end_of_the_context_and_counts_its_decode(refs):
    """A row asked for more tokens than its context holds stops, finish reason "length",
    once its KV row is full: a 10-token prompt in a context of 16 feeds 6 tokens more and
    gets 7 (the last one is never fed), transformers' 7. A row's tokens/s counts the tokens
    after its first (which its prefill gave) over its decode time."""
    family, d, *_ = refs("mixtral")
    prompt = list(range(3, 13))
    m = serve(d, max_context=16, max_batch=1)
    res = generate(m, [prompt], 20)
    assert res.finish_reasons == ["length"]
    assert res.token_ids[0] == hf_greedy(build_hf(family), prompt, 7)
    batch = DecodeBatch(m)
    (row,) = batch.add([prompt], [5])
    while batch.live:
        batch.step()
    st = row.stats
    assert st["new_tokens"] == 5 and st["decode_s"] > 0
    assert st["tokens_per_s"] == pytest.approx(4 / st["decode_s"])


def test_cache_policies_pick_the_victim_they_promise():
    from serve.cache import LFU, LRU, POLICIES, LayerAware, NextUse
    from serve.config import CACHE_POLICIES

    keys = [(0, 1), (2, 1), (1, 3)]
    lru = LRU(n_layers=3)
    for k in keys + [(0, 1)]:
        lru.touch(k)
    assert lru.victim(keys) == (2, 1)  # touched longest ago
    lfu = LFU(n_layers=3)
    for k in [(0, 1), (0, 1), (2, 1), (2, 1), (1, 3), (0, 1)]:
        lfu.touch(k)
    assert lfu.victim(keys) == (1, 3)  # used once
    layer, lru = LayerAware(n_layers=3), LRU(n_layers=3)
    for k in [(0, 1), (2, 1), (1, 3), (1, 3)]:
        layer.touch(k)
        lru.touch(k)
    # (0, 1) is older (age 3 vs 2) but an expert of the deepest layer ages 1 + 2/3 times
    # faster, so LRU evicts (0, 1) and the layer-aware policy (2, 1)
    assert lru.victim([(0, 1), (2, 1)]) == (0, 1)
    assert layer.victim([(0, 1), (2, 1)]) == (2, 1)
    layer.touch((2, 1))
    for _ in range(3):  # a shallow expert unused for long enough still goes
        layer.touch((1, 3))
    assert layer.victim([(0, 1), (2, 1)]) == (0, 1)
    nxt, lru = NextUse(n_layers=4), LRU(n_layers=4)
    for k in [(0, 5), (1, 2), (2, 7), (3, 1), (0, 3), (1, 4)]:  # the next token is at layer 1
        nxt.touch(k)
        lru.touch(k)
    keys = [(0, 3), (1, 2), (2, 7), (3, 1)]
    # LRU evicts layer 2's expert, needed next; next-use the layer running now (1), then the
    # layers whose turn comes last (0, then 3)
    assert lru.victim(keys) == (1, 2)
    assert nxt.victim(keys) == (1, 2)
    assert lru.victim(keys[2:]) == (2, 7)
    assert nxt.victim(keys[2:] + [(0, 3)]) == (0, 3)
    assert nxt.victim([(3, 1), (2, 7)]) == (3, 1)
    assert nxt.victim([(1, 4), (1, 2)]) == (1, 2)  # within a layer: least recently used
    assert tuple(POLICIES) == CACHE_POLICIES  # what the CLI and config accept


def test_slot_pool_is_allocated_once(refs):
    _, d, prompts, _, _ = refs("mixtral")
    m = serve(d, memory_budget=budget_for(d, 5))
    ptrs = (m.cache.w_in.data_ptr(), m.cache.w_out.data_ptr(), m.kv.k.data_ptr())
    generate(m, prompts, NEW)
    generate(m, prompts[:1], NEW)
    assert (m.cache.w_in.data_ptr(), m.cache.w_out.data_ptr(), m.kv.k.data_ptr()) == ptrs
    assert len(m.cache.slot_of) == 5


GPT_OSS_PARTS = dict(attn_sinks=True, qkv_bias=True, o_bias=True, sliding_window=3,
                     sliding_window_layers=[1], moe=dict(expert_type="clamped_swiglu",
                                                         expert_bias=True, swiglu_limit=0.3))


@pytest.mark.parametrize("kw", [{}, {"qk_norm": True, "first_dense_layers": 1},
                                {"tie_embeddings": True}, GPT_OSS_PARTS])
def test_serves_our_own_exports(tmp_path, kw):
    from moe import ModelConfig, MoEConfig, MoETransformer
    from moe.hf_export import export_hf
    from routing import RouterConfig

    torch.manual_seed(0)
    kw = dict(kw)
    moe_kw = kw.pop("moe", {})
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2,
                      max_seq_len=32, dense_ffn=40, **kw,
                      moe=MoEConfig(num_experts=6, expert_ffn=24, kernel_backend="torch",
                                    router=RouterConfig(top_k=2), **moe_kw))
    ours = MoETransformer(cfg).eval()
    with torch.no_grad():  # biases and sinks that count
        for name, p in ours.named_parameters():
            if name.endswith(("bias", "b_in", "b_out", "sinks")):
                p.normal_(0, 0.5)
    export_hf(cfg, ours.state_dict(), tmp_path)
    ids = [3, 9, 27, 4]
    want = list(ids)
    with torch.no_grad():
        for _ in range(6):
            want.append(int(ours(torch.tensor([want])).logits[0, -1].argmax()))
    m = serve(tmp_path, max_batch=1, memory_budget=budget_for(tmp_path, 3, max_batch=1))
    assert generate(m, [ids], 6).token_ids[0] == want[len(ids):]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("quant", ["none", "int4"])
def test_device_memory_stays_under_the_budget(refs, quant):
    _, d, prompts, ref_ids, _ = refs("mixtral")
    budget = budget_for(d, 4, quant=quant)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    m = serve(d, memory_budget=budget, device="cuda", quant=quant)
    out = generate(m, prompts, NEW).token_ids
    if quant == "none":
        assert out == ref_ids
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base <= budget


def test_the_precision_gate_scores_predictions_without_copying_them(tmp_path):
    """prefetch_min_precision: below the bar a layer's predictions are scored but not copied
    (the same precision and recall as copying them: the predictions do not depend on the
    cache), the tokens stay transformers'; a layer whose recent predictions were right is
    copied again."""
    hf, budget, prompt, ref = mixtral_at_12_slots(tmp_path)
    st = {}
    for bar in (0.0, 1.0):  # copy always; copy only perfect predictions (none here)
        m = serve(tmp_path, memory_budget=budget, max_batch=1, prefetch_min_precision=bar)
        res = generate(m, [prompt], 10)
        assert res.token_ids == [ref]
        st[bar] = res.stats
    assert st[0.0]["experts_prefetched"] > 0 and st[0.0]["prefetch_withheld"] == 0
    assert st[1.0]["experts_prefetched"] == 0 and st[1.0]["prefetch_copied"] == 0
    assert st[1.0]["prefetch_withheld"] == st[0.0]["prefetch_copied"] > 0
    assert 0 < st[1.0]["prefetch_precision"] < 1
    for key in ("prefetch_precision", "prefetch_recall"):
        assert st[1.0][key] == st[0.0][key]
    assert st[1.0]["bytes_to_device"] < st[0.0]["bytes_to_device"]
    # the gate's own view of layer 2 (predicted from layer 1): scored, under the bar
    assert 0 < m.gate.precision(2) < 1 and not m.gate.allow(2)
    # on a fresh model (nothing resident), layer 1 (predicted from layer 0) after a run of
    # right predictions: copied ahead; layer 2 after wrong ones: not
    m = serve(tmp_path, memory_budget=budget, max_batch=1)
    m.gate = PrefetchGate(0.75, window=8, warmup=4)
    m.gate.record(1, 8, 8)
    m.gate.record(2, 8, 2)
    x = torch.randn(3, hf.config.hidden_size, generator=torch.Generator().manual_seed(4))
    m._prefetch_next(0, x, set())
    nxt = m.model.layers[1]
    named = set(nxt.mlp.router.select(nxt.mlp_norm(x))[0].flatten().tolist())
    assert m._predicted[1] == named and m.cache.stats.prefetched == len(named)
    assert all(m.cache.resident((1, e)) for e in named)
    before = m.cache.stats.prefetched
    m._prefetch_next(1, x, set())  # layer 2: withheld, kept as a mask on the device
    assert m.cache.stats.prefetched == before
    nxt = m.model.layers[2]
    named = set(nxt.mlp.router.select(nxt.mlp_norm(x))[0].flatten().tolist())
    assert set(m._predicted[2].nonzero().flatten().tolist()) == named


@pytest.mark.parametrize("bar", [0.0, 1.0])  # predictions copied / withheld (scored)
def test_a_moe_layer_reads_from_the_device_once(tmp_path, monkeypatch, bar):
    """The experts a layer uses, the next layer's prediction and this layer's withheld one
    come back to the host in one read (each read waits for the device), with the same
    tokens as transformers."""
    hf, budget, prompt, ref = mixtral_at_12_slots(tmp_path)
    m = serve(tmp_path, memory_budget=budget, max_batch=1, prefetch_min_precision=bar)
    reads = []
    tolist = torch.Tensor.tolist

    def counted(t):
        frame = sys._getframe(1)
        if frame.f_code.co_filename.endswith("serve/runtime.py"):
            reads.append(frame.f_code.co_name)
        return tolist(t)

    monkeypatch.setattr(torch.Tensor, "tolist", counted)
    res = generate(m, [prompt], 10)
    assert res.token_ids == [ref]
    steps, moe_layers = 10, sum(b.is_moe for b in m.model.layers)
    assert 0 < res.stats["prefetch_withheld" if bar else "prefetch_copied"]
    assert reads.count("_moe") == steps * moe_layers and set(reads) == {"_moe"}, reads[:12]


def test_attention_leaves_out_cudnn_whose_plans_are_per_shape(refs, monkeypatch):
    """The runtime's attention runs with cuDNN's SDPA backend disabled (it builds a plan for
    each new key count, and decode's grows every step: ~17 ms of host time a call on the
    H200), the flash, memory-efficient and math ones enabled; other code keeps them all."""
    import torch.nn.functional as F

    _, d, prompts, ref_ids, _ = refs("mixtral")
    seen, sdpa = [], F.scaled_dot_product_attention

    def spy(*a, **kw):
        b = torch.backends.cuda
        seen.append((b.cudnn_sdp_enabled(), b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(),
                     b.math_sdp_enabled()))
        return sdpa(*a, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    assert generate(serve(d), prompts, NEW).token_ids == ref_ids
    assert seen and set(seen) == {(False, True, True, True)}
    assert torch.backends.cuda.cudnn_sdp_enabled()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_expert_step_is_queued_without_waiting_for_the_device(tmp_path):
    """A layer's expert step (slot table, sort, grouped GEMMs, combine) returns while the
    device is still busy with what was queued before it (its expert copies, in serving): the
    host goes on to issue the next layer's work instead of leaving the PCIe link idle."""
    import time

    build_hf("mixtral").save_pretrained(tmp_path)
    m = serve(tmp_path, device="cuda")
    x = torch.randn(3, m.cfg.d_model, device="cuda")
    ids, w = m.model.layers[0].mlp.router.select(x)
    keys = [(0, e) for e in sorted(set(ids.flatten().tolist()))]
    slots = {e: s for (_, e), s in m.cache.acquire(keys).items()}
    m._experts(x, ids, w, slots)  # kernels built and picked
    torch.cuda.synchronize()
    torch.cuda._sleep(1_000_000_000)  # 0.5-3 s of device time queued ahead (by the clock)
    t0 = time.perf_counter()
    y = m._experts(x, ids, w, slots)
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    busy = time.perf_counter() - t0
    assert busy > 0.3 and host < 0.1 * busy, (host, busy)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("bar", [None, 0.0, 1.0])  # no prefetch; copied; withheld by the gate
def test_a_decode_step_reads_nothing_back_but_its_routing(tmp_path, bar, monkeypatch):
    """A decode step on the Triton backend (the GPU's launch sequence, under the CPU
    interpreter) runs no op that waits for the device: no boolean-mask indexing, nonzero,
    unique or item. Its waits are the small reads of each layer's routing (and, prefetching,
    its prediction) and of the sampled token, made with .tolist(), which this check does not
    see: a hidden wait would hold the host while the layer's expert copies run, and it
    could not queue the next layer's work."""
    from kernels.triton import pick
    from tests.host_sync import no_host_sync

    # every grouped GEMM picks among the implementations that read nothing back (on a GPU
    # the per-expert loop, which reads the rows per expert, could time fastest)
    picks, run = [], pick.run
    monkeypatch.setattr(pick, "run", lambda *a, **kw: picks.append(pick._no_host_waits)
                        or run(*a, **kw))
    build_hf("mixtral").save_pretrained(tmp_path)
    kw = dict(prefetch="none") if bar is None else dict(prefetch_min_precision=bar)
    # the experts in RAM, as on a GPU (the check cannot see through safetensors' mmap reads)
    m = serve(tmp_path, memory_budget=budget_for(tmp_path, 12), max_batch=1,
              kernel_backend="triton", host_budget=10**9, **kw)
    batch = DecodeBatch(m, capacity=1, reuse_prefix=False)
    batch.add([[5, 17, 33, 2]], [4])
    batch.step()  # the prompt
    before = m.counters()
    with no_host_sync():
        batch.step()  # a token
    moved = {k: v - before[k] for k, v in m.counters().items()}
    assert moved["hits"] + moved["misses"] > 0
    assert picks and all(picks)
    if bar is not None:
        assert moved["copied" if bar == 0 else "withheld"] == 2  # layers 1 and 2 predicted
