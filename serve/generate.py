"""Token generation over an `OffloadedModel`: a `DecodeBatch` of sequences, each in its own
KV-cache row, that new sequences may join between decode steps (continuous batching);
prompts read layer by layer in the decode's forward, prefix reuse, speculation (a predicted
answer, prompt lookup or a draft model), greedy or temperature / top-k / top-p sampling with
a seed, stop tokens, streaming through a callback. `generate` runs a fixed set of prompts to
the end."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from serve.grammar import Constraint
from serve.kvcache import common_prefix
from serve.runtime import OffloadedModel
from serve.sampling import (
    SamplingConfig,
    adjust_logits,
    sample_probs,
    sample_rows,
    seeded_rows,
    token_logprobs,
)
from serve.speculate import (
    PREDICTED_DRAFT,
    DraftAsk,
    Drafted,
    judge,
    lookup,
    next_length,
    predicted,
)


@dataclass
class GenerationResult:
    """token_ids: the new tokens of each prompt (a stop token ends and is included);
    finish_reasons: "stop" or "length"; logits: per prompt [new tokens, V] when asked for;
    logprobs, prompt_logprobs: per prompt, Row's (None unless sampling asks for them)."""

    token_ids: list[list[int]]
    finish_reasons: list[str]
    stats: dict
    logits: list[torch.Tensor] = field(default_factory=list)
    logprobs: list[list | None] = field(default_factory=list)
    prompt_logprobs: list[list | None] = field(default_factory=list)


def check_prompts(model: OffloadedModel, prompts: Sequence[Sequence[int]]) -> None:
    """Each prompt is a non-empty list of in-vocabulary ids that fits the context."""
    if not prompts:
        raise ValueError("no prompt given")
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


@dataclass(eq=False)
class Row:
    """One sequence of a DecodeBatch. on_token(id) is called as each new token is chosen and
    ends the row when it returns True (finish_reason "stop")."""

    prompt_len: int
    limit: int  # most new tokens
    kv_row: int
    sampling: SamplingConfig
    gen: torch.Generator | None = None
    on_token: Callable[[int], bool | None] | None = None
    out: list[int] = field(default_factory=list)  # new tokens so far
    pending: list[int] = field(default_factory=list)  # prompt tokens not yet in its KV row
    length: int = 0  # positions held in its KV-cache row
    cached: int = 0  # leading prompt tokens its KV row held already (not read again)
    done: bool = False
    finish_reason: str = "length"
    peak_batch: int = 1  # most rows that ran a decode step together with this one
    t_added: float = 0.0
    t_first: float = 0.0  # when its first token was chosen
    t_done: float = 0.0
    since: dict = field(default_factory=dict)  # the model's counters when it joined
    prompt: Sequence[int] = ()  # its prompt (a repetition penalty reads it)
    # a row added with it whose prompt starts as this one's does: it reads their first
    # `share` tokens for both; this row takes them from it (DecodeBatch._plan_read, _follow)
    leader: Row | None = None
    share: int = 0
    constraint: Constraint | None = None  # its place in sampling.grammar
    drafted: int = 0  # tokens drafted for it (DecodeBatch._draft)
    accepted: int = 0  # of those, the ones verified
    draft_length: int = 0  # most it drafts next (speculate.next_length)
    draft_max: int = 0  # most it ever drafts a step
    pred_drafted: int = 0  # of its drafts, those from the prediction
    pred_accepted: int = 0  # and of those, the ones verified
    stats: dict = field(default_factory=dict)  # set when it ends
    logits: list[torch.Tensor] = field(default_factory=list)  # [V] per token, when kept
    # per new token, when sampling.logprobs is set (else None): (its log-probability,
    # [(id, log-prob)] of the most likely tokens, most likely first)
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None
    # per prompt token, when sampling.prompt_logprobs is set (else None): as logprobs, with
    # sampling.logprobs (or 0) alternatives; None for the first token
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]] | None] | None = None

    def __post_init__(self) -> None:
        if self.sampling.logprobs is not None:
            self.logprobs = []
        if self.sampling.prompt_logprobs:
            self.prompt_logprobs = []


@dataclass
class _Read:
    """What one step reads of the prompts of `rows` (DecodeBatch._plan_read): rounds of one
    chunk per row (rows, tokens of each, where each goes, next-token targets or None), their
    OffloadedModel.step arguments (specs), the rows that score their prompt (want, by id) and
    how many alternatives (top), where each row's reading ends (start, by id) and the
    waiting rows that join each round (joins)."""

    rows: list[Row]
    rounds: list[tuple]
    specs: list[tuple]
    want: set[int]
    top: int
    start: dict[int, int]
    joins: dict[int, list[Row]]

    @property
    def copies(self) -> dict[int, list[tuple[int, int, int]]]:
        """The KV copies that take the joining rows their leader's start, before the forward
        (OffloadedModel.prefill's copies: round -> [(leader's row, its row, share)])."""
        return {k: [(f.leader.kv_row, f.kv_row, f.share) for f in fs]
                for k, fs in self.joins.items()}


class DecodeBatch:
    """Sequences that decode together on one OffloadedModel, each in its own KV-cache row.

    `add` gives new prompts free rows; each `step` is one forward of the model: a decode token
    of each row that has one and, beside them, the prompts of the rows still reading theirs,
    in chunks of prefill_chunk tokens that pass each layer in turn (OffloadedModel.prefill),
    so each expert a layer needs crosses to the device once for the whole step, not once per
    chunk and again for the decode. A row whose prompt is then all in chooses its first
    token. Rows join and leave between steps (continuous batching), so a request need not
    wait for a running batch to end. A prompt is read whole in one step unless
    scfg.prefill_step_tokens bounds what a step reads while rows decode (then the running
    rows wait that much a step, and the prompt takes several steps). Each row samples with
    its own config and generator.

    Prefix reuse (model.scfg.prefix_cache): the KV cache remembers which tokens each row holds
    (KVCache.held), across batches. A new prompt takes the free row that holds the longest
    prefix of it, or has the longest prefix any row holds copied into a free one (a shared
    system prompt), and reads only the rest: a chat's next turn reads the new message, not
    the whole conversation, and its experts are not moved again for the old tokens. A prompt
    added twice at once (n choices, best_of) is read by its first row; the others take it
    in the same pass, layer by layer, and read only its last token; so do prompts added
    together that start alike (a system prompt). A prompt whose tokens are all scored
    (prompt_logprobs) takes only a start whose scores a row kept (KVCache.scores).

    Speculation (model.scfg.speculate, or a row's sampling.prediction): a decoding row
    drafts tokens from its predicted answer, by prompt lookup or with the model's draft
    model, and the step's forward verifies them (serve/speculate.py), so a row may gain
    several tokens a step.
    """

    def __init__(self, model: OffloadedModel, stop_ids: Sequence[int] = (),
                 capacity: int | None = None, keep_logits: bool = False,
                 reuse_prefix: bool | None = None, layerwise: bool = True,
                 joint: bool = True):
        """capacity: most rows at once (default and at most: the model's max_batch);
        reuse_prefix: None = model.scfg.prefix_cache (benchmarks of prefill turn it off);
        for comparison: layerwise=False reads prompts a chunk per step; joint=False runs a
        step's decode as a forward of its own, after the prompts', and reads them a chunk per
        step while rows decode (what steps did before they were one forward)."""
        self.model = model
        self.layerwise, self.joint = layerwise, joint
        self.speculate = model.scfg.speculate
        self.reuse = model.scfg.prefix_cache if reuse_prefix is None else reuse_prefix
        self.capacity = capacity or model.max_batch
        if not 1 <= self.capacity <= model.max_batch:
            raise ValueError(f"capacity {self.capacity} is outside [1, max_batch="
                             f"{model.max_batch}]")
        self.stops = set(stop_ids)
        self.keep_logits = keep_logits
        self.live: list[Row] = []
        self._free = list(range(self.capacity))  # KV-cache rows, lowest first
        self.prefill_s = self.decode_s = 0.0  # seconds in prefill / decode forwards so far
        self.steps = 0  # forwards so far

    @property
    def free(self) -> int:
        return len(self._free)

    def add(self, prompts: Sequence[Sequence[int]], limits: Sequence[int],
            on_token: Sequence[Callable[[int], bool | None] | None] | None = None,
            sampling: Sequence[SamplingConfig] | None = None) -> list[Row]:
        """Give prompts (lists of ids) free rows -> their Rows; the next steps prefill them.
        limits: most new tokens per prompt; sampling: one config per prompt (default
        greedy)."""
        check_prompts(self.model, prompts)
        cfgs = list(sampling) if sampling is not None else [SamplingConfig()] * len(prompts)
        if len(cfgs) != len(prompts):
            raise ValueError(f"{len(cfgs)} sampling configs for {len(prompts)} prompts")
        for c in cfgs:
            c.check(self.model.cfg.vocab_size)
        if len(prompts) > self.free:
            raise ValueError(f"{len(prompts)} prompts but {self.free} free rows of "
                             f"{self.capacity}")
        if len(limits) != len(prompts):
            raise ValueError(f"{len(limits)} max_new_tokens values for {len(prompts)} prompts")
        if min(limits) < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {min(limits)}")
        calls = list(on_token) if on_token is not None else [None] * len(prompts)
        t0, since, dev = time.perf_counter(), self.model.counters(), self.model.device
        rows: list[Row] = []
        for p, lim, cb, c in zip(prompts, limits, calls, cfgs, strict=True):
            most = max(self.speculate, PREDICTED_DRAFT) if c.prediction else self.speculate
            match = self._held_starts(p, c)
            lead, share = self._leader(p, c, rows, match)
            if lead is None:
                kv_row, cached, scores = self._take_row(match)
            else:  # a row added with it reads their shared start for both
                kv_row, cached, scores = self._take_spare(), 0, []
            row = Row(len(p), lim, kv_row, c, c.generator(dev), cb,
                      pending=list(p[cached:]), length=cached, cached=cached,
                      t_added=t0, since=since, prompt=p, leader=lead, share=share,
                      constraint=None if c.grammar is None else
                      c.grammar.constraint(p, self.model.cfg.vocab_size),
                      draft_length=most, draft_max=most)
            if cached and row.prompt_logprobs is not None:
                _take_scores(row, scores)
            rows.append(row)
        self.live = sorted(self.live + rows, key=lambda r: r.kv_row)
        return rows

    # a start shared with a row added together is worth waiting for from this many tokens on
    # (or the whole prompt but its last token, when shorter): a system prompt, n choices
    SHARE_MIN = 16

    def _held_starts(self, prompt: Sequence[int], sampling: SamplingConfig
                     ) -> dict[int, int] | None:
        """{KV row: how many leading tokens of prompt it holds, all but the last prompt
        token at most (its logits choose the first new token)}; None when prefix reuse is
        off. A prompt whose tokens are all scored (prompt_logprobs) takes only a scored
        prefix, less its last token, whose logits score the first token read."""
        if not self.reuse:
            return None
        kv = self.model.kv
        if sampling.prompt_logprobs:
            top = sampling.logprobs or 0
            return {r: max(0, min(kv.common(r, prompt[:-1]) - 1, kv.scored(r, top) - 1))
                    for r in range(len(kv.held))}
        return {r: kv.common(r, prompt[:-1]) for r in range(len(kv.held))}

    def _leader(self, prompt: Sequence[int], sampling: SamplingConfig, added: list[Row],
                match: dict[int, int] | None) -> tuple[Row | None, int]:
        """The row among `added` (this call's, not themselves waiting) whose prompt shares
        the longest start with `prompt` -> (it, that many tokens), when that start is long
        enough and longer than any KV row holds (match: _held_starts); (None, 0) otherwise.
        A prompt scored whole (prompt_logprobs) follows only a row that scores its own with
        as many alternatives, and takes its start less the last token (_held_starts)."""
        if match is None:
            return None, 0
        want = prompt[:-1]
        top = sampling.logprobs or 0
        best, n = None, 0
        for r in added:
            if r.leader is None and (not sampling.prompt_logprobs or r.prompt_logprobs
                                     is not None and (r.sampling.logprobs or 0) >= top):
                m = common_prefix(want, r.prompt) - bool(sampling.prompt_logprobs)
                if m > n:
                    best, n = r, m
        if best is None or n <= max(match.values()) or n < min(self.SHARE_MIN, len(want)):
            return None, 0
        return best, n

    def _spare(self) -> int:
        """The free KV row holding the fewest tokens (the least to lose)."""
        return min(self._free, key=lambda r: (len(self.model.kv.held[r]), r))

    def _take_spare(self) -> int:
        """_spare(), taken and emptied."""
        row = self._spare()
        self._free.remove(row)
        self.model.kv.forget(row, 0)
        return row

    def _follow(self, r: Row) -> None:
        """Row r's leader has read their shared start in an earlier step: r copies it from
        the leader's KV row and reads only the rest of its prompt (at least its last token,
        whose logits choose its first new token)."""
        n = r.share
        self.model.kv.copy_entries(r.leader.kv_row, r.kv_row, n)
        r.length = r.cached = n
        del r.pending[:n]
        self._took(r)

    def _took(self, r: Row) -> None:
        """Row r holds its leader's first r.share positions now: the tokens (and scores)
        they hold, and the leader's scores of tokens 1..share when r scores its prompt."""
        kv, n, src = self.model.kv, r.share, r.leader.kv_row
        kv.held[r.kv_row], kv.scores[r.kv_row] = kv.held[src][:n], kv.scores[src][:n]
        if r.prompt_logprobs is not None:
            _take_scores(r, r.leader.prompt_logprobs[1:n + 1])
        r.leader = None

    def _take_row(self, match: dict[int, int] | None) -> tuple[int, int, list]:
        """A free KV row for a prompt whose starts the rows hold as `match` says
        (_held_starts) -> (row, how many leading prompt tokens it holds, the scores of prompt
        tokens 1..that many where they were kept): the free row holding the longest start,
        else the longest start any row holds copied into the free row holding the fewest
        tokens. With match None none is reused: the lowest free row."""
        kv = self.model.kv
        spare = self._spare()
        scores: list = []
        if match is None:
            row, cached = min(self._free), 0
        else:
            row = max(self._free, key=lambda r: (match[r], -r))
            src = max(match, key=lambda r: (match[r], r in self._free))
            cached = match[src]
            # the last token taken is scored by the logits before it, which are not read again
            scores = kv.scores[src][1:cached + 1]
            if cached == 0:
                row = spare
            elif match[row] < cached:  # held by a busy row (or one outside this batch): copy
                row = spare
                kv.copy_prefix(src, row, cached)
        self._free.remove(row)
        kv.forget(row, cached)
        return row, cached, scores

    def step(self) -> list[Row]:
        """One forward: the decode token of each row that has one and, beside them, the
        prompts of the rows still reading theirs, layer by layer (OffloadedModel.prefill), so
        each expert a layer needs crosses to the device once for all of them; rows whose
        prompt is then all in choose their first token -> the rows that ended in it."""
        filling = [r for r in self.live if r.pending]  # with rows waiting for a leader
        decoding = [r for r in self.live if r.out]
        t0 = time.perf_counter()
        read = self._plan_read(filling, self._read_limit(bool(decoding))) if filling else None
        if read is None and not decoding and self.live:  # never spin: name it instead
            raise RuntimeError(f"no row of {len(self.live)} can advance (each waits for a "
                               "leader that reads nothing); this is a bug")
        jobs = read.specs if read is not None else []
        top, copies = (read.top, read.copies) if read is not None else (0, {})
        drafts = self._drafts(decoding)
        dec = self._decode_job(decoding, drafts) if decoding else None
        keep = [len(jobs)] if any(d.tokens for d in drafts) else []  # per-position logits
        if self.joint:
            outs = self.model.prefill(jobs + [dec] * (dec is not None), top, copies, keep)
        else:  # the prompts' forward, then the decode's (for comparison)
            outs = (self.model.prefill(jobs, top, copies) if jobs else []) + (
                self.model.prefill([dec], top, keep=[0] * bool(keep)) if dec else [])
        rows, logits, ended = [], [], []
        if read is not None:
            rows, last = self._record_read(read, outs[:len(jobs)])
            logits = [last] if rows else []
        if decoding:
            plain, plain_logits, ended = self._decoded(decoding, drafts, outs[-1])
            rows, logits = rows + plain, logits + [plain_logits]
        if rows:  # waits for the device
            ended += self._choose(rows, logits[0] if len(logits) == 1 else torch.cat(logits))
        self.steps += 1
        dt = time.perf_counter() - t0  # a step that reads and decodes counts in both
        self.prefill_s += dt if read is not None else 0.0
        self.decode_s += dt if decoding else 0.0
        return ended

    def _decode_job(self, rows: list[Row], drafted: list[Drafted]) -> tuple:
        """The decode chunk (OffloadedModel.step's arguments) of rows: each row's last token
        and the tokens drafted to follow it, scored against the drafts (targets) when any."""
        drafts = [d.tokens for d in drafted]
        ids = torch.zeros(len(rows), 1 + max(map(len, drafts)), dtype=torch.long)
        targets = torch.full(ids.shape, -1, dtype=torch.long) if any(drafts) else None
        for j, (r, d) in enumerate(zip(rows, drafts, strict=True)):
            ids[j, :1 + len(d)] = torch.tensor([r.out[-1]] + d)
            if d:
                targets[j, :len(d)] = torch.tensor(d)
        return (ids.to(self.model.device), [r.kv_row for r in rows],
                [r.length for r in rows], [1 + len(d) for d in drafts], targets)

    def _decoded(self, rows: list[Row], drafts: list[Drafted], out
                 ) -> tuple[list[Row], torch.Tensor, list[Row]]:
        """Book the decode chunk's forward (out: its step result): rows without drafts wrote
        their last token (-> them and their logits, to sample from); rows with drafts keep
        the drafts the model confirms (-> the rows that ended)."""
        logits = out if isinstance(out, torch.Tensor) else out[0]
        plain = [j for j, d in enumerate(drafts) if not d.tokens]
        for j in plain:
            r = rows[j]
            self.model.kv.record(r.kv_row, r.length, r.out[-1:])
            r.length += 1
        for r in rows:
            r.peak_batch = max(r.peak_batch, len(rows))
        spec = [j for j, d in enumerate(drafts) if d.tokens]
        ended = self._verify([rows[j] for j in spec], [drafts[j] for j in spec],
                             [torch.cat([out[4][j], logits[j, None]]) for j in spec]
                             ) if spec else []
        every = len(plain) == len(rows)  # (no gather then)
        return [rows[j] for j in plain], logits if every else logits[plain], ended

    def _read_limit(self, decoding: bool) -> int | None:
        """Most prompt tokens a step reads (it reads at least a chunk of each row's; None:
        the prompts whole): while rows decode, model.scfg.prefill_step_tokens, which bounds
        how long they wait (one chunk a step when not joint, as before); else whole, unless
        not layerwise."""
        if not self.layerwise or decoding and not self.joint:
            return 0
        return self.model.scfg.prefill_step_tokens if decoding else None

    def _plan_read(self, rows: list[Row], limit: int | None) -> _Read | None:
        """Take the next prefill chunks of rows' prompts, a round of one chunk per row at a
        time, until the prompts are in or the rounds hold `limit` tokens (_read_limit). A
        row waiting for its leader joins the first round after the leader's rounds cover
        their shared start: in each layer it takes the leader's keys and values of that start
        just before its own chunk (OffloadedModel.prefill's copies), so the start is read
        once and the whole group still passes the experts once. None: nothing to read (only
        rows whose leader reads later)."""
        readers = [r for r in rows if r.leader is None]
        if not readers:
            return None
        ids_ = {id(r) for r in readers}
        waiting = [r for r in rows if r.leader is not None and id(r.leader) in ids_]
        want = {id(r) for r in readers + waiting if r.prompt_logprobs is not None}
        top = max((r.sampling.logprobs or 0 for r in readers + waiting if id(r) in want),
                  default=0)
        start = {id(r): r.length for r in readers}
        rounds, n = [], 0  # (rows, tokens of each, where each goes, targets or None)
        joins: dict[int, list[Row]] = {}  # round -> the waiting rows that join in it
        while not rounds or limit is None or n < limit:
            for f in [f for f in waiting if start[id(f.leader)] >= f.share]:
                waiting.remove(f)
                joins.setdefault(len(rounds), []).append(f)
                f.length = f.cached = f.share
                del f.pending[:f.share]
                start[id(f)] = f.share
                readers.append(f)
            active = [r for r in readers if r.pending]
            if not active:
                break
            rounds.append(self._next_chunks(active, want, start))
            n += sum(map(len, rounds[-1][1]))
        specs = []
        for rr, toks, at, targets in rounds:
            ids = torch.zeros(len(rr), max(map(len, toks)), dtype=torch.long)
            for j, t in enumerate(toks):
                ids[j, :len(t)] = torch.tensor(t)
            specs.append((ids.to(self.model.device), [r.kv_row for r in rr], at,
                          list(map(len, toks)), targets))
        return _Read(readers, rounds, specs, want, top, start, joins)

    def _record_read(self, read: _Read, outs: list) -> tuple[list[Row], torch.Tensor | None]:
        """Book what the forward of read's chunks wrote (outs: one step result each): the
        rows' KV tokens and lengths, prompt scores, waiting rows that can now copy their
        shared start -> (the rows whose prompt is all in, the logits [n, V] of their last
        prompt token)."""
        last: dict[int, torch.Tensor] = {}  # each row's logits after its last chunk
        for k, ((rr, toks, _, targets), out) in enumerate(zip(read.rounds, outs, strict=True)):
            for f in read.joins.get(k, ()):  # the start it took from its leader, in every layer
                self._took(f)
            logits = out if targets is None else out[0]
            for j, (r, t) in enumerate(zip(rr, toks, strict=True)):
                self.model.kv.record(r.kv_row, r.length, t)
                r.length += len(t)
                last[id(r)] = logits[j]
                if id(r) in read.want:  # each position's next token: the last one's follows on
                    has = len(t) if r.length < read.start[id(r)] or r.pending else len(t) - 1
                    k = r.sampling.logprobs or 0
                    r.prompt_logprobs.extend(
                        (lp, list(zip(a, v, strict=True))) for lp, a, v in zip(
                            out[1][j, :has].tolist(), out[2][j, :has, :k].tolist(),
                            out[3][j, :has, :k].tolist(), strict=True))
        held = self.model.kv.held
        for f in self.live:  # rows whose leader has now read their shared start
            if f.leader is not None and len(held[f.leader.kv_row]) >= f.share:
                self._follow(f)
        done = [r for r in read.rows if not r.pending]
        for r in done:  # a scored prompt's scores stay with its KV row, for a later prompt
            if r.prompt_logprobs is not None:
                self.model.kv.score(r.kv_row, r.prompt_logprobs)
        return done, torch.stack([last[id(r)] for r in done]) if done else None

    def _next_chunks(self, rows: list[Row], want: set[int], start: dict[int, int]
                     ) -> tuple[list[Row], list[list[int]], list[int], torch.Tensor | None]:
        """Take the next prefill chunk of each row's pending prompt (start: where each
        row's next chunk goes, advanced) -> (rows, their tokens, where they go, the
        next-token targets of the rows that score their prompt (-1 elsewhere), None when
        none does)."""
        chunk = self.model.scfg.prefill_chunk
        toks = [r.pending[:chunk] for r in rows]
        at = [start[id(r)] for r in rows]
        targets = None
        if any(id(r) in want for r in rows):
            targets = torch.full((len(rows), max(map(len, toks))), -1, dtype=torch.long)
        for j, (r, t) in enumerate(zip(rows, toks, strict=True)):
            if id(r) in want:  # each position's next prompt token, into the next chunk too
                nxt = r.pending[1:len(t) + 1]
                targets[j, :len(nxt)] = torch.tensor(nxt, dtype=torch.long)
                if start[id(r)] == 0:
                    r.prompt_logprobs.append(None)  # the first token follows nothing
            del r.pending[:len(t)]
            start[id(r)] += len(t)
        return rows, toks, at, targets

    def _choose(self, rows: list[Row], logits: torch.Tensor) -> list[Row]:
        """Sample each row's next token from logits [len(rows), V] (after its penalties and
        biases); end rows that stop."""
        adjusted = logits
        if any(_adjusts(r) for r in rows):
            adjusted = torch.stack([_adjusted(r, logits[j], self.stops)
                                    for j, r in enumerate(rows)])
        nxt = sample_rows(adjusted, [r.sampling for r in rows],  # waits for the device
                          [r.gen for r in rows])
        now = time.perf_counter()
        ended = [r for j, (r, t) in enumerate(zip(rows, nxt, strict=True))
                 if self._emit(r, t, logits[j], now)]
        return self._end(ended)

    def _emit(self, r: Row, t: int, logits: torch.Tensor | None, now: float) -> bool:
        """Row r's next token is t (its logits [V], kept or scored when asked) -> whether r
        ends with it (a stop token, the caller's stop, its grammar's end, its limit)."""
        if self.keep_logits:
            r.logits.append(logits.cpu())
        if r.logprobs is not None:
            r.logprobs.append(token_logprobs(logits, t, r.sampling.logprobs))
        if not r.out:
            r.t_first = now
        r.out.append(t)
        if r.constraint is not None:
            r.constraint.accept(t)
        if r.on_token is not None and r.on_token(t):  # e.g. the caller saw a stop string
            r.done, r.finish_reason = True, "stop"
        elif (t in self.stops and not r.sampling.ignore_eos
              or r.constraint is not None and r.constraint.done):
            r.done, r.finish_reason = True, "stop"
        elif len(r.out) >= r.limit or r.length >= self.model.max_context:
            r.done = True
        return r.done

    def _end(self, ended: list[Row]) -> list[Row]:
        """Rows that ended: their stats, their KV rows freed -> ended."""
        if ended:
            self.model.synchronize()
            now = time.perf_counter()
            for r in ended:
                r.t_done = now
                r.stats = _row_stats(r, self.model.stats(since=r.since))
                self._free.append(r.kv_row)
            self._free.sort()
            self.live = [r for r in self.live if not r.done]
        return ended

    # -- speculation (a predicted answer, prompt lookup or a draft model) --------------------
    def _drafts(self, rows: list[Row]) -> list[Drafted]:
        """Each row's drafts for this step (_draft), those of the draft model drawn for all
        rows that ask it at once."""
        drafts = [self._draft(r) for r in rows]
        asks = [j for j, d in enumerate(drafts) if isinstance(d, DraftAsk)]
        if asks:
            for j, d in zip(asks, self.model.drafter.draft([drafts[j] for j in asks]),
                            strict=True):
                drafts[j] = d
        return drafts

    def _draft(self, r: Row) -> Drafted | DraftAsk:
        """As many tokens as row r may take: those its predicted answer has next
        (sampling.prediction, speculate.predicted), else those that followed the latest
        earlier occurrence of the last 3 of its prompt and answer (prompt lookup: no forward,
        and right where they repeat), else, when the model has one, what to ask its draft
        model for (serve/draft.py: its greedy continuation; a sampled row's drawn from the
        draft's distribution, which comes with them for judging)."""
        room = min(r.draft_length, r.limit - len(r.out) - 1,
                   self.model.max_context - r.length - 1)
        if room <= 0:
            return Drafted([])
        if r.sampling.prediction:
            drafts = predicted(r.sampling.prediction, r.out, room)
            if drafts:
                return Drafted(drafts, predicted=True)
        context = list(r.prompt) + r.out
        drafts = lookup(context, room)
        if not drafts and self.model.drafter is not None:
            sampled = r.sampling if r.sampling.temperature > 0 else None
            return DraftAsk(r.kv_row, context, room, sampled, r.gen)
        return Drafted(drafts)

    def _verify(self, rows: list[Row], drafts: list[Drafted], logits: list[torch.Tensor]
                ) -> list[Row]:
        """Rows that wrote their last token and drafts in one forward (logits: per row
        [len(draft) + 1, V], after each of those): position by position, each row judges
        its draft there (speculate.judge) on its logits as it samples from them (after its
        penalties and biases, under its grammar: each token taken advances them as a step
        would), takes the token judged, and goes on while drafts are kept -> the rows that
        ended."""
        now = time.perf_counter()
        ended = []
        for r, drafted, lg in zip(rows, drafts, logits, strict=True):
            d, qs = drafted.tokens, drafted.q
            start, last, kept = r.length, r.out[-1], 0
            for s in range(len(d) + 1):
                row = _adjusted(r, lg[s], self.stops) if _adjusts(r) else lg[s]
                probs = None if r.sampling.temperature == 0 else sample_probs(
                    row[None], r.sampling)[0]
                keep, t = judge(probs, row, d[s] if s < len(d) else None, r.gen,
                                qs[s] if qs is not None and s < len(d) else None)
                kept += keep
                r.length += 1  # as a step a token would be: what precedes t is written
                if self._emit(r, t, lg[s], now):
                    ended.append(r)
                    break
                if not keep:
                    break
            self.model.kv.record(r.kv_row, start, [last] + d[:kept])
            r.drafted, r.accepted = r.drafted + len(d), r.accepted + kept
            if drafted.predicted:
                r.pred_drafted, r.pred_accepted = r.pred_drafted + len(d), r.pred_accepted + kept
            r.draft_length = next_length(r.draft_max, r.draft_length, len(d), kept)
        return self._end(ended)


def _take_scores(r: Row, entries: Sequence) -> None:
    """Row r scores its prompt and took its first tokens' scores (entries for tokens 1..)
    from elsewhere: they open its prompt_logprobs, with as many alternatives as it asks."""
    k = r.sampling.logprobs or 0
    r.prompt_logprobs = [None] + [(lp, alts[:k]) for lp, alts in entries]


def _adjusts(r: Row) -> bool:
    """Whether row r samples from other logits than the model's."""
    return (r.sampling.adjusts or r.constraint is not None
            or len(r.out) < r.sampling.min_tokens)


def _adjusted(r: Row, logits: torch.Tensor, stops: set[int]) -> torch.Tensor:
    """Row r's logits [V] for sampling: after its penalties and biases, without stop tokens
    before min_tokens, then under its grammar."""
    if r.sampling.adjusts:
        logits = adjust_logits(logits, r.sampling, r.prompt, r.out)
    if len(r.out) < r.sampling.min_tokens and stops:
        logits = logits.index_fill(0, torch.tensor(sorted(stops), device=logits.device),
                                   float("-inf"))
    return logits if r.constraint is None else r.constraint.mask(logits)


def _row_stats(r: Row, model_stats: dict) -> dict:
    """A finished row's figures; the cache ones (model_stats) are the model's over the row's
    life, so they include the rows it ran with."""
    decode_s = r.t_done - r.t_first
    n = len(r.out)
    return {"prompt_tokens": r.prompt_len, "cached_tokens": r.cached, "new_tokens": n,
            "drafted_tokens": r.drafted, "accepted_tokens": r.accepted,
            "prediction_accepted_tokens": r.pred_accepted,
            "prediction_rejected_tokens": r.pred_drafted - r.pred_accepted,
            "ttft_s": r.t_first - r.t_added,
            "decode_s": decode_s,
            "tokens_per_s": (n - 1) / decode_s if decode_s > 0 and n > 1 else 0.0,
            "batch_size": r.peak_batch, **model_stats}


@torch.no_grad()
def generate(model: OffloadedModel, prompts: Sequence[Sequence[int]],
             max_new_tokens: int | Sequence[int], sampling: SamplingConfig | None = None,
             stop_ids: Sequence[int] = (),
             on_token: Callable[[int, int], bool | None] | None = None,
             keep_logits: bool = False) -> GenerationResult:
    """prompts (B lists of token ids) -> up to max_new_tokens new ids each (one int, or one
    per prompt); on_token(row, id) is called as each token is chosen and ends that row when it
    returns True. Rows that end leave the batch and prompts beyond the model's max_batch take
    the freed rows. A seed s gives prompt b the seed s + b, so it draws what it draws alone
    with that seed. stats: ttft_s is the mean over prompts from the call; tokens_per_s counts
    decode tokens over the time in decode steps."""
    limits = ([max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int)
              else list(max_new_tokens))
    sampling = sampling or SamplingConfig()
    cfgs = seeded_rows(sampling, len(prompts))
    check_prompts(model, prompts)  # all of them, before any work
    if len(limits) != len(prompts):
        raise ValueError(f"{len(limits)} max_new_tokens values for {len(prompts)} prompts")
    batch = DecodeBatch(model, stop_ids, keep_logits=keep_logits)
    calls = [None if on_token is None else (lambda t, b=b: on_token(b, t))
             for b in range(len(prompts))]
    waiting = list(range(len(prompts)))  # more prompts than KV rows wait for a free one
    rows: list[Row] = [None] * len(prompts)  # type: ignore[list-item]
    model.reset_stats()
    t0 = time.perf_counter()
    while waiting or batch.live:
        if waiting and batch.free:
            take, waiting = waiting[:batch.free], waiting[batch.free:]
            added = batch.add([prompts[b] for b in take], [limits[b] for b in take],
                              [calls[b] for b in take], [cfgs[b] for b in take])
            for b, r in zip(take, added, strict=True):
                rows[b] = r
        batch.step()
    model.synchronize()
    n_new, n_prompt = sum(len(r.out) for r in rows), sum(len(p) for p in prompts)
    cached = sum(r.cached for r in rows)
    decode_tokens = n_new - len(rows)  # each first token comes from its prefill
    stats = {"prompt_tokens": n_prompt, "cached_tokens": cached, "new_tokens": n_new,
             "drafted_tokens": sum(r.drafted for r in rows),
             "accepted_tokens": sum(r.accepted for r in rows), "steps": batch.steps,
             "ttft_s": sum(r.t_first - t0 for r in rows) / len(rows),
             "decode_s": batch.decode_s,
             "tokens_per_s": decode_tokens / batch.decode_s if batch.decode_s > 0 else 0.0,
             "prefill_tokens_per_s": (n_prompt - cached) / batch.prefill_s, **model.stats()}
    return GenerationResult([r.out for r in rows], [r.finish_reason for r in rows], stats,
                            [torch.stack(r.logits) for r in rows] if keep_logits else [],
                            [r.logprobs for r in rows], [r.prompt_logprobs for r in rows])
