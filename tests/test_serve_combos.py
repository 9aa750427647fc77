"""The serving options together: settings drawn at random (fixed seeds) from every exact
option (cache policy, budget, prefetch and its gate, weight bar and fraction, prefill chunks
and step limit, prefix reuse, experts run on the host, disk readers, speculation, batch rows,
fixed-shape decode steps) over several model families and prompt sets. Each option has tests
of its own; these catch two of them that break each other. Greedy: transformers' tokens,
twice (the second time with warm slots and the prefix cache); sampled: each prompt of a
batch draws what it draws alone with its seed."""

from __future__ import annotations

import random

import pytest

pytest.importorskip("transformers")

from serve.config import ServeConfig  # noqa: E402
from serve.generate import generate  # noqa: E402
from serve.runtime import OffloadedModel  # noqa: E402
from serve.sampling import SamplingConfig  # noqa: E402
from tests.hf_models import build_hf, hf_greedy  # noqa: E402

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss",
            "glm4_moe")
CHOICES = {"max_batch": (1, 2, 3), "cache_policy": ("lru", "lfu", "layer", "next-use"),
           "prefetch": ("none", "cross-layer"), "prefetch_min_weight": (0.0, 0.0, 0.3),
           "prefetch_min_precision": (0.0, 0.75), "prefetch_fraction": (1.0, 1.0, 0.5),
           "prefill_chunk": (2, 3, 512), "prefix_cache": (True, False),
           "prefill_step_tokens": (None, None, 3), "host_compute_tokens": (0, 0, 1, 2),
           "disk_readers": (0, 2), "speculate": (0, 0, 2), "cuda_graphs": (False, True)}
SLOTS = (1, 2, 3, 5, 8, 12, None)  # None: every expert fits


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """family -> (its saved directory, the transformers model), built when first asked."""
    built = {}

    def get(family: str):
        if family not in built:
            d = tmp_path_factory.mktemp(family)
            hf = build_hf(family)
            hf.save_pretrained(d, max_shard_size="40KB")
            built[family] = (d, hf)
        return built[family]

    return get


def draw(rng: random.Random, d) -> tuple[OffloadedModel, list[list[int]], int, str]:
    """A model served with settings drawn by rng, prompts (some sharing a start) and a
    number of new tokens -> (model, prompts, new, the settings in words)."""
    kw = {k: rng.choice(v) for k, v in CHOICES.items()}
    kw = dict(model=str(d), device="cpu", dtype="float32", max_context=64,
              kernel_backend="torch", **kw)
    slots = rng.choice(SLOTS)
    if slots is not None:
        probe = OffloadedModel(ServeConfig(**kw))
        kw["memory_budget"] = probe.fixed_bytes + slots * probe.slot_bytes
    prompts: list[list[int]] = []
    for _ in range(rng.randrange(1, 5)):
        if prompts and rng.random() < 0.4:  # a start another prompt has
            p = prompts[0][:rng.randrange(1, len(prompts[0]) + 1)]
            p += [rng.randrange(1, 300) for _ in range(rng.randrange(0, 4))]
        else:
            p = [rng.randrange(1, 300) for _ in range(rng.randrange(1, 12))]
        prompts.append(p)
    said = f"slots={slots} " + " ".join(f"{k}={kw[k]}" for k in CHOICES)
    return OffloadedModel(ServeConfig(**kw)), prompts, rng.randrange(1, 8), said


@pytest.mark.parametrize("seed", range(36))
def test_greedy_settings_together_give_transformers_tokens(models, seed):
    rng = random.Random(seed)
    family = FAMILIES[seed % len(FAMILIES)]
    d, hf = models(family)
    m, prompts, new, said = draw(rng, d)
    want = [hf_greedy(hf, p, new) for p in prompts]
    assert generate(m, prompts, new).token_ids == want, f"{family} {said}"
    assert generate(m, prompts, new).token_ids == want, f"{family} {said} (again)"


@pytest.mark.parametrize("seed", range(9))
def test_sampled_rows_draw_as_alone_whatever_the_settings(models, seed):
    rng = random.Random(100 + seed)
    family = FAMILIES[(seed * 3) % len(FAMILIES)]
    d, _ = models(family)
    m, prompts, new, said = draw(rng, d)
    s = dict(temperature=rng.choice([0.7, 1.0]), top_k=rng.choice([0, 5]),
             top_p=rng.choice([1.0, 0.8]), repetition_penalty=rng.choice([1.0, 1.3]),
             min_tokens=rng.choice([0, 2]))
    alone = [generate(m, [p], new, SamplingConfig(seed=7 + b, **s)).token_ids[0]
             for b, p in enumerate(prompts)]
    assert generate(m, prompts, new, SamplingConfig(seed=7, **s)).token_ids == alone, \
        f"{family} {said} {s}"
