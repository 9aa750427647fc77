"""Foundation demo: build the tiny MoE LM, take a few optimizer steps, print routing statistics.

Run with `make demo` (or `python -m train.demo`). Replaced by real training in issue 5.
"""

from __future__ import annotations

import time

import torch

from moe import ModelConfig, MoEConfig, MoETransformer
from routing import RouterConfig


def tiny_model_config() -> ModelConfig:
    """The embedded default: 4 layers, 8 SwiGLU experts, top-2 softmax routing."""
    router = RouterConfig(top_k=2, score="softmax", renormalize=True, capacity_factor=None)
    moe = MoEConfig(num_experts=8, expert_ffn=128, router=router)
    return ModelConfig(vocab_size=256, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2,
                       max_seq_len=128, dense_ffn=256, moe=moe)


def synthetic_batch(batch: int, seq: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """[batch, seq + 1] token ids: noisy copies of a few fixed patterns (learnable quickly)."""
    patterns = torch.randint(0, vocab, (8, seq + 1), generator=torch.Generator().manual_seed(0))
    ids = patterns[torch.randint(0, 8, (batch,), generator=gen)]
    noise = torch.rand(ids.shape, generator=gen) < 0.05
    return torch.where(noise, torch.randint(0, vocab, ids.shape, generator=gen), ids)


def main(steps: int = 30, batch: int = 8, seq: int = 64) -> None:
    torch.manual_seed(0)
    cfg = tiny_model_config()
    model = MoETransformer(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tiny MoE LM: {n_params / 1e6:.2f}M parameters, {cfg.n_layers} layers, "
          f"{cfg.moe.num_experts} experts, top-{cfg.moe.router.top_k}")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(1)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        ids = synthetic_batch(batch, seq, cfg.vocab_size, gen)
        out = model(ids[:, :-1], labels=ids[:, 1:])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        if step == 1 or step % 10 == 0 or step == steps:
            tok_s = step * batch * seq / (time.perf_counter() - t0)
            print(f"step {step:3d}/{steps}  loss {out.ce_loss.item():.3f}  "
                  f"aux {out.aux_loss.item():.3f}  z {out.z_loss.item():.2f}  {tok_s:,.0f} tok/s")
    print("\nexpert load on the last batch (share of routed slots per expert):")
    print("layer  " + " ".join(f"e{e:<4d}" for e in range(cfg.moe.num_experts)) + " dropped")
    for i, r in enumerate(out.routings):
        share = r.tokens_per_expert.float() / r.tokens_per_expert.sum()
        print(f"{i:5d}  " + " ".join(f"{s:5.2f}" for s in share.tolist())
              + f" {r.dropped_fraction.item():7.3f}")


if __name__ == "__main__":
    main()
