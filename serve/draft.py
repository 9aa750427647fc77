"""A draft model for speculation (ServeConfig.draft_model): a small causal LM that shares the
served model's vocabulary (Qwen3-0.6B for Qwen3-30B-A3B, Mistral-7B for Mixtral), loaded
whole on the device by transformers, drafts a row's next tokens where prompt lookup finds
none (serve.generate.DecodeBatch._draft): greedily for a greedy row, drawn from its own
distribution under the row's temperature, top-k and top-p for a sampled one (which then
judges them by speculative sampling against it), stopping before a token it is unsure of
(ServeConfig.draft_min_prob). The served model verifies them in its step's one forward
(serve/speculate.py judges them), so an offloaded step that moves experts yields several
tokens where the drafts hold.

The draft keeps one KV cache per KV-cache row of the served model; a row's next draft feeds
only the tokens its cache lacks (the tokens kept since, or a new prompt's, less the start it
shares with what the cache holds), after dropping the drafts that were not kept.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from serve.runtime import common_prefix
from serve.sampling import sample_probs
from serve.speculate import Drafted


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ValueError("a draft model is loaded by transformers, which is not installed: "
                         "pip install 'moe-framework[draft]'") from None
    return transformers


def _config(path: str | Path):
    """The draft's transformers config (its text config for multimodal ones); ValueError
    names a directory it cannot read."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise ValueError(f"draft model {str(path)!r}: no config.json there (a Hugging Face "
                         "causal LM directory is expected)")
    try:
        cfg = _transformers().AutoConfig.from_pretrained(p)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"draft model {str(path)!r}: transformers cannot read its config "
                         f"({e})") from None
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _kv_dims(cfg) -> tuple[int, int, int]:
    """(layers, key-value heads, head dim) of a decoder config."""
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, kv, hd


def draft_nbytes(path: str | Path, dtype: torch.dtype, rows: int, context: int) -> int:
    """Device bytes of the draft at path: its weights in dtype (counted on the meta device,
    nothing read) and a KV cache of `context` tokens for each of `rows` rows."""
    cfg = _config(path)
    with torch.device("meta"):
        model = _transformers().AutoModelForCausalLM.from_config(cfg)
    el = torch.finfo(dtype).bits // 8
    weights = sum(p.numel() for p in model.parameters()) * el
    n_layers, kv, hd = _kv_dims(cfg)
    return weights + 2 * n_layers * kv * hd * el * rows * context


def _vocab(path: Path) -> dict | None:
    """The token -> id map of the tokenizer.json at path, if there is one."""
    f = path / "tokenizer.json"
    if not f.is_file():
        return None
    return json.loads(f.read_text()).get("model", {}).get("vocab")


class Drafter:
    """The draft model at `path` on device in dtype, with a KV cache for each of `rows`
    rows; drafting stops at a token the draft gives less than min_prob. ValueError when its
    vocabulary is not the served model's (vocab_size, and the tokenizers' vocabularies where
    both directories hold a tokenizer.json)."""

    def __init__(self, path: str | Path, served: str | Path, vocab_size: int,
                 device: torch.device, dtype: torch.dtype, rows: int, min_prob: float = 0.0):
        cfg = _config(path)
        if cfg.vocab_size != vocab_size:
            raise ValueError(f"draft model {str(path)!r} has a vocabulary of {cfg.vocab_size} "
                             f"tokens, the served model {vocab_size}: a draft must share the "
                             "served model's tokenizer")
        mine, theirs = _vocab(Path(path)), _vocab(Path(served))
        if mine is not None and theirs is not None and mine != theirs:
            raise ValueError(f"draft model {str(path)!r}: its tokenizer.json maps tokens to "
                             "other ids than the served model's; a draft must share its "
                             "tokenizer")
        tf = _transformers()
        bars = tf.utils.logging.is_progress_bar_enabled()
        tf.utils.logging.disable_progress_bar()  # its loading bar; the runtime says it loaded
        try:
            self.model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
        finally:
            if bars:
                tf.utils.logging.enable_progress_bar()
        self.model.eval()
        self.device, self.min_prob = device, min_prob
        self.max_positions = getattr(cfg, "max_position_embeddings", None)
        self._cache_cls = tf.DynamicCache
        params = inspect.signature(self.model.forward).parameters
        # the cache argument's name (transformers 5 renamed past_key_values), and only the last
        # position's logits where the model can skip the others
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._last = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.caches: list = [None] * rows
        self.held: list[list[int]] = [[] for _ in range(rows)]  # the tokens each cache holds

    @torch.no_grad()
    def draft(self, row: int, context: Sequence[int], k: int, sampling=None,
              gen: torch.Generator | None = None) -> Drafted:
        """Up to k tokens the draft model takes after context (row's prompt and answer so
        far): greedily, or drawn with gen from its distribution under sampling (a
        serve.sampling.SamplingConfig with a temperature; the distributions come back for
        speculative sampling), up to the first it gives less than min_prob; row's cache
        kept for its next draft. None where k < 1 or the draft's context would pass its
        positions."""
        context = list(context)
        if k < 1 or self.max_positions and len(context) + k > self.max_positions:
            return Drafted([])
        cache, held = self.caches[row], self.held[row]
        keep = min(common_prefix(held, context), len(context) - 1)  # feed one token at least
        if cache is not None and keep < len(held):
            try:  # drop the tokens the row did not keep (a negative crop removes that many)
                cache.crop(keep - len(held))
            except (RuntimeError, ValueError):  # a cache that cannot roll back: start over
                cache = None
        if cache is None:
            cache, keep = self._cache_cls(), 0
        feed, fed = context[keep:], context[:keep]
        out = Drafted([], None if sampling is None else [])
        for _ in range(k):
            ids = torch.tensor([feed], device=self.device)
            logits = self.model(input_ids=ids, use_cache=True, **{self._cache_arg: cache},
                                **self._last).logits[0, -1].float()
            fed += feed
            if sampling is None:
                p, t = torch.softmax(logits, -1).max(-1)
            else:
                q = sample_probs(logits[None], sampling)[0]
                t = torch.multinomial(q, 1, generator=gen)[0]
                p = q[t]
            if p < self.min_prob:  # unsure: a draft likely rejected costs its experts' bytes
                break
            out.tokens.append(int(t))
            if out.q is not None:
                out.q.append(q)
            feed = out.tokens[-1:]
        self.caches[row], self.held[row] = cache, fed
        return out
