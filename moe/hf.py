"""Hugging Face checkpoint layouts: import Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE,
DeepSeek-V2 / V3, GLM-4.5 (glm4_moe) and GPT-OSS (bf16 or MXFP4 experts) directories, export
our models as Mixtral, Qwen3-MoE, GLM-4.5, DeepSeek-V3 or GPT-OSS directories (safetensors +
config.json), and read dense Llama / Qwen3 directories for upcycling.

Names follow the layouts on the Hub (per-expert w1/w2/w3 for Mixtral, gate/up/down_proj for
most others, stacked gate_up_proj / down_proj for GPT-OSS), which `transformers` loads with
its own classes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moe.config import ROPE_TYPES, MLAConfig, ModelConfig, RopeScaling
from moe.experts import EXPERT_PARAMS


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
    if m.shared_expert_gate:
        problems.append("gated shared experts")
    if m.num_shared_experts and (m.shared_expert_ffn or 0) not in (
            0, m.num_shared_experts * m.expert_ffn):
        problems.append("shared_expert_ffn != num_shared_experts * expert_ffn")
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
    'glm4_moe' for sigmoid routing behind GQA, else 'mixtral' or 'qwen3_moe'; ValueError
    says why none can."""
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


# Per-family names of the router and of one expert's (gate, up, down) projections.
EXPERT_NAMES = {
    "mixtral": ("block_sparse_moe.gate", "block_sparse_moe.experts.{e}.", ("w1", "w3", "w2")),
    "qwen3_moe": ("mlp.gate", "mlp.experts.{e}.", ("gate_proj", "up_proj", "down_proj")),
    "qwen2_moe": ("mlp.gate", "mlp.experts.{e}.", ("gate_proj", "up_proj", "down_proj")),
    "olmoe": ("mlp.gate", "mlp.experts.{e}.", ("gate_proj", "up_proj", "down_proj")),
    "deepseek_v2": ("mlp.gate", "mlp.experts.{e}.", ("gate_proj", "up_proj", "down_proj")),
    "deepseek_v3": ("mlp.gate", "mlp.experts.{e}.", ("gate_proj", "up_proj", "down_proj")),
    "glm4_moe": ("mlp.gate", "mlp.experts.{e}.", ("gate_proj", "up_proj", "down_proj")),
    "gpt_oss": ("mlp.router", "mlp.experts.", ("gate_up_proj", "down_proj")),  # stacked
}
DEEPSEEK = ("deepseek_v2", "deepseek_v3")
GPT_OSS_MXFP4 = {"quant_method": "mxfp4", "modules_to_not_convert": [  # as on the Hub
    "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
GPT_OSS_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                "truncate": False, "original_max_position_embeddings": 4096,
                "rope_theta": 150000.0}  # GptOssConfig's default
V3_ROUTED = ("deepseek_v3", "glm4_moe")  # sigmoid, selection bias, groups, shared experts
EXPORT_FAMILIES = ("mixtral", "qwen3_moe", "deepseek_v3", "glm4_moe", "gpt_oss")


MLA_NAMES = {  # ours -> DeepSeek's, under attn. / self_attn.
    "q_proj": "q_proj", "q_a_proj": "q_a_proj", "q_a_norm": "q_a_layernorm",
    "q_b_proj": "q_b_proj", "kv_a_proj": "kv_a_proj_with_mqa", "kv_a_norm": "kv_a_layernorm",
    "kv_b_proj": "kv_b_proj", "o_proj": "o_proj"}


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


def to_hf_state(cfg: ModelConfig, state: dict[str, torch.Tensor],
                family: str) -> dict[str, torch.Tensor]:
    """Our single-process state dict -> the family's Hub tensor names."""
    out = {hub: state[ours] for ours, hub in shared_names(cfg)}
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
        if family in V3_ROUTED:
            bias = state.get(src + "mlp.router.expert_bias")
            out[dst + gate_name + ".e_score_correction_bias"] = (
                bias if bias is not None else torch.zeros(cfg.moe.num_experts))
            if cfg.moe.num_shared_experts:
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
    elif family == "glm4_moe":  # DeepSeek-V3's MoE behind grouped-query attention
        moe, _, dense_layers = _deepseek_moe(hf, family)
    elif family == "gpt_oss":
        moe = MoEConfig(num_experts=hf.get("num_local_experts") or hf["num_experts"],
                        expert_ffn=hf["intermediate_size"], expert_type="clamped_swiglu",
                        expert_bias=True, swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)),
                        swiglu_limit=float(hf.get("swiglu_limit", 7.0)),
                        router=RouterConfig(top_k=hf["num_experts_per_tok"], gate_bias=True))
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
    if dense_layers and dense_layers != list(range(len(dense_layers))):
        raise ValueError(f"dense layers {dense_layers} are not a leading block; "
                         "this layer pattern is not supported")
    quant = hf.get("quantization_config")
    if quant and not is_mxfp4(hf):
        raise ValueError(f"config.json: a quantized checkpoint (quant_method="
                         f"{quant.get('quant_method')!r}) is not supported; serve its bf16 "
                         "weights (--quant int8 / int4 quantizes them at load)")
    if hf.get("mlp_bias"):
        raise ValueError("config.json: mlp_bias=true is not supported")
    if hf.get("attention_bias") and family not in ("qwen2_moe", "glm4_moe", "gpt_oss"):
        raise ValueError(f"config.json: attention_bias=true in a {family} model is not "
                         "supported")
    if family == "gpt_oss" and not (hf.get("rope_scaling") or hf.get("rope_parameters")):
        hf = dict(hf, rope_parameters=GPT_OSS_ROPE)  # what transformers gives it then
    window, window_layers = hf_sliding_window(hf, family, n_layers)
    fields = llama_fields(hf, default_context=4096, partial_rotary=family == "glm4_moe")
    if mla is not None:
        fields.update(n_kv_heads=fields["n_heads"],
                      head_dim=mla.qk_nope_head_dim + mla.qk_rope_head_dim)
    cfg = ModelConfig(
        **fields, mla=mla, qk_norm=family in ("qwen3_moe", "olmoe") or (
            family == "glm4_moe" and bool(hf.get("use_qk_norm"))),
        qk_norm_type="full" if family == "olmoe" else "head",
        qkv_bias=(family == "qwen2_moe" and hf.get("qkv_bias", True))
        or (family in ("glm4_moe", "gpt_oss") and bool(hf.get("attention_bias", True))),
        o_bias=family == "gpt_oss" and bool(hf.get("attention_bias", True)),
        attn_sinks=family == "gpt_oss",
        dense_ffn=hf.get("intermediate_size", 0) if family in (
            "qwen2_moe", "qwen3_moe", *DEEPSEEK, "glm4_moe") else 1,
        moe=moe, first_dense_layers=len(dense_layers), sliding_window=window,
        sliding_window_layers=window_layers,
        clip_qkv=hf.get("clip_qkv") if family == "olmoe" else None)
    cfg.check()
    return cfg, family, dense_layers


def _deepseek_moe(hf: dict, family: str):
    """DeepSeek-V2 / V3 config.json -> (MoEConfig, MLAConfig, dense layer indices); for
    GLM-4.5 (V3's MoE, no MLA) the MLAConfig is None. As transformers builds them: V2
    softmax top-k (greedy or group-limited by the best expert of a group), weights not
    renormalised; V3 sigmoid scores with the correction bias for selection, groups scored by
    their two best experts, renormalised as norm_topk_prob says; both scaled by
    routed_scaling_factor, with n_shared_experts ungated shared experts."""
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
    if family == "glm4_moe":
        return moe, None, list(range(first_dense))
    mla = MLAConfig(q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=hf["kv_lora_rank"],
                    qk_nope_head_dim=hf["qk_nope_head_dim"],
                    qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"])
    return moe, mla, list(range(first_dense))


def hf_sliding_window(hf: dict, family: str, n_layers: int) -> tuple[int | None, list[int] | None]:
    """(window, the layers it applies to or None for all) as transformers reads config.json:
    Mixtral's sliding_window for every layer; Qwen-MoE's only with use_sliding_window, on
    every layer (Qwen3) or on the layers its layer_types (or max_window_layers) name
    (Qwen2); GPT-OSS's on the layers its layer_types name (the even ones by default);
    OLMoE, DeepSeek and GLM have none."""
    window = hf.get("sliding_window")
    if family in ("olmoe", "glm4_moe", *DEEPSEEK) or not window:
        return None, None
    if family == "mixtral":
        return int(window), None
    types = hf.get("layer_types")
    if family == "gpt_oss":  # layer_types, by default sliding on the even layers
        types = types or ["sliding_attention" if i % 2 == 0 else "full_attention"
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
        if family in (*DEEPSEEK, "glm4_moe") and cfg.moe.num_shared_experts:  # ungated
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


def dense_tensor(hf: dict, cfg: ModelConfig, name: str,
                 parts: list[torch.Tensor]) -> torch.Tensor:
    """Our non-expert tensor `name` from the Hub tensors it is made of (dense_tensor_names:
    concatenated by rows), in our layout. DeepSeek's RoPE acts on interleaved pairs (x0, x1),
    (x2, x3), ... (always in V2; in V3 unless rope_interleave is false); the rows that make the
    rotated query / key parts are reordered to the rotate-half layout (evens, then odds):
    q . k is unchanged, and one RoPE serves every family."""
    t = torch.cat(parts) if len(parts) > 1 else parts[0]
    m = cfg.mla
    if m is None or (hf.get("model_type") == "deepseek_v3"
                     and not hf.get("rope_interleave", True)):
        return t
    r = m.qk_rope_head_dim
    perm = torch.cat([torch.arange(0, r, 2), torch.arange(1, r, 2)])
    if name.endswith(("attn.q_proj.weight", "attn.q_b_proj.weight")):
        head = m.qk_nope_head_dim + r
        v = t.view(cfg.n_heads, head, -1)
        return torch.cat([v[:, :m.qk_nope_head_dim], v[:, m.qk_nope_head_dim:][:, perm]],
                         dim=1).reshape(t.shape)
    if name.endswith("attn.kv_a_proj.weight"):
        return torch.cat([t[:m.kv_lora_rank], t[m.kv_lora_rank:][perm]])
    return t


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
    rows = torch.cat([torch.arange(0, b_in.shape[0], 2), torch.arange(1, b_in.shape[0], 2)])
    return gu[rows], dn, b_in[rows], get(base + "down_proj_bias", e)


def import_hf(model_dir: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A directory of a family in EXPERT_NAMES (sharded safetensors or not; ours from
    export_hf too) -> (ModelConfig, our single-process state dict)."""
    hf = _read_config(model_dir)
    cfg, family, _ = hf_model_config(hf)
    tensors = _read_tensors(model_dir)
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
