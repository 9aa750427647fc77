"""parallelize(model, mesh): EP or FSSDP for the experts, DDP or FSDP2 for everything else."""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from parallel.comm import CommCounters, SumOverRanks
from parallel.expert_parallel import apply_expert_parallel
from parallel.fssdp import apply_fssdp
from parallel.layout import EPLayout, FSSDPLayout, Layout
from parallel.mesh import Mesh
from routing.routers import TopKRouter


@dataclass
class Parallelized:
    """module: call it for forward (wrapped); model: the underlying `moe` model (its MoE layers
    now hold local experts or shards). backward(loss) then step() train one step; or call
    loss.backward() and after_backward() yourself and step your own optimizer (ddp, fsdp2).

    With grad_accum = A > 1, a step is A micro-batches, each run forward and backward inside
    `with par.micro_batch(i):` (i = 0 .. A-1), then one step(): the gradients are the mean of
    the micro-batches' (each loss counts 1/A), and the dense gradients cross ranks once, in
    the last micro-batch's backward (DDP's no_sync, FSDP2's deferred reduce-scatter,
    DeepSpeed's accumulation boundary). FSSDP's expert gradients cross in every backward (its
    sparse reduce-scatter sums only the experts that micro-batch used).
    """

    module: nn.Module
    model: nn.Module
    mesh: Mesh | None
    counters: CommCounters
    expert_params: list[nn.Parameter] = field(default_factory=list)
    optimizers: list[torch.optim.Optimizer] = field(default_factory=list)
    engine: object | None = None  # the DeepSpeed engine when dense="deepspeed"
    layouts: dict[str, Layout] = field(default_factory=dict)  # non-identity params only
    grad_accum: int = 1  # micro-batches per step
    _last: bool = field(default=True, init=False, repr=False)  # this micro-batch ends a step
    _inside: bool = field(default=False, init=False, repr=False)  # in a micro_batch block

    @contextlib.contextmanager
    def micro_batch(self, i: int) -> Iterator[None]:
        """Run micro-batch i (0-based) of grad_accum, forward and backward, inside this."""
        if not 0 <= i < self.grad_accum:
            raise ValueError(f"micro-batch {i} outside 0 .. {self.grad_accum - 1}")
        self._last, self._inside = i == self.grad_accum - 1, True
        sync = contextlib.nullcontext()
        fsdp2 = hasattr(self.model, "set_requires_gradient_sync")
        if isinstance(self.module, DistributedDataParallel) and not self._last:
            sync = self.module.no_sync()
        elif fsdp2:
            self.model.set_requires_gradient_sync(self._last)
        try:
            with sync:
                yield
        finally:
            self._last, self._inside = True, False
            if fsdp2:
                self.model.set_requires_gradient_sync(True)

    def backward(self, loss: torch.Tensor) -> None:
        """loss.backward() (through the DeepSpeed engine if any; with grad_accum, loss counts
        1 / grad_accum), then after_backward() once the step's last micro-batch is in."""
        if self.grad_accum > 1 and not self._inside:
            raise ValueError(f"grad_accum={self.grad_accum}: run each micro-batch's forward "
                             "and backward inside `with par.micro_batch(i):`")
        if self.engine is not None:
            self.engine.backward(loss)  # divides by its gradient_accumulation_steps
            if not self._last:
                self.engine.step()  # not a boundary: counts the micro-step, steps nothing
        else:
            (loss / self.grad_accum if self.grad_accum > 1 else loss).backward()
        if self._last:
            self.after_backward()

    def step(self) -> None:
        """Step every optimizer (and the engine), then clear the gradients."""
        if self.engine is not None:
            self.engine.step()
        for opt in self.optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)

    def set_lr(self, lr: float) -> None:
        """Set the learning rate of every optimizer, DeepSpeed's included."""
        opts = list(self.optimizers)
        if self.engine is not None:
            opts.append(self.engine.optimizer)
        for opt in opts:
            for g in opt.param_groups:
                g["lr"] = lr

    def after_backward(self) -> None:
        """Average expert gradients like DDP averages the rest (mean of the ranks' losses).

        EP: a local expert's gradient already sums every rank's tokens; replicas across the
        expert-DP group are summed too. FSSDP: the sparse reduce-scatter summed them.
        """
        if self.mesh is None or self.mesh.cfg.mode == "dp" or not self.expert_params:
            return
        mode, W = self.mesh.cfg.mode, self.mesh.world_size
        grads = [p.grad for p in self.expert_params if p.grad is not None]
        if mode == "ep" and self.mesh.dp_size > 1 and grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=self.mesh.expert_dp_group)
            self.counters.add("expert_dp.all_reduce", flat.numel() * flat.element_size())
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        for g in grads:
            g.div_(W)


    def _layout(self, name: str) -> Layout:
        return self.layouts.get(name) or Layout(name)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The single-process state dict (same names as the unwrapped model), on every rank."""
        state: dict[str, torch.Tensor] = {}
        for name, t in self.model.state_dict().items():
            state.update(self._layout(name).to_canonical(t))
        return state

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a single-process state dict into this (possibly sharded) model."""
        own = self.model.state_dict()
        wanted = {n for name in own for n in self._layout(name).names}
        missing, extra = sorted(wanted - set(state)), sorted(set(state) - wanted)
        if missing or extra:
            raise ValueError(f"state dict does not fit this model: missing {missing[:5]}, "
                             f"unexpected {extra[:5]}")
        for name, t in own.items():
            src = self._layout(name).from_canonical(state, t)
            if tuple(src.shape) != tuple(t.shape):
                raise ValueError(f"{name}: checkpoint shape {tuple(src.shape)} != model "
                                 f"{tuple(t.shape)}")
            t.copy_(src.to(t.dtype))
        if self.engine is not None and hasattr(self.engine.optimizer, "refresh_fp32_params"):
            # ZeRO steps fp32 master partitions of its own: refill them from the weights
            self.engine.optimizer.refresh_fp32_params()

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        """The torch optimizers' per-parameter state in the canonical layout:
        {"<param name>.<key>": tensor} (tensors shaped like their parameter are gathered)."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        out: dict[str, torch.Tensor] = {}
        for opt in self.optimizers:
            for p, st in opt.state.items():
                layout = self._layout(names[id(p)])
                # Sorted: to_canonical may run a collective, and every rank must take the
                # state entries in one order.
                for key, v in sorted(st.items()):
                    if torch.is_tensor(v) and v.shape == p.shape:
                        for canon, t in layout.to_canonical(v).items():
                            out[f"{canon}.{key}"] = t
                    else:
                        for canon in layout.names:
                            out[f"{canon}.{key}"] = torch.as_tensor(v)
        if self.engine is not None:
            out.update(self._engine_optimizer_state())
        return out

    def _engine_params(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of what the DeepSpeed engine optimizes, in one order on every
        rank."""
        expert = {id(p) for p in self.expert_params}
        return [(n, p) for n, p in self.model.named_parameters() if id(p) not in expert]

    def engine_grad_fragments(self) -> list[torch.Tensor]:
        """This rank's disjoint pieces of the dense gradients DeepSpeed holds (ZeRO 1/2 keep
        no p.grad), as writable views: valid between backward and step. [] without DeepSpeed."""
        if self.engine is None:
            return []
        out = []
        for _, p in self._engine_params():
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is not None:
                out.append(mapping.get_lp_grad_fragment(p._index_in_param_group))
        return out

    def _relink_engine_state(self) -> None:
        """Point each parameter at its fragment of the partitioned optimizer state again.
        DeepSpeed links them once, after the first param group's first step, so the groups
        stepped after it (our no-weight-decay group) keep an empty link."""
        zero = self.engine.optimizer
        if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
            zero._hp_optimizer_states_linked = False
            zero._lazy_init_hp_params_optimizer_state()

    def _engine_optimizer_state(self) -> dict[str, torch.Tensor]:
        """The ZeRO-partitioned dense optimizer state gathered per parameter (DeepSpeed's
        tensor-fragment API; collective), named as a torch optimizer's would be."""
        from deepspeed.utils import safe_get_full_optimizer_state

        states = list(self.engine.optimizer.optimizer.state.values())
        if not states:
            return {}
        self._relink_engine_state()
        first = states[0]
        tensor_keys = sorted(k for k, v in first.items() if torch.is_tensor(v) and v.dim())
        out = {}
        for name, p in self._engine_params():
            for key in tensor_keys:
                out[f"{name}.{key}"] = safe_get_full_optimizer_state(p, key).detach().cpu() \
                    .reshape(p.shape).clone()
            for key, v in first.items():
                if key not in tensor_keys:
                    out[f"{name}.{key}"] = torch.as_tensor(v).detach().cpu().clone()
        return out

    @torch.no_grad()
    def _load_engine_optimizer_state(self, state: dict[str, torch.Tensor]) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        params = self._engine_params()
        prefix = params[0][0] + "."
        keys = sorted(k[len(prefix):] for k in state if k.startswith(prefix))
        if not keys:
            return
        missing = [f"{n}.{k}" for n, _ in params for k in keys if f"{n}.{k}" not in state]
        if missing:
            raise ValueError(f"optimizer state lacks {missing[:3]}")
        zero = self.engine.optimizer
        base = zero.optimizer
        if not base.state:  # no step yet: torch optimizers create their state lazily
            for group in base.param_groups:
                for flat in group["params"]:
                    base.state[flat] = {
                        k: torch.zeros_like(flat) if state[prefix + k].dim()
                        else state[prefix + k].clone() for k in keys}
        self._relink_engine_state()
        for name, p in params:
            for key in keys:
                v = state[f"{name}.{key}"]
                if v.dim():
                    safe_set_full_optimizer_state(p, v.to(p.device), key)
        for key in keys:  # per-group scalars (the step count) are one value for the group
            v = state[f"{params[0][0]}.{key}"]
            if v.dim() == 0:
                for st in base.state.values():
                    old = st.get(key)
                    st[key] = v.clone().to(old.dtype) if torch.is_tensor(old) else v.item()

    @torch.no_grad()
    def load_optimizer_state(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of optimizer_state, for the optimizers this object holds."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        for opt in self.optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    layout = self._layout(names[id(p)])
                    keys = {k[len(layout.names[0]) + 1:] for k in state
                            if k.startswith(layout.names[0] + ".")}
                    st = {}
                    for key in sorted(keys):  # one order on every rank (collectives inside)
                        full = {c: state[f"{c}.{key}"] for c in layout.names}
                        v = full[layout.names[0]]
                        if v.dim() == 0:
                            st[key] = v.clone()
                        else:
                            st[key] = layout.from_canonical(full, p).to(p.dtype).clone()
                    if st:
                        opt.state[p] = st
        if self.engine is not None:
            self._load_engine_optimizer_state(state)


def _layouts(model: nn.Module, mode: str, mesh: Mesh | None) -> dict[str, Layout]:
    from moe.experts import EXPERT_PARAMS
    from moe.layer import MoELayer
    from parallel.fssdp import FSSDPExperts

    layouts: dict[str, Layout] = {}
    for name, module in model.named_modules():
        if not isinstance(module, MoELayer):
            continue
        prefix = f"{name}.experts." if name else "experts."
        if isinstance(module.experts, FSSDPExperts):
            layouts[prefix + "shard"] = FSSDPLayout(prefix, module.experts)
        elif mode == "ep":
            for w in EXPERT_PARAMS:
                if getattr(module.experts, w) is not None:
                    layouts[prefix + w] = EPLayout(prefix + w, mesh.ep_group)
    return layouts


OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def parallelize(model: nn.Module, mesh: Mesh | None,
                optimizer: OptimizerFactory | None = None, grad_accum: int = 1
                ) -> Parallelized:
    """Wrap a model built by `moe/` for mesh.cfg.mode ("dp", "ep", "fssdp") and mesh.cfg.dense.

    optimizer(params) builds the optimizer(s) once the parameters are final (local experts,
    shards, FSDP2 DTensors); needed for dense="deepspeed", which gets its own over the dense
    parameters (ZeRO-partitioned) while the experts get another. mesh=None: one process,
    nothing wrapped (the same interface for single-device runs). grad_accum: micro-batches
    per step (Parallelized.micro_batch).
    """
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
    if mesh is None:
        opts = [optimizer(list(model.parameters()))] if optimizer is not None else []
        return Parallelized(module=model, model=model, mesh=None, counters=CommCounters(),
                            optimizers=opts, grad_accum=grad_accum)
    cfg = mesh.cfg
    counters = CommCounters()
    model = model.to(mesh.device)
    expert_params: list[nn.Parameter] = []
    if cfg.mode == "ep":
        expert_params = apply_expert_parallel(model, mesh.ep_group, counters)
    elif cfg.mode == "fssdp":
        expert_params = apply_fssdp(model, mesh.expert_group, counters, cfg.rematerialize)
    for name, module in model.named_modules():  # global-batch aux losses: every rank's counts
        if isinstance(module, TopKRouter) and module.cfg.aux_loss_type == "global_batch":
            module.count_reducer = SumOverRanks(None, counters, f"{name}.expert_counts")
    ignored = {id(p) for p in expert_params}
    dense_params = [p for p in model.parameters() if id(p) not in ignored]
    engine, optimizers = None, []
    if cfg.dense == "deepspeed":
        if optimizer is None:
            raise ValueError("dense='deepspeed' needs an optimizer factory: "
                             "parallelize(model, mesh, optimizer=lambda ps: ...)")
        # DeepSpeed broadcasts every module parameter from rank 0 at start-up; local experts
        # and FSSDP shards differ per rank by design, so they are put back afterwards.
        saved = [p.detach().clone() for p in expert_params]
        engine = _deepspeed_engine(model, dense_params, optimizer(dense_params), cfg.zero_stage,
                                   grad_accum)
        with torch.no_grad():
            for p, v in zip(expert_params, saved, strict=True):
                p.copy_(v)
        module = engine
        if expert_params:
            optimizers.append(optimizer(expert_params))
    elif mesh.world_size == 1:
        module = model
    elif cfg.dense == "ddp":
        names = [n for n, p in model.named_parameters() if id(p) in ignored]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
        # Buffers (router expert bias, hash tables) stay in step by construction: no per-step
        # broadcast (the keyword was renamed in newer torch).
        sync_kw = ("forward_sync_buffers" if "forward_sync_buffers"
                   in inspect.signature(DistributedDataParallel.__init__).parameters
                   else "broadcast_buffers")
        module = DistributedDataParallel(
            model, device_ids=[mesh.device] if mesh.device.type == "cuda" else None,
            **{sync_kw: False})
    else:
        from torch.distributed.fsdp import fully_shard

        ignored_params = set(expert_params)
        for block in getattr(model, "layers", []):
            fully_shard(block, mesh=mesh.device_mesh, ignored_params=ignored_params)
        fully_shard(model, mesh=mesh.device_mesh, ignored_params=ignored_params)
        module = model
    if optimizer is not None and engine is None:
        optimizers.append(optimizer(list(model.parameters())))
    return Parallelized(module=module, model=model, mesh=mesh, counters=counters,
                        expert_params=expert_params, optimizers=optimizers, engine=engine,
                        layouts=_layouts(model, cfg.mode, mesh), grad_accum=grad_accum)


def _skip_deepspeed_shm_op(deepspeed) -> None:
    """DeepSpeed's communication backend compiles its shared-memory all-reduce (a C++ op,
    'deepspeed_shm_comm') when it starts on a CPU machine: a minute or more on 2 cores, on
    every new install. Only DeepSpeed's inference all-reduce uses it, never ZeRO's
    collectives, so it is marked as not compatible here and never built."""
    try:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except (AttributeError, TypeError):  # a DeepSpeed without the table: it decides itself
        pass


def _deepspeed_engine(model, dense_params, dense_optimizer, zero_stage: int,
                      grad_accum: int = 1):
    """A DeepSpeed engine that owns the dense parameters' optimizer (ZeRO stage 1 or 2),
    accumulating grad_accum micro-batches a step."""
    try:
        import deepspeed
    except ImportError as e:
        raise ValueError("dense='deepspeed' needs the deepspeed package installed") from e
    config = {
        "train_micro_batch_size_per_gpu": 1,  # we call the engine per micro-batch ourselves
        "gradient_accumulation_steps": grad_accum,
        "zero_optimization": {"stage": zero_stage},
        # DeepSpeed clips at norm 1.0 unless told otherwise; clipping is the trainer's choice.
        "gradient_clipping": 0.0,
        # Any torch optimizer is fine under ZeRO 1/2 (it steps the rank's partition).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }
    _skip_deepspeed_shm_op(deepspeed)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=dense_params,
                                           optimizer=dense_optimizer, config=config)
    # ZeRO calls torch's old collective names, which torch 2.13 warns of at every step.
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*deprecated")
    return engine
