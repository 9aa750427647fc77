"""Tokenizer, stop tokens and chat template of a model directory (tokenizer.json through the
`tokenizers` library; chat templates rendered with jinja2 in a sandbox, as transformers does)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

# Used when a directory has no chat template of its own.
PLAIN_CHAT = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
              "{% if add_generation_prompt %}assistant:{% endif %}")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _token_str(v) -> str | None:
    return v.get("content") if isinstance(v, dict) else v


def stop_token_ids(model_dir: Path) -> set[int]:
    """eos ids from generation_config.json and config.json."""
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        v = _read_json(Path(model_dir) / name).get("eos_token_id")
        ids.update(v if isinstance(v, list) else [] if v is None else [v])
    return ids


class HarmonyTokens(NamedTuple):
    """Ids of the special tokens that frame a message in the harmony format (GPT-OSS):
    <|start|>role<|channel|>name<|message|>text<|end|>."""

    start: int
    channel: int
    message: int
    end: int


# fill-in-the-middle tokens (begin, hole, end), by model family; the prompt is
# begin + prefix + hole + suffix + end, and the model writes the middle
FIM_STYLES = (("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),  # Qwen2.5 / Qwen3 coders
              ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),  # DeepSeek-Coder (V2: MoE)
              ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"))  # StarCoder

# names a chat template reads that callers may not set through template kwargs
_RESERVED = {"messages", "add_generation_prompt", "bos_token", "eos_token"}


_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


def _as_templates_read(message: dict) -> dict:
    """A chat message as transformers hands it to a template: keys whose value is None
    dropped (OpenAI clients send "content": null beside tool calls), and an earlier answer's
    reasoning under both names templates read ("reasoning_content"; "thinking": GPT-OSS).
    Content given as OpenAI's text parts is joined into one string (lines); tool calls'
    arguments given as JSON text (OpenAI's form) are parsed, as templates expect them."""
    m = {k: v for k, v in message.items() if v is not None}
    if isinstance(m.get("tool_calls"), list):
        m["tool_calls"] = [_with_parsed_arguments(c) for c in m["tool_calls"]]
    parts = m.get("content")
    if isinstance(parts, list):  # OpenAI's content parts: text only for a text model
        if not all(isinstance(p, dict) and p.get("type") == "text"
                   and isinstance(p.get("text"), str) for p in parts):
            raise ValueError("a message's content parts must all be {\"type\": \"text\", "
                             "\"text\": ...}: this model reads text only")
        m["content"] = "\n".join(p["text"] for p in parts)
    reasoning = next((m[k] for k in _REASONING_KEYS if k in m), None)
    if reasoning is not None:
        m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
    return m


def _with_parsed_arguments(call):
    """A tool call whose function's arguments are JSON text -> the same with them parsed
    (left as they are when they do not read)."""
    fn = call.get("function") if isinstance(call, dict) else None
    if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
        try:
            return dict(call, function=dict(fn, arguments=json.loads(fn["arguments"])))
        except json.JSONDecodeError:
            pass
    return call


class TextCodec:
    """Text <-> token ids for one model directory."""

    def __init__(self, model_dir: str | Path):
        from tokenizers import Tokenizer

        d = Path(model_dir)
        if not (d / "tokenizer.json").exists():
            how = ("; it has a sentencepiece tokenizer.model, which transformers converts: "
                   f"python -c \"from transformers import AutoTokenizer; AutoTokenizer."
                   f"from_pretrained('{d}').save_pretrained('{d}')\""
                   if (d / "tokenizer.model").exists() else "")
            raise FileNotFoundError(f"{d} has no tokenizer.json: pass token ids "
                                    f"(--prompt-ids) or add the tokenizer files{how}")
        self.tok = Tokenizer.from_file(str(d / "tokenizer.json"))
        cfg = _read_json(d / "tokenizer_config.json")
        template = cfg.get("chat_template")
        if (d / "chat_template.jinja").exists():
            template = (d / "chat_template.jinja").read_text()
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"),
                            template[0]["template"])
        self.chat_template = template or PLAIN_CHAT
        self.bos_token = _token_str(cfg.get("bos_token"))
        self.eos_token = _token_str(cfg.get("eos_token"))
        self.stop_ids = stop_token_ids(d)
        if self.eos_token is not None and self.tok.token_to_id(self.eos_token) is not None:
            self.stop_ids.add(self.tok.token_to_id(self.eos_token))
        ids = [self.tok.token_to_id(t) for t in
               ("<|start|>", "<|channel|>", "<|message|>", "<|end|>")]
        # set when the tokenizer speaks harmony: chat answers then split into channels
        self.harmony = HarmonyTokens(*ids) if None not in ids else None
        # else <think>...</think> (Qwen3, DeepSeek-R1): the reasoning before the answer
        think = (self.tok.token_to_id("<think>"), self.tok.token_to_id("</think>"))
        self.think = think if self.harmony is None and None not in think else None
        tags = (self.tok.token_to_id("<tool_call>"), self.tok.token_to_id("</tool_call>"))
        # Qwen3 / Hermes tool calls (a harmony model calls tools in its own framing)
        self.tool_tags = tags if self.harmony is None and None not in tags else None

    def fill_in_middle(self, prefix: str, suffix: str) -> list[int]:
        """The prompt ids asking the model for the text between prefix and suffix, in its
        family's fill-in-the-middle format (FIM_STYLES); ValueError when it has none."""
        style = next((s for s in FIM_STYLES
                      if all(self.tok.token_to_id(t) is not None for t in s)), None)
        if style is None:
            raise ValueError("'suffix' needs fill-in-the-middle tokens, and this model's "
                             "tokenizer has none (" + ", ".join(s[0] for s in FIM_STYLES) + ")")
        begin, hole, end = style
        return self.encode(f"{begin}{prefix}{hole}{suffix}{end}")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def render_chat(self, messages: list[dict], /, add_generation_prompt: bool = True,
                    **template_kwargs) -> str:
        """[{'role', 'content'}, ...] -> the prompt text the model was tuned on.
        template_kwargs: further variables the template reads (e.g. GPT-OSS's
        reasoning_effort), as transformers' apply_chat_template passes them."""
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        for m in messages:
            if not isinstance(m, dict) or "role" not in m or (
                    "content" not in m and "tool_calls" not in m):
                raise ValueError("each chat message needs a 'role' and a 'content' (or "
                                 "'tool_calls')")
        messages = [_as_templates_read(m) for m in messages]
        clash = sorted(_RESERVED & set(template_kwargs))
        if clash:
            raise ValueError(f"chat template kwargs may not set {', '.join(clash)}")

        def raise_exception(msg):
            raise TemplateError(msg)

        # as transformers renders them: loop controls, raise_exception, strftime_now, tojson
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
        try:
            return env.from_string(self.chat_template).render(
                **template_kwargs, messages=messages,
                add_generation_prompt=add_generation_prompt, bos_token=self.bos_token or "",
                eos_token=self.eos_token or "")
        except (TemplateError, TypeError) as e:  # raise_exception, or messages it cannot read
            raise ValueError(f"the chat template refused the messages: {e}") from e

    def encode_chat(self, messages: list[dict], /, **template_kwargs) -> list[int]:
        # the template writes any BOS itself
        return self.encode(self.render_chat(messages, **template_kwargs),
                           add_special_tokens=False)


class StreamDecoder:
    """Feeds token ids, returns the new text each time (whole characters only)."""

    def __init__(self, codec: TextCodec):
        self.codec, self.ids, self.text = codec, [], ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.codec.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest
            return ""
        new, self.text = text[len(self.text):], text
        return new

    def flush(self) -> str:
        """The text held back at the end (an incomplete character decodes as U+FFFD)."""
        text = self.codec.decode(self.ids)
        new, self.text = text[len(self.text):], text
        return new
