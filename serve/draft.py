"""A draft model for speculation (ServeConfig.draft_model): a small causal LM that shares the
served model's vocabulary (Qwen3-0.6B for Qwen3-30B-A3B, Mistral-7B for Mixtral), loaded
whole on the device by transformers, drafts a row's next tokens where prompt lookup finds
none (serve.generate.DecodeBatch._draft): greedily for a greedy row, drawn from its own
distribution under the row's temperature, top-k and top-p for a sampled one (which then
judges them by speculative sampling against it), stopping before a token it is unsure of
(ServeConfig.draft_min_prob). The served model verifies them in its step's one forward
(serve/speculate.py judges them), so an offloaded step that moves experts yields several
tokens where the drafts hold.

The draft keeps a KV cache row for each KV-cache row of the served model, batched: a step
drafts for all its rows in as many forwards as its longest draft. A row's next draft feeds
only the tokens its cache lacks (the tokens kept since, or a new prompt's, less the start it
shares with what the cache holds), after dropping the drafts that were not kept.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from serve.kvcache import common_prefix
from serve.sampling import sample_probs
from serve.speculate import DraftAsk, Drafted


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


SLACK = 64  # hidden slots past twice the longest row's tokens that start the cache over


def _kv_dims(cfg) -> tuple[int, int, int]:
    """(layers, key-value heads, head dim) of a decoder config."""
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, kv, hd


def draft_nbytes(path: str | Path, dtype: torch.dtype, rows: int, context: int) -> int:
    """Device bytes of the draft at path: its weights in dtype (counted on the meta device,
    nothing read) and its KV cache for `rows` rows of up to `context` tokens: one row's
    holds no more, a batch's hidden slots stretch it to at most 2 * context + SLACK
    (Drafter._crowded)."""
    cfg = _config(path)
    with torch.device("meta"):
        model = _transformers().AutoModelForCausalLM.from_config(cfg)
    el = torch.finfo(dtype).bits // 8
    weights = sum(p.numel() for p in model.parameters()) * el
    n_layers, kv, hd = _kv_dims(cfg)
    slots = context if rows == 1 else 2 * context + SLACK
    return weights + 2 * n_layers * kv * hd * el * rows * slots


def _window(cfg) -> int | None:
    """The draft's sliding attention window, where its layers have one."""
    w = getattr(cfg, "sliding_window", None)
    if not w or getattr(cfg, "use_sliding_window", True) is False:
        return None
    types = getattr(cfg, "layer_types", None)
    return None if types is not None and "sliding_attention" not in types else int(w)


def _vocab(path: Path) -> dict | None:
    """The token -> id map of the tokenizer.json at path, if there is one."""
    f = path / "tokenizer.json"
    if not f.is_file():
        return None
    return json.loads(f.read_text()).get("model", {}).get("vocab")


class Drafter:
    """The draft model at `path` on device in dtype, with a KV cache for `rows` rows;
    drafting stops at a token the draft gives less than min_prob. ValueError when its
    vocabulary is not the served model's (vocab_size, and the tokenizers' vocabularies where
    both directories hold a tokenizer.json).

    The rows share one batched cache, so a step's drafts for all rows take as many forwards
    as the longest draft, not their sum. Its slots run on in feed order: a row's tokens
    hold slots among other rows' padding and its own dropped drafts, which the attention
    mask hides, and each token's position is its place in the row. It batches the rows up
    to the highest that drafted since it began (rows are taken lowest first), so a lone
    request computes one row. Slots past every row's last live one are cut (a lone row
    keeps no hidden slot). When hidden slots outgrow the live ones (a long new prompt
    beside short ones, many dropped drafts), or a higher row drafts, the cache starts
    over: the drafting rows feed their contexts again."""

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
        self.device, self.min_prob, self.rows = device, min_prob, rows
        self.max_positions = getattr(cfg, "max_position_embeddings", None)
        # a sliding window counts slots, which hidden ones stretch: the cache starts over
        # before it would pass the window, and no row drafts beyond it
        self.window = _window(cfg)
        self.limit = min((n for n in (self.max_positions, self.window) if n), default=None)
        self._cache_cls = tf.DynamicCache
        params = inspect.signature(self.model.forward).parameters
        # the cache argument's name (transformers 5 renamed past_key_values), and only the
        # positions whose logits are read where the model can skip the others
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._keep_logits = "logits_to_keep" in params
        self.cache = None  # batched over the rows below the highest that drafted since it began
        self.live = torch.zeros(0, 0, dtype=torch.bool, device=device)  # slots not hidden
        self.held: list[list[int]] = [[] for _ in range(rows)]  # the tokens each row holds
        self.slots: list[list[int]] = [[] for _ in range(rows)]  # and their slots
        self.forwards = 0  # batched forwards so far
        self.row_forwards = 0  # the forwards drafting row by row would have taken

    @torch.no_grad()
    def draft(self, asks: Sequence[DraftAsk]) -> list[Drafted]:
        """Each ask's drafts (in order): up to ask.k tokens the draft model takes after its
        context, greedily, or drawn with its generator from the draft's distribution under
        its sampling (the distributions come back for speculative sampling), up to the first
        it gives less than min_prob. No drafts for an ask with k < 1 or whose draft would
        pass the draft's positions (or window). Each row's cache keeps what it fed, for its
        next draft."""
        if len({a.row for a in asks}) < len(asks):
            raise ValueError("a row asks for two drafts in one step")
        out = [Drafted([], None if a.sampling is None else []) for a in asks]
        going = {a.row: j for j, a in enumerate(asks)
                 if a.k >= 1 and (self.limit is None or len(a.context) + a.k <= self.limit)}
        feeds = {}
        for row, j in going.items():
            context = list(asks[j].context)  # keep what it holds of it, feed one token at least
            self._drop(row, min(common_prefix(self.held[row], context), len(context) - 1))
            feeds[row] = context[len(self.held[row]):]
        self._trim()
        if going and (max(going) >= len(self.live)  # a row the cache lacks
                      or self._crowded(feeds, max(asks[j].k for j in going.values()))):
            self._restart(max(going) + 1)
            feeds = {row: list(asks[j].context) for row, j in going.items()}
        while going:
            picks = self._pick_tokens(self._forward(feeds, going), {
                row: asks[j] for row, j in going.items()})
            feeds = {}
            for row, (p, t, q) in picks.items():
                a, d = asks[going[row]], out[going[row]]
                if p < self.min_prob:  # unsure: a draft likely rejected costs its experts' bytes
                    del going[row]
                    continue
                d.tokens.append(t)
                if d.q is not None:
                    d.q.append(q)
                if len(d.tokens) == a.k:  # its last draft is fed next time, if kept
                    del going[row]
                else:
                    feeds[row] = [t]
        return out

    @staticmethod
    def _pick_tokens(logits: dict[int, torch.Tensor], asks: dict[int, DraftAsk]) -> dict:
        """Each row's next draft from its logits [V] -> row: (its probability, the token,
        the distribution it was drawn from or None): the argmax of the greedy rows (all at
        once), a draw with its own generator for each sampled one."""
        picks = {}
        greedy = [row for row in logits if asks[row].sampling is None]
        if greedy:
            p, t = torch.softmax(torch.stack([logits[row] for row in greedy]), -1).max(-1)
            picks = {row: (pr, tok, None)
                     for row, pr, tok in zip(greedy, p.tolist(), t.tolist(), strict=True)}
        for row in logits.keys() - set(greedy):
            a = asks[row]
            q = sample_probs(logits[row][None], a.sampling)[0]
            t = int(torch.multinomial(q, 1, generator=a.gen)[0])
            picks[row] = (float(q[t]), t, q)
        return picks

    def _drop(self, row: int, keep: int) -> None:
        """Hide row's slots past its first `keep` tokens."""
        if keep < len(self.held[row]):
            self.live[row, self.slots[row][keep:]] = False
            del self.held[row][keep:], self.slots[row][keep:]

    def _trim(self) -> None:
        """Cut the slots past every row's last live one (a lone row's dropped drafts: it
        never holds a hidden slot then)."""
        end, n = max((sl[-1] + 1 for sl in self.slots if sl), default=0), self.live.shape[1]
        if self.cache is None or end == n:
            return
        if end:
            try:  # a negative crop removes that many
                self.cache.crop(end - n)
                self.live = self.live[:, :end]
                return
            except (RuntimeError, ValueError):  # a cache that cannot roll back
                pass
        self._restart(len(self.live))  # none held, or no crop

    def _crowded(self, feeds: dict[int, list[int]], k: int) -> bool:
        """Whether feeding feeds and then up to k - 1 drafts a row would pass the window, or
        leave more than twice the slots (and SLACK) of the longest row's tokens."""
        width = self.live.shape[1] + max(map(len, feeds.values())) + k - 1
        longest = max(len(self.held[r]) + len(f) for r, f in feeds.items())
        cap = 2 * longest + SLACK
        return width > (cap if self.window is None else min(cap, self.window))

    def _restart(self, batch: int) -> None:
        """Forget every row's tokens: an empty cache, batched over rows [0, batch)."""
        self.cache = None
        self.live = torch.zeros(batch, 0, dtype=torch.bool, device=self.device)
        for row in range(self.rows):
            self.held[row], self.slots[row] = [], []

    def _forward(self, feeds: dict[int, list[int]], want) -> dict[int, torch.Tensor]:
        """One forward of the cache's rows: each row in feeds feeds its tokens after those it
        holds, the others padding, hidden from then on -> the logits [V] after the last token
        fed of each row in want."""
        (batch, n), width = self.live.shape, max(map(len, feeds.values()))
        ids = torch.zeros(batch, width, dtype=torch.long)
        fresh = torch.zeros(batch, width, dtype=torch.bool)
        for row, f in feeds.items():
            ids[row, :len(f)] = torch.tensor(f)
            fresh[row, :len(f)] = True
        pos = torch.tensor([len(h) for h in self.held[:batch]])[:, None] + torch.arange(width)
        if self.max_positions:  # a padding slot past the last position (never read)
            pos.clamp_(max=self.max_positions - 1)
        # padding sees its row's tokens and the padding before it (none unattended), and is
        # hidden from the next forward on
        mask = torch.cat([self.live, torch.ones_like(fresh, device=self.device)], 1)
        lasts = sorted({len(feeds[row]) - 1 for row in want})
        kw = ({"logits_to_keep": torch.tensor(lasts, device=self.device)}
              if self._keep_logits else {})
        if self.cache is None:
            self.cache = self._cache_cls()
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.long(),
                            position_ids=pos.to(self.device), use_cache=True,
                            **{self._cache_arg: self.cache}, **kw).logits
        for row, f in feeds.items():
            self.held[row] += f
            self.slots[row] += range(n, n + len(f))
        self.live = torch.cat([self.live, fresh.to(self.device)], 1)
        self.forwards += 1
        self.row_forwards += len(feeds)
        at = {last: i for i, last in enumerate(lasts)} if self._keep_logits else None
        return {row: logits[row, at[len(feeds[row]) - 1] if at else len(feeds[row]) - 1].float()
                for row in want}
