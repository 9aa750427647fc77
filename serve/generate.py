"""Token generation over an `OffloadedModel`: batched (left-padded) prompts, chunked prefill,
KV-cached decode, greedy or temperature / top-k / top-p sampling with a seed, stop tokens,
streaming through a callback."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from serve.runtime import OffloadedModel


@dataclass
class SamplingConfig:
    """temperature 0: greedy. top_k 0 and top_p 1: off. seed: None draws a fresh one."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def check(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class GenerationResult:
    """token_ids: the new tokens of each prompt (a stop token ends and is included);
    finish_reasons: "stop" or "length"; step_logits: [B, V] per step when asked for."""

    token_ids: list[list[int]]
    finish_reasons: list[str]
    stats: dict
    step_logits: list[torch.Tensor] = field(default_factory=list)


def sample_next(logits: torch.Tensor, cfg: SamplingConfig,
                gen: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]: greedy, or sampled after temperature, top-k, top-p
    (applied in that order, as transformers does)."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    logits = logits / cfg.temperature
    if cfg.top_k:
        kth = logits.topk(min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= cfg.top_p  # keep the first token past p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def check_prompts(model: OffloadedModel, prompts: Sequence[Sequence[int]]) -> None:
    if not prompts:
        raise ValueError("no prompt given")
    if len(prompts) > model.max_batch:
        raise ValueError(f"{len(prompts)} prompts exceed max_batch={model.max_batch}")
    V = model.cfg.vocab_size
    for p in prompts:
        if not p:
            raise ValueError("a prompt is empty")
        if len(p) > model.max_context:
            raise ValueError(f"prompt of {len(p)} tokens is longer than the context of "
                             f"{model.max_context} tokens")
        bad = [t for t in p if not 0 <= t < V]
        if bad:
            raise ValueError(f"token id(s) {bad[:5]} outside the vocabulary [0, {V})")


@torch.no_grad()
def generate(model: OffloadedModel, prompts: Sequence[Sequence[int]],
             max_new_tokens: int | Sequence[int], sampling: SamplingConfig | None = None,
             stop_ids: Sequence[int] = (),
             on_token: Callable[[int, int], bool | None] | None = None,
             keep_logits: bool = False) -> GenerationResult:
    """prompts (B lists of token ids) -> up to max_new_tokens new ids each (one int, or one
    per prompt); on_token(row, id) is called as each token is chosen and ends that row when it
    returns True."""
    sampling = sampling or SamplingConfig()
    sampling.check()
    check_prompts(model, prompts)
    limits = ([max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int)
              else list(max_new_tokens))
    if len(limits) != len(prompts):
        raise ValueError(f"{len(limits)} max_new_tokens values for {len(prompts)} prompts")
    if min(limits) < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {min(limits)}")
    dev, B = model.device, len(prompts)
    L = max(len(p) for p in prompts)
    total = min(L + max(limits), model.max_context)
    ids = torch.zeros(B, L, dtype=torch.long)
    valid = torch.ones(B, total, dtype=torch.bool)
    for b, p in enumerate(prompts):
        ids[b, L - len(p):] = torch.tensor(list(p))
        valid[b, :L - len(p)] = False
    ids, valid = ids.to(dev), valid.to(dev)
    gen = None
    if sampling.temperature > 0:
        gen = torch.Generator(device=dev)
        gen.manual_seed(sampling.seed if sampling.seed is not None else
                        int(torch.randint(0, 2**62, ()).item()))
    stops = set(stop_ids)
    model.reset_stats()
    t0 = time.perf_counter()
    logits = model.prefill(ids, valid)
    out: list[list[int]] = [[] for _ in range(B)]
    reasons = ["length"] * B
    done = [False] * B
    kept: list[torch.Tensor] = []
    pos, t_first = L, None
    while True:
        if keep_logits:
            kept.append(logits.cpu())
        nxt = sample_next(logits, sampling, gen)
        nxt_host = nxt.tolist()
        if t_first is None:
            model.synchronize()
            t_first = time.perf_counter()
        for b, t in enumerate(nxt_host):
            if done[b]:
                continue
            out[b].append(t)
            if on_token is not None and on_token(b, t):  # the caller saw a stop string
                done[b], reasons[b] = True, "stop"
            elif t in stops:
                done[b], reasons[b] = True, "stop"
            elif len(out[b]) >= limits[b]:
                done[b] = True
        if all(done) or pos >= total:
            break
        logits = model.step(nxt[:, None], pos, valid[:, :pos + 1])
        pos += 1
    model.synchronize()
    t_end = time.perf_counter()
    n_new = sum(len(o) for o in out)
    decode_s = t_end - t_first
    stats = {"prompt_tokens": sum(len(p) for p in prompts), "new_tokens": n_new,
             "ttft_s": t_first - t0, "decode_s": decode_s,
             "tokens_per_s": (n_new - B) / decode_s if decode_s > 0 and n_new > B else 0.0,
             "prefill_tokens_per_s": sum(len(p) for p in prompts) / (t_first - t0),
             **model.stats()}
    return GenerationResult(out, reasons, stats, kept)
