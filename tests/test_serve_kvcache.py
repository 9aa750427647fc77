"""The KV cache (serve/kvcache.py) with int8 entries (ServeConfig.kv_cache_dtype): each entry
read back within half a code step of what was written, about half the bytes of the compute
dtype in the memory plan (so more expert slots under a budget), and answers close to exact
serving's for plain, latent (MLA) and sink (GPT-OSS) attention."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from serve.config import ServeConfig  # noqa: E402
from serve.generate import generate  # noqa: E402
from serve.kvcache import KVCache, _dequantize, _quantize  # noqa: E402
from serve.runtime import OffloadedModel  # noqa: E402
from tests.hf_models import build_hf  # noqa: E402
from tests.seeds import fresh_seed  # noqa: E402


@pytest.mark.parametrize("dim", [8, 64, 128, 576])
def test_int8_entries_come_back_within_half_a_step(dim):
    g = torch.Generator().manual_seed(fresh_seed())
    vals = torch.randn(5, 3, dim, generator=g) * torch.logspace(-2, 2, dim)
    vals[0, 0] = 0  # a sink's zero entry stays zero
    codes, scale = _quantize(vals)
    assert codes.dtype == torch.int8 and scale.shape == (5, 3, max(1, dim // 64))
    back = _dequantize(codes, scale, torch.float32)
    step = scale.repeat_interleave(dim // scale.shape[-1], -1)
    assert ((back - vals).abs() <= step / 2 + 1e-7).all()
    assert torch.equal(back[0, 0], torch.zeros(dim))


def serve(d, **kw) -> OffloadedModel:
    return OffloadedModel(ServeConfig(model=str(d), max_context=64, max_batch=2,
                                      dtype="float32", **kw))


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_int8_kv_cache_answers_close_to_exact_in_fewer_bytes(tmp_path, family):
    """int8 entries: the cache's bytes are about half (codes + a float scale per 64
    channels or per head), the budget that held 4 expert slots holds more, and the logits of
    a batch (prefix reuse included) stay close to exact serving's."""
    build_hf(family).save_pretrained(tmp_path)
    exact = serve(tmp_path)
    budget = exact.fixed_bytes + 4 * exact.slot_bytes
    small = serve(tmp_path, memory_budget=budget)
    packed = serve(tmp_path, memory_budget=budget, kv_cache_dtype="int8")
    cfg = exact.cfg
    full = KVCache.nbytes(cfg, 2, 64, torch.float32)
    assert KVCache.nbytes(cfg, 2, 64, torch.float32, "int8") < 0.6 * full
    assert packed.n_slots > small.n_slots and "int8" in packed.budget_report
    assert packed.kv.k.dtype == torch.int8
    prompts = [[5, 17, 99, 3, 250, 41, 8], [5, 17, 99, 3, 12]]  # a shared start
    want = generate(small, prompts, 6, keep_logits=True)
    got = generate(packed, prompts, 6, keep_logits=True)
    for a, b in zip(got.logits, want.logits, strict=True):
        n = min(len(a), len(b))
        err = (a[:n] - b[:n]).abs().max() / b[:n].abs().max()
        assert 0 < err < 0.02, err
    again = generate(packed, [prompts[1]], 6, keep_logits=True)  # read from the held prefix
    assert again.stats["cached_tokens"] > 0
    torch.testing.assert_close(again.logits[0][0], got.logits[1][0], rtol=1e-3, atol=1e-3)


def test_kv_cache_dtype_is_checked():
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        ServeConfig(model="m", kv_cache_dtype="fp8").check()
