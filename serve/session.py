"""A served model with its tokenizer: text or ids in, text and ids out, stop strings handled.
Shared by the CLI and the HTTP server."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from serve.answer import AnswerParts
from serve.config import ServeConfig
from serve.generate import GenerationResult, generate
from serve.runtime import OffloadedModel
from serve.sampling import SamplingConfig
from serve.text import StreamDecoder, TextCodec, stop_token_ids


@dataclass
class Completion:
    """One prompt's answer: new token ids, their text (None without a tokenizer) and, for a
    chat answer of a reasoning model, its reasoning (GPT-OSS's analysis channel, the text
    inside <think>...</think>; `text` is then the answer only) and its tool calls."""

    token_ids: list[int]
    text: str | None
    finish_reason: str
    prompt_tokens: int
    reasoning: str | None = None
    tool_calls: list[dict] = field(default_factory=list)  # {"name", "arguments" (JSON text)}
    logprobs: list | None = None  # per new token, when asked for: see generate.Row.logprobs
    prompt_logprobs: list | None = None  # per prompt token, when asked for: the same


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
        self._grammars = None  # serve.grammar.Grammars, made on first use

    def grammar(self, response_format: dict):
        """OpenAI's response_format -> the AnswerGrammar for SamplingConfig.grammar (None:
        plain text), which holds a reasoning model's answer only (serve/grammar.py);
        ValueError names a bad format, a model without a tokenizer or a missing xgrammar."""
        from serve.grammar import AnswerGrammar, Grammars, format_key

        if format_key(response_format) is None:
            return None
        codec = self.need_codec()
        if self._grammars is None:
            self._grammars = Grammars(codec.tok, self.model.cfg.vocab_size, self.stop_ids)
        reasons = codec.harmony is not None or codec.think is not None
        return AnswerGrammar(self._grammars.compile(response_format), codec if reasons else None)

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

    def text_row(self, stop: list[str] | None = None,
                 on_text: Callable[[str], None] | None = None, ignore_eos: bool = False,
                 cancelled: Callable[[], bool] | None = None, channels: bool = False,
                 on_reasoning: Callable[[str], None] | None = None,
                 prompt: list[int] | None = None,
                 on_tool_call: Callable[[dict], None] | None = None) -> TextRow:
        """A TextRow for one sequence of this model (stop strings need the tokenizer)."""
        stop = [s for s in stop or [] if s]
        if stop:
            self.need_codec()
        return TextRow(self.codec, self.stop_ids, stop, on_text, ignore_eos, cancelled,
                       channels, on_reasoning, prompt, on_tool_call)

    def complete(self, prompts: list[list[int]], max_new_tokens: int | list[int],
                 sampling: SamplingConfig | None = None, stop: list[str] | None = None,
                 on_text: Callable[[int, str], None] | None = None,
                 channels: bool = False,
                 on_reasoning: Callable[[int, str], None] | None = None,
                 ) -> tuple[list[Completion], GenerationResult]:
        """Generate for each prompt; on_text(row, new_text) streams text as it is decided
        (ids as text when there is no tokenizer). Stop strings end a row and are cut.
        max_new_tokens: one limit, or one per row. channels: split a reasoning model's chat
        answer into its reasoning, streamed to on_reasoning(row, new_text), and its text."""
        ignore_eos = sampling is not None and sampling.ignore_eos
        rows = [self.text_row(stop, None if on_text is None else (lambda t, b=b: on_text(b, t)),
                              ignore_eos, channels=channels, on_reasoning=None
                              if on_reasoning is None else (lambda t, b=b: on_reasoning(b, t)),
                              prompt=prompts[b])
                for b in range(len(prompts))]
        res = generate(self.model, prompts, max_new_tokens, sampling, self.stop_ids,
                       lambda b, tok: rows[b].on_token(tok))
        out = [Completion(ids, rows[b].finish(), res.finish_reasons[b], len(prompts[b]),
                          rows[b].reasoning, rows[b].tool_calls, res.logprobs[b],
                          res.prompt_logprobs[b])
               for b, ids in enumerate(res.token_ids)]
        return out, res


class TextRow:
    """One sequence's tokens -> its text as they come: a stop string ends the row and is cut;
    on_text(new_text) gets only text that cannot be the start of a stop string (ids as text
    without a tokenizer); cancelled() -> True ends the row at its next token.

    channels=True (a chat answer) splits the answer of a model whose format serve/answer.py
    knows (GPT-OSS's harmony, <think> tags, <tool_call> tags): its reasoning goes to
    `reasoning` (streamed to on_reasoning), its tool calls to `tool_calls` (each to
    on_tool_call), the rest to the text; framing is dropped; stop strings apply to the text.
    prompt: the prompt's ids (a template may open the thought)."""

    def __init__(self, codec: TextCodec | None, stop_ids, stop: list[str],
                 on_text: Callable[[str], None] | None = None, ignore_eos: bool = False,
                 cancelled: Callable[[], bool] | None = None, channels: bool = False,
                 on_reasoning: Callable[[str], None] | None = None,
                 prompt: list[int] | None = None,
                 on_tool_call: Callable[[dict], None] | None = None):
        self.codec, self.stop_ids, self.stop = codec, set(stop_ids), list(stop)
        self.on_text, self.ignore_eos, self.cancelled = on_text, ignore_eos, cancelled
        self.decoder = StreamDecoder(codec) if codec else None
        self.text = ""
        self.held = 0  # characters streamed so far
        self.stopped = False
        self.parts = AnswerParts(codec, prompt, on_tool_call) \
            if channels and AnswerParts.knows(codec) else None
        self.reasoning: str | None = None if self.parts is None else ""
        self.on_reasoning = on_reasoning
        self._reasoner = StreamDecoder(codec) if self.parts is not None else None

    @property
    def tool_calls(self) -> list[dict]:
        return [] if self.parts is None else self.parts.tool_calls

    def on_token(self, tok: int) -> bool:
        """Take the next token -> True when the row must end here."""
        if self.cancelled is not None and self.cancelled():
            return True
        if self.decoder is None:
            if self.on_text is not None:
                self.on_text(f"{tok} ")
            return False
        if tok in self.stop_ids and not self.ignore_eos:
            return False
        routed = [("text", tok)] if self.parts is None else self.parts.route(tok)
        return any(self._show(part, t) for part, t in routed)

    def _show(self, part: str, tok: int) -> bool:
        """Add a token to the reasoning or the text -> True when a stop string ends the row."""
        if part == "reasoning":
            piece = self._reasoner.push(tok)
            self.reasoning += piece
            if piece and self.on_reasoning is not None:
                self.on_reasoning(piece)
            return False
        if self.stopped:
            return True
        self.text += self.decoder.push(tok)
        hit = next((self.text.index(s) for s in self.stop if s in self.text), None)
        if hit is not None:
            self.text, self.stopped = self.text[:hit], True
        if self.on_text is not None:
            safe = len(self.text) if hit is not None else max(
                self.held, len(self.text) - max((len(s) - 1 for s in self.stop), default=0))
            if safe > self.held:
                self.on_text(self.text[self.held:safe])
                self.held = safe
        return hit is not None

    def finish(self) -> str | None:
        """The row has ended -> its whole text (None without a tokenizer); the part not yet
        streamed goes to on_text (and the reasoning's to on_reasoning)."""
        if self.decoder is None:
            return None
        if self.parts is not None:
            for part, t in self.parts.finish():
                self._show(part, t)
            piece = self._reasoner.flush()
            self.reasoning += piece
            if piece and self.on_reasoning is not None:
                self.on_reasoning(piece)
        if not self.stopped:
            self.text += self.decoder.flush()
            hit = next((self.text.index(s) for s in self.stop if s in self.text), None)
            self.text = self.text[:hit]
        if self.on_text is not None and len(self.text) > self.held:
            self.on_text(self.text[self.held:])
            self.held = len(self.text)
        return self.text
