"""Hugging Face checkpoint layouts: the Hub's tensor names for each MoE family (per-expert
w1/w2/w3 for Mixtral, gate/up/down_proj for most others, stacked gate_up_proj / down_proj for
GPT-OSS), shared by import (moe.hf_import) and export (moe.hf_export)."""

from __future__ import annotations

import torch

from moe.config import ModelConfig

# Per-family names of the router and of one expert's (gate, up, down) projections.
EXPERT_NAMES = {
    "mixtral": ("block_sparse_moe.gate", "block_sparse_moe.experts.{e}.", ("w1", "w3", "w2")),
    "qwen3_moe": ("mlp.gate", "mlp.experts.{e}.", ("gate_proj", "up_proj", "down_proj")),
    "qwen2_moe": ("mlp.gate", "mlp.experts.{e}.", ("gate_proj", "up_proj", "down_proj")),
    "olmoe": ("mlp.gate", "mlp.experts.{e}.", ("gate_proj", "up_proj", "down_proj")),
    "deepseek_v2": ("mlp.gate", "mlp.experts.{e}.", ("gate_proj", "up_proj", "down_proj")),
    "deepseek_v3": ("mlp.gate", "mlp.experts.{e}.", ("gate_proj", "up_proj", "down_proj")),
    # GLM-4.7-Flash: DeepSeek-V3's latent attention and MoE, its dense layers listed
    "glm4_moe_lite": ("mlp.gate", "mlp.experts.{e}.", ("gate_proj", "up_proj", "down_proj")),
    "glm4_moe": ("mlp.gate", "mlp.experts.{e}.", ("gate_proj", "up_proj", "down_proj")),
    # dots.llm1: DeepSeek-V3's MoE behind Qwen3's attention
    "dots1": ("mlp.gate", "mlp.experts.{e}.", ("gate_proj", "up_proj", "down_proj")),
    "gpt_oss": ("mlp.router", "mlp.experts.", ("gate_up_proj", "down_proj")),  # stacked
    "ernie4_5_moe": ("mlp.gate", "mlp.experts.{e}.", ("gate_proj", "up_proj", "down_proj")),
    "minimax_m2": ("block_sparse_moe.gate", "block_sparse_moe.experts.{e}.", ("w1", "w3", "w2")),
}
DEEPSEEK = ("deepseek_v2", "deepseek_v3", "glm4_moe_lite")  # latent attention (MLA)
GPT_OSS_MXFP4 = {"quant_method": "mxfp4", "modules_to_not_convert": [  # as on the Hub
    "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
GPT_OSS_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                "truncate": False, "original_max_position_embeddings": 4096,
                "rope_theta": 150000.0}  # GptOssConfig's default
# sigmoid scores, a selection bias, groups
V3_ROUTED = ("deepseek_v3", "glm4_moe", "glm4_moe_lite", "dots1")
UNGATED_SHARED = (*DEEPSEEK, "glm4_moe", "dots1", "ernie4_5_moe")  # shared, no gate


MLA_NAMES = {  # ours -> DeepSeek's, under attn. / self_attn.
    "q_proj": "q_proj", "q_a_proj": "q_a_proj", "q_a_norm": "q_a_layernorm",
    "q_b_proj": "q_b_proj", "kv_a_proj": "kv_a_proj_with_mqa", "kv_a_norm": "kv_a_layernorm",
    "kv_b_proj": "kv_b_proj", "o_proj": "o_proj"}


def evens_then_odds(n: int) -> torch.Tensor:
    """[n] indices that reorder features interleaved in pairs (x0, x1), (x2, x3), ... to
    their halves (evens, then odds): DeepSeek's and ERNIE's RoPE pairs to rotate-half,
    GPT-OSS's gate / up features to [gate; up]. argsort() gives the way back."""
    return torch.cat([torch.arange(0, n, 2), torch.arange(1, n, 2)])


def shared_names(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(our name, Hub name) of the tensors every Llama-style family names alike: embeddings,
    norms and attention (the LM head is left to the caller: it may be tied)."""
    pairs = [("embed.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight")]
    attn = ("q_proj", "k_proj", "v_proj", "o_proj")
    mla = cfg.mla
    if mla is not None:
        q = ["q_proj"] if mla.q_lora_rank is None else ["q_a_proj", "q_a_norm", "q_b_proj"]
        attn = [*q, "kv_a_proj", "kv_a_norm", "kv_b_proj", "o_proj"]
    biased = [p for p, on in (("q_proj", cfg.qkv_bias), ("k_proj", cfg.qkv_bias),
                              ("v_proj", cfg.qkv_bias), ("o_proj", cfg.o_bias)) if on]
    for i in range(cfg.n_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        pairs += [(src + "attn_norm.weight", dst + "input_layernorm.weight"),
                  (src + "mlp_norm.weight", dst + "post_attention_layernorm.weight")]
        pairs += [(src + f"attn.{p}.weight", dst + f"self_attn.{MLA_NAMES.get(p, p)}.weight")
                  for p in attn]
        if cfg.qk_norm:
            pairs += [(src + f"attn.{n}.weight", dst + f"self_attn.{n}.weight")
                      for n in ("q_norm", "k_norm")]
        pairs += [(src + f"attn.{p}.bias", dst + f"self_attn.{p}.bias") for p in biased]
        if cfg.attn_sinks:
            pairs.append((src + "attn.sinks", dst + "self_attn.sinks"))
    return pairs


def dense_tensor_names(cfg: ModelConfig, family: str) -> dict[str, list[str]]:
    """Our name of every non-expert tensor -> the Hub tensors it is the row-concatenation of
    (one name for most; gate and up projections for fused SwiGLU inputs). The LM head maps to
    lm_head.weight; a tied model's directory may lack it (use the embeddings then)."""
    names = {ours: [hub] for ours, hub in shared_names(cfg)}
    names["lm_head.weight"] = ["lm_head.weight"]
    gate_name = EXPERT_NAMES[family][0]
    for i in range(cfg.n_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        if not cfg.is_moe_layer(i):
            names[dst + "mlp.w_in.weight"] = [src + "mlp.gate_proj.weight",
                                              src + "mlp.up_proj.weight"]
            names[dst + "mlp.w_out.weight"] = [src + "mlp.down_proj.weight"]
            continue
        names[dst + "mlp.router.weight"] = [src + gate_name + ".weight"]
        if cfg.moe.router.gate_bias:
            names[dst + "mlp.router.bias"] = [src + gate_name + ".bias"]
        if family in V3_ROUTED:
            names[dst + "mlp.router.expert_bias"] = [src + gate_name + ".e_score_correction_bias"]
        elif family == "ernie4_5_moe":  # [1, E]
            names[dst + "mlp.router.expert_bias"] = [src + "mlp.moe_statics."
                                                     "e_score_correction_bias"]
        elif family == "minimax_m2":
            names[dst + "mlp.router.expert_bias"] = [src + "block_sparse_moe."
                                                     "e_score_correction_bias"]
        if family in UNGATED_SHARED and cfg.moe.num_shared_experts:
            sh = src + "mlp.shared_experts."
            names[dst + "mlp.shared.mlp.w_in.weight"] = [sh + "gate_proj.weight",
                                                         sh + "up_proj.weight"]
            names[dst + "mlp.shared.mlp.w_out.weight"] = [sh + "down_proj.weight"]
        elif cfg.moe.num_shared_experts:  # Qwen2-MoE: one sigmoid-gated shared expert
            sh = src + "mlp.shared_expert."
            names[dst + "mlp.shared.mlp.w_in.weight"] = [sh + "gate_proj.weight",
                                                         sh + "up_proj.weight"]
            names[dst + "mlp.shared.mlp.w_out.weight"] = [sh + "down_proj.weight"]
            names[dst + "mlp.shared.gate.weight"] = [src + "mlp.shared_expert_gate.weight"]
    return names


def expert_tensor_names(family: str, layer: int, expert: int) -> tuple[str, str, str]:
    """Hub names of one expert's (gate, up, down) projection weights (families that store
    each expert apart; GPT-OSS stacks them: expert_sources)."""
    _, prefix, parts = EXPERT_NAMES[family]
    base = f"model.layers.{layer}." + prefix.format(e=expert)
    return tuple(base + p + ".weight" for p in parts)


def is_mxfp4(hf: dict) -> bool:
    """Whether config.json says the experts are stored as MXFP4 (GPT-OSS on the Hub)."""
    quant = hf.get("quantization_config") or {}
    return hf.get("model_type") == "gpt_oss" and quant.get("quant_method") == "mxfp4"


def expert_sources(hf: dict, family: str, layer: int, num_experts: int) -> list[str]:
    """Every Hub tensor the experts of one layer are read from."""
    if family != "gpt_oss":
        return [n for e in range(num_experts) for n in expert_tensor_names(family, layer, e)]
    base = f"model.layers.{layer}.mlp.experts."
    mats = ("gate_up_proj", "down_proj")
    if is_mxfp4(hf):
        mats = tuple(f"{m}_{part}" for m in mats for part in ("blocks", "scales"))
    return [base + n for n in (*mats, "gate_up_proj_bias", "down_proj_bias")]
