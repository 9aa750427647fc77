"""Sparse upcycling (Komatsuzaki et al. 2022): start an MoE from a dense checkpoint by
copying its MLP into every expert; attention, norms and embeddings are copied as they are."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from moe.config import ModelConfig, MoEConfig
from moe.hf_import import llama_fields, load_hf_dense
from moe.hf_names import shared_names
from moe.model import MoETransformer


def config_from_dense(hf: dict, moe: MoEConfig) -> ModelConfig:
    """A dense HF config.json + the MoE settings -> our ModelConfig (every layer MoE)."""
    moe = dataclasses.replace(moe, expert_ffn=hf["intermediate_size"])
    return ModelConfig(**llama_fields(hf, default_context=2048),
                       qk_norm=hf.get("model_type") == "qwen3",
                       dense_ffn=hf["intermediate_size"], moe=moe)


def upcycle_hf_dense(model_dir: Path, moe: MoEConfig,
                     router_std: float = 0.0) -> MoETransformer:
    """Build an MoETransformer whose experts are copies of the dense model's MLPs. The router
    starts at N(0, router_std) (0: uniform routing, so step 0 reproduces the dense model when
    top-k weights are renormalised)."""
    hf, state = load_hf_dense(Path(model_dir))
    cfg = config_from_dense(hf, moe)
    model = MoETransformer(cfg)
    ours = {name: state[hub] for name, hub in shared_names(cfg)}
    ours["lm_head.weight"] = state.get("lm_head.weight", state["model.embed_tokens.weight"])
    E = moe.num_experts
    for i in range(cfg.n_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        w_in = torch.cat([state[src + "mlp.gate_proj.weight"], state[src + "mlp.up_proj.weight"]])
        ours[dst + "mlp.experts.w_in"] = w_in.unsqueeze(0).repeat(E, 1, 1)
        ours[dst + "mlp.experts.w_out"] = state[src + "mlp.down_proj.weight"].unsqueeze(0) \
            .repeat(E, 1, 1)
        ours[dst + "mlp.router.weight"] = torch.randn(E, cfg.d_model) * router_std
    _copy_into(model, ours)
    return model


def upcycle_dense_model(dense_cfg: ModelConfig, dense_state: dict[str, torch.Tensor],
                        moe: MoEConfig, router_std: float = 0.0) -> MoETransformer:
    """One of our models with only dense layers (first_dense_layers >= n_layers) -> the same
    model with every MLP replaced by E copies of it behind a router."""
    dense_layers = [i for i in range(dense_cfg.n_layers) if not dense_cfg.is_moe_layer(i)]
    if len(dense_layers) != dense_cfg.n_layers:
        raise ValueError("upcycling needs a dense model: this checkpoint already has MoE layers "
                         f"{[i for i in range(dense_cfg.n_layers) if dense_cfg.is_moe_layer(i)]}")
    moe = dataclasses.replace(moe, expert_ffn=dense_cfg.dense_ffn,
                              expert_type=dense_cfg.moe.expert_type)
    cfg = ModelConfig(**{**dense_cfg.__dict__, "moe": moe, "first_dense_layers": 0,
                         "moe_layer_freq": 1})
    model = MoETransformer(cfg)
    E = moe.num_experts
    ours = {}
    for name, t in dense_state.items():
        if ".mlp.w_in." in name or ".mlp.w_out." in name:
            layer = name.split(".mlp.")[0]
            which = "w_in" if ".w_in." in name else "w_out"
            ours[f"{layer}.mlp.experts.{which}"] = t.unsqueeze(0).repeat(E, 1, 1)
        elif ".mlp.router." not in name and ".mlp.experts." not in name:
            ours[name] = t
    for i in range(cfg.n_layers):
        ours[f"layers.{i}.mlp.router.weight"] = torch.randn(E, cfg.d_model) * router_std
    _copy_into(model, ours)
    return model


def _copy_into(model: MoETransformer, tensors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name in tensors:
                t.copy_(tensors[name].to(t.dtype))
            elif not name.endswith("expert_bias") and not name.endswith(".table"):
                raise ValueError(f"upcycling left {name} without a source tensor")
