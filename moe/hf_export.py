"""Export our models as Hugging Face directories (safetensors + config.json) of the family
that can hold them: Mixtral, Qwen3-MoE, GLM-4.5, DeepSeek-V3, GPT-OSS or ERNIE-4.5, which
`transformers` loads with its own classes."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from moe.config import ModelConfig
from moe.hf_names import EXPERT_NAMES, UNGATED_SHARED, V3_ROUTED, evens_then_odds, shared_names


def _shared_problems(cfg: ModelConfig) -> list[str]:
    """What keeps shared experts from the ungated ones of num_shared_experts * expert_ffn
    that DeepSeek, GLM and ERNIE have."""
    m = cfg.moe
    problems = ["gated shared experts"] if m.shared_expert_gate else []
    if m.num_shared_experts and (m.shared_expert_ffn or 0) not in (
            0, m.num_shared_experts * m.expert_ffn):
        problems.append("shared_expert_ffn != num_shared_experts * expert_ffn")
    return problems


def _ernie_problems(cfg: ModelConfig) -> list[str]:
    """What keeps a softmax-routed model with a selection bias from the ERNIE-4.5 layout:
    renormalised top-k weights, SwiGLU experts, ungated shared experts, plain GQA with
    RoPE on every dimension."""
    r, m = cfg.moe.router, cfg.moe
    problems = _shared_problems(cfg)
    if not r.renormalize or r.routed_scaling_factor != 1.0 or r.n_group > 1:
        problems.append("weights not renormalised, scaled or group-limited routing (it "
                        "renormalises the top-k scores)")
    if m.expert_type != "swiglu":
        problems.append(f"expert_type={m.expert_type} (it uses SwiGLU experts)")
    if cfg.qkv_bias or cfg.qk_norm or cfg.clip_qkv is not None \
            or cfg.partial_rotary_factor != 1.0:
        problems.append("q/k/v biases, q/k norms, clip_qkv or partial RoPE")
    if cfg.sliding_window is not None:
        problems.append("a sliding window")
    return problems


def _v3_moe_problems(cfg: ModelConfig) -> list[str]:
    """What keeps the MoE part from DeepSeek-V3's (and GLM-4.5's) layout: sigmoid top-k
    routing (groups scored by their two best experts), SwiGLU experts, ungated shared experts
    of num_shared_experts * expert_ffn, every layer MoE after the leading dense ones."""
    r, m = cfg.moe.router, cfg.moe
    problems = []
    if r.kind != "topk" or r.score != "sigmoid":
        problems.append(f"router {r.kind}/{r.score} (they use sigmoid top-k)")
    if r.n_group > 1 and r.group_score != "top2":
        problems.append("groups scored by their best expert (they sum the two best)")
    if m.expert_type != "swiglu":
        problems.append(f"expert_type={m.expert_type} (they use SwiGLU experts)")
    problems += _shared_problems(cfg)
    if cfg.moe_layer_freq != 1:
        problems.append("MoE layers that are not all the layers after the first dense ones")
    if cfg.clip_qkv is not None:
        problems.append("q/k/v clipping")
    if cfg.sliding_window is not None:
        problems.append("a sliding window")
    return problems


def _deepseek_v3_problems(cfg: ModelConfig) -> list[str]:
    """What keeps an MLA model from the DeepSeek-V3 layout (empty: it fits)."""
    problems = _v3_moe_problems(cfg)
    if cfg.qk_norm or cfg.qkv_bias:
        problems.append("q/k norms or q/k/v biases")
    return problems


def _glm4_problems(cfg: ModelConfig) -> list[str]:
    """What keeps a sigmoid-routed GQA model from the GLM-4.5 (glm4_moe) layout."""
    problems = _v3_moe_problems(cfg)
    if cfg.qk_norm and cfg.qk_norm_type != "head":
        problems.append("full-width q/k norms (OLMoE's)")
    return problems


def _gpt_oss_problems(cfg: ModelConfig) -> list[str]:
    """What keeps a model from the GPT-OSS layout: softmax top-k over renormalised weights,
    clamped SwiGLU experts, every layer MoE, no shared experts, q/k/v and o biases alike,
    plain GQA."""
    r, m = cfg.moe.router, cfg.moe
    problems = []
    if r.kind != "topk" or r.score != "softmax" or not r.renormalize or r.n_group > 1 \
            or r.routed_scaling_factor != 1.0:
        problems.append("a router other than softmax top-k with renormalised weights")
    if r.expert_bias:
        problems.append("a router selection bias")
    if m.expert_type != "clamped_swiglu":
        problems.append(f"expert_type={m.expert_type} (it uses clamped_swiglu)")
    if m.num_shared_experts or any(not cfg.is_moe_layer(i) for i in range(cfg.n_layers)):
        problems.append("shared experts or dense layers")
    if cfg.qkv_bias != cfg.o_bias:
        problems.append("biases on q/k/v but not on o, or the other way (attention_bias "
                        "sets both)")
    if cfg.mla is not None or cfg.qk_norm or cfg.clip_qkv is not None \
            or cfg.partial_rotary_factor != 1.0:
        problems.append("MLA, q/k norms, clip_qkv or partial RoPE")
    return problems


def choose_family(cfg: ModelConfig) -> str:
    """The Hub family that can hold this model: 'deepseek_v3' for multi-head latent
    attention, 'gpt_oss' for attention sinks / clamped SwiGLU / o, expert or gate biases,
    'glm4_moe' for sigmoid routing behind GQA, 'ernie4_5_moe' for softmax routing with a
    selection bias, else 'mixtral' or 'qwen3_moe'; ValueError says why none can."""
    r, m = cfg.moe.router, cfg.moe
    if cfg.mla is not None:
        problems = _deepseek_v3_problems(cfg)
        if problems:
            raise ValueError("this MLA model has no DeepSeek-V3 equivalent: "
                             + "; ".join(problems))
        return "deepseek_v3"
    if cfg.attn_sinks or cfg.o_bias or m.expert_type == "clamped_swiglu" or m.expert_bias \
            or r.gate_bias:  # only GPT-OSS's layout holds these
        problems = _gpt_oss_problems(cfg)
        if problems:
            raise ValueError("this model has no GPT-OSS equivalent: " + "; ".join(problems))
        return "gpt_oss"
    if r.kind == "topk" and r.score == "sigmoid":
        problems = _glm4_problems(cfg)
        if problems:
            raise ValueError("this sigmoid-routed model has no GLM-4.5 (glm4_moe) equivalent: "
                             + "; ".join(problems))
        return "glm4_moe"
    if r.kind == "topk" and r.expert_bias:
        problems = _ernie_problems(cfg)
        if problems:
            raise ValueError("this softmax-routed model with a selection bias has no "
                             "ERNIE-4.5 (ernie4_5_moe) equivalent: " + "; ".join(problems))
        return "ernie4_5_moe"
    problems = []
    if r.kind != "topk" or r.score != "softmax":
        problems.append(f"router {r.kind}/{r.score} (both families use softmax top-k)")
    if m.expert_type != "swiglu":
        problems.append(f"expert_type={m.expert_type} (both use SwiGLU experts)")
    if m.num_shared_experts:
        problems.append("shared experts (neither family has them)")
    if r.routed_scaling_factor != 1.0:
        problems.append("routed_scaling_factor != 1")
    if cfg.qkv_bias:
        problems.append("q/k/v biases")
    if cfg.qk_norm and cfg.qk_norm_type != "head":
        problems.append("full-width q/k norms (OLMoE's)")
    if cfg.clip_qkv is not None:
        problems.append("clip_qkv (OLMoE's)")
    if cfg.partial_rotary_factor != 1.0:
        problems.append("partial RoPE (GLM's)")
    if r.n_group > 1:
        problems.append("group-limited routing (DeepSeek's)")
    if cfg.sliding_window is not None and cfg.sliding_window_layers is not None and (
            sorted(cfg.sliding_window_layers) != list(range(cfg.n_layers))):
        problems.append("a sliding window on some layers only (both apply it to every layer)")
    if problems:
        raise ValueError("this model has no Mixtral or Qwen3-MoE equivalent: "
                         + "; ".join(problems))
    all_moe = all(cfg.is_moe_layer(i) for i in range(cfg.n_layers))
    if cfg.qk_norm or not all_moe or not r.renormalize:
        if not cfg.qk_norm:
            raise ValueError("Qwen3-MoE needs qk_norm=true (it has q/k norms) and Mixtral needs "
                             "every layer MoE with renormalised top-k weights")
        return "qwen3_moe"
    return "mixtral"


def hf_config_json(cfg: ModelConfig, family: str) -> dict:
    """The config.json (as a dict) of our model in the family's Hugging Face layout."""
    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.resolved_head_dim, max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, hidden_act="silu",
        tie_word_embeddings=cfg.tie_embeddings, num_experts_per_tok=cfg.moe.router.top_k,
        router_aux_loss_coef=cfg.moe.router.aux_loss_coef, torch_dtype="float32",
        attention_dropout=0.0, initializer_range=cfg.init_std,
    )
    rs = cfg.rope_scaling
    if rs.type != "default":
        rope = {"rope_type": rs.type, "rope_theta": cfg.rope_theta, "factor": rs.factor}
        if rs.type == "yarn":
            rope.update(original_max_position_embeddings=rs.original_max_seq_len,
                        beta_fast=rs.beta_fast, beta_slow=rs.beta_slow, truncate=rs.truncate)
            rope.update({k: v for k, v in (("attention_factor", rs.attention_factor),
                                           ("mscale", rs.mscale),
                                           ("mscale_all_dim", rs.mscale_all_dim))
                         if v is not None})
        common["rope_parameters"] = rope
    if family == "deepseek_v3":
        m, r = cfg.mla, cfg.moe.router
        return dict(common, architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3",
                    head_dim=m.qk_rope_head_dim, num_key_value_heads=cfg.n_heads,
                    q_lora_rank=m.q_lora_rank, kv_lora_rank=m.kv_lora_rank,
                    qk_nope_head_dim=m.qk_nope_head_dim, qk_rope_head_dim=m.qk_rope_head_dim,
                    v_head_dim=m.v_head_dim, rope_interleave=False,  # ours is rotate-half
                    n_routed_experts=cfg.moe.num_experts,
                    moe_intermediate_size=cfg.moe.expert_ffn, intermediate_size=cfg.dense_ffn,
                    n_shared_experts=cfg.moe.num_shared_experts,
                    first_k_dense_replace=cfg.first_dense_layers, n_group=r.n_group,
                    topk_group=r.topk_group, norm_topk_prob=r.renormalize,
                    routed_scaling_factor=r.routed_scaling_factor, attention_bias=False)
    if family == "gpt_oss":
        m = cfg.moe
        # without rope_parameters transformers would give GPT-OSS its YaRN default
        common.setdefault("rope_parameters", {"rope_type": "default",
                                              "rope_theta": cfg.rope_theta})
        return dict(common, architectures=["GptOssForCausalLM"], model_type="gpt_oss",
                    intermediate_size=m.expert_ffn, num_local_experts=m.num_experts,
                    swiglu_alpha=m.swiglu_alpha, swiglu_limit=m.swiglu_limit,
                    attention_bias=cfg.qkv_bias, sliding_window=cfg.sliding_window,
                    layer_types=["sliding_attention" if cfg.window(i) else "full_attention"
                                 for i in range(cfg.n_layers)])
    if family == "glm4_moe":
        r = cfg.moe.router
        return dict(common, architectures=["Glm4MoeForCausalLM"], model_type="glm4_moe",
                    partial_rotary_factor=cfg.partial_rotary_factor,
                    attention_bias=cfg.qkv_bias, use_qk_norm=cfg.qk_norm,
                    n_routed_experts=cfg.moe.num_experts,
                    moe_intermediate_size=cfg.moe.expert_ffn, intermediate_size=cfg.dense_ffn,
                    n_shared_experts=cfg.moe.num_shared_experts,
                    first_k_dense_replace=cfg.first_dense_layers, n_group=r.n_group,
                    topk_group=r.topk_group, norm_topk_prob=r.renormalize,
                    routed_scaling_factor=r.routed_scaling_factor, num_mtp_layers=0)
    if family == "ernie4_5_moe":
        m = cfg.moe
        common.pop("num_experts_per_tok")
        common.setdefault("rope_parameters", {"rope_type": "default",
                                              "rope_theta": cfg.rope_theta})
        return dict(common, architectures=["Ernie4_5_MoeForCausalLM"],
                    model_type="ernie4_5_moe", moe_k=m.router.top_k,
                    moe_num_experts=m.num_experts, moe_intermediate_size=m.expert_ffn,
                    intermediate_size=cfg.dense_ffn,
                    moe_num_shared_experts=m.num_shared_experts,
                    moe_layer_start_index=cfg.first_dense_layers,
                    moe_layer_end_index=cfg.n_layers - 1,
                    moe_layer_interval=cfg.moe_layer_freq, use_bias=False)
    if family == "mixtral":
        return dict(common, architectures=["MixtralForCausalLM"], model_type="mixtral",
                    intermediate_size=cfg.moe.expert_ffn, num_local_experts=cfg.moe.num_experts,
                    sliding_window=cfg.sliding_window)
    dense_layers = [i for i in range(cfg.n_layers) if not cfg.is_moe_layer(i)]
    return dict(common, architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe",
                moe_intermediate_size=cfg.moe.expert_ffn, intermediate_size=cfg.dense_ffn,
                num_experts=cfg.moe.num_experts, norm_topk_prob=cfg.moe.router.renormalize,
                decoder_sparse_step=1, mlp_only_layers=dense_layers, attention_bias=False,
                use_sliding_window=cfg.sliding_window is not None,
                sliding_window=cfg.sliding_window)


EXPORT_FAMILIES = ("mixtral", "qwen3_moe", "deepseek_v3", "glm4_moe", "gpt_oss", "ernie4_5_moe")


def to_hf_state(cfg: ModelConfig, state: dict[str, torch.Tensor],
                family: str) -> dict[str, torch.Tensor]:
    """Our single-process state dict -> the family's Hub tensor names."""
    out = {hub: state[ours] for ours, hub in shared_names(cfg)}
    if family == "ernie4_5_moe":  # its RoPE rotates interleaved pairs: ours rotate halves
        hd = cfg.resolved_head_dim
        back = evens_then_odds(hd).argsort()
        for hub in [h for h in out if h.endswith(("self_attn.q_proj.weight",
                                                  "self_attn.k_proj.weight"))]:
            t = out[hub]
            out[hub] = t.view(-1, hd, t.shape[-1])[:, back].reshape(t.shape)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    gate_name, expert_prefix, parts = EXPERT_NAMES[family]
    for i in range(cfg.n_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        if not cfg.is_moe_layer(i):
            gate, up = state[src + "mlp.w_in.weight"].chunk(2, dim=0)
            out[dst + "mlp.gate_proj.weight"] = gate
            out[dst + "mlp.up_proj.weight"] = up
            out[dst + "mlp.down_proj.weight"] = state[src + "mlp.w_out.weight"]
            continue
        w_in, w_out = state[src + "mlp.experts.w_in"], state[src + "mlp.experts.w_out"]
        F = cfg.moe.expert_ffn
        out[dst + gate_name + ".weight"] = state[src + "mlp.router.weight"]
        if family == "gpt_oss":
            out.update(_gpt_oss_experts(cfg, state, src, dst))
            continue
        if family in (*V3_ROUTED, "ernie4_5_moe"):
            bias = state.get(src + "mlp.router.expert_bias")
            bias = bias if bias is not None else torch.zeros(cfg.moe.num_experts)
            if family == "ernie4_5_moe":
                out[dst + "mlp.moe_statics.e_score_correction_bias"] = bias[None]
            else:
                out[dst + gate_name + ".e_score_correction_bias"] = bias
        if family in UNGATED_SHARED and cfg.moe.num_shared_experts:
            sh = dst + "mlp.shared_experts."
            gate, up = state[src + "mlp.shared.mlp.w_in.weight"].chunk(2, dim=0)
            out[sh + "gate_proj.weight"], out[sh + "up_proj.weight"] = gate, up
            out[sh + "down_proj.weight"] = state[src + "mlp.shared.mlp.w_out.weight"]
        g, u, dn = parts
        for e in range(cfg.moe.num_experts):
            base = dst + expert_prefix.format(e=e)
            out[base + f"{g}.weight"] = w_in[e, :F]
            out[base + f"{u}.weight"] = w_in[e, F:]
            out[base + f"{dn}.weight"] = w_out[e]
    return {k: v.detach().to(torch.float32).contiguous().clone() for k, v in out.items()}


def _gpt_oss_experts(cfg: ModelConfig, state: dict[str, torch.Tensor], src: str, dst: str
                     ) -> dict[str, torch.Tensor]:
    """One layer's router bias and stacked experts in GPT-OSS's layout: [in, out] matrices,
    gate and up features interleaved (zeros for biases the model lacks)."""
    E, F, d = cfg.moe.num_experts, cfg.moe.expert_ffn, cfg.d_model
    w_in, w_out = state[src + "mlp.experts.w_in"], state[src + "mlp.experts.w_out"]
    b_in = state.get(src + "mlp.experts.b_in", w_in.new_zeros(E, 2 * F))
    b_out = state.get(src + "mlp.experts.b_out", w_in.new_zeros(E, d))

    def interleave(t: torch.Tensor) -> torch.Tensor:  # [E, 2F, ...] (gate; up) -> g0 u0 g1 ..
        return torch.stack([t[:, :F], t[:, F:]], dim=2).flatten(1, 2)

    base = dst + "mlp.experts."
    return {dst + "mlp.router.bias": state.get(src + "mlp.router.bias", w_in.new_zeros(E)),
            base + "gate_up_proj": interleave(w_in).transpose(1, 2),
            base + "gate_up_proj_bias": interleave(b_in),
            base + "down_proj": w_out.transpose(1, 2), base + "down_proj_bias": b_out}


def _check_export_family(family: str) -> None:
    if family not in EXPORT_FAMILIES:
        raise ValueError(f"export writes {', '.join(EXPORT_FAMILIES)}, not {family!r}")


def export_hf(cfg: ModelConfig, state: dict[str, torch.Tensor], out_dir: Path,
              tokenizer_file: Path | None = None, eos_token: str = "<|endoftext|>",
              family: str | None = None) -> str:
    """Write out_dir/{config.json, model.safetensors, tokenizer files}; returns the family."""
    family = family or choose_family(cfg)
    _check_export_family(family)
    if (cfg.mla is not None) != (family == "deepseek_v3"):
        raise ValueError(f"a {family} directory cannot hold this model's attention")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(to_hf_state(cfg, state, family), str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(hf_config_json(cfg, family), indent=2))
    if tokenizer_file is not None:
        (out_dir / "tokenizer.json").write_bytes(Path(tokenizer_file).read_bytes())
        (out_dir / "tokenizer_config.json").write_text(json.dumps(dict(
            tokenizer_class="PreTrainedTokenizerFast", eos_token=eos_token, bos_token=None,
            pad_token=eos_token, model_max_length=cfg.max_seq_len), indent=2))
    return family
