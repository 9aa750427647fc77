"""How a row's next token is drawn: its sampling settings (temperature / top-k / top-p with a
seed, penalties, logit biases, a grammar, stop-token rules, log-probabilities), the logits
adjustments they make, greedy or seeded sampling per row, and the log-probabilities kept."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

MAX_LOGPROBS = 20  # most alternatives a row may ask for


@dataclass
class SamplingConfig:
    """temperature 0: greedy. top_k 0 and top_p 1: off. seed: None draws a fresh one.
    logprobs: None, or keep each chosen token's log-probability and the `logprobs` most
    likely tokens' (of the model's distribution, before penalties, biases, temperature, top-k
    and top-p). prompt_logprobs: also keep each prompt token's log-probability after those
    before it.

    Before temperature (greedy too), the logits are adjusted (`adjust_logits`):
    repetition_penalty p (transformers' / CTRL's): a token of the prompt or of the answer so
    far has its logit divided by p when positive, multiplied by p when negative (1: off);
    presence_penalty a and frequency_penalty f (OpenAI's, in [-2, 2]): a token the answer
    holds c > 0 times loses a + f c; logit_bias {id: b} (OpenAI's, b in [-100, 100]) adds b.
    grammar: a serve.grammar.AnswerGrammar (Session.grammar) the answer must follow: the
    tokens it cannot take next are masked out, after the penalties.
    min_tokens: stop tokens cannot be drawn before the answer has this many tokens;
    ignore_eos: a stop token does not end the answer (fixed-length benchmarks).
    prediction: token ids the answer is expected to be much like (OpenAI's predicted
    outputs: the file an edit rewrites), drafted for speculation (serve.speculate.predicted);
    the answer is the model's whatever they are."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: bool = False  # keep each prompt token's log-probability (Row)
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    grammar: object | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    prediction: tuple[int, ...] | None = None

    @property
    def adjusts(self) -> bool:
        """Whether any penalty or bias changes the logits."""
        return (self.repetition_penalty != 1 or self.presence_penalty != 0
                or self.frequency_penalty != 0 or bool(self.logit_bias))

    def generator(self, device: torch.device) -> torch.Generator | None:
        """A generator seeded with `seed` (a fresh seed when None); None when greedy."""
        if self.temperature == 0:
            return None
        gen = torch.Generator(device=device)
        gen.manual_seed(self.seed if self.seed is not None else
                        int(torch.randint(0, 2**62, ()).item()))
        return gen

    def check(self, vocab_size: int | None = None) -> None:
        """ValueError naming the first setting out of range (logit_bias ids: in the
        vocabulary, when vocab_size is given)."""
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.min_tokens and self.grammar is not None:
            raise ValueError("min_tokens cannot be combined with a response format: the "
                             "grammar may need a stop token sooner")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.prediction is not None and vocab_size is not None and any(
                not 0 <= t < vocab_size for t in self.prediction):
            raise ValueError(f"prediction holds token ids outside the vocabulary "
                             f"[0, {vocab_size})")
        for t, b in (self.logit_bias or {}).items():
            if not isinstance(t, int) or isinstance(t, bool) or t < 0 or (
                    vocab_size is not None and t >= vocab_size):
                raise ValueError(f"logit_bias token id {t!r} is not in the vocabulary"
                                 + (f" [0, {vocab_size})" if vocab_size else ""))
            if not -100 <= b <= 100:
                raise ValueError(f"logit_bias of token {t} must be in [-100, 100], got {b}")


def seeded_rows(sampling: SamplingConfig, n: int) -> list[SamplingConfig]:
    """One config per row: with a seed s, row i draws with s + i (unseeded: shared as is)."""
    if sampling.seed is None:
        return [sampling] * n
    return [replace(sampling, seed=sampling.seed + i) for i in range(n)]


def sample_next(logits: torch.Tensor, cfg: SamplingConfig,
                gen: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]: greedy, or sampled after temperature, top-k, top-p
    (applied in that order, as transformers does)."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    return torch.multinomial(sample_probs(logits, cfg), 1, generator=gen).squeeze(-1)


def sample_probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """logits [B, V] -> the distribution [B, V] a sampled row draws from: after temperature
    (> 0), top-k, top-p."""
    logits = logits / cfg.temperature
    if cfg.top_k:
        kth = logits.topk(min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= cfg.top_p  # keep the first token past p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits.softmax(-1)


def sample_rows(logits: torch.Tensor, cfgs: Sequence[SamplingConfig],
                gens: Sequence[torch.Generator | None]) -> list[int]:
    """logits [B, V] -> one token id per row, row b sampled by cfgs[b] with gens[b] (so a
    seeded row draws the same tokens whatever rows share its batch)."""
    greedy = [b for b, c in enumerate(cfgs) if c.temperature == 0]
    if len(greedy) == len(cfgs):
        return logits.argmax(-1).tolist()
    out = [0] * len(cfgs)
    if greedy:
        for b, t in zip(greedy, logits[greedy].argmax(-1).tolist(), strict=True):
            out[b] = t
    for b, c in enumerate(cfgs):
        if c.temperature > 0:
            out[b] = int(sample_next(logits[b:b + 1], c, gens[b]))
    return out


def adjust_logits(logits: torch.Tensor, cfg: SamplingConfig, prompt: Sequence[int],
                  out: Sequence[int]) -> torch.Tensor:
    """One row's logits [V] after cfg's repetition / presence / frequency penalties (over
    the prompt and the answer so far `out`) and logit biases (a new tensor)."""
    logits = logits.clone()
    dev = logits.device
    if cfg.repetition_penalty != 1:
        seen = torch.tensor(sorted(set(prompt) | set(out)), dtype=torch.long, device=dev)
        x = logits[seen]
        logits[seen] = torch.where(x > 0, x / cfg.repetition_penalty,
                                   x * cfg.repetition_penalty)
    if (cfg.presence_penalty or cfg.frequency_penalty) and out:
        ids, counts = torch.tensor(list(out), device=dev).unique(return_counts=True)
        logits[ids] -= cfg.presence_penalty + cfg.frequency_penalty * counts.to(logits.dtype)
    if cfg.logit_bias:
        ids = torch.tensor(list(cfg.logit_bias), dtype=torch.long, device=dev)
        logits[ids] += torch.tensor(list(cfg.logit_bias.values()), dtype=logits.dtype,
                                    device=dev)
    return logits


def token_logprobs(logits: torch.Tensor, tok: int, k: int
                   ) -> tuple[float, list[tuple[int, float]]]:
    """logits [V] -> (log p(tok), [(id, log p)] of the k most likely tokens)."""
    lp = logits.float().log_softmax(-1)
    top = lp.topk(k) if k else None
    alts = [] if top is None else list(zip(top.indices.tolist(), top.values.tolist(),
                                           strict=True))
    return float(lp[tok]), alts
