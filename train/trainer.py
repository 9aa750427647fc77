"""The training loop: data -> model (parallelized when launched on several ranks) -> AdamW
with warm-up and a cosine, WSD or constant schedule -> metrics and checkpoints."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import shutil
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from kernels.device import peak_flops as device_peak_flops
from moe import MoETransformer
from parallel import Parallelized, init_distributed, parallelize
from routing import scheduled, set_routing_step
from train import checkpoint
from train.config import TrainConfig
from train.data import TokenBatches, prepare
from train.metrics import MetricsLogger

SCHEDULES = ("cosine", "wsd", "constant")


def lr_at(step: int, cfg) -> float:
    """The learning rate of 0-based step `step`: linear warm-up to optim.lr, then
    optim.schedule (OptimConfig) until trainer.max_steps."""
    o, total = cfg.optim, cfg.trainer.max_steps
    if o.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule must be one of {', '.join(SCHEDULES)}, "
                         f"got {o.schedule!r}")
    if o.schedule == "wsd" and not 0 < o.decay_fraction <= 1:
        raise ValueError(f"optim.decay_fraction must be in (0, 1], got {o.decay_fraction}")
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    floor = o.lr * o.min_lr_ratio
    if o.schedule == "constant":
        return o.lr
    if o.schedule == "wsd":
        decay = max(1, round(total * o.decay_fraction))
        start = max(o.warmup_steps, total - decay)
        if step < start:
            return o.lr
        t = (step - start + 1) / max(1, total - start)
        return o.lr + (floor - o.lr) * min(t, 1.0)
    t = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
    return floor + (o.lr - floor) * 0.5 * (1 + math.cos(math.pi * t))


def active_flops_per_token(model: MoETransformer, seq_len: int,
                           experts_per_token: float | None = None) -> float:
    """6 x (parameters a token passes through) + attention, for fwd+bwd (PaLM's MFU count).
    experts_per_token: the experts a token passes through (default: the config's top_k; a
    k schedule or threshold routing changes it step by step)."""
    cfg = model.cfg
    k = cfg.moe.router.top_k if experts_per_token is None else experts_per_token
    n = 0
    for name, p in model.named_parameters():
        if ".experts." in name:
            n += p.numel() * k / cfg.moe.num_experts
        elif name != "embed.weight":
            n += p.numel()
    _, k_dim, v_dim = cfg.kv_dims  # q.k and attention-weighted v, every head (MLA too)
    attn = 6 * cfg.n_layers * seq_len * cfg.n_heads * (k_dim + v_dim)
    return 6 * n + attn


def routed_experts_per_token(routings, rc, top_k: int) -> float:
    """The experts a token was routed to this step, before capacity drops: top_k, or for
    threshold routing the mean of the slots its threshold used."""
    if rc.kind != "threshold" or not routings:
        return float(top_k)
    used = [r.experts_per_token.float() / (1 - r.dropped_fraction.float()).clamp(min=1e-6)
            for r in routings]
    return float(torch.stack(used).mean())


def peak_flops(device: torch.device, configured: float | None) -> float:
    """FLOP/s that MFU divides by: trainer.peak_tflops, else the device's datasheet peak or
    a measured one."""
    return configured * 1e12 if configured else device_peak_flops(device)[0]


def clip_grad_norm(par: Parallelized, max_norm: float) -> float:
    """Global gradient norm over every rank's parameters (replicated ones counted once)."""
    expert = {id(p) for p in par.expert_params}
    dense_sq = torch.zeros((), dtype=torch.float64)
    local_sq = torch.zeros((), dtype=torch.float64)
    grads = []
    for p in par.model.parameters():
        if p.grad is None:
            continue
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        sq = g.detach().double().square().sum().cpu()
        if id(p) in expert:
            local_sq += sq
        else:
            dense_sq += sq
        grads.append(p.grad)

    def summed(t: torch.Tensor, group=None) -> torch.Tensor:  # over the group's ranks
        t = t.to(par.mesh.device if par.mesh.device.type == "cuda" else "cpu")
        dist.all_reduce(t, group=group)
        return t.cpu()

    if par.mesh is not None and par.expert_params:
        local_sq = summed(local_sq, par.mesh.ep_group if par.mesh.cfg.mode == "ep"
                          else par.mesh.expert_group)
    fragments = par.engine_grad_fragments()  # DeepSpeed: each rank holds a slice
    if fragments:
        dense_sq += summed(sum(f.detach().double().square().sum() for f in fragments)
                           .reshape(()))
        grads += fragments
    norm = float((dense_sq + local_sq).sqrt())
    if max_norm > 0 and norm > max_norm:
        for g in grads:
            g.mul_(max_norm / (norm + 1e-6))
    return norm


def global_loads(loads: list[torch.Tensor], mesh) -> torch.Tensor:
    """Per MoE layer [E] slots kept this step on this rank -> [L, E] summed over the ranks
    (one all-reduce), int64."""
    if not loads:
        return torch.zeros(0, 0, dtype=torch.int64)
    total = torch.stack(loads)
    if mesh is not None:
        dist.all_reduce(total)
    return total


def max_violation(loads: torch.Tensor) -> float:
    """[L, E] slots per expert -> the mean over layers of (max load - mean load) / mean load:
    MaxVio (Wang et al. 2024), 0 when every expert takes the same share."""
    if loads.numel() == 0:
        return 0.0
    f = loads.double()
    mean = f.mean(1).clamp(min=1e-9)
    return float(((f.max(1).values - mean) / mean).mean())


def update_expert_biases(model: MoETransformer, loads: torch.Tensor) -> None:
    """DeepSeek-V3 aux-loss-free balancing: move each router's bias by the step's global load
    (loads [L, E]: every rank's, summed)."""
    layers = [b.mlp for b in model.layers if b.is_moe]
    for layer, load in zip(layers, loads, strict=True):
        if getattr(layer.router, "expert_bias", None) is not None:
            layer.router.update_expert_bias(load)


def mixed_precision(mode: str, dtype: torch.dtype, device: torch.device):
    """trainer.mixed_precision -> a context factory for the forward: torch.autocast to bf16
    on the device ("bf16"), or nothing ("none")."""
    if mode not in ("none", "bf16"):
        raise ValueError(f"trainer.mixed_precision must be none or bf16, got {mode!r}")
    if mode == "none":
        return contextlib.nullcontext
    if dtype != torch.float32:
        raise ValueError("trainer.mixed_precision=bf16 keeps float32 weights and computes in "
                         f"bf16: leave trainer.dtype=float32 (got {dtype})")
    return functools.partial(torch.autocast, device.type, dtype=torch.bfloat16)


def resumed_data_offset(state: dict, start: int, accum: int, rows: int, log) -> int:
    """Where a resumed run's data continues: the offset o such that step s (1-based) reads
    global micro-batches o + (s - 1) * accum + m. The checkpoint says how many micro-batches
    its run read, of how many rows (older checkpoints: one a step, of this run's rows); a
    run that resumes with other micro-batches (grad_accum, batch_size or ranks changed)
    continues after the rows read."""
    read = int(state.get("micro_batches", state.get("data_step", start)))
    saved_rows = int(state.get("micro_batch_rows", rows))
    if saved_rows != rows:
        done = read * saved_rows
        read = -(-done // rows)
        log(f"data: the checkpoint's run read micro-batches of {saved_rows} rows, this one "
            f"reads {rows}: it continues after the {done} rows read (the same order within "
            "an epoch; the next epoch may start a batch earlier or later)")
    return read - start * accum


@torch.no_grad()
def validation_loss(par: Parallelized, batches: TokenBatches, n: int, device, mesh,
                    amp=contextlib.nullcontext) -> float:
    """Mean cross-entropy over the first n held-out global batches (every rank its rows);
    collective under a mesh, so every rank calls it at the same steps. amp(): the forward's
    autocast context."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    for i in range(n):
        ids = batches.val_batch(i).to(device)
        with amp():
            total += par.module(ids[:, :-1], labels=ids[:, 1:]).ce_loss.double()
    if mesh is not None:
        dist.all_reduce(total)
        total /= mesh.world_size
    return float(total) / n


class StepTotals:
    """One optimizer step's micro-batches, added up as they run (detached values only, so no
    micro-batch's graph outlives its backward)."""

    def __init__(self, rc, top_k: int):
        self.rc, self.top_k, self.n = rc, top_k, 0
        self.ce = self.aux = self.z = 0.0
        self.entropy: float | None = None
        self.dropped = self.per_token = self.routed = 0.0
        self.loads: list[torch.Tensor] = []  # per MoE layer: [E] kept slots

    def add(self, out) -> None:
        self.n += 1
        self.ce += out.ce_loss.detach()
        self.aux += out.aux_loss.item()
        self.z += out.z_loss.item()
        if out.entropy_loss is not None:
            self.entropy = (self.entropy or 0.0) + out.entropy_loss.item()
        rs = out.routings
        if rs:
            self.dropped += float(torch.stack([r.dropped_fraction.float() for r in rs]).mean())
            self.per_token += float(torch.stack([r.experts_per_token.float()
                                                 for r in rs]).mean())
        self.routed += routed_experts_per_token(rs, self.rc, self.top_k)
        loads = [r.tokens_per_expert.detach() for r in rs]
        self.loads = loads if not self.loads else [a + b for a, b in zip(self.loads, loads,
                                                                         strict=True)]

    def mean(self, x: float) -> float:
        return x / max(self.n, 1)


def upcycle(source: Path, moe) -> MoETransformer:
    """A dense HF folder (config.json) or one of our dense checkpoints -> an upcycled MoE."""
    from moe.upcycle import upcycle_dense_model, upcycle_hf_dense

    if (source / "config.json").exists():
        return upcycle_hf_dense(source, moe, router_std=0.02)
    resolved = checkpoint.resolve(source)
    if resolved is None:
        raise FileNotFoundError(f"trainer.upcycle_from={source}: neither a Hugging Face folder "
                                "(config.json) nor one of our checkpoints (model_config.json)")
    dense_cfg = checkpoint.model_config(resolved)
    dense = parallelize(MoETransformer(dense_cfg), None)
    checkpoint.load(resolved, dense, load_optimizer=False)
    return upcycle_dense_model(dense_cfg, dense.full_state_dict(), moe, router_std=0.02)


# Router settings that steer training, not the model's function: they come from this run.
TRAINING_ROUTER_FIELDS = ("aux_loss_coef", "aux_loss_type", "z_loss_coef", "capacity_factor",
                          "drop_policy", "expert_bias_update_rate")


def init_from_hf(source: Path, run_model) -> MoETransformer:
    """A Hugging Face MoE folder -> our model with its weights; its shape comes from the
    folder, the router's training settings and the kernel backend from this run's config."""
    from moe.hf_import import import_hf

    cfg, state = import_hf(source)
    for name in TRAINING_ROUTER_FIELDS:
        setattr(cfg.moe.router, name, getattr(run_model.moe.router, name))
    cfg.moe.kernel_backend = run_model.moe.kernel_backend
    model = MoETransformer(cfg)
    model.load_state_dict(state)
    return model


def build_optimizer_factory(cfg: TrainConfig):
    o = cfg.optim

    def factory(params):
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [g for g in ({"params": decay, "weight_decay": o.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)

    return factory


def _one_process_note(p) -> str:
    """What the model line says of parallel settings that one process does not use."""
    asked = [f"parallel={p.mode}" if p.mode != "dp" else "",
             f"parallel.dense={p.dense}" if p.dense != "ddp" else ""]
    asked = [a for a in asked if a]
    verb = "takes" if len(asked) == 1 else "take"
    return f" (one process: {' and '.join(asked)} {verb} effect under torchrun)" if asked else ""


def run(cfg: TrainConfig, run_dir: Path) -> list[float]:
    """Train as cfg says, writing into run_dir; returns the losses of the steps run here."""
    cfg.check()  # bad settings stop the run before any work, as does a bad schedule
    lr_at(0, cfg)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not distributed:  # the parallel settings' names, on one process too
        cfg.parallel.check(cfg.parallel.ep_size or 1)
    mesh = init_distributed(cfg.parallel) if distributed else None
    rank, world = (mesh.rank, mesh.world_size) if mesh else (0, 1)
    main = rank == 0
    log = print if main else (lambda *a, **k: None)
    device = mesh.device if mesh else torch.device(
        "cuda" if cfg.trainer.device == "auto" and torch.cuda.is_available()
        else ("cpu" if cfg.trainer.device == "auto" else cfg.trainer.device))
    if main:
        data_dir = prepare(cfg.data, log)
    if mesh:
        dist.barrier()
        data_dir = prepare(cfg.data, log)
    batches = TokenBatches(data_dir, cfg.data, rank, world)
    if main:  # the run carries its tokenizer, for export and serving
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data_dir / "tokenizer.json", run_dir / "tokenizer.json")
    if cfg.model.vocab_size != batches.vocab_size and not (
            cfg.trainer.upcycle_from or cfg.trainer.init_from):
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} but the tokenizer has "
                         f"{batches.vocab_size} tokens (set model.vocab_size=${{data.vocab_size}})")
    torch.manual_seed(cfg.trainer.seed)
    dtype = getattr(torch, cfg.trainer.dtype)
    amp = mixed_precision(cfg.trainer.mixed_precision, dtype, device)
    if cfg.trainer.upcycle_from:
        model = upcycle(Path(cfg.trainer.upcycle_from), cfg.model.moe)
        cfg.model = model.cfg  # the dense model decides the shape
        log(f"upcycled {cfg.trainer.upcycle_from} into {cfg.model.moe.num_experts} experts")
        if model.cfg.vocab_size != batches.vocab_size:
            raise ValueError(f"the dense model has {model.cfg.vocab_size} tokens, the data "
                             f"tokenizer {batches.vocab_size}: set data.tokenizer to its folder")
        model = model.to(device=device, dtype=dtype)
    elif cfg.trainer.init_from:
        model = init_from_hf(Path(cfg.trainer.init_from), cfg.model)
        cfg.model = model.cfg  # the checkpoint decides the shape
        log(f"initialised from {cfg.trainer.init_from}: {cfg.model.n_layers} layers, "
            f"{cfg.model.moe.num_experts} experts, top-{cfg.model.moe.router.top_k}")
        if model.cfg.vocab_size < batches.vocab_size:
            raise ValueError(f"the model has {model.cfg.vocab_size} tokens, the data tokenizer "
                             f"{batches.vocab_size}: set data.tokenizer to its folder")
        model = model.to(device=device, dtype=dtype)
    else:
        model = MoETransformer(cfg.model).to(device=device, dtype=dtype)
    ac = cfg.trainer.activation_checkpointing
    model.set_activation_checkpointing(ac)
    accum = cfg.trainer.grad_accum
    eval_every = cfg.trainer.eval_every
    if eval_every and not batches.val_batches:
        raise ValueError("trainer.eval_every needs held-out data: set data.val_fraction "
                         "(e.g. 0.01)")
    n_eval = min(cfg.trainer.eval_batches, batches.val_batches)
    par = parallelize(model, mesh, optimizer=build_optimizer_factory(cfg), grad_accum=accum)
    model_config = dataclasses.asdict(cfg.model)
    ckpt_root = run_dir / "checkpoints"
    start = data_offset = 0  # batches.batch(data_offset + (step - 1) * accum + micro-batch)
    rows = cfg.data.batch_size * world  # rows of one global micro-batch
    if cfg.trainer.resume:
        path = checkpoint.latest(ckpt_root)
        if path is None:
            log(f"resume: no checkpoint under {ckpt_root}, starting from step 0")
        else:
            checkpoint.check_model_config(path, model_config)
            state = checkpoint.load(path, par)
            start = state["step"]
            data_offset = resumed_data_offset(state, start, accum, rows, log)
            log(f"resume: loaded {path} (step {start})")
    n_params = sum(p.numel() for p in model.parameters())
    notes = [f"{n_params / 1e6:.2f}M parameters on this rank", f"{world} rank(s)",
             f"parallel={cfg.parallel.mode} (dense: {cfg.parallel.dense})" if mesh
             else "parallel=none" + _one_process_note(cfg.parallel), f"device={device}"]
    if accum > 1:
        notes.append(f"{accum} micro-batches a step")
    if ac != "none":
        notes.append(f"recomputing each {ac} in backward")
    if cfg.trainer.mixed_precision == "bf16":
        notes.append("bf16 autocast over float32 weights")
    log("model: " + ", ".join(notes))
    if main and start == 0 and (run_dir / "metrics.jsonl").exists():
        (run_dir / "metrics.jsonl").unlink()  # a fresh run: its own metrics, not appended
    metrics = MetricsLogger(run_dir, cfg.trainer.max_steps, cfg.trainer.log_every,
                            cfg.logger.kind, cfg.logger.project, cfg.logger.run_name,
                            config=dataclasses.asdict(cfg), enabled=main)
    # FLOPs per token (MFU) are linear in the experts a token passes through
    flops_0 = active_flops_per_token(model, cfg.data.seq_len, 0)
    flops_per_expert = active_flops_per_token(model, cfg.data.seq_len, 1) - flops_0
    peak = peak_flops(device, cfg.trainer.peak_tflops)
    kill_after = int(os.environ.get("MOE_KILL_AFTER_STEP", "-1"))  # fault injection (tests)
    losses = []
    rc = model.cfg.moe.router
    guard = mesh.guard() if mesh else contextlib.nullcontext()
    with guard:
        for step in range(start + 1, cfg.trainer.max_steps + 1):
            t0 = time.perf_counter()
            lr = lr_at(step - 1, cfg)
            top_k, threshold = scheduled(rc, step - 1)
            par.set_lr(lr)
            set_routing_step(model, step - 1)  # the k / sparsity schedule, if any
            par.counters.reset()
            tot = StepTotals(rc, top_k)
            for m in range(accum):
                ids = batches.batch(data_offset + (step - 1) * accum + m).to(device)
                with par.micro_batch(m):
                    with amp():
                        out = par.module(ids[:, :-1], labels=ids[:, 1:])
                    par.backward(out.loss)
                tot.add(out)
                del out
            gnorm = clip_grad_norm(par, cfg.optim.grad_clip)
            if not math.isfinite(gnorm):  # global: every rank stops here, nothing is stepped
                raise ValueError(
                    f"step {step}: the gradient norm is {gnorm} (loss "
                    f"{float(tot.ce) / accum:.4g} on this rank): training diverged; lower "
                    "optim.lr or raise optim.warmup_steps / optim.grad_clip, and resume from "
                    "the last checkpoint (trainer.resume=true)")
            par.step()
            loads = global_loads(tot.loads, mesh)
            update_expert_biases(model, loads)
            loss = tot.ce / accum
            if mesh:
                dist.all_reduce(loss)
                loss /= world
            dt = time.perf_counter() - t0
            tokens = ids[:, :-1].numel() * world * accum
            flops_tok = flops_0 + flops_per_expert * tot.mean(tot.routed)
            record = dict(
                step=step, loss=loss.item(), lr=lr, grad_norm=gnorm,
                tokens_per_s=tokens / dt, mfu=flops_tok * tokens / world / dt / peak,
                aux_loss=tot.mean(tot.aux), z_loss=tot.mean(tot.z),
                dropped_fraction=tot.mean(tot.dropped),
                experts_per_token=tot.mean(tot.per_token),
                top_k=top_k, **({"threshold": threshold} if rc.kind == "threshold" else {}),
                **({"entropy_loss": tot.mean(tot.entropy)} if tot.entropy is not None else {}),
                expert_load=[(load.float() / load.sum().clamp(min=1)).tolist()
                             for load in loads],
                load_max_violation=max_violation(loads),
                comm_bytes=par.counters.snapshot(),
            )
            if eval_every and (step % eval_every == 0 or step == cfg.trainer.max_steps):
                record["val_loss"] = validation_loss(par, batches, n_eval, device, mesh, amp)
            metrics.log(record)
            losses.append(record["loss"])
            every = cfg.trainer.ckpt_every
            if (every and step % every == 0) or step == cfg.trainer.max_steps:
                checkpoint.save(ckpt_root, step, par, {
                    "data_step": step, "micro_batches": data_offset + step * accum,
                    "micro_batch_rows": rows}, model_config, cfg.trainer.keep_checkpoints)
            if cfg.trainer.heatmap_every and step % cfg.trainer.heatmap_every == 0:
                metrics.heatmap(run_dir / "expert_load.png")
            if step == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
    metrics.heatmap(run_dir / "expert_load.png")
    metrics.close()
    if mesh:
        mesh.close()
    return losses
