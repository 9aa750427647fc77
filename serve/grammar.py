"""Structured output: an answer held to JSON (any JSON object, or one JSON schema), OpenAI's
"response_format", with xgrammar (the grammar engine of vLLM and SGLang): before each token
is drawn, the tokens the grammar cannot take next are masked out, and once the JSON is whole
only a stop token may follow. json_object asks for one JSON object; json_schema for a value
of the schema. The JSON is compact (no whitespace but one space after ':' and ','), so a
model cannot pad it without end.

`Grammars` compiles response formats for one tokenizer (cached); a compiled grammar rides in
SamplingConfig.grammar, and each row of a DecodeBatch follows it with its own `Constraint`.
xgrammar is optional (`pip install 'moe-framework[structured]'`); a format asked without it is
refused by name.
"""

from __future__ import annotations

import json
from collections import OrderedDict

import torch

INSTALL = "pip install 'moe-framework[structured]' (xgrammar)"


def _xgrammar():
    try:
        import xgrammar
    except ImportError as e:
        raise ValueError(f"structured output (response_format) needs xgrammar: {INSTALL}") \
            from e
    return xgrammar


def format_key(fmt: dict) -> str | None:
    """OpenAI's response_format -> a canonical key: None for {"type": "text"} (no constraint),
    "json" for {"type": "json_object"}, the schema's JSON text for {"type": "json_schema",
    "json_schema": {"schema": {...}, ...}}; ValueError names what is wrong."""
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise ValueError("'response_format' must be an object with a \"type\"")
    kind = fmt["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ValueError("'response_format' of type json_schema needs \"json_schema\": "
                             "{\"name\": ..., \"schema\": {...}}")
        return json.dumps(schema)  # key order kept: properties come in the order given
    raise ValueError(f"'response_format' type {kind!r} is not supported: text, json_object or "
                     "json_schema")


class Grammars:
    """Compiled grammars for one tokenizer (tokenizers.Tokenizer) and model vocabulary."""

    def __init__(self, tok, vocab_size: int, stop_ids, cache: int = 64):
        self._tok, self.vocab_size, self._stop = tok, vocab_size, sorted(stop_ids)
        self._compiler = None
        self._cache: OrderedDict[str, object] = OrderedDict()
        self._size = cache

    def compiler(self):
        if self._compiler is None:
            xgr = _xgrammar()
            from transformers import PreTrainedTokenizerFast

            info = xgr.TokenizerInfo.from_huggingface(
                PreTrainedTokenizerFast(tokenizer_object=self._tok), vocab_size=self.vocab_size,
                stop_token_ids=self._stop)
            self._compiler = xgr.GrammarCompiler(info)
        return self._compiler

    def compile(self, fmt: dict):
        """OpenAI's response_format -> a compiled grammar (None for plain text)."""
        key = format_key(fmt)
        if key is None:
            return None
        if key not in self._cache:
            comp = self.compiler()
            try:  # compact JSON: a model cannot pad it with whitespace without end
                grammar = comp.compile_json_schema('{"type": "object"}' if key == "json"
                                                   else key, any_whitespace=False)
            except Exception as e:  # noqa: BLE001 - xgrammar's errors for a bad schema
                raise ValueError(f"'response_format' schema cannot be compiled: {e}") from e
            self._cache[key] = grammar
            if len(self._cache) > self._size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key]


class Constraint:
    """One row's place in a compiled grammar: `mask` the logits of its next token, `accept`
    the token drawn; `done` once the grammar has ended (its stop token taken)."""

    def __init__(self, grammar, vocab_size: int):
        xgr = _xgrammar()
        self._xgr = xgr
        self.matcher = xgr.GrammarMatcher(grammar)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [V] -> a copy with the tokens the grammar cannot take next at -inf."""
        out = logits.float().clone().unsqueeze(0)
        self.matcher.fill_next_token_bitmask(self.bitmask)
        self._xgr.apply_token_bitmask_inplace(out, self.bitmask.to(out.device))
        return out[0]

    def accept(self, tok: int) -> None:
        if not self.matcher.accept_token(tok):
            raise RuntimeError(f"token {tok} was drawn against the grammar")

    @property
    def done(self) -> bool:
        return self.matcher.is_terminated()
