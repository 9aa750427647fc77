"""Import Hugging Face MoE directories (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2 / V3,
GLM-4.5 (glm4_moe), GLM-4.7-Flash (glm4_moe_lite), dots.llm1 (dots1), GPT-OSS with bf16 or
MXFP4 experts, ERNIE-4.5 (ernie4_5_moe), MiniMax-M2 (minimax_m2); sharded safetensors or
not) as our ModelConfig and state dict, and read dense Llama / Qwen3 directories for
upcycling. Options that would be served wrong are refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from moe.config import ROPE_TYPES, MLAConfig, ModelConfig, RopeScaling
from moe.experts import EXPERT_PARAMS
from moe.hf_fp8 import FP8_DTYPES, fp8_block, fp8_dequantize
from moe.hf_names import (
    DEEPSEEK,
    EXPERT_NAMES,
    GPT_OSS_ROPE,
    dense_tensor_names,
    evens_then_odds,
    expert_tensor_names,
    is_mxfp4,
)


def _read_config(model_dir: Path) -> dict:
    cfg_path = Path(model_dir) / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{model_dir} is not a model directory (no config.json)")
    return json.loads(cfg_path.read_text())


def _read_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the directory's safetensors files (one file or a sharded set)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} has no .safetensors files")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors


def dequantize_fp8_tensors(tensors: dict[str, torch.Tensor], block: tuple[int, int]
                           ) -> dict[str, torch.Tensor]:
    """An FP8 block-scaled checkpoint's tensors with each float8 weight dequantized (float32)
    and its `_scale_inv` gone; ValueError names a float8 weight without its scales."""
    out = {}
    for name, t in tensors.items():
        if name.endswith("_scale_inv") and name[:-len("_scale_inv")] in tensors:
            continue
        if t.dtype in FP8_DTYPES:
            scale = tensors.get(name + "_scale_inv")
            if scale is None:
                raise ValueError(f"fp8 tensor {name} has no {name}_scale_inv")
            t = fp8_dequantize(t, scale, block)
        out[name] = t
    return out


def load_hf_dense(model_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A dense Llama / Qwen3 directory -> (config.json as a dict, its tensors)."""
    hf = _read_config(model_dir)
    if hf.get("model_type") not in ("llama", "qwen3", "mistral"):
        raise ValueError(f"cannot upcycle model_type={hf.get('model_type')!r}: "
                         "supported dense families are llama, mistral and qwen3")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError("cannot upcycle a model with attention or MLP biases")
    return hf, _read_tensors(model_dir)


def hf_rope_scaling(hf: dict) -> RopeScaling:
    """The RoPE scaling of a config.json: `rope_parameters` (transformers 5) or the older
    `rope_scaling`; ValueError names a scaling type this framework does not implement."""
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}  # as transformers reads
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"config.json asks for RoPE scaling {kind!r}, which is not supported "
                         f"(supported: {', '.join(ROPE_TYPES)}); serving it with plain RoPE "
                         "would give wrong tokens")
    if kind == "default":
        return RopeScaling()
    extra = {k: rope[k] for k in ("attention_factor", "mscale", "mscale_all_dim")
             if rope.get(k) is not None}
    factor = rope.get("factor")
    orig = rope.get("original_max_position_embeddings",
                    hf.get("original_max_position_embeddings"))
    if kind == "yarn":
        orig = orig or hf.get("max_position_embeddings")
        if factor is None and orig:  # DeepSeek-style: the context ratio
            factor = hf["max_position_embeddings"] / orig
    if factor is None:
        raise ValueError(f"config.json: {kind} RoPE scaling without a factor")
    out = RopeScaling(type=kind, factor=float(factor), original_max_seq_len=orig,
                      beta_fast=float(rope.get("beta_fast") or 32),
                      beta_slow=float(rope.get("beta_slow") or 1),
                      truncate=bool(rope.get("truncate", True)), **extra)
    out.check()
    return out


def llama_fields(hf: dict, default_context: int, partial_rotary: bool = False) -> dict:
    """The ModelConfig fields every Llama-style config.json spells alike (sizes, heads, RoPE,
    norm eps, tied embeddings), as keyword arguments; ValueError for options it would
    silently ignore (another activation, partial rotary embeddings, RoPE scalings it lacks)."""
    rope = hf.get("rope_parameters") or {}
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.json: hidden_act={act!r} is not supported (silu only)")
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0) and not partial_rotary:
        raise ValueError(f"config.json: partial_rotary_factor={partial} is not supported "
                         f"for model_type={hf.get('model_type')!r}")
    return dict(
        partial_rotary_factor=float(partial or 1.0),
        rope_scaling=hf_rope_scaling(hf),
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"),
        max_seq_len=hf.get("max_position_embeddings", default_context),
        rope_theta=hf.get("rope_theta", rope.get("rope_theta", 10000.0)),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


def hf_model_config(hf: dict) -> tuple[ModelConfig, str, list[int]]:
    """A config.json of a family in EXPERT_NAMES (as a dict) -> (our ModelConfig,
    the family, the indices of its dense layers); ValueError names what is not supported."""
    from moe.config import MoEConfig
    from routing.config import RouterConfig

    family = hf.get("model_type")
    if family not in EXPERT_NAMES:
        raise ValueError(f"unsupported architecture model_type={family!r}; supported: "
                         f"{', '.join(EXPERT_NAMES)}")
    if family == "minimax_m2" and hf.get("rotary_dim") and hf.get("head_dim"):
        # the released checkpoints give partial RoPE as rotary_dim, as transformers reads it
        rope = dict(hf.get("rope_parameters") or {})
        rope.setdefault("partial_rotary_factor", hf["rotary_dim"] / hf["head_dim"])
        hf = {**hf, "rope_parameters": {"rope_theta": hf.get("rope_theta", 5e6), **rope}}
    if family == "ernie4_5_moe":  # its name for top-k, and its RoPE base, as transformers has
        hf = {"num_experts_per_tok": hf.get("moe_k"), **hf}
        if "rope_theta" not in hf and "rope_theta" not in (hf.get("rope_parameters") or {}):
            hf["rope_theta"] = 500000.0
    missing = [k for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                           "vocab_size", "num_experts_per_tok") if k not in hf]
    if missing:
        raise ValueError(f"config.json of a {family} model lacks {', '.join(missing)}")
    n_layers = hf["num_hidden_layers"]
    shared_ffn = hf.get("shared_expert_intermediate_size", 0) if family == "qwen2_moe" else 0
    dense_layers: list[int] = []
    mla = None
    if family in DEEPSEEK:
        moe, mla, dense_layers = _deepseek_moe(hf, family)
    elif family in ("glm4_moe", "dots1"):  # DeepSeek-V3's MoE behind grouped-query attention
        moe, _, dense_layers = _deepseek_moe(hf, family)
    elif family == "gpt_oss":
        moe = MoEConfig(num_experts=hf.get("num_local_experts") or hf["num_experts"],
                        expert_ffn=hf["intermediate_size"], expert_type="clamped_swiglu",
                        expert_bias=True, swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)),
                        swiglu_limit=float(hf.get("swiglu_limit", 7.0)),
                        router=RouterConfig(top_k=hf["num_experts_per_tok"], gate_bias=True))
    elif family == "ernie4_5_moe":
        moe, dense_layers = _ernie_moe(hf)
    elif family == "minimax_m2":  # Mixtral's layout, sigmoid routing with a selection bias
        moe = MoEConfig(num_experts=hf.get("num_local_experts") or hf["num_experts"],
                        expert_ffn=hf["intermediate_size"],
                        router=RouterConfig(top_k=hf["num_experts_per_tok"], score="sigmoid",
                                            expert_bias=True))
    elif family in ("mixtral", "olmoe"):
        n_exp = hf.get("num_local_experts") or hf.get("num_experts")
        moe = MoEConfig(num_experts=n_exp, expert_ffn=hf["intermediate_size"],
                        router=RouterConfig(top_k=hf["num_experts_per_tok"],
                                            renormalize=hf.get("norm_topk_prob",
                                                               family == "mixtral")))
    else:
        # the Hub's config.json says num_experts; transformers 5 writes num_local_experts
        n_exp = hf.get("num_experts") or hf["num_local_experts"]
        moe = MoEConfig(num_experts=n_exp, expert_ffn=hf["moe_intermediate_size"],
                        router=RouterConfig(top_k=hf["num_experts_per_tok"],
                                            renormalize=hf.get("norm_topk_prob",
                                                               family == "qwen3_moe")),
                        num_shared_experts=1 if shared_ffn else 0,
                        shared_expert_ffn=shared_ffn or None, shared_expert_gate=bool(shared_ffn))
        step = hf.get("decoder_sparse_step", 1)
        dense_layers = [i for i in range(n_layers) if i in (hf.get("mlp_only_layers") or [])
                        or (i + 1) % step != 0]
    first, freq = _layer_pattern(dense_layers, n_layers, hf.get(
        "moe_layer_interval" if family == "ernie4_5_moe" else "decoder_sparse_step", 1) or 1)
    quant = hf.get("quantization_config")
    if quant and not is_mxfp4(hf) and fp8_block(hf) is None:
        raise ValueError(f"config.json: a quantized checkpoint (quant_method="
                         f"{quant.get('quant_method')!r}) is not supported (MXFP4 and FP8 "
                         "block-scaled ones are); serve its bf16 weights (--quant int8 / int4 "
                         "quantizes them at load)")
    if hf.get("mlp_bias") or hf.get("use_bias"):
        raise ValueError(f"config.json: {'mlp_bias' if hf.get('mlp_bias') else 'use_bias'}"
                         "=true is not supported")
    if hf.get("attention_bias") and family not in ("qwen2_moe", "glm4_moe", "gpt_oss"):
        raise ValueError(f"config.json: attention_bias=true in a {family} model is not "
                         "supported")
    if family == "gpt_oss" and not (hf.get("rope_scaling") or hf.get("rope_parameters")):
        hf = dict(hf, rope_parameters=GPT_OSS_ROPE)  # what transformers gives it then
    window, window_layers = hf_sliding_window(hf, family, n_layers)
    fields = llama_fields(hf, default_context=4096,
                          partial_rotary=family in ("glm4_moe", "minimax_m2"))
    if mla is not None:
        fields.update(n_kv_heads=fields["n_heads"],
                      head_dim=mla.qk_nope_head_dim + mla.qk_rope_head_dim)
    cfg = ModelConfig(
        **fields, mla=mla, qk_norm=family in ("qwen3_moe", "olmoe", "dots1", "minimax_m2") or (
            family == "glm4_moe" and bool(hf.get("use_qk_norm"))),
        qk_norm_type="full" if family in ("olmoe", "minimax_m2") else "head",
        qkv_bias=(family == "qwen2_moe" and hf.get("qkv_bias", True))
        or (family in ("glm4_moe", "gpt_oss") and bool(hf.get("attention_bias", True))),
        o_bias=family == "gpt_oss" and bool(hf.get("attention_bias", True)),
        attn_sinks=family == "gpt_oss",
        dense_ffn=hf.get("intermediate_size", 0) if family in (
            "qwen2_moe", "qwen3_moe", *DEEPSEEK, "glm4_moe", "dots1", "ernie4_5_moe") else 1,
        moe=moe, first_dense_layers=first, moe_layer_freq=freq, sliding_window=window,
        sliding_window_layers=window_layers,
        clip_qkv=hf.get("clip_qkv") if family == "olmoe" else None)
    cfg.check()
    return cfg, family, dense_layers


def _layer_pattern(dense_layers: list[int], n_layers: int, step: int) -> tuple[int, int]:
    """(first_dense_layers, moe_layer_freq) that make ModelConfig.is_moe_layer's dense layers
    these: a leading block, then MoE every `step` layers (ERNIE's moe_layer_interval,
    Qwen-MoE's decoder_sparse_step) or every layer; ValueError for another pattern."""
    first = next((i for i in range(n_layers) if i not in dense_layers), n_layers)
    for freq in dict.fromkeys((step, 1)):
        if dense_layers == [i for i in range(n_layers) if i < first or (i + 1) % freq]:
            return first, freq
    raise ValueError(f"dense layers {dense_layers} are not a leading block, then every "
                     f"{step} layers; this layer pattern is not supported")


def _ernie_moe(hf: dict):
    """ERNIE-4.5 config.json -> (MoEConfig, dense layer indices), as transformers builds it:
    softmax scores, top-k selection by scores + the correction bias (moe_statics), weights
    the selected scores renormalised, moe_num_shared_experts ungated shared experts; MoE
    layers from moe_layer_start_index to moe_layer_end_index (-1: the last) every
    moe_layer_interval."""
    from moe.config import MoEConfig
    from routing.config import RouterConfig

    n_layers = hf["num_hidden_layers"]
    n_exp, ffn = hf.get("moe_num_experts"), hf.get("moe_intermediate_size")
    start, end = hf.get("moe_layer_start_index", 1), hf.get("moe_layer_end_index", -1)
    if not all(isinstance(v, int) for v in (n_exp, ffn, start, end)):
        raise ValueError("config.json of an ernie4_5_moe model: moe_num_experts, "
                         "moe_intermediate_size and moe_layer_start/end_index must be single "
                         "integers (the multimodal variants' lists are not supported)")
    end = n_layers - 1 if end == -1 else end
    step = hf.get("moe_layer_interval", 1)
    n_shared = hf.get("moe_num_shared_experts") or 0
    moe = MoEConfig(num_experts=n_exp, expert_ffn=ffn, num_shared_experts=n_shared,
                    shared_expert_ffn=n_shared * ffn or None,  # a zero bias without aux-free
                    router=RouterConfig(top_k=hf["num_experts_per_tok"],
                                        expert_bias=bool(hf.get("moe_use_aux_free", True))))
    return moe, [i for i in range(n_layers) if not (start <= i <= end and (i + 1) % step == 0)]


def _deepseek_moe(hf: dict, family: str):
    """DeepSeek-V2 / V3 (and GLM-4.7-Flash, V3's MLA and MoE) config.json -> (MoEConfig,
    MLAConfig, dense layer indices); for GLM-4.5 (V3's MoE, no MLA) the MLAConfig is None.
    As transformers builds them: V2 softmax top-k (greedy or group-limited by the best
    expert of a group), weights not renormalised; V3 sigmoid scores with the correction bias
    for selection, groups scored by their two best experts, renormalised as norm_topk_prob
    says; both scaled by routed_scaling_factor, with n_shared_experts ungated shared
    experts."""
    from moe.config import MoEConfig
    from routing.config import RouterConfig

    n_exp, ffn = hf["n_routed_experts"], hf["moe_intermediate_size"]
    scale = float(hf.get("routed_scaling_factor", 1.0))
    if family == "deepseek_v2":
        method = hf.get("topk_method", "greedy")
        if method not in ("greedy", "group_limited_greedy"):
            raise ValueError(f"config.json: topk_method={method!r} is not supported "
                             "(greedy, group_limited_greedy)")
        groups = ((hf.get("n_group") or 1, hf.get("topk_group") or 1)
                  if method == "group_limited_greedy" else (1, 1))
        router = RouterConfig(top_k=hf["num_experts_per_tok"], renormalize=False,
                              routed_scaling_factor=scale, n_group=groups[0],
                              topk_group=groups[1], group_score="max")
    else:
        router = RouterConfig(top_k=hf["num_experts_per_tok"], score="sigmoid",
                              expert_bias=True, renormalize=bool(hf.get("norm_topk_prob", True)),
                              routed_scaling_factor=scale, n_group=hf.get("n_group") or 1,
                              topk_group=hf.get("topk_group") or 1, group_score="top2")
    n_shared = hf.get("n_shared_experts") or 0
    moe = MoEConfig(num_experts=n_exp, expert_ffn=ffn, router=router,
                    num_shared_experts=n_shared, shared_expert_ffn=n_shared * ffn or None)
    first_dense = min(hf.get("first_k_dense_replace") or 0, hf["num_hidden_layers"])
    dense = list(range(first_dense))
    if family == "glm4_moe_lite":  # mlp_layer_types, by default dense then sparse
        types = hf.get("mlp_layer_types") or ["dense"] + ["sparse"] * (hf["num_hidden_layers"]
                                                                      - 1)
        dense = [i for i, t in enumerate(types) if t == "dense"]
    if family in ("glm4_moe", "dots1"):
        return moe, None, dense
    mla = MLAConfig(q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=hf["kv_lora_rank"],
                    qk_nope_head_dim=hf["qk_nope_head_dim"],
                    qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"])
    return moe, mla, dense


def hf_sliding_window(hf: dict, family: str, n_layers: int) -> tuple[int | None, list[int] | None]:
    """(window, the layers it applies to or None for all) as transformers reads config.json:
    Mixtral's sliding_window for every layer; Qwen-MoE's only with use_sliding_window, on
    every layer (Qwen3) or on the layers its layer_types (or max_window_layers) name
    (Qwen2); GPT-OSS's on the layers its layer_types name (the even ones by default), dots1's
    likewise (those from max_window_layers on by default);
    OLMoE, DeepSeek, GLM, ERNIE and MiniMax-M2 have none."""
    window = hf.get("sliding_window")
    if family in ("olmoe", "glm4_moe", "ernie4_5_moe", "minimax_m2", *DEEPSEEK) or not window:
        return None, None
    if family == "mixtral":
        return int(window), None
    types = hf.get("layer_types")
    if family in ("gpt_oss", "dots1"):  # layer_types; by default GPT-OSS's even layers,
        top = hf.get("max_window_layers", n_layers)  # dots1's from max_window_layers on
        types = types or ["sliding_attention" if (i % 2 == 0 if family == "gpt_oss"
                                                  else i >= top) else "full_attention"
                          for i in range(n_layers)]
        layers = [i for i, t in enumerate(types) if t == "sliding_attention"]
        return (int(window), layers) if layers else (None, None)
    if types is not None and family == "qwen2_moe":
        layers = [i for i, t in enumerate(types) if t == "sliding_attention"]
    elif not hf.get("use_sliding_window"):
        return None, None
    elif family == "qwen3_moe":
        return int(window), None
    else:
        top = hf.get("max_window_layers", n_layers)
        layers = [i for i in range(n_layers) if (i + 1) % 2 and i < top]
    return (int(window), layers) if layers else (None, None)


def dense_tensor(hf: dict, cfg: ModelConfig, name: str,
                 parts: list[torch.Tensor]) -> torch.Tensor:
    """Our non-expert tensor `name` from the Hub tensors it is made of (dense_tensor_names:
    concatenated by rows), in our layout. DeepSeek's RoPE acts on interleaved pairs (x0, x1),
    (x2, x3), ... (always in V2; in V3 unless rope_interleave is false), ERNIE's on every
    head dimension so; the rows that make the rotated query / key parts are reordered to the
    rotate-half layout (evens, then odds): q . k is unchanged, and one RoPE serves every
    family."""
    t = torch.cat(parts) if len(parts) > 1 else parts[0]
    if hf.get("model_type") == "ernie4_5_moe":
        if name.endswith("router.expert_bias"):
            return t.reshape(-1)
        if name.endswith(("attn.q_proj.weight", "attn.k_proj.weight")):
            hd = cfg.resolved_head_dim
            return t.view(-1, hd, t.shape[-1])[:, evens_then_odds(hd)].reshape(t.shape)
        return t
    m = cfg.mla
    if m is None or (hf.get("model_type") in ("deepseek_v3", "glm4_moe_lite")
                     and not hf.get("rope_interleave", True)):
        return t
    r = m.qk_rope_head_dim
    perm = evens_then_odds(r)
    if name.endswith(("attn.q_proj.weight", "attn.q_b_proj.weight")):
        head = m.qk_nope_head_dim + r
        v = t.view(cfg.n_heads, head, -1)
        return torch.cat([v[:, :m.qk_nope_head_dim], v[:, m.qk_nope_head_dim:][:, perm]],
                         dim=1).reshape(t.shape)
    if name.endswith("attn.kv_a_proj.weight"):
        return torch.cat([t[:m.kv_lora_rank], t[m.kv_lora_rank:][perm]])
    return t


def read_expert(hf: dict, family: str, layer: int, e: int, get, packed: bool = False):
    """One expert in our layout: (w_in [2F, d] (gate; up), w_out [d, F], b_in [2F], b_out [d];
    the biases None for families without them). get(name, e) reads Hub tensor `name`, or
    its e-th slice when e is not None (stacked experts). packed: an MXFP4 checkpoint's
    w_in / w_out come as packed QuantWeights (kernels.mxfp4), not decoded."""
    if family != "gpt_oss":
        g, u, dn = (get(n, None) for n in expert_tensor_names(family, layer, e))
        return torch.cat([g, u]), dn, None, None
    from kernels.mxfp4 import mxfp4_dequantize, mxfp4_weight

    base = f"model.layers.{layer}.mlp.experts."
    if is_mxfp4(hf):  # [rows, G, 16] blocks: rows are output features
        decode = mxfp4_weight if packed else mxfp4_dequantize
        gu, dn = (decode(get(f"{base}{m}_blocks", e), get(f"{base}{m}_scales", e))
                  for m in ("gate_up_proj", "down_proj"))
    else:  # [in, out] matrices
        gu, dn = get(base + "gate_up_proj", e).T, get(base + "down_proj", e).T
    b_in = get(base + "gate_up_proj_bias", e)
    # GPT-OSS interleaves gate and up features (gate even, up odd): ours are [gate; up]
    rows = evens_then_odds(b_in.shape[0])
    return gu[rows], dn, b_in[rows], get(base + "down_proj_bias", e)


def import_hf(model_dir: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A directory of a family in EXPERT_NAMES (sharded safetensors or not; ours from
    export_hf too) -> (ModelConfig, our single-process state dict)."""
    hf = _read_config(model_dir)
    cfg, family, _ = hf_model_config(hf)
    tensors = _read_tensors(model_dir)
    block = fp8_block(hf)
    if block is not None:
        tensors = dequantize_fp8_tensors(tensors, block)
    tensors.setdefault("lm_head.weight", tensors["model.embed_tokens.weight"])
    state = {ours: dense_tensor(hf, cfg, ours, [tensors[h] for h in hubs])
             for ours, hubs in dense_tensor_names(cfg, family).items()}

    def get(name: str, e: int | None) -> torch.Tensor:
        return tensors[name] if e is None else tensors[name][e]

    for i in range(cfg.n_layers):
        if not cfg.is_moe_layer(i):
            continue
        parts = [read_expert(hf, family, i, e, get) for e in range(cfg.moe.num_experts)]
        for j, name in enumerate(EXPERT_PARAMS):  # read_expert's order
            if parts[0][j] is not None:
                state[f"layers.{i}.mlp.experts.{name}"] = torch.stack([p[j] for p in parts])
    return cfg, state
