"""A served model with its tokenizer: text or ids in, text and ids out, stop strings handled.
Shared by the CLI and the HTTP server."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from serve.config import ServeConfig
from serve.generate import GenerationResult, SamplingConfig, generate
from serve.runtime import OffloadedModel
from serve.text import StreamDecoder, TextCodec, stop_token_ids


@dataclass
class Completion:
    """One prompt's answer: new token ids, their text (None without a tokenizer)."""

    token_ids: list[int]
    text: str | None
    finish_reason: str
    prompt_tokens: int


class Session:
    """model directory + ServeConfig -> completions for prompts given as text, ids or chat."""

    def __init__(self, cfg: ServeConfig, verbose: bool = False):
        self.model = OffloadedModel(cfg, verbose=verbose)
        self.name = Path(cfg.model).name
        try:
            self.codec: TextCodec | None = TextCodec(cfg.model)
        except FileNotFoundError:
            self.codec = None
        self.stop_ids = self.codec.stop_ids if self.codec else stop_token_ids(Path(cfg.model))

    def need_codec(self) -> TextCodec:
        if self.codec is None:
            raise ValueError(f"{self.model.scfg.model} has no tokenizer.json: text prompts need "
                             "one; pass token ids instead")
        return self.codec

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.need_codec().encode(prompt)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise ValueError("a prompt must be a string or a list of token ids")
        return list(prompt)

    def complete(self, prompts: list[list[int]], max_new_tokens: int | list[int],
                 sampling: SamplingConfig | None = None,
                 stop: list[str] | list[list[str]] | None = None,
                 on_text: Callable[[int, str], None] | None = None,
                 ignore_eos: bool = False,
                 cancelled: Callable[[int], bool] | None = None,
                 ) -> tuple[list[Completion], GenerationResult]:
        """Generate for each prompt; on_text(row, new_text) streams text as it is decided
        (ids as text when there is no tokenizer). Stop strings (one list for every row, or a
        list per row) end a row and are cut. max_new_tokens: one limit, or one per row.
        cancelled(row) -> True ends that row at its next token (its client has gone)."""
        stops = _row_stops(stop, len(prompts))
        if any(stops):
            self.need_codec()
        decoders = [StreamDecoder(self.codec) if self.codec else None for _ in prompts]
        texts = [""] * len(prompts)
        held = [0] * len(prompts)  # characters not yet streamed (could start a stop string)
        stopped = [False] * len(prompts)

        def on_token(row: int, tok: int) -> bool:
            if cancelled is not None and cancelled(row):
                return True
            stop, dec = stops[row], decoders[row]
            if dec is None:
                if on_text is not None:
                    on_text(row, f"{tok} ")
                return False
            if tok in self.stop_ids and not ignore_eos:
                return False
            texts[row] += dec.push(tok)
            hit = next((texts[row].index(s) for s in stop if s in texts[row]), None)
            if hit is not None:
                texts[row], stopped[row] = texts[row][:hit], True
            if on_text is not None:
                safe = len(texts[row]) if hit is not None else max(
                    held[row], len(texts[row]) - max((len(s) - 1 for s in stop), default=0))
                if safe > held[row]:
                    on_text(row, texts[row][held[row]:safe])
                    held[row] = safe
            return hit is not None

        res = generate(self.model, prompts, max_new_tokens, sampling,
                       () if ignore_eos else self.stop_ids, on_token)
        for row, dec in enumerate(decoders):
            if dec is None:
                continue
            if not stopped[row]:
                texts[row] += dec.flush()
                hit = next((texts[row].index(s) for s in stops[row] if s in texts[row]), None)
                texts[row] = texts[row][:hit]
            if on_text is not None and len(texts[row]) > held[row]:
                on_text(row, texts[row][held[row]:])
        out = [Completion(ids, texts[i] if self.codec else None, res.finish_reasons[i],
                          len(prompts[i])) for i, ids in enumerate(res.token_ids)]
        return out, res


def _row_stops(stop: list[str] | list[list[str]] | None, rows: int) -> list[list[str]]:
    """stop strings for every row, or one list per row -> one non-empty-string list per row."""
    if not stop:
        return [[] for _ in range(rows)]
    if all(isinstance(s, str) for s in stop):
        return [[s for s in stop if s] for _ in range(rows)]
    if len(stop) != rows or not all(isinstance(s, list) for s in stop):
        raise ValueError(f"stop must be a list of strings or {rows} lists of strings, one per "
                         "prompt")
    return [[x for x in s if x] for s in stop]
