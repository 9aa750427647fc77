"""Tiny random-weight Hugging Face MoE models of twelve families (import and serving
tests)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

VOCAB = 300
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, num_experts_per_tok=2,
              eos_token_id=None, bos_token_id=None, pad_token_id=0)


MLA = dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
           first_k_dense_replace=1, num_key_value_heads=4, kv_lora_rank=16,
           qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, n_group=4, topk_group=2)
FAMILIES = {  # family -> (model class, config class, family-specific config fields)
    "mixtral": ("MixtralForCausalLM", "MixtralConfig",
                dict(intermediate_size=40, num_local_experts=8)),
    "qwen2_moe": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig",
                  dict(intermediate_size=48, moe_intermediate_size=24, num_experts=8,
                       shared_expert_intermediate_size=40, mlp_only_layers=[0])),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig",
                  dict(intermediate_size=48, moe_intermediate_size=24, num_experts=8,
                       head_dim=8, norm_topk_prob=False)),
    "olmoe": ("OlmoeForCausalLM", "OlmoeConfig", dict(intermediate_size=24, num_experts=8)),
    # multi-head latent attention, shared experts, a leading dense layer, group-limited routing
    "deepseek_v2": ("DeepseekV2ForCausalLM", "DeepseekV2Config", dict(
        **MLA, q_lora_rank=None, n_shared_experts=2, topk_method="group_limited_greedy",
        routed_scaling_factor=1.5)),
    "deepseek_v3": ("DeepseekV3ForCausalLM", "DeepseekV3Config", dict(
        **MLA, q_lora_rank=12, n_shared_experts=1, routed_scaling_factor=2.5,
        norm_topk_prob=True)),
    # dots.llm1: V3's MoE behind Qwen3's attention (q/k norms), a window on the last layer
    "dots1": ("Dots1ForCausalLM", "Dots1Config", dict(
        intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1,
        first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=2.5,
        norm_topk_prob=True, head_dim=8, sliding_window=4, max_window_layers=2)),
    # GLM-4.7-Flash: V3's latent attention and MoE, dense layers listed by mlp_layer_types
    "glm4_moe_lite": ("Glm4MoeLiteForCausalLM", "Glm4MoeLiteConfig", dict(
        **MLA, q_lora_rank=12, n_shared_experts=1, routed_scaling_factor=1.8,
        norm_topk_prob=True, mlp_layer_types=["dense", "sparse", "sparse"])),
    # DeepSeek-V3's MoE behind grouped-query attention with biases, q/k norms, partial RoPE
    "glm4_moe": ("Glm4MoeForCausalLM", "Glm4MoeConfig", dict(
        intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1,
        first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=2.5,
        attention_bias=True, use_qk_norm=True, partial_rotary_factor=0.5, head_dim=8,
        num_hidden_layers=4)),
    # attention sinks, biases everywhere, clamped SwiGLU experts, YaRN, a window every other
    # layer
    "gpt_oss": ("GptOssForCausalLM", "GptOssConfig", dict(
        intermediate_size=16, num_local_experts=8, head_dim=8, sliding_window=4,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0,
                         "beta_slow": 1.0, "truncate": False, "rope_theta": 150000.0,
                         "original_max_position_embeddings": 16})),
    # softmax routing with a selection bias, ungated shared experts, a leading dense layer,
    # RoPE on interleaved pairs, tied embeddings
    # full-width q/k norms, partial RoPE (rotary_dim), sigmoid routing with a selection bias
    "minimax_m2": ("MiniMaxM2ForCausalLM", "MiniMaxM2Config", dict(
        intermediate_size=16, num_local_experts=8, head_dim=8, rotary_dim=4)),
    "ernie4_5_moe": ("Ernie4_5_MoeForCausalLM", "Ernie4_5_MoeConfig", dict(
        intermediate_size=48, moe_intermediate_size=16, moe_num_experts=8,
        moe_num_shared_experts=2, moe_layer_start_index=1, tie_word_embeddings=True)),
}


def build_hf(family: str, seed: int = 0, **overrides):
    """A random transformers model of the family (8 experts, top-2, 3 layers); overrides
    change its config fields."""
    torch.manual_seed(seed)
    model_cls, cfg_cls, fields = FAMILIES[family]
    cfg = getattr(transformers, cfg_cls)(**{**COMMON, **fields, **overrides})
    m = getattr(transformers, model_cls)(cfg)
    with torch.no_grad():  # make norms and biases count, and routing decisive
        for name, p in m.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(("proj.bias", "proj_bias", "sinks", "router.bias")):
                p.normal_(0, 0.5)
            elif name.endswith(("gate.weight", "router.weight")) and p.shape[0] == 8:
                p.normal_(0, 0.5)
            elif family == "gpt_oss" and name.endswith("experts.gate_up_proj"):  # reach 7
                p.normal_(0, 1.0)
            elif name.endswith("e_score_correction_bias"):  # ERNIE's, on softmax scores
                p.normal_(0, 0.05)
        for name, b in m.named_buffers():  # DeepSeek-V3's selection bias
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.3)
    return m.eval()


def saved_hf(family: str, model_dir: Path, seed: int = 0, **overrides):
    """build_hf(family, seed, **overrides), saved in model_dir -> the model (the reference)."""
    hf = build_hf(family, seed, **overrides)
    hf.save_pretrained(model_dir)
    return hf


CODE_TEXTS = ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())\n",
              "class Point:\n    x: int\n    y: int\n", "for i in range(10):\n    print(i)\n"] * 20


def save_served_model(model_dir: Path, seed: int):
    """A random tiny Mixtral with a tokenizer trained on CODE_TEXTS, saved in model_dir (as a
    served directory looks) -> the transformers model (the reference)."""
    hf = build_hf("mixtral", seed=seed)
    hf.save_pretrained(model_dir)
    save_tokenizer(model_dir, CODE_TEXTS)
    return hf


def hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    """transformers' greedy continuation: the n new token ids after prompt ids."""
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def save_tokenizer(model_dir: Path, texts: list[str], special: tuple[str, ...] = ()) -> None:
    """A byte-level BPE of VOCAB tokens trained on texts, with an eos token (id 0), the
    `special` tokens after it and a chat template, written as tokenizer.json +
    tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>", *special],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
        "chat_template": "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n"
                         "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"}))


def save_gpt_oss_mxfp4(hf, model_dir: Path) -> None:
    """Save a GPT-OSS model as the Hub stores it: experts as MXFP4 blocks and scales (rows =
    output features), quantization_config saying so; the rest as it is."""
    from safetensors.torch import load_file, save_file

    from kernels.mxfp4 import mxfp4_quantize
    from moe.hf_names import GPT_OSS_MXFP4

    hf.save_pretrained(model_dir)
    path = model_dir / "model.safetensors"
    tensors = load_file(str(path))
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj",
                                                   "experts.down_proj"))]:
        blocks, scales = mxfp4_quantize(tensors.pop(name).transpose(1, 2))  # [E, out, in]
        tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
    save_file(tensors, str(path), metadata={"format": "pt"})
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["quantization_config"] = GPT_OSS_MXFP4
    (model_dir / "config.json").write_text(json.dumps(cfg))


def save_fp8(hf, model_dir: Path, block: tuple[int, int] = (16, 16)):
    """Save hf as an FP8 block-scaled checkpoint (moe.hf_fp8.write_fp8_checkpoint:
    DeepSeek-V3's layout, float8 e4m3 linear weights beside `<name>_scale_inv`; routers,
    norms, embeddings and the LM head as they are) -> the checkpoint's reference:
    transformers' model of its dequantized weights."""
    import tempfile

    from safetensors.torch import load_file, save_file

    from moe.hf_fp8 import fp8_dequantize, write_fp8_checkpoint

    with tempfile.TemporaryDirectory() as src, tempfile.TemporaryDirectory() as ref_dir:
        hf.save_pretrained(src)
        write_fp8_checkpoint(Path(src), model_dir, block, verbose=False)
        tensors = load_file(str(model_dir / "model.safetensors"))
        plain = {n: fp8_dequantize(t, tensors[n + "_scale_inv"], block)
                 if n + "_scale_inv" in tensors else t
                 for n, t in tensors.items() if not n.endswith("_scale_inv")}
        save_file(plain, str(Path(ref_dir) / "model.safetensors"), metadata={"format": "pt"})
        for f in Path(src).iterdir():
            if f.suffix != ".safetensors":
                (Path(ref_dir) / f.name).write_bytes(f.read_bytes())
        return transformers.AutoModelForCausalLM.from_pretrained(ref_dir).eval()
