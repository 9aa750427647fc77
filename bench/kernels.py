"""Forward+backward of one MoE layer: ours vs the torch reference, peers and the dense ceiling.

    python -m bench.kernels                      # GPU: Mixtral, OLMoE, Qwen3-30B-A3B shapes, bf16
    python -m bench.kernels --smoke              # CPU: tiny shape, checks every path runs

Prints a table (TFLOP/s of the expert GEMMs, time, peak memory, ratio to the same-FLOPs dense
GEMM chain) and appends it to bench/RESULTS.md. Peers that cannot run here are listed with the
reason. ScatterMoE and MegaBlocks are imported from .peers/ (brought beside the project for
the run by bench/prepare_gpu_carry.sh, never committed; MegaBlocks' two CUDA extensions are
stood in for by bench/peer_shims.py); DeepSpeed from its installed package.
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import statistics
import sys
import traceback
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bench.common import (
    Stopped,
    Unavailable,
    command_line,
    markdown_table,
    peak_memory,
    results_block,
    stop_on_sigterm,
    time_fn,
)

# name: (d_model, expert_ffn, num_experts, top_k, renormalize, transformers family)
SHAPES = {
    "mixtral": (4096, 14336, 8, 2, True, "mixtral"),
    "olmoe": (2048, 1024, 64, 8, False, "olmoe"),
    "qwen3": (2048, 768, 128, 8, True, "qwen3_moe"),
    "smoke": (64, 96, 8, 2, True, "mixtral"),
}
Step = Callable[[], None]


def expert_flops(T: int, shape) -> float:
    """Forward+backward FLOPs of the expert GEMMs: 3 matrices, x3 for fwd+bwd."""
    d, f, _, k = shape[:4]
    return 18.0 * T * k * d * f


def _inputs(T, d, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(T, d, generator=g).to(device, dtype).requires_grad_(True)
    dy = torch.randn(T, d, generator=g).to(device, dtype)
    return x, dy


def _fresh(step: Step, *owners) -> Step:
    """step, each call starting as a training step does after optimizer.zero_grad() (set to
    None, PyTorch's default): its backward writes the gradients of owners (modules' parameters
    and leaf tensors) rather than adding them to the last call's, a read and a write of every
    weight gradient more that no training step without accumulation pays. `.leaves` holds
    them."""
    leaves = [p for o in owners
              for p in (o.parameters() if isinstance(o, nn.Module) else (o,))]

    def fresh_step():
        for t in leaves:
            t.grad = None
        step()

    fresh_step.leaves = leaves
    return fresh_step


def _init_(module: nn.Module, std: float = 0.02) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
    return module


def _torch_route(x, wg, k, renorm):
    probs = torch.softmax((x @ wg.t()).float(), dim=-1)
    w, ids = probs.topk(k, dim=-1)
    if renorm:
        w = w / w.sum(-1, keepdim=True)
    return w.to(x.dtype), ids


def _ours_layer(shape, T, dtype, device, backend: str):
    """Our MoELayer at `shape` (its router's losses computed, validate off) with random
    weights, and its input and output gradient [T, d] -> (layer, x, dy)."""
    from moe import MoEConfig, MoELayer
    from routing import RouterConfig

    d, f, E, k, renorm, _ = shape
    cfg = MoEConfig(num_experts=E, expert_ffn=f, kernel_backend=backend,
                    router=RouterConfig(top_k=k, renormalize=renorm, validate=False))
    x, dy = _inputs(T, d, dtype, device)
    return _init_(MoELayer(d, cfg)).to(device, dtype), x, dy


def build_ours(shape, T, dtype, device, backend="triton", gemm="auto") -> Step:
    """gemm: "auto" (the Triton backend times its kernels, with cp.async and with TMA tiles,
    against torch._grouped_mm and a cuBLAS GEMM per expert, per shape, and keeps the
    fastest), or "triton" / "tma" / "torch" / "loop" forced."""
    from kernels.triton import pick

    layer, x, dy = _ours_layer(shape, T, dtype, device, backend)

    def step():
        with pick.forced(gemm):
            out, _ = layer(x)
            out.backward(dy)

    return _fresh(step, layer, x)


def build_ours_apart(shape, T, dtype, device) -> Step:
    """Ours as before 2026-11-30: the same Triton kernels with the SwiGLU and the weighted
    combine as kernels of their own (grouped_linear, swiglu, grouped_linear, weighted_combine:
    h, a and y all kept for the backward), beside the layer that fuses them (the ours row)."""
    from kernels import grouped_linear, sort_by_expert, swiglu, weighted_combine

    layer, x, dy = _ours_layer(shape, T, dtype, device, "triton")
    ex = layer.experts

    def step():
        r = layer.router(x)
        d = sort_by_expert(r.expert_ids, r.num_experts, None, "triton")
        h = grouped_linear(x, ex.w_in, d, False, True, "triton")
        y = grouped_linear(swiglu(h, "triton"), ex.w_out, d, True, True, "triton")
        weighted_combine(y, r.combine_weights, d, True, "triton").backward(dy)

    return _fresh(step, layer, x)


class _OutputOnly(nn.Module):
    """A MoE layer that returns its output alone (a CUDA graph's outputs are tensors)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)[0]


def build_ours_graphed(shape, T, dtype, device) -> Step:
    """Ours, forward and backward each replayed from a CUDA graph
    (torch.cuda.make_graphed_callables): the host issues two graph launches instead of the
    layer's ~40 kernels and their Python. Possible because a layer step waits for the
    device nowhere (bench/layer_launches.py) once its GEMMs pick among the implementations
    that read nothing back (kernels.without_host_waits); the eager warm-up does the Triton
    autotuning and those picks, which time kernels and cannot be captured."""
    if device.type != "cuda":
        raise Unavailable("CUDA graphs need CUDA")
    from kernels import without_host_waits

    layer, x, dy = _ours_layer(shape, T, dtype, device, "triton")
    wrapped = _OutputOnly(layer)
    with without_host_waits():  # a capture cannot hold a read back (the per-expert loop's)
        for _ in range(2):
            wrapped(x).backward(dy)
        torch.cuda.synchronize()
        graphed = torch.cuda.make_graphed_callables(wrapped, (x,))
        # the replay computes what the eager layer does, on inputs the capture never saw
        x2 = torch.randn_like(x).requires_grad_(True)
        out_g = graphed(x2)
        out_g.backward(dy)
        out_e = wrapped(x2.detach())
    err = ((out_g.float() - out_e.float()).norm() / out_e.float().norm()).item()
    if not err < 1e-2:
        raise RuntimeError(f"the graph's output differs from the eager layer's: {err:.1e}")

    def step():
        graphed(x).backward(dy)

    return _fresh(step, layer, x)


def build_loop(shape, T, dtype, device) -> Step:
    """A plain loop over experts: gather each expert's tokens, two matmuls, index_add back."""
    d, f, E, k, renorm, _ = shape
    wg = (torch.randn(E, d, device=device, dtype=dtype) * 0.02).requires_grad_(True)
    w_in = (torch.randn(E, 2 * f, d, device=device, dtype=dtype) * 0.02).requires_grad_(True)
    w_out = (torch.randn(E, d, f, device=device, dtype=dtype) * 0.02).requires_grad_(True)
    x, dy = _inputs(T, d, dtype, device)

    def step():
        w, ids = _torch_route(x, wg, k, renorm)
        out = torch.zeros_like(x)
        for e in range(E):
            tok, slot = torch.where(ids == e)
            if tok.numel() == 0:
                continue
            g, u = (x[tok] @ w_in[e].t()).chunk(2, dim=-1)
            y = (F.silu(g) * u) @ w_out[e].t()
            out = out.index_add(0, tok, y * w[tok, slot, None])
        out.backward(dy)

    return _fresh(step, wg, w_in, w_out, x)


def build_hf(shape, T, dtype, device, impl="eager") -> Step:
    try:
        import transformers
    except ImportError as e:
        raise Unavailable("transformers not installed") from e
    d, f, E, k, renorm, family = shape
    if family == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block
        cfg = transformers.MixtralConfig(hidden_size=d, intermediate_size=f,
                                         num_local_experts=E, num_experts_per_tok=k)
    elif family == "olmoe":
        from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock as Block
        cfg = transformers.OlmoeConfig(hidden_size=d, intermediate_size=f, num_experts=E,
                                       num_experts_per_tok=k, norm_topk_prob=renorm)
    else:
        from transformers.models.qwen3_moe.modeling_qwen3_moe import (
            Qwen3MoeSparseMoeBlock as Block,
        )
        cfg = transformers.Qwen3MoeConfig(hidden_size=d, moe_intermediate_size=f,
                                          num_experts=E, num_experts_per_tok=k,
                                          norm_topk_prob=renorm)
    try:
        cfg._experts_implementation = impl
    except Exception as e:  # noqa: BLE001
        raise Unavailable(f"this transformers has no experts implementation {impl!r}") from e
    block = _init_(Block(cfg)).to(device, dtype)
    x, dy = _inputs(T, d, dtype, device)
    x3 = x.view(1, T, d)

    def step():
        out = block(x3)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(dy.view(1, T, d))

    step()  # fail here, not in the timing loop, if this implementation cannot run
    return _fresh(step, block, x)


PEERS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".peers")


def _peers_on_path(*packages: str) -> bool:
    """Put .peers/ (peer code brought beside the project for a run) on sys.path when it holds
    every one of `packages`; whether it does."""
    there = all(os.path.isdir(os.path.join(PEERS, p)) for p in packages)
    if there and PEERS not in sys.path:
        sys.path.insert(0, PEERS)
    return there


def build_scattermoe(shape, T, dtype, device) -> Step:
    _peers_on_path("scattermoe")
    try:
        from scattermoe.mlp import GLUMLP
    except ImportError as e:
        raise Unavailable("ScatterMoE not brought beside the project (.peers/scattermoe)") from e
    if device.type != "cuda":
        raise Unavailable("ScatterMoE's kernels need CUDA")
    d, f, E, k, renorm, _ = shape
    mlp = _init_(GLUMLP(d, f, E, k, activation=nn.SiLU())).to(device, dtype)
    wg = (torch.randn(E, d, device=device, dtype=dtype) * 0.02).requires_grad_(True)
    x, dy = _inputs(T, d, dtype, device)

    def step():
        w, ids = _torch_route(x, wg, k, renorm)
        out = mlp(x, w, ids)
        out.backward(dy)

    return _fresh(step, mlp, wg, x)


class _SwiGLUExpert(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.w13 = nn.Linear(d, 2 * f, bias=False)
        self.w2 = nn.Linear(f, d, bias=False)

    def forward(self, x):
        g, u = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(g) * u)


def _init_single_process_group(device):
    import torch.distributed as dist

    if dist.is_initialized():
        return
    # one rank: an in-process store, so no port is bound (two runs at once never collide).
    # DeepSpeed only checks that a launcher's variables are set; with the group already up it
    # binds nothing, so the port below is never used.
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(),
                            rank=0, world_size=1)


def build_deepspeed(shape, T, dtype, device) -> Step:
    try:
        import deepspeed  # noqa: F401
        from deepspeed.moe.layer import MoE
    except Exception as e:  # noqa: BLE001 - import errors of an optional peer
        raise Unavailable(f"deepspeed not importable: {type(e).__name__}: {e}") from e
    d, f, E, k, _, _ = shape
    _init_single_process_group(device)
    moe = MoE(hidden_size=d, expert=_SwiGLUExpert(d, f), num_experts=E, ep_size=1, k=k,
              capacity_factor=1.0, drop_tokens=False, use_rts=False)
    moe = _init_(moe).to(device, dtype)
    x, dy = _inputs(T, d, dtype, device)

    def step():
        out, _, _ = moe(x.view(1, T, d))
        out.backward(dy.view(1, T, d))

    step()
    return _fresh(step, moe, x)


def megatron_layer(shape, dtype, grouped: bool = False,
                   dispatcher: str = "alltoall") -> nn.Module:
    """megatron-core's MoELayer (its top-k router with aux loss, its token dispatcher at EP 1)
    with SwiGLU experts: SequentialMLP (a GEMM pair per expert, what megatron-core trains with
    without Transformer Engine) or, grouped=True, its legacy GroupedMLP (grouped GEMMs through
    the grouped_gemm package, stood in for by torch._grouped_mm from bench/peer_shims.py;
    megatron-core 0.16 is its last release with it; bf16 only). Its Transformer Engine grouped
    experts (TEGroupedMLP) cannot be brought. Needs torch.distributed initialized; built on
    the CPU, parameters in `dtype`."""
    from bench import peer_shims

    peer_shims.install_grouped_gemm()  # before megatron's experts module binds the package
    try:
        from megatron.core import parallel_state
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        from megatron.core.transformer.moe import experts as mc_experts
        from megatron.core.transformer.moe import grouped_gemm_util
        from megatron.core.transformer.transformer_config import TransformerConfig
    except Exception as e:  # noqa: BLE001 - import errors of an optional peer
        raise Unavailable(f"megatron-core not importable: {type(e).__name__}: {e}") from e
    peer_shims.patch_megatron_router_gemm()  # its gate GEMM without Transformer Engine
    if grouped:
        if not hasattr(mc_experts, "GroupedMLP"):
            raise Unavailable("this megatron-core has no legacy GroupedMLP (removed after "
                              "0.16; bench/prepare_gpu_carry.sh brings 0.16.1)")
        if not grouped_gemm_util.grouped_gemm_is_available():
            raise Unavailable("megatron-core bound grouped_gemm before its stand-in was "
                              "registered")
        if dtype != torch.bfloat16:
            raise Unavailable("megatron-core's GroupedMLP supports bf16 only")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    d, f, E, k, renorm, _ = shape
    cfg = TransformerConfig(
        num_layers=1, hidden_size=d, num_attention_heads=16, ffn_hidden_size=f,
        moe_ffn_hidden_size=f, num_moe_experts=E, moe_router_topk=k,
        moe_router_pre_softmax=not renorm, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, moe_token_dispatcher_type=dispatcher,
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2,
        moe_grouped_gemm=grouped, moe_use_legacy_grouped_gemm=grouped, params_dtype=dtype,
        bf16=dtype == torch.bfloat16, use_cpu_initialization=True)
    spec = get_gpt_layer_local_spec(num_experts=E, moe_grouped_gemm=grouped,
                                    moe_use_legacy_grouped_gemm=grouped).submodules.mlp
    return _init_(spec(cfg))


def build_megatron(shape, T, dtype, device, grouped: bool = False) -> Step:
    """megatron_layer() on the GPU with the all-to-all dispatcher."""
    if device.type != "cuda":
        raise Unavailable("megatron-core's MoE layer needs CUDA (its router moves its weight "
                          "to the current CUDA device)")
    _init_single_process_group(device)
    layer = megatron_layer(shape, dtype, grouped).to(device, dtype)
    from megatron.core.tensor_parallel.random import (
        get_cuda_rng_tracker,
        model_parallel_cuda_manual_seed,
    )

    if not get_cuda_rng_tracker().is_initialized():
        model_parallel_cuda_manual_seed(0)
    d = shape[0]
    x, dy = _inputs(T, d, dtype, device)
    x3, dy3 = x.view(T, 1, d), dy.view(T, 1, d)

    def step():
        out, _ = layer(x3)
        out.backward(dy3)

    step()
    return _fresh(step, layer, x)


def megablocks_layer(shape, dtype, device) -> nn.Module:
    """MegaBlocks' dMoE (its learned top-k router with load-balancing loss, Triton gather /
    scatter, grouped SwiGLU experts) with its CUDA extensions stood in for by
    bench/peer_shims.py; on the CPU its Triton kernels need TRITON_INTERPRET=1."""
    if not _peers_on_path("megablocks", "stk"):
        raise Unavailable("MegaBlocks not brought beside the project (.peers/megablocks and "
                          ".peers/stk)")
    from bench import peer_shims

    peer_shims.install()
    try:
        from megablocks.backend import kernels as mb_kernels
        from megablocks.layers.arguments import Arguments
        from megablocks.layers.dmoe import dMoE
    except Exception as e:  # noqa: BLE001 - import errors of an optional peer
        raise Unavailable(f"megablocks not importable: {type(e).__name__}: {e}") from e
    if device.type != "cuda":  # the interpreter has no timer: keep one config, tune nothing
        for kernel in vars(mb_kernels).values():
            if hasattr(kernel, "configs") and len(kernel.configs) > 1:
                kernel.configs = kernel.configs[:1]
    d, f, E, k, renorm, _ = shape
    args = Arguments(hidden_size=d, ffn_hidden_size=f, moe_num_experts=E, moe_top_k=k,
                     mlp_type="glu", mlp_impl="grouped", activation_fn=F.silu, bias=False,
                     return_bias=False, moe_normalize_expert_weights=1 if renorm else None,
                     fp16=dtype == torch.float16, bf16=dtype == torch.bfloat16, device=device)
    return dMoE(args)


def build_megablocks(shape, T, dtype, device) -> Step:
    layer = megablocks_layer(shape, dtype, device)
    from megablocks.layers.moe import clear_load_balancing_loss

    d = shape[0]
    x, dy = _inputs(T, d, dtype, device)

    def step():
        out = layer(x.view(1, T, d))
        out.backward(dy.view(1, T, d))
        clear_load_balancing_loss()  # dMoE keeps each forward's loss in a global list

    return _fresh(step, layer, x)


def build_dense(shape, T, dtype, device) -> Step:
    """The ceiling: the same six GEMMs (fwd 2, bwd 4) as one dense expert over T * k rows."""
    d, f, _, k = shape[:4]
    M = T * k
    g = torch.Generator(device="cpu").manual_seed(1)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    x, a, dy, dh = rnd(M, d), rnd(M, f), rnd(M, d), rnd(M, 2 * f)
    w1, w2 = rnd(2 * f, d), rnd(d, f)

    def step():
        torch.mm(x, w1.t())
        torch.mm(a, w2.t())
        torch.mm(dy, w2)
        torch.mm(dy.t(), a)
        torch.mm(dh, w1)
        torch.mm(dh.t(), x)

    return step


# key: (table name, builder)
IMPLS: dict[str, tuple[str, Callable]] = {
    "ours": ("ours (triton backend)", build_ours),
    "ours-graphed": ("ours, fwd and bwd as CUDA graphs", build_ours_graphed),
    "ours-apart": ("ours, SwiGLU and combine as separate kernels (before 2026-11-30)",
                   build_ours_apart),
    "ours-triton": ("ours, Triton GEMMs only", lambda *a: build_ours(*a, gemm="triton")),
    "ours-tma-gemm": ("ours, Triton GEMMs with TMA tiles where they apply",
                      lambda *a: build_ours(*a, gemm="tma")),
    "ours-torch-gemm": ("ours, torch._grouped_mm GEMMs",
                        lambda *a: build_ours(*a, gemm="torch")),
    "ours-loop-gemm": ("ours, a cuBLAS GEMM per expert", lambda *a: build_ours(*a, gemm="loop")),
    "reference": ("ours, torch reference", lambda *a: build_ours(*a, backend="torch")),
    "loop": ("loop over experts", build_loop),
    "hf": ("transformers block (eager)", build_hf),
    "hf-grouped": ("transformers block (grouped_mm)", lambda *a: build_hf(*a, impl="grouped_mm")),
    "scattermoe": ("ScatterMoE", build_scattermoe),
    "deepspeed": ("DeepSpeed MoE", build_deepspeed),
    "megatron": ("megatron-core MoELayer (SequentialMLP)", build_megatron),
    "megatron-grouped": ("megatron-core MoELayer (GroupedMLP; torch stand-in for grouped_gemm)",
                         lambda *a: build_megatron(*a, grouped=True)),
    "megablocks": ("MegaBlocks dMoE (grouped; torch stand-ins for its CUDA extensions)",
                   build_megablocks),
    "dense": ("dense GEMM, same FLOPs (ceiling)", build_dense),
}
NOT_RUN = {
    "megatron-core MoELayer (TEGroupedMLP)": "its Transformer Engine grouped experts need "
    "Transformer Engine, a CUDA build that cannot be brought to the lent GPU for this run; "
    "the GroupedMLP row is megatron-core's other grouped-GEMM experts",
    "MegaBlocks dMoE (sparse, stk)": "its block-sparse stk kernels refuse Triton >= 3.2; the "
    "grouped row is MegaBlocks with its CUDA extensions stood in for by torch ops",
}


def check_ours(shape, dtype, device, tokens: int = 512) -> str:
    """Ours vs float64 with ours' expert choices pinned: max rel. error of out and all grads."""
    from kernels import grouped_linear, sort_by_expert, swiglu, weighted_combine
    from moe import MoEConfig, MoELayer
    from routing import RouterConfig

    d, f, E, k, renorm, _ = shape
    cfg = MoEConfig(num_experts=E, expert_ffn=f, kernel_backend="triton",
                    router=RouterConfig(top_k=k, renormalize=renorm))
    layer = MoELayer(d, cfg).to(device, dtype)
    x, dy = _inputs(tokens, d, dtype, device, seed=3)
    out, routing = layer(x)
    out.backward(dy)
    leaves = [t.detach().double().requires_grad_(True) for t in
              (x, layer.router.weight, layer.experts.w_in, layer.experts.w_out)]
    xr, wg, w_in, w_out = leaves
    probs = torch.softmax(xr @ wg.t(), dim=-1)
    w = probs.gather(1, routing.expert_ids)
    w = w / w.sum(-1, keepdim=True) if renorm else w
    disp = sort_by_expert(routing.expert_ids, E)
    h = grouped_linear(xr, w_in, disp, backend="torch")
    y = grouped_linear(swiglu(h, "torch"), w_out, disp, True, True, "torch")
    out_r = weighted_combine(y, w, disp, True, "torch")
    out_r.backward(dy.double())
    got = [out, x.grad, layer.router.weight.grad, layer.experts.w_in.grad,
           layer.experts.w_out.grad]
    want = [out_r] + [t.grad for t in leaves]
    errs = [((a.double() - b).norm() / b.norm()).item() for a, b in zip(got, want, strict=True)]
    return f"{max(errs):.1e}"


def _forced_gemm(impl: str, fn, *args):
    """fn(*args) with the grouped GEMMs forced to one implementation (kernels/triton/pick.py:
    "triton", "tma", "torch" or "loop")."""
    from kernels.triton import pick

    with pick.forced(impl):
        return fn(*args)


def _row_major(fn, *args):
    """fn(*args) with the grouped GEMMs' tiles launched in plain row-major order (GROUP=1),
    to measure what the L2-grouped order gains."""
    from kernels.triton import grouped_mm

    saved, grouped_mm.GROUP = grouped_mm.GROUP, 1
    try:
        return _forced_gemm("triton", fn, *args)
    finally:
        grouped_mm.GROUP = saved


def breakdown(shape, T, dtype, device) -> str:
    """Time each stage of ours (fwd and bwd primitives) next to a dense mm of its FLOPs."""
    from kernels import sort_by_expert
    from kernels import triton_backend as tri
    from kernels.triton.grouped_mm import pick_block_m
    from kernels.triton.schedule import block_schedule, inverse_permutation
    from moe import MoEConfig, MoELayer
    from routing import RouterConfig

    d, f, E, k, renorm, _ = shape
    gpu = device.type == "cuda"
    cfg = MoEConfig(num_experts=E, expert_ffn=f, kernel_backend="triton",
                    router=RouterConfig(top_k=k, renormalize=renorm, validate=False))
    layer = MoELayer(d, cfg).to(device, dtype)
    x, dy = _inputs(T, d, dtype, device)
    x = x.detach()
    M = T * k
    with torch.no_grad():
        r = layer.router(x)
        disp = sort_by_expert(r.expert_ids, E)
        w_in, w_out = layer.experts.w_in, layer.experts.w_out
        h = tri.scatter2scatter(x, w_in, disp, False, True, k)
        a = tri.swiglu_fwd(h)
        y = tri.scatter2scatter(a, w_out, disp, True, True, 1)

    def sort_and_schedule():
        dd = sort_by_expert(r.expert_ids, E)
        block_schedule(dd, pick_block_m(dd, x.element_size()))
        inverse_permutation(dd)

    from kernels import reference as ref_ops

    rnd = lambda *s: torch.randn(*s, device=device, dtype=dtype)  # noqa: E731
    A, B = rnd(M, d), rnd(d, 2 * f)
    logits = (x @ layer.router.weight.t()).float()
    flat = r.expert_ids.reshape(-1)
    stages = [
        ("router (gate mm, softmax, top-k, losses)", lambda: layer.router(x), None),
        ("top-k routing: fused kernel", lambda: tri.topk_route_fwd(logits, None, k, False,
                                                                    renorm, 1.0), None),
        ("top-k routing: torch ops", lambda: ref_ops.topk_route_fwd(logits, None, k, False,
                                                                     renorm, 1.0), None),
        ("router losses: fused kernels", lambda: tri.router_losses_fwd(
            logits, r.expert_ids, False, True), None),
        ("router losses: torch ops", lambda: ref_ops.router_losses_fwd(
            logits, r.expert_ids, False, True), None),
        ("sort by expert: counting-sort kernels", lambda: tri.sort_pairs(flat, E, k), None),
        ("sort by expert: torch.sort + bincount", lambda: ref_ops.sort_pairs(flat, E, k),
         None),
        ("sort + block schedule + inverse perm", sort_and_schedule, None),
        ("fwd x -> h (scatter2scatter)", lambda: _forced_gemm(
            "triton", tri.scatter2scatter, x, w_in, disp, False, True, k), 4 * M * d * f),
        ("fwd swiglu", lambda: tri.swiglu_fwd(h), None),
        ("fwd x -> h, a: SwiGLU in the epilogue (picked)", lambda: tri.scatter2scatter_swiglu(
            x, w_in, disp, False, k), 4 * M * d * f),
        ("fwd x -> h, a: SwiGLU in the epilogue, TMA", lambda: _forced_gemm(
            "tma", tri.scatter2scatter_swiglu, x, w_in, disp, False, k), 4 * M * d * f),
        ("fwd x -> h then swiglu, TMA (unfused)", lambda: tri.swiglu_fwd(_forced_gemm(
            "tma", tri.scatter2scatter, x, w_in, disp, False, True, k)), 4 * M * d * f),
        ("fwd a -> y (grouped)", lambda: tri.scatter2scatter(a, w_out, disp, True, True, 1),
         2 * M * d * f),
        ("fwd combine", lambda: tri.weighted_combine(y, r.combine_weights, disp, True), None),
        ("bwd combine", lambda: tri.weighted_combine_backward(dy, y, r.combine_weights, disp,
                                                              True), None),
        ("bwd dy -> da", lambda: tri.scatter2scatter(y, w_out.transpose(1, 2), disp, True, True,
                                                     1), 2 * M * d * f),
        ("bwd dW_out", lambda: tri.group_weight_grad(a, y, disp, True, 1, True), 2 * M * d * f),
        ("bwd swiglu", lambda: tri.swiglu_bwd(h, a), None),
        ("bwd dy -> dh: SwiGLU bwd in the epilogue (picked)",
         lambda: tri.scatter2scatter_swiglu_bwd(y, w_out.transpose(1, 2), h, disp, True),
         2 * M * d * f),
        ("bwd dy -> dh: SwiGLU bwd in the epilogue, TMA", lambda: _forced_gemm(
            "tma", tri.scatter2scatter_swiglu_bwd, y, w_out.transpose(1, 2), h, disp, True),
         2 * M * d * f),
        ("bwd dy -> da then swiglu bwd, TMA (unfused)", lambda: tri.swiglu_bwd(h, _forced_gemm(
            "tma", tri.scatter2scatter, y, w_out.transpose(1, 2), disp, True, True, 1)),
         2 * M * d * f),
        ("bwd combine, rows only (its weights' gradient in the next GEMM)",
         lambda: tri.combine_grad_rows(dy, r.combine_weights, disp), None),
        ("bwd dout -> dh, dweights: SwiGLU and combine bwd in the epilogue (picked)",
         lambda: tri.scatter2scatter_swiglu_bwd_combined(dy, w_out.transpose(1, 2), h,
                                                         r.combine_weights, disp),
         2 * M * d * f),
        ("bwd dout -> dh, dweights: in the epilogue, TMA", lambda: _forced_gemm(
            "tma", tri.scatter2scatter_swiglu_bwd_combined, dy, w_out.transpose(1, 2), h,
            r.combine_weights, disp), 2 * M * d * f),
        ("bwd dh -> dx (slot order + sum)", lambda: tri.scatter2scatter(
            h, w_in.transpose(1, 2), disp, True, False, 1).view(T, k, d).sum(1), 4 * M * d * f),
        ("bwd dW_in", lambda: _forced_gemm("triton", tri.group_weight_grad, x, h, disp, False,
                                           k, True), 4 * M * d * f),
        ("fwd x -> h, row-major tile order (GROUP=1)", lambda: _row_major(
            tri.scatter2scatter, x, w_in, disp, False, True, k), 4 * M * d * f),
        ("bwd dW_in, row-major tile order (GROUP=1)", lambda: _row_major(
            tri.group_weight_grad, x, h, disp, False, k, True), 4 * M * d * f),
        ("fwd x -> h, torch._grouped_mm", lambda: _forced_gemm(
            "torch", tri.scatter2scatter, x, w_in, disp, False, True, k), 4 * M * d * f),
        ("bwd dW_in, torch._grouped_mm", lambda: _forced_gemm(
            "torch", tri.group_weight_grad, x, h, disp, False, k, True), 4 * M * d * f),
        ("fwd x -> h, a cuBLAS GEMM per expert", lambda: _forced_gemm(
            "loop", tri.scatter2scatter, x, w_in, disp, False, True, k), 4 * M * d * f),
        ("bwd dW_in, a cuBLAS GEMM per expert", lambda: _forced_gemm(
            "loop", tri.group_weight_grad, x, h, disp, False, k, True), 4 * M * d * f),
        ("fwd x -> h, Triton with TMA weight tiles", lambda: _forced_gemm(
            "tma", tri.scatter2scatter, x, w_in, disp, False, True, k), 4 * M * d * f),
        ("bwd dy -> da, Triton with TMA tiles", lambda: _forced_gemm(
            "tma", tri.scatter2scatter, y, w_out.transpose(1, 2), disp, True, True, 1),
         2 * M * d * f),
        ("bwd dy -> da, Triton with cp.async tiles", lambda: _forced_gemm(
            "triton", tri.scatter2scatter, y, w_out.transpose(1, 2), disp, True, True, 1),
         2 * M * d * f),
        ("dense mm [M,d]x[d,2F] (reference rate)", lambda: A @ B, 4 * M * d * f),
    ]
    rows = []
    print(markdown_table(["stage", "ms", "TFLOP/s"], []), flush=True)
    for name, fn, flops in stages:
        try:  # the primitives alone, as the autograd functions call them: no graph
            with torch.no_grad():
                t = time_fn(fn, device, budget_s=0.3, min_iters=3 if gpu else 1,
                            warmup=gpu)  # CPU times (the interpreter's) mean nothing: once
            row = [name, f"{t * 1e3:.3f}", f"{flops / t / 1e12:.0f}" if flops else "-"]
        except Exception as e:  # noqa: BLE001 - one stage failing leaves the others' rows
            row = [name, f"failed: {type(e).__name__}: {e}"[:120], "-"]
        rows.append(row)
        print(f"| {' | '.join(row)} |", flush=True)  # as it goes: a time limit keeps them
    return markdown_table(["stage", "ms", "TFLOP/s"], rows)


def _gemm_choices(shape, T) -> str:
    """Which implementation the Triton backend picked for each grouped GEMM of this shape and
    token count (kernels/triton/pick.py), e.g. "fwd in: torch, ..."."""
    import triton

    from kernels.triton import pick

    d, f, E, k = shape[:4]
    rows = triton.next_power_of_2(max(1, T * k // E))
    names = {("s2s_glu", 2 * f, d): "fwd in+swiglu", ("s2s", 2 * f, d): "fwd in",
             ("s2s", d, f): "fwd out", ("s2s_glu_comb", f, d): "bwd dA+swiglu+combine",
             ("s2s_glu_bwd", f, d): "bwd dA+swiglu",
             ("s2s", f, d): "bwd dA", ("s2s", d, 2 * f): "bwd dX", ("wgrad", d, f): "dW out",
             ("wgrad", 2 * f, d): "dW in"}
    got = {names[key[:3]]: impl for key, impl in pick.choices().items()
           if key[:3] in names and key[3] == E and key[4] == rows}
    return ", ".join(f"{n}: {got[n]}" for n in names.values() if n in got) or "none timed"


def _time_impl(key, shape, T, dtype, device, results: dict) -> None:
    """Build and time implementation `key`; results[name] = (s, peak GiB, note or reason,
    host s)."""
    name, build = IMPLS[key]
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    step = None
    try:
        step = build(shape, T, dtype, device)
        gpu = device.type == "cuda"
        host: list[float] = []
        t = time_fn(step, device, min_iters=3 if gpu else 1, warmup=gpu, host_times=host)
        mem = peak_memory(step, device)
        results[name] = (t, mem, None, statistics.median(host))
    except Unavailable as e:
        results[name] = (None, None, str(e), None)
    except Exception as e:  # noqa: BLE001 - a peer failing must not end the run
        msg = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        results[name] = (None, None, msg, None)
        traceback.print_exc(limit=2)
    finally:
        step = None
    r = results[name]
    status = f"{r[0] * 1e3:.2f} ms (host {r[3] * 1e3:.2f} ms)" if r[0] else f"n/a ({r[2]})"
    print(f"  {shape_name(shape)} T={T} {name}: {status}", flush=True)
    if key == "ours" and r[0]:
        gemms = _gemm_choices(shape, T)
        print(f"    grouped GEMMs picked: {gemms}", flush=True)
        results[name] = (r[0], r[1], gemms, r[3])


def shape_name(shape) -> str:
    return next((n for n, s in SHAPES.items() if s == shape), "?")


def _table_rows(sname, T, shape, results, check) -> list[list[str]]:
    flops = expert_flops(T, shape)
    dense_t = results.get(IMPLS["dense"][0], (None,))[0]
    rows = []
    for name, (t, mem, why, host) in results.items():
        if t is None:
            rows.append([sname, str(T), name, "-", "-", "-", "-", "-", f"not run: {why}"])
            continue
        ratio = f"{dense_t / t:.2f}" if dense_t else "-"
        note = f"{check}; {why}" if name == IMPLS["ours"][0] else ""
        rows.append([sname, str(T), name, f"{t * 1e3:.2f}", f"{host * 1e3:.2f}",
                     f"{flops / t / 1e12:.1f}", "-" if mem is None else f"{mem:.2f}", ratio,
                     note])
    for name, why in NOT_RUN.items():
        rows.append([sname, str(T), name, "-", "-", "-", "-", "-", f"not run: {why}"])
    return rows


def _run_groups(shapes, tokens, impls, dtype, device, rows: list, current: list) -> None:
    """Measure each (shape, T) group into `rows`; `current` holds the group being measured
    (shape name, T, shape, results so far, check), and is empty between groups."""
    for sname in shapes:
        shape = SHAPES[sname]
        check = check_ours(shape, dtype, device, 512 if device.type == "cuda" else 32)
        print(f"[{sname}] ours vs float64 reference, max rel err (out, dx, dw): {check}",
              flush=True)
        for T in tokens:
            current[:] = [(sname, T, shape, {}, check)]
            for key in impls:
                _time_impl(key, shape, T, dtype, device, current[0][3])
            rows += _table_rows(*current[0])
            current.clear()


def run(shapes, tokens, impls, dtype, device, out_path, command) -> str:
    """Time every implementation per shape and token count; the table is written at the end,
    or with the rows measured so far when a SIGTERM (timeout) stops the run."""
    rows: list[list[str]] = []
    current: list[tuple] = []  # the (shape, T) group being measured
    stopped = None
    try:
        with stop_on_sigterm():
            _run_groups(shapes, tokens, impls, dtype, device, rows, current)
    except Stopped:
        stopped = (f"stopped by SIGTERM (timeout) during {current[0][0]} T={current[0][1]}"
                   if current else "stopped by SIGTERM (timeout)")
        print(stopped, flush=True)
        if current and current[0][3]:
            rows += _table_rows(*current[0])

    header = ["shape", "tokens", "implementation", "fwd+bwd ms", "host ms", "TFLOP/s",
              "peak GiB", "x dense", "note"]
    shapes_desc = "; ".join(f"{s}: d={SHAPES[s][0]}, ffn={SHAPES[s][1]}, E={SHAPES[s][2]}, "
                            f"k={SHAPES[s][3]}" for s in shapes)
    body = (f"Shapes ({str(dtype).replace('torch.', '')}): {shapes_desc}. TFLOP/s counts the "
            "expert GEMMs only (18·T·k·d·ffn for fwd+bwd); 'x dense' is the same-FLOPs dense "
            "GEMM chain's time over this row's; every row's step starts with its gradients "
            "set to None, as after optimizer.zero_grad() (a step writes them, adding to "
            "none); 'host ms' is the time the host took to issue "
            "the step (until its last launch returned, before waiting for the device): near "
            "'fwd+bwd ms', the device waited for the host; ours' note is its max relative "
            "error vs a float64 reference and which implementation the Triton backend "
            "picked for each grouped GEMM (triton: its kernel with cp.async tiles, tma: with "
            "TMA tiles, torch: torch._grouped_mm, or loop: a cuBLAS GEMM per expert; timed "
            "once per shape).\n\n"
            + (f" **Partial**: {stopped}; the rows are those measured before it.\n\n"
               if stopped else "") + markdown_table(header, rows))
    block = results_block("MoE layer forward+backward (bench/kernels.py)", command, device,
                          body)
    print(block)
    if out_path:
        with open(out_path, "a") as fh:
            fh.write(block)
    if stopped:
        raise SystemExit(128 + signal.SIGTERM)
    return block


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="mixtral,olmoe,qwen3")
    p.add_argument("--tokens", default=None, help="comma-separated (default 4096,16384; "
                   "smoke: 64)")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--out", default="bench/RESULTS.md")
    p.add_argument("--smoke", action="store_true", help="tiny shape on the CPU")
    p.add_argument("--breakdown", action="store_true",
                   help="time each stage of ours per shape and token count instead")
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if a.smoke:
        a.shapes, a.tokens, a.dtype = "smoke", a.tokens or "64", "float32"
    elif device.type != "cuda":
        sys.exit("bench/kernels.py needs a CUDA GPU (use --smoke on the CPU)")
    a.tokens = a.tokens or "4096,16384"
    impls = [s for s in a.impls.split(",") if s]
    unknown = [s for s in impls if s not in IMPLS]
    if unknown:
        sys.exit(f"unknown implementation(s) {unknown}; choose from {list(IMPLS)}")
    if a.breakdown:
        for s in a.shapes.split(","):
            for T in (int(t) for t in a.tokens.split(",")):
                print(f"\n{s}, T={T}:", flush=True)
                breakdown(SHAPES[s], T, getattr(torch, a.dtype), device)
        return
    command = command_line("bench.kernels", argv)
    run(a.shapes.split(","), [int(t) for t in a.tokens.split(",")], impls,
        getattr(torch, a.dtype), device, a.out, command.strip())


if __name__ == "__main__":
    main()
