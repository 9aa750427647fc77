"""Export to Hugging Face layouts (transformers is the reference) and sparse upcycling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moe import ModelConfig, MoEConfig, MoETransformer  # noqa: E402
from moe.config import MLAConfig, RopeScaling  # noqa: E402
from moe.hf_export import choose_family, export_hf  # noqa: E402
from moe.upcycle import upcycle_hf_dense  # noqa: E402
from routing import RouterConfig  # noqa: E402
from tests.hf_models import build_hf  # noqa: E402


def tiny(**kw) -> ModelConfig:
    moe = MoEConfig(num_experts=4, expert_ffn=24, kernel_backend="torch",
                    router=kw.pop("router", RouterConfig(top_k=2)),
                    num_shared_experts=kw.pop("shared", 0))
    base = dict(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                max_seq_len=64, dense_ffn=40, moe=moe)
    return ModelConfig(**{**base, **kw})


DEEPSEEK_V3 = dict(n_kv_heads=4, shared=2, first_dense_layers=1, router=RouterConfig(
    top_k=2, score="sigmoid", expert_bias=True, n_group=2, topk_group=1, group_score="top2",
    routed_scaling_factor=2.0))


@pytest.mark.parametrize("kw,family", [
    ({}, "mixtral"),
    ({"qk_norm": True}, "qwen3_moe"),
    ({"qk_norm": True, "router": RouterConfig(top_k=2, renormalize=False),
      "moe_layer_freq": 2}, "qwen3_moe"),
    ({"tie_embeddings": True}, "mixtral"),
    ({"sliding_window": 5, "rope_scaling": RopeScaling("linear", factor=2.0)}, "mixtral"),
    ({"qk_norm": True, "sliding_window": 6,
      "rope_scaling": RopeScaling("yarn", factor=4.0, original_max_seq_len=16)}, "qwen3_moe"),
    (dict(DEEPSEEK_V3, mla=MLAConfig(None, 16, 8, 4, 6)), "deepseek_v3"),
    (dict(DEEPSEEK_V3, n_kv_heads=2, qkv_bias=True, qk_norm=True, partial_rotary_factor=0.5),
     "glm4_moe"),
    ({"router": RouterConfig(top_k=2, score="sigmoid", expert_bias=True)}, "glm4_moe"),
    ({"router": RouterConfig(top_k=2, expert_bias=True), "shared": 2, "first_dense_layers": 1,
      "tie_embeddings": True}, "ernie4_5_moe"),
    ({"router": RouterConfig(top_k=2, expert_bias=True), "moe_layer_freq": 2,
      "rope_scaling": RopeScaling("linear", factor=2.0)}, "ernie4_5_moe"),
    (dict(DEEPSEEK_V3, mla=MLAConfig(12, 16, 8, 4, 6), shared=0, first_dense_layers=0,
          rope_scaling=RopeScaling("yarn", factor=4.0, original_max_seq_len=16, mscale=1.0,
                                   mscale_all_dim=0.8)), "deepseek_v3"),
])
def test_export_loads_in_transformers_with_equal_logits(tmp_path, kw, family):
    torch.manual_seed(0)
    cfg = tiny(**kw)
    model = MoETransformer(cfg)
    with torch.no_grad():  # non-trivial norms, so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0, 0.5)
        for name, b in model.named_buffers():
            if name.endswith("expert_bias"):
                b.normal_(0, 0.3)
    assert export_hf(cfg, model.state_dict(), tmp_path) == family
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32)
    assert hf.config.model_type == family
    ids = torch.randint(0, 96, (2, 17))
    with torch.no_grad():
        ours = model(ids).logits
        theirs = hf(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_models_without_an_hf_family_are_refused():
    with pytest.raises(ValueError, match="no ERNIE-4.5 .* equivalent: weights not renormal"):
        choose_family(tiny(router=RouterConfig(top_k=2, expert_bias=True, renormalize=False)))
    assert choose_family(tiny(router=RouterConfig(top_k=2, score="sigmoid"))) == "glm4_moe"
    with pytest.raises(ValueError, match="no GLM-4.5 .* equivalent: a sliding window"):
        choose_family(tiny(router=RouterConfig(top_k=2, score="sigmoid"), sliding_window=8))
    with pytest.raises(ValueError, match="expert_choice"):
        choose_family(tiny(router=RouterConfig(kind="expert_choice", top_k=2)))
    with pytest.raises(ValueError, match="partial RoPE"):
        choose_family(tiny(partial_rotary_factor=0.5))
    with pytest.raises(ValueError, match="qk_norm"):
        choose_family(tiny(moe_layer_freq=2))
    with pytest.raises(ValueError, match="clip_qkv"):
        choose_family(tiny(clip_qkv=1.0))
    with pytest.raises(ValueError, match="sliding window on some layers"):
        choose_family(tiny(sliding_window=4, sliding_window_layers=[0]))
    mla = MLAConfig(None, 16, 8, 4, 6)
    with pytest.raises(ValueError, match="no DeepSeek-V3 equivalent: router topk/softmax"):
        choose_family(tiny(mla=mla, n_kv_heads=4))
    with pytest.raises(ValueError, match="best expert"):
        choose_family(tiny(**dict(DEEPSEEK_V3, mla=mla, router=RouterConfig(
            top_k=2, score="sigmoid", n_group=2, group_score="max"))))
    with pytest.raises(ValueError, match="cannot hold this model's attention"):
        export_hf(tiny(**dict(DEEPSEEK_V3, mla=mla)), {}, Path("/nonexistent"), family="mixtral")


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_upcycled_model_equals_the_dense_model_at_step_0(tmp_path, family):
    torch.manual_seed(0)
    common = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if family == "llama":
        hf_cfg = transformers.LlamaConfig(**common)
        dense = transformers.LlamaForCausalLM(hf_cfg)
    else:
        hf_cfg = transformers.Qwen3Config(**common, head_dim=8)
        dense = transformers.Qwen3ForCausalLM(hf_cfg)
    dense.save_pretrained(tmp_path)
    moe = MoEConfig(num_experts=4, kernel_backend="torch", router=RouterConfig(top_k=2))
    model = upcycle_hf_dense(tmp_path, moe)
    ids = torch.randint(0, 96, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(model.layers[0].mlp.experts.w_in[0], model.layers[0].mlp.experts.w_in[3])


def test_upcycling_refuses_unknown_families(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ValueError, match="gpt2"):
        upcycle_hf_dense(tmp_path, MoEConfig())


def test_upcycle_one_of_our_dense_models():
    from moe.upcycle import upcycle_dense_model

    torch.manual_seed(0)
    dense_cfg = tiny(first_dense_layers=2)
    dense = MoETransformer(dense_cfg)
    moe = MoEConfig(num_experts=4, kernel_backend="torch", router=RouterConfig(top_k=2))
    model = upcycle_dense_model(dense_cfg, dense.state_dict(), moe)
    assert all(b.is_moe for b in model.layers)
    ids = torch.randint(0, 96, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="already has MoE layers"):
        upcycle_dense_model(tiny(), MoETransformer(tiny()).state_dict(), moe)


@pytest.mark.parametrize("family,overrides", [("mixtral", {}),
                                             ("qwen3_moe", {"mlp_only_layers": [0]})])
def test_import_hf_matches_transformers(tmp_path, family, overrides):
    hf = build_hf(family, **overrides)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")  # sharded, as on the Hub
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    assert_import_matches(hf, tmp_path)


def assert_import_matches(hf, model_dir):
    """Import model_dir into our model; its logits must equal the transformers model's."""
    from moe.hf_import import import_hf

    cfg, state = import_hf(model_dir)
    model = MoETransformer(cfg)
    model.load_state_dict(state)
    ids = torch.randint(0, 96, (2, 15))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5)
    return cfg


@pytest.mark.parametrize("kw", [dict(o_bias=True), dict(o_bias=True, qkv_bias=True)])
def test_an_output_projection_bias_is_never_exported_without_it(kw):
    """Only GPT-OSS's layout has a bias on o_proj: a model with one is not written as
    Mixtral, Qwen3-MoE or GLM-4.5 (which would drop it); GPT-OSS's refusal names why."""
    with pytest.raises(ValueError, match="no GPT-OSS equivalent"):
        choose_family(ModelConfig(**kw))
    glm = ModelConfig(**kw, moe=MoEConfig(router=RouterConfig(score="sigmoid")))
    with pytest.raises(ValueError, match="no GPT-OSS equivalent"):
        choose_family(glm)


def test_mxfp4_decoding_matches_transformers():
    """Random MXFP4 blocks and scales decode to what transformers' GPT-OSS loader makes of
    them (its [E, in, out] layout transposed), and re-encoding a decoded block is exact."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from kernels.mxfp4 import mxfp4_dequantize, mxfp4_quantize

    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 5, 2, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(110, 140, (3, 5, 2), generator=gen, dtype=torch.uint8)
    ours = mxfp4_dequantize(blocks, scales)
    ref = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    torch.testing.assert_close(ours, ref.transpose(1, 2), rtol=0, atol=0)
    assert ours.shape == (3, 5, 64)
    w = ours * (ours.abs().amax(-1, keepdim=True) > 0)
    torch.testing.assert_close(mxfp4_dequantize(*mxfp4_quantize(w)), w, rtol=0, atol=0)
    with pytest.raises(ValueError, match="multiple of 32"):
        mxfp4_quantize(torch.ones(2, 16))


def test_gpt_oss_config_without_rope_keys_gets_transformers_default():
    """A GPT-OSS config.json without rope_parameters / rope_scaling is read as transformers
    reads it: YaRN, factor 32 over 4096 positions, theta 150000, not plain RoPE."""
    from moe.hf_import import hf_model_config

    hf = build_hf("gpt_oss").config.to_dict()
    for key in ("rope_parameters", "rope_scaling", "rope_theta"):
        hf.pop(key, None)
    cfg, family, _ = hf_model_config(hf)
    rs = cfg.rope_scaling
    assert family == "gpt_oss" and cfg.attn_sinks and cfg.window(0) and not cfg.window(1)
    assert (rs.type, rs.factor, rs.original_max_seq_len, rs.truncate) == ("yarn", 32.0, 4096,
                                                                           False)
    assert cfg.rope_theta == 150000.0


def test_import_hf_errors(tmp_path):
    from moe.hf_import import import_hf

    with pytest.raises(FileNotFoundError, match="no config.json"):
        import_hf(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="unsupported architecture"):
        import_hf(tmp_path)


@pytest.mark.parametrize("family,refusal", [
    ("qwen2_moe", "no Mixtral or Qwen3-MoE equivalent"),
    ("olmoe", "no Mixtral or Qwen3-MoE equivalent"),
    ("deepseek_v2", "no DeepSeek-V3 equivalent: router topk/softmax"),
    ("ernie4_5_moe", None),
    ("glm4_moe", None),
    ("deepseek_v3", None),
    ("glm4_moe_lite", None),  # exported as DeepSeek-V3, the same maths
    ("dots1", "GLM-4.5 .* equivalent: a sliding window"),  # GLM has no window
    ("minimax_m2", "GLM-4.5 .* equivalent: full-width q/k norms"),
    ("gpt_oss", None)])
def test_import_families_match_transformers_and_export_back(tmp_path, family, refusal):
    """Import equals transformers; a family export cannot write is refused by name, and a
    DeepSeek-V3, GLM-4.5, GPT-OSS or ERNIE-4.5 import exports back to a directory
    transformers loads with equal logits."""
    from moe.hf_import import import_hf

    hf = build_hf(family)  # q/k/v biases, norms and V3's selection bias randomised
    hf.save_pretrained(tmp_path / "in")
    cfg = assert_import_matches(hf, tmp_path / "in")
    if refusal is not None:
        with pytest.raises(ValueError, match=refusal):
            choose_family(cfg)
        return
    _, state = import_hf(tmp_path / "in")
    assert export_hf(cfg, state, tmp_path / "out") == {"glm4_moe_lite": "deepseek_v3"}.get(
        family, family)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = torch.randint(0, 96, (2, 15))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_fp8_block_checkpoints_import_as_their_dequantized_weights(tmp_path, family):
    """An FP8 block-scaled directory (float8 weights and their _scale_inv, blocks that do
    not divide the shapes) imports as the model of its dequantized weights."""
    from tests.hf_models import save_fp8

    ref = save_fp8(build_hf(family), tmp_path, block=(16, 16))
    assert_import_matches(ref, tmp_path)


def test_fp8_blocks_round_trip_and_bad_schemes_are_named():
    from moe.hf_fp8 import fp8_block, fp8_dequantize, fp8_quantize

    w = torch.randn(40, 23) * torch.logspace(-3, 1, 23)  # columns of very different scales
    codes, scale = fp8_quantize(w, (16, 8))
    assert codes.dtype == torch.float8_e4m3fn and scale.shape == (3, 3)
    back = fp8_dequantize(codes, scale, (16, 8))
    assert ((back - w).abs() <= 0.07 * w.abs() + 1e-6 * scale.max()).all()  # e4m3: 3 bits
    assert torch.equal(fp8_dequantize(*fp8_quantize(back, (16, 8)), (16, 8)), back)
    with pytest.raises(ValueError, match="scales of shape"):
        fp8_dequantize(codes, scale[:2], (16, 8))
    assert fp8_block({}) is None and fp8_block({"quantization_config": {
        "quant_method": "fp8", "weight_block_size": [128, 128]}}) == (128, 128)
    with pytest.raises(ValueError, match="per-tensor FP8"):
        fp8_block({"quantization_config": {"quant_method": "fp8"}})
    with pytest.raises(ValueError, match="fmt='e3m4'"):
        fp8_block({"quantization_config": {"quant_method": "fp8", "fmt": "e3m4",
                                           "weight_block_size": [128, 128]}})


def test_minimax_m2_as_released_gives_partial_rope_as_rotary_dim(tmp_path):
    """MiniMax-M2's released config.json says rotary_dim (and rope_theta at the top), not
    rope_parameters: read as transformers reads it, the same logits."""
    import json

    hf = build_hf("minimax_m2")
    hf.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    cfg = json.loads(path.read_text())
    theta = cfg.pop("rope_parameters")["rope_theta"]
    path.write_text(json.dumps({**cfg, "rope_theta": theta, "rotary_dim": 4}))
    imported = assert_import_matches(hf, tmp_path)
    assert imported.partial_rotary_factor == 0.5 and imported.rope_theta == theta
