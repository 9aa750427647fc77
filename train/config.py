"""The typed training configuration. Hydra fills it from configs/ (YAML only selects and
overrides); a misspelt key or a wrong type stops the run before it starts."""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from moe.config import ModelConfig
from parallel.config import ParallelConfig
from train.data import DataConfig


@dataclass
class OptimConfig:
    """AdamW with linear warm-up to lr, then the schedule: "cosine" decays to min_lr_ratio *
    lr at the last step; "wsd" (warm-up, stable, decay) holds lr until the last
    decay_fraction of the steps, then decays linearly to min_lr_ratio * lr; "constant"
    holds lr."""

    lr: float = 3e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # global norm; 0 turns clipping off
    schedule: str = "cosine"  # cosine | wsd | constant
    decay_fraction: float = 0.2  # wsd: the share of the steps spent decaying


@dataclass
class TrainerConfig:
    max_steps: int = 200
    grad_accum: int = 1  # micro-batches a step: global batch = grad_accum x batch_size x ranks
    # recompute in backward instead of keeping: none | moe_act (the routed experts' SwiGLU
    # activation) | mlp (each MLP / MoE layer) | block
    activation_checkpointing: str = "none"
    log_every: int = 10
    eval_every: int = 0  # validation loss every n steps and at the end (0: never); needs
    # data.val_fraction > 0
    eval_batches: int = 8  # held-out global batches a validation reads (at most all of them)
    ckpt_every: int = 50  # 0: only at the end
    keep_checkpoints: int = 0  # the newest n checkpoints stay, older ones are deleted (0: all)
    resume: bool = False
    seed: int = 0
    device: str = "auto"  # auto: cuda if present, else cpu
    dtype: str = "float32"  # float32 | bfloat16: the weights' (and optimizer state's) dtype
    # bf16: float32 weights, gradients and AdamW state, the forward's matmuls in bf16
    # (torch.autocast; the router in float32); none: everything in trainer.dtype
    mixed_precision: str = "none"
    peak_tflops: float | None = None  # for MFU; None: looked up (GPU) or measured (CPU)
    heatmap_every: int = 0  # write expert_load.png every n steps (0: at the end)
    upcycle_from: str | None = None  # a dense HF Llama/Mistral/Qwen3 folder: experts = its MLPs
    init_from: str | None = None  # an HF MoE folder (any family moe-serve reads): fine-tune it


@dataclass
class LoggerConfig:
    kind: str = "console"  # console | wandb
    project: str = "moe-framework"
    run_name: str | None = None


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)

    def check(self) -> None:
        """ValueError naming the first setting out of range among those that need neither
        the data nor a model: a run stops on them before it reads its corpus or trains a
        tokenizer (minutes on a real corpus)."""
        from moe.model import check_recompute

        t, d = self.trainer, self.data
        for name, value, least in (
                ("trainer.max_steps", t.max_steps, 1), ("trainer.grad_accum", t.grad_accum, 1),
                ("trainer.log_every", t.log_every, 1), ("trainer.eval_every", t.eval_every, 0),
                ("trainer.eval_batches", t.eval_batches, 1),
                ("trainer.ckpt_every", t.ckpt_every, 0),
                ("trainer.keep_checkpoints", t.keep_checkpoints, 0),
                ("trainer.heatmap_every", t.heatmap_every, 0),
                ("data.seq_len", d.seq_len, 1), ("data.batch_size", d.batch_size, 1),
                ("data.vocab_size", d.vocab_size, 1), ("data.max_bytes", d.max_bytes, 1)):
            if value < least:
                raise ValueError(f"{name} must be >= {least}, got {value}")
        if not 0 <= d.val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {d.val_fraction}")
        try:
            check_recompute(t.activation_checkpointing)
        except ValueError as e:
            raise ValueError(f"trainer.activation_checkpointing: {e}") from None
        if t.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"trainer.dtype must be float32 or bfloat16, got {t.dtype!r}")
        if t.upcycle_from and t.init_from:
            raise ValueError("trainer.upcycle_from and trainer.init_from both set: pick one")


def register() -> None:
    """Register the schema so configs/train.yaml can build on it."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
