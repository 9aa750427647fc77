"""`moe-serve`: generate, chat, bench, plan, convert and an OpenAI-compatible HTTP server for
an offloaded MoE model directory (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2 / V3, GLM-4.5,
GLM-4.7-Flash, dots.llm1, GPT-OSS, ERNIE-4.5, MiniMax-M2, or our own exports).

    moe-serve generate --model DIR --prompt "def f(" --max-new-tokens 32 --memory-budget 8GiB
    moe-serve generate --model DIR --prompt-ids 1,2,3 --json
    moe-serve plan --model DIR --memory-budget 24GiB
    moe-serve convert --model DIR --out DIR-FP8   (FP8 block-scaled copy: half bf16's bytes)
    moe-serve chat --model DIR   [--chat-template-kwargs '{"reasoning_effort": "low"}']
    moe-serve bench --model DIR --memory-budget 24GiB --json
    moe-serve http --model DIR --port 8000
    moe-serve generate --config gpu_24gib --model DIR --prompt "Hi"   (configs/serve/ presets)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from kernels.quant import FP8_FORMATS
from serve.config import (
    CACHE_POLICIES,
    KV_CACHE_DTYPES,
    MISS_QUANTS,
    QUANT_CHOICES,
    ServeConfig,
    read_serve_config,
)
from serve.sampling import SamplingConfig
from serve.units import parse_size


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--prompt-ids takes comma-separated integers, got {text!r}") from None


def _at_least(least: int):
    """An argparse type: an integer >= least."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if v < least:
            raise argparse.ArgumentTypeError(f"must be >= {least}, got {v}")
        return v
    return parse


def _port(text: str) -> int:
    v = _at_least(0)(text)
    if v > 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 0-65535, got {v}")
    return v


def _check_listen(host: str, port: int) -> None:
    """ValueError when host:port cannot be listened on (in use, not this machine's address):
    checked before the model loads, not after."""
    import socket

    try:
        family, kind, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as HTTPServer does
            s.bind(addr)
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def _json_object(text: str) -> dict:
    try:
        v = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}): {text!r}") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"takes a JSON object, got {text!r}")
    return v


def _template_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chat-template-kwargs", type=_json_object, default={}, metavar="JSON",
                   help="variables for the chat template, e.g. "
                   "'{\"reasoning_effort\": \"high\"}' (GPT-OSS)")


def _runtime_args(p: argparse.ArgumentParser) -> None:
    """Flags default to None: unset ones come from --config, else from ServeConfig."""
    p.add_argument("--config", default=None, metavar="NAME|FILE",
                   help="a serving preset: a YAML file of ServeConfig fields or the name of "
                        "one in configs/serve/; the flags given here override it")
    p.add_argument("--model", default=None,
                   help="model directory (config.json, safetensors); required unless the "
                        "--config names it")
    p.add_argument("--memory-budget", type=_size, default=None, metavar="SIZE",
                   help="bytes the runtime may keep on the device (e.g. 300KiB, 8GiB); "
                        "default: 90%% of the device's free memory")
    p.add_argument("--host-budget", type=_size, default=None, metavar="SIZE",
                   help="expert bytes kept in host RAM; the rest stays on disk")
    p.add_argument("--disk-readers", type=int, default=None, metavar="N",
                   help="threads reading the experts that stay on disk, several at once and "
                   "beside the device's work (default: 4 on cuda, 0 on cpu; 0: each is "
                   "read when it is needed)")
    p.add_argument("--cache-policy", choices=CACHE_POLICIES, default=None,
                   help="default: lru")
    p.add_argument("--prefetch", choices=["none", "cross-layer"], default=None,
                   help="default: cross-layer")
    p.add_argument("--prefetch-min-weight", type=float, default=None, metavar="W",
                   help="prefetch only the predicted experts whose predicted weight reaches W "
                        "for some token (default 0: every top-k prediction); wrong "
                        "predictions cost PCIe bytes")
    p.add_argument("--prefetch-min-precision", type=float, default=None, metavar="P",
                   help="copy a layer's predicted experts only while at least this share of "
                        "its recent predictions were right (they are scored without copies "
                        "until then; default 0.75; 0: always copy)")
    p.add_argument("--prefetch-fraction", type=float, default=None, metavar="F",
                   help="copy ahead only this share of each predicted expert's bytes, the "
                        "rest when its layer uses it (default 1: all); sized to the link's "
                        "idle time between layers, a wrong prediction costs F of a copy")
    p.add_argument("--quant", choices=QUANT_CHOICES, default=None,
                   help="experts kept packed: int8 / int4 quantized at load, mxfp4 as an "
                        "MXFP4 checkpoint (GPT-OSS) stores them, fp8 as an FP8 block-scaled "
                        "checkpoint stores them (half bf16's bytes a slot); auto (default): "
                        "mxfp4 / fp8 for such checkpoints, else none")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default=None,
                   help="default: auto (cuda when present)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   default=None, help="default: auto (bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--max-context", type=int, default=None,
                   help="tokens of KV cache per sequence (default: the model's, at most 4096)")
    p.add_argument("--max-batch", type=int, default=None,
                   help="sequences decoded at once, each row reserving max-context tokens "
                   "of KV cache (generate: default one per prompt, more prompts take "
                   "turns; http: default 4, concurrent requests decode together)")
    p.add_argument("--prefill-step-tokens", type=int, default=None, metavar="N",
                   help="while rows decode, a step reads at most N prompt tokens (at least a "
                   "chunk of each new prompt), so the running rows wait less a step; default: "
                   "new prompts are read whole in one step, their experts moved once with the "
                   "decode's")
    p.add_argument("--host-compute-tokens", type=int, default=None, metavar="N",
                   help="a missing expert that at most N of a step's tokens use runs on the "
                   "host CPU instead of crossing to the device (decode: N of 1-4 pays when "
                   "the CPU reads memory faster than PCIe moves it); default 0: off")
    p.add_argument("--skip-miss-weight", type=float, default=None, metavar="W",
                   help="approximate: a missing expert that every token using it weighs below "
                   "W (not as its first choice) is skipped, not copied in; its tokens' other "
                   "experts take its weight (e.g. 0.2 for Mixtral's top-2); default 0: exact")
    p.add_argument("--miss-quant", choices=MISS_QUANTS, default=None,
                   help="approximate, with --miss-quant-weight W: a missing expert that every "
                   "token using it weighs below W (not as its first choice) runs from a copy "
                   "quantized to this precision (2-4x fewer bytes to move) in a pool of its "
                   "own; default none: exact")
    p.add_argument("--miss-quant-weight", type=float, default=None, metavar="W",
                   help="the weight below which --miss-quant stands in for a missing expert")
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default=None,
                   help="int8: KV entries as int8 codes with a scale per token, head and 64 "
                   "channels, about half the bytes, so more expert slots fit (approximate); "
                   "default auto: the compute dtype")
    p.add_argument("--miss-quant-slots", type=int, default=None, metavar="N",
                   help="slots of the stand-ins' pool, in the budget (default: top-k x "
                   "max batch; more keep stand-ins from step to step)")
    p.add_argument("--speculate", type=int, default=None, metavar="K",
                   help="answers draft up to K tokens a step from the prompt and answer so "
                   "far (prompt lookup) and keep those the model confirms in the same "
                   "forward (greedy: its argmax; sampled: speculative sampling): what a "
                   "token a step gives, in fewer steps when the answer repeats its prompt; "
                   f"default 0: off ({DRAFT_SPECULATE} with --draft-model)")
    p.add_argument("--draft-model", default=None, metavar="DIR",
                   help="a small causal LM sharing the model's tokenizer (a Hugging Face "
                   "directory, e.g. Qwen3-0.6B for Qwen3-30B-A3B), loaded whole on the device "
                   "within the budget, drafts the --speculate tokens where prompt lookup "
                   "finds none")
    p.add_argument("--draft-min-prob", type=float, default=None, metavar="P",
                   help="a draft stops before a token the draft model gives less than P "
                   "(default 0.4): a rejected draft still moves its experts")
    p.add_argument("--offload-dir", default=None, help="where quantized disk-tier experts go")
    p.add_argument("--trace-experts", default=None, metavar="FILE",
                   help="write the experts each forward pass runs from the device cache to "
                   "FILE (JSON lines), for `moe-serve plan --trace FILE`")
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false", default=None,
                   help="read every prompt whole, even where a KV-cache row holds its start "
                   "(the chat so far, a shared system prompt)")
    p.add_argument("--cuda-graphs", dest="cuda_graphs", action="store_true", default=None,
                   help="once every expert is resident (a budget that holds them all), replay "
                   "each decode step from a CUDA graph: one launch a token instead of one a "
                   "kernel (attention then reads a power of two of keys under a mask)")
    p.add_argument("--quiet", action="store_true", help="no loading messages on stderr")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=_at_least(1), default=64)
    p.add_argument("--temperature", type=float, default=None,
                   help="0 or unset: greedy (unless --top-k/--top-p are given)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None,
                   help="sampling seed; prompt i of a batch uses seed + i")
    p.add_argument("--repetition-penalty", type=float, default=1.0, metavar="P",
                   help="divide (multiply, when negative) the logits of tokens already in the "
                   "prompt or answer by P, as transformers does (1: off)")
    p.add_argument("--presence-penalty", type=float, default=0.0, metavar="A",
                   help="OpenAI's: a token already in the answer loses A (in [-2, 2])")
    p.add_argument("--frequency-penalty", type=float, default=0.0, metavar="F",
                   help="OpenAI's: a token the answer holds c times loses F c (in [-2, 2])")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence")
    p.add_argument("--prediction-file", default=None, metavar="FILE",
                   help="text the answer is expected to be much like (OpenAI's predicted "
                   "outputs: the file an edit rewrites), drafted for speculation; the answer "
                   "is the model's whatever it holds")
    p.add_argument("--response-format", default=None, metavar="json|SCHEMA.json",
                   help="hold the answer to JSON: 'json' (any JSON value the grammar of "
                   "OpenAI's json_object allows) or a JSON-schema file (needs xgrammar)")


def _sampling(a, session=None) -> SamplingConfig:
    """The sampling flags -> SamplingConfig; with the session, the response format's grammar
    and the prediction file's tokens too (both need the model's tokenizer)."""
    sampled = a.top_k > 0 or a.top_p < 1
    temp = a.temperature if a.temperature is not None else (1.0 if sampled else 0.0)
    fmt = _response_format(a.response_format) if a.response_format is not None else None
    if a.prediction_file is not None and not Path(a.prediction_file).is_file():
        raise ValueError(f"--prediction-file {a.prediction_file}: no such file")
    grammar = prediction = None
    if session is not None:
        grammar = session.grammar(fmt) if fmt is not None else None
        if a.prediction_file is not None:
            prediction = tuple(session.need_codec().encode(
                Path(a.prediction_file).read_text(), add_special_tokens=False))
    return SamplingConfig(temperature=temp, top_k=a.top_k, top_p=a.top_p, seed=a.seed,
                          repetition_penalty=a.repetition_penalty,
                          presence_penalty=a.presence_penalty,
                          frequency_penalty=a.frequency_penalty, grammar=grammar,
                          ignore_eos=a.ignore_eos, prediction=prediction)


def _check_before_loading(a) -> None:
    """The generation flags that need no model, checked before it loads (a mistyped --top-p
    should not cost a model's load first)."""
    _sampling(a).check()


def _response_format(value: str) -> dict:
    """--response-format: 'json', or a JSON-schema file -> OpenAI's response_format."""
    if value == "json":
        return {"type": "json_object"}
    path = Path(value)
    if not path.is_file():
        raise ValueError(f"--response-format {value!r} is neither 'json' nor a JSON-schema file")
    try:
        schema = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--response-format {value}: not JSON ({e})") from e
    return {"type": "json_schema", "json_schema": {"name": path.stem, "schema": schema}}


FLAG_FIELDS = ("model", "device", "dtype", "memory_budget", "host_budget", "disk_readers",
               "cache_policy", "prefetch", "prefetch_min_weight", "prefetch_min_precision",
               "prefetch_fraction", "quant", "max_batch", "max_context", "offload_dir",
               "prefix_cache", "prefill_step_tokens", "host_compute_tokens", "skip_miss_weight",
               "miss_quant", "miss_quant_weight", "miss_quant_slots", "kv_cache_dtype", "speculate",
               "draft_model", "draft_min_prob", "trace_experts", "cuda_graphs")
# tokens drafted a step with a draft model when neither a flag nor the preset says
DRAFT_SPECULATE = 4


def _config(a, batch: int = 1) -> ServeConfig:
    """ServeConfig from the flags given, over the --config preset, over the defaults; the
    batch (one row per prompt) unless a flag or the preset sets max_batch."""
    fields = read_serve_config(a.config) if a.config else {}
    fields.update({k: getattr(a, k) for k in FLAG_FIELDS if getattr(a, k) is not None})
    if not fields.get("model"):
        raise ValueError("no model directory: give --model DIR (or model: in the --config)")
    fields.setdefault("max_batch", batch)
    if fields.get("draft_model"):
        fields.setdefault("speculate", DRAFT_SPECULATE)
    return ServeConfig(**fields)


def _session(a, batch: int = 1):
    from serve.session import Session

    return Session(_config(a, batch), verbose=not a.quiet)


def cmd_generate(a) -> None:
    prompts_text = a.prompt or []
    if bool(prompts_text) == bool(a.prompt_ids):
        raise ValueError("give the prompt as --prompt TEXT or as --prompt-ids 1,2,3 (not both)")
    batch = len(prompts_text) or len(a.prompt_ids)
    _check_before_loading(a)
    s = _session(a, batch)
    prompts = [s.encode(p) for p in prompts_text] if prompts_text else a.prompt_ids
    stream = not a.json and batch == 1
    on_text = (lambda row, text: print(text, end="", flush=True)) if stream else None
    outs, res = s.complete(prompts, a.max_new_tokens, _sampling(a, s), a.stop, on_text)
    if a.json:
        if batch == 1:
            o = outs[0]
            doc = {"token_ids": o.token_ids, "text": o.text, "finish_reason": o.finish_reason}
        else:
            doc = {"token_ids": [o.token_ids for o in outs], "text": [o.text for o in outs],
                   "finish_reason": [o.finish_reason for o in outs]}
        print(json.dumps(dict(doc, stats=res.stats)))
        return
    if stream:
        print()
    else:
        for i, o in enumerate(outs):
            label = repr(prompts_text[i]) if prompts_text else f"ids {prompts[i]}"
            print(f"--- prompt {i + 1}: {label}")
            print((prompts_text[i] + o.text) if o.text is not None and prompts_text
                  else o.text if o.text is not None else " ".join(map(str, o.token_ids)))
    st = res.stats
    cached = f", {st['cached_tokens']} prompt tokens cached" if st["cached_tokens"] else ""
    extra = "".join(f", {text}" for text, on in (
        (f"{st['accepted_tokens']}/{st['drafted_tokens']} drafts kept", st["drafted_tokens"]),
        (f"{st['experts_on_host']} experts run on the host", st["experts_on_host"]),
        (f"{st['experts_skipped']} missing experts skipped", st["experts_skipped"]),
        (f"{st['experts_low_precision']} low-precision stand-ins",
         st["experts_low_precision"]),
        (f"prefetch withheld for {st.get('prefetch_withheld', 0)} of "
         f"{st.get('prefetch_withheld', 0) + st.get('prefetch_copied', 0)} layer predictions "
         "(precision under --prefetch-min-precision)", st.get("prefetch_withheld", 0))) if on)
    print(f"[{st['new_tokens']} tokens{cached}, {st['tokens_per_s']:.1f} tok/s decode, ttft "
          f"{st['ttft_s'] * 1e3:.0f} ms, expert hit rate {st['expert_hit_rate']:.2f}, "
          f"prefetch precision {st['prefetch_precision']:.2f} recall "
          f"{st['prefetch_recall']:.2f}, {st['bytes_to_device'] / 2**20:.1f} MiB to device"
          f"{extra}]", file=sys.stderr)


def cmd_chat(a) -> None:
    _check_before_loading(a)
    s = _session(a)
    codec = s.need_codec()
    sampling = _sampling(a, s)
    messages: list[dict] = []
    if a.system:
        messages.append({"role": "system", "content": a.system})
    print("moe-serve chat: type a message; an empty line or Ctrl-D ends.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip() or line.strip() in ("/exit", "/quit"):
            break
        messages.append({"role": "user", "content": line})
        ids = codec.encode_chat(messages, **a.chat_template_kwargs)
        outs, _ = s.complete([ids], a.max_new_tokens, sampling, a.stop,
                             lambda row, text: print(text, end="", flush=True),
                             channels=True,
                             on_reasoning=_show_reasoning if a.show_reasoning else None)
        print()
        for c in outs[0].tool_calls:  # the model asked for a tool this chat does not run
            print(f"[tool call {c['name']}({c['arguments']}): not run here]", file=sys.stderr)
        messages.append({"role": "assistant", "content": outs[0].text})


def _show_reasoning(row: int, text: str) -> None:
    """A reasoning model's reasoning, on stderr."""
    print(text, end="", file=sys.stderr, flush=True)


def cmd_plan(a) -> None:
    from serve.plan import compare, format_comparison, format_plan, plan

    bw = None if a.pcie_gbps is None else a.pcie_gbps * 1e9
    if a.compare and a.trace:
        raise ValueError("--trace replays the trace at one expert format; drop --compare")
    if a.compare:
        plans = compare(_config(a), bw)
        print(json.dumps(plans) if a.json else format_comparison(plans))
        return
    p = plan(_config(a), bw)
    if a.trace:
        from serve.plan import format_trace, with_trace

        p = with_trace(p, a.trace, verbose=not a.quiet)
        print(json.dumps(p) if a.json else format_plan(p) + "\n" + format_trace(p))
        return
    print(json.dumps(p) if a.json else format_plan(p))


def cmd_convert(a) -> None:
    from moe.hf_fp8 import write_fp8_checkpoint
    from serve.store import ModelDirError, WeightStore
    from serve.units import format_size

    done = write_fp8_checkpoint(Path(a.model), Path(a.out), a.block, a.fmt, not a.quiet,
                                a.experts_only)
    print(f"{a.out}: {done['weights_fp8']} {'expert' if a.experts_only else 'linear'} "
          f"weights as {a.fmt} in "
          f"{a.block[0]}x{a.block[1]} blocks, {format_size(done['bytes_before'])} -> "
          f"{format_size(done['bytes_after'])}")
    try:
        why = WeightStore(a.out, tiers=False).why_not_fp8()
    except ModelDirError as e:
        print(f"moe-serve cannot serve it: {e}")
        return
    print("its experts stay FP8 in RAM, on the wire and in their slots (--quant fp8, the "
          "default)" if why is None else f"its experts are widened when read: {a.out} {why}")


def _block(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in text.lower().replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a block is ROWS,COLS, e.g. 128,128; got "
                                         f"{text!r}") from None
    if rows < 1 or cols < 1:
        raise argparse.ArgumentTypeError(f"block sizes must be positive, got {text!r}")
    return rows, cols


def cmd_bench(a) -> None:
    from serve.bench import format_report, run_bench

    cfg = _config(a, a.batch)
    report = run_bench(cfg, a.prompt_len, a.new_tokens, a.batch, a.seed or 0,
                       verbose=not a.quiet)
    print(json.dumps(report) if a.json else format_report(report))


# rows the HTTP server decodes at once unless --max-batch or the preset says: concurrent
# requests share each step's pass over the experts
HTTP_BATCH = 4


def http_access(api_key: str | None, allowed_origins: str | None
                ) -> tuple[str | None, tuple[str, ...]]:
    """(the API key: --api-key, else $MOE_SERVE_API_KEY, None when empty; the allowed
    origins of --allowed-origins)."""
    key = api_key if api_key is not None else os.environ.get("MOE_SERVE_API_KEY")
    origins = tuple(o.strip() for o in (allowed_origins or "").split(",") if o.strip())
    return key or None, origins


def cmd_http(a) -> None:
    from serve.http import serve_forever

    key, origins = http_access(a.api_key, a.allowed_origins)
    _check_listen(a.host, a.port)
    serve_forever(_session(a, HTTP_BATCH), a.host, a.port, a.chat_template_kwargs, key,
                  origins, a.drain_timeout)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moe-serve", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="complete prompts")
    _runtime_args(g)
    _sampling_args(g)
    g.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    g.add_argument("--prompt-ids", action="append", type=_ids,
                   help="prompt token ids, comma-separated (repeat for a batch)")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.set_defaults(func=cmd_generate)
    c = sub.add_parser("chat", help="interactive chat through the model's chat template")
    _runtime_args(c)
    _sampling_args(c)
    c.add_argument("--system", default=None, help="system message")
    _template_args(c)
    c.add_argument("--show-reasoning", action="store_true",
                   help="print a reasoning model's reasoning (GPT-OSS's analysis channel, "
                   "<think>...</think>) on stderr; it is never part of the answer")
    c.set_defaults(func=cmd_chat)
    b = sub.add_parser("bench", help="prefill / decode speed, hit rate, bytes, S-MBU, S-MFU")
    _runtime_args(b)
    b.add_argument("--prompt-len", type=_at_least(1), default=None,
                   help="prompt tokens (default: 128, fewer if the context is shorter)")
    b.add_argument("--new-tokens", type=_at_least(1), default=None,
                   help="tokens decoded after the prompt (default: 32, fewer if the context "
                   "is shorter)")
    b.add_argument("--batch", type=_at_least(1), default=1)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench)
    pl = sub.add_parser("plan", help="what a budget buys, before loading: expert slots, "
                        "host RAM, bytes per token, the PCIe bound")
    _runtime_args(pl)
    pl.add_argument("--pcie-gbps", type=float, default=None,
                    help="host-to-device GB/s (default: measured on a GPU, else 25)")
    pl.add_argument("--compare", action="store_true",
                    help="a row for each expert format (none, int8, int4, and the "
                    "checkpoint's own), over --quant")
    pl.add_argument("--trace", default=None, metavar="FILE",
                    help="replay an expert trace (--trace-experts FILE of a run of this "
                    "model): each cache policy's decode hit rate and bytes at this budget "
                    "and others, beside the fewest possible")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_plan)
    cv = sub.add_parser("convert", help="write a checkpoint's linear weights as FP8 "
                        "block-scaled codes (DeepSeek-V3's layout): half bf16's bytes on "
                        "disk, in RAM, on the wire and in the expert slots")
    cv.add_argument("--model", required=True, help="the Hugging Face model directory to read")
    cv.add_argument("--out", required=True, help="the new directory (absent or empty)")
    cv.add_argument("--block", type=_block, default=(128, 128), metavar="ROWS,COLS",
                    help="weights sharing a scale (default 128,128; the expert sizes must be "
                    "multiples of it for their slots to stay FP8)")
    cv.add_argument("--fmt", choices=list(FP8_FORMATS), default="e4m3")
    cv.add_argument("--experts-only", action="store_true",
                    help="only the routed experts' weights (what offloading moves); attention "
                    "and the rest stay as they are, for closer answers")
    cv.add_argument("--quiet", action="store_true", help="no progress on stderr")
    cv.set_defaults(func=cmd_convert)
    h = sub.add_parser("http", help="OpenAI-compatible server: /v1/completions, "
                       "/v1/chat/completions, /v1/models, /health")
    _runtime_args(h)
    h.add_argument("--host", default="127.0.0.1")
    h.add_argument("--port", type=_port, default=8000)
    h.add_argument("--api-key", default=None, metavar="KEY",
                   help="requests to /v1/* must send \"Authorization: Bearer KEY\" (default: "
                   "$MOE_SERVE_API_KEY; unset: open)")
    h.add_argument("--drain-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGTERM, seconds the requests in flight may take to finish "
                   "before the server exits (default 30)")
    h.add_argument("--allowed-origins", default=None, metavar="ORIGINS",
                   help="comma-separated origins browsers may call from (CORS), or * for any; "
                   "default none")
    _template_args(h)
    h.set_defaults(func=cmd_http)
    return p


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    try:
        a.func(a)
    except KeyboardInterrupt:
        sys.exit(130)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        print(f"moe-serve: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
