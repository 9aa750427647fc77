"""`python -m train` as a user runs it on one rank: loss falls, resume after SIGKILL, config
errors, exports; the runs on several ranks are in test_train_ranks.py."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.forked import run_module
from tests.train_helpers import (
    MLA,
    ROOT,
    TINY,
    VAL,
    load_and_run,
    losses,
    records,
    train,
)


def test_tiny_run_loss_falls_and_writes_its_outputs(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    proc = train(run_dir, data_cache, "trainer.max_steps=60", "trainer.ckpt_every=30")
    ls = losses(run_dir)
    first = sum(ls[s] for s in range(1, 6)) / 5
    last = sum(ls[s] for s in range(56, 61)) / 5
    assert last < first - 1.0, (first, last)
    rec = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("step", "loss", "lr", "tokens_per_s", "mfu", "aux_loss", "z_loss",
                "dropped_fraction", "expert_load", "experts_per_token", "top_k",
                "load_max_violation"):
        assert key in rec, key
    assert rec["top_k"] == 2 and rec["experts_per_token"] == 2.0
    assert len(rec["expert_load"]) == 2 and len(rec["expert_load"][0]) == 4
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000060"
    assert (run_dir / "expert_load.png").stat().st_size > 1000
    assert "step    60/60" in proc.stdout and "tok/s" in proc.stdout


def test_resume_after_sigkill_matches_uninterrupted(tmp_path, data_cache):
    """... under a k schedule (4 experts per token at step 1, 1 from step 9 on), which the
    resumed run picks up at its step; trainer.keep_checkpoints=1 leaves the newest only."""
    common = ["trainer.max_steps=12", "trainer.ckpt_every=4", "router=dense_to_sparse",
              "model.moe.router.top_k=1", "model.moe.router.top_k_start=4",
              "model.moe.router.schedule_steps=8"]
    train(tmp_path / "a", data_cache, *common)
    killed = train(tmp_path / "b", data_cache, *common, "trainer.keep_checkpoints=1",
                   env={"MOE_KILL_AFTER_STEP": "6"}, check=False)
    assert killed.returncode == -9
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text() == "step_00000004"
    train(tmp_path / "b", data_cache, *common, "trainer.resume=true",
          "trainer.keep_checkpoints=1")
    assert [p.name for p in (tmp_path / "b" / "checkpoints").glob("step_*")] == [
        "step_00000012"]
    assert len(list((tmp_path / "a" / "checkpoints").glob("step_*"))) == 3  # 0: keeps all
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    for step in range(5, 13):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-6), step
    ks = {r["step"]: r["top_k"] for r in records(tmp_path / "b")}
    assert [ks[s] for s in range(1, 13)] == [4, 4, 3, 3, 3, 2, 2, 1, 1, 1, 1, 1]


def test_threshold_routing_trains_on_fewer_experts(tmp_path, data_cache):
    """router=threshold: tokens take 1 to top_k experts; the entropy loss is logged and
    lowers the mean experts per token as training goes (its coefficient raised here)."""
    train(tmp_path / "run", data_cache, "router=threshold", "trainer.max_steps=30",
          "model.moe.router.entropy_loss_coef=0.2", "model.moe.router.threshold=0.5")
    recs = records(tmp_path / "run")
    for r in recs:
        assert r["threshold"] == 0.5 and r["top_k"] == 4 and "entropy_loss" in r
        assert 1.0 <= r["experts_per_token"] <= 4.0
    first = sum(r["experts_per_token"] for r in recs[:5]) / 5
    last = sum(r["experts_per_token"] for r in recs[-5:]) / 5
    assert last < first, (first, last)


@pytest.mark.parametrize("override,message", [
    ("trainer.max_stepz=3", "max_stepz"),
    ("trainer.max_steps=abc", "max_steps"),
    ("data.path=/nonexistent/corpus", "/nonexistent/corpus"),
    ("model.moe.router.top_k=9", "top_k=9"),
    ("trainer.grad_accum=0", "grad_accum"),
    ("trainer.activation_checkpointing=all", "activation checkpointing"),
    ("optim.schedule=linear", "optim.schedule"),
])
def test_bad_config_stops_with_a_message(tmp_path, data_cache, override, message):
    proc = train(tmp_path / "run", data_cache, override, "trainer.max_steps=2", check=False)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr


@pytest.mark.parametrize("override,message", [
    ("trainer.max_steps=0", "trainer.max_steps must be >= 1, got 0"),
    ("data.seq_len=0", "data.seq_len must be >= 1, got 0"),
    ("trainer.eval_batches=0", "trainer.eval_batches must be >= 1"),
    ("data.val_fraction=1.5", "data.val_fraction must be in [0, 1)"),
    ("parallel.mode=eq", "parallel mode must be dp, ep or fssdp, got 'eq'"),
])
def test_settings_out_of_range_stop_the_run_before_it_reads_its_data(tmp_path, override,
                                                                      message):
    """They need neither data nor model: the run ends with the message (exit 2, no traceback)
    before it reads the corpus or trains a tokenizer (its data cache stays unwritten)."""
    cache = tmp_path / "cache"
    proc = train(tmp_path / "run", str(cache), override, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not cache.exists()


def test_divergence_stops_with_a_message_before_the_step(tmp_path, data_cache):
    """A non-finite gradient norm ends the run (exit 2, every rank) before the optimizer
    steps on it, naming the step and what to change; no checkpoint of it is written."""
    proc = train(tmp_path / "run", data_cache, "optim.lr=1e6", "optim.warmup_steps=1",
                 "optim.grad_clip=0", "trainer.max_steps=6", "trainer.ckpt_every=1",
                 check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "training diverged" in proc.stderr and "lower optim.lr" in proc.stderr
    step = int(proc.stderr.split("error: step ")[1].split(":")[0])
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*"))
    assert saved and saved[-1] == f"step_{step - 1:08d}", (step, saved)


def test_checkpoint_of_another_shape_is_refused(tmp_path, data_cache):
    train(tmp_path / "run", data_cache, "trainer.max_steps=2")
    proc = train(tmp_path / "run", data_cache, "trainer.max_steps=4", "trainer.resume=true",
                 "model.moe.expert_ffn=32", check=False)
    assert proc.returncode != 0
    assert "another model shape" in proc.stderr and "expert_ffn" in proc.stderr


def test_validation_needs_held_out_data(tmp_path, data_cache):
    proc = train(tmp_path / "run", data_cache, "trainer.eval_every=2", "trainer.max_steps=2",
                 check=False)
    assert proc.returncode != 0 and "data.val_fraction" in proc.stderr


def test_gpu_experiment_preset_composes():
    """configs/experiment/small_gpu.yaml fills the typed config (Hydra's own checks) with
    the settings its comment promises; so does router=global_batch."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from train.config import TrainConfig, register

    register()
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("train", overrides=["experiment=small_gpu"]))
    assert isinstance(cfg, TrainConfig)
    t = cfg.trainer
    assert (t.mixed_precision, t.activation_checkpointing, t.grad_accum) == ("bf16", "mlp", 4)
    assert t.eval_every == 250 and cfg.data.val_fraction == 0.005
    assert cfg.model.n_layers == 8 and cfg.model.moe.num_experts == 16
    assert cfg.model.vocab_size == 32000 and cfg.model.max_seq_len == 1024
    assert cfg.parallel.mode == "fssdp"
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("train", overrides=["experiment=tiny",
                                                              "router=global_batch"]))
    assert cfg.model.moe.router.aux_loss_type == "global_batch"
    cfg.model.moe.router.check(cfg.model.moe.num_experts)


def test_sweep_and_report(tmp_path, data_cache):
    sweep = tmp_path / "sweep"
    args = ["-m", *TINY, f"data.cache_dir={data_cache}", "trainer.max_steps=4", *VAL,
            f"hydra.sweep.dir={sweep}", "model.moe.router.top_k=1,2"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = run_module("train", args, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = run_module("train.sweep_report", [sweep], cwd=ROOT, env=env, timeout=120)
    assert rep.returncode == 0, rep.stderr
    table = (sweep / "sweep.md").read_text()
    assert "model.moe.router.top_k=1" in table and "model.moe.router.top_k=2" in table
    assert "| experts/token |" in table and "| 1.00 |" in table and "| 2.00 |" in table
    assert "| validation loss |" in table
    for line in table.splitlines()[2:]:  # each run's validation loss, a number
        float(line.split("|")[5])
    assert (sweep / "sweep.png").stat().st_size > 1000


def test_wandb_offline(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    train(run_dir, data_cache, "trainer.max_steps=3", "logger=wandb",
          env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert list((run_dir / "wandb").glob("offline-run-*"))


@pytest.mark.parametrize("family,overrides", [("mixtral", []), ("deepseek_v3", MLA),
                                              ("glm4_moe", ["router=sigmoid_aux_free"]),
                                              ("gpt_oss", ["model=tiny_gpt_oss"])])
def test_export_cli_loads_in_transformers(tmp_path, data_cache, family, overrides):
    transformers = pytest.importorskip("transformers")
    run_dir = tmp_path / "run"
    train(run_dir, data_cache, "trainer.max_steps=3", *overrides)
    out = tmp_path / "hf"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = run_module("train.export", [run_dir, out], cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"as {family}" in proc.stdout
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tok.encode("def main():\n    return 0\n")])
    ours = load_and_run(str(run_dir / "checkpoints" / "step_00000003"), None)
    fixed = torch.arange(32).remainder(512).view(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(hf(fixed).logits, ours, rtol=1e-5, atol=1e-5)
        assert hf(ids).logits.shape[-1] == 512
    if family == "mixtral":  # the refusal is the same for every family
        bad = run_module("train.export", [tmp_path / "nope", out], cwd=ROOT, env=env)
        assert bad.returncode != 0 and "not a checkpoint" in bad.stderr


def test_fine_tune_a_hub_moe_and_export_it_back(tmp_path, data_cache):
    """trainer.init_from reads a DeepSeek-V3 folder (latent attention, groups, selection
    bias, a shared expert, a dense first layer) into the trainer: with lr=0 and no bias
    updates, the exported run gives the original model's logits; with training on, the
    loss falls."""
    transformers = pytest.importorskip("transformers")
    from tests.hf_models import build_hf

    hub = tmp_path / "hub"
    hf = build_hf("deepseek_v3", vocab_size=512, max_position_embeddings=128)
    hf.save_pretrained(hub)
    frozen = ["trainer.max_steps=2", f"trainer.init_from={hub}", "optim.lr=0",
              "model.moe.router.expert_bias_update_rate=0"]
    proc = train(tmp_path / "frozen", data_cache, *frozen)
    assert f"initialised from {hub}: 3 layers, 8 experts, top-2" in proc.stdout
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = tmp_path / "out"
    proc = run_module("train.export", [tmp_path / "frozen", out], cwd=ROOT, env=env)
    assert proc.returncode == 0 and "as deepseek_v3" in proc.stdout, proc.stderr[-2000:]
    back = transformers.AutoModelForCausalLM.from_pretrained(out)
    ids = torch.arange(40).remainder(512).view(2, 20)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5)
    train(tmp_path / "tuned", data_cache, "trainer.max_steps=12", f"trainer.init_from={hub}")
    tuned = losses(tmp_path / "tuned")
    assert tuned[12] < tuned[1]
    both = train(tmp_path / "both", data_cache, f"trainer.init_from={hub}",
                 f"trainer.upcycle_from={hub}", check=False)
    assert both.returncode != 0 and "pick one" in both.stderr


def test_train_upcycled_from_a_dense_model(tmp_path, data_cache):
    transformers = pytest.importorskip("transformers")
    dense_dir = tmp_path / "dense"
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=128)
    transformers.LlamaForCausalLM(cfg).save_pretrained(dense_dir)
    # the dense model's tokenizer: here, one trained by a first run on the same corpus
    first = tmp_path / "first"
    train(first, data_cache, "trainer.max_steps=1")
    (dense_dir / "tokenizer.json").write_bytes((first / "tokenizer.json").read_bytes())
    proc = train(tmp_path / "up", data_cache, "trainer.max_steps=3",
                 f"trainer.upcycle_from={dense_dir}", f"data.tokenizer={dense_dir}")
    assert "upcycled" in proc.stdout
    assert len(losses(tmp_path / "up")) == 3


def test_sample_cli(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    train(run_dir, data_cache, "trainer.max_steps=2")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = run_module("train.sample", [run_dir, "--prompt", "def f(x):", "--new-tokens", "6",
                                       "--temperature", "0"], cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--- prompt 'def f(x):'" in proc.stdout and "def f(x):" in proc.stdout


def test_train_upcycled_from_one_of_our_dense_runs(tmp_path, data_cache):
    train(tmp_path / "dense", data_cache, "trainer.max_steps=2", "model.first_dense_layers=2")
    proc = train(tmp_path / "up", data_cache, "trainer.max_steps=2",
                 f"trainer.upcycle_from={tmp_path / 'dense'}")
    assert "upcycled" in proc.stdout and len(losses(tmp_path / "up")) == 2
    rec = json.loads((tmp_path / "up" / "metrics.jsonl").read_text().splitlines()[-1])
    assert len(rec["expert_load"]) == 2  # both layers are MoE now


def test_gradient_accumulation_trains_like_one_batch_and_resumes_with_another_split(
        tmp_path, data_cache):
    """trainer.grad_accum=2 of 4 rows = one batch of 8 (aux loss off: it is per micro-batch),
    also with each MLP recomputed in backward, and a run resumed with batches of 8 continues
    after the rows its checkpoint read."""
    common = ["trainer.max_steps=4", "model.moe.router.aux_loss_coef=0"]
    train(tmp_path / "a", data_cache, *common)
    proc = train(tmp_path / "b", data_cache, "model.moe.router.aux_loss_coef=0",
                 "trainer.max_steps=2", "trainer.grad_accum=2", "data.batch_size=4",
                 "trainer.activation_checkpointing=mlp")
    assert "2 micro-batches a step, recomputing each mlp in backward" in proc.stdout
    proc = train(tmp_path / "b", data_cache, *common, "trainer.resume=true")
    assert "continues after the 16 rows read" in proc.stdout
    a, b = records(tmp_path / "a"), records(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b, strict=True):
        for key in ("loss", "grad_norm", "z_loss"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), (x["step"], key)
        torch.testing.assert_close(torch.tensor(y["expert_load"]), torch.tensor(x["expert_load"]))


def test_checkpoints_from_before_new_config_fields_still_resume(tmp_path):
    """A model_config.json written before a field existed reads with its default, so resume
    accepts it; a real difference in the new field is still named."""
    from dataclasses import asdict

    from moe import ModelConfig
    from train import checkpoint

    run = asdict(ModelConfig())
    old = {k: v for k, v in run.items()
           if k not in ("rope_scaling", "sliding_window", "sliding_window_layers", "clip_qkv")}
    (tmp_path / "model_config.json").write_text(json.dumps(old))
    checkpoint.check_model_config(tmp_path, run)
    assert checkpoint.model_config(tmp_path) == ModelConfig()
    with pytest.raises(ValueError, match="sliding_window: checkpoint None, this run 8"):
        checkpoint.check_model_config(tmp_path, {**run, "sliding_window": 8})


def test_mfu_counts_the_experts_a_token_was_routed_to():
    """FLOPs per token grow by one expert's per extra expert; threshold routing counts the
    slots its threshold used (capacity drops included), top-k routing its (scheduled) k."""
    from moe import ModelConfig, MoEConfig, MoETransformer
    from routing import RouterConfig
    from train.trainer import active_flops_per_token, routed_experts_per_token

    rc = RouterConfig(kind="threshold", top_k=3, threshold=0.5, capacity_factor=0.5)
    cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, max_seq_len=8,
                      moe=MoEConfig(num_experts=4, expert_ffn=8, router=rc,
                                    kernel_backend="torch"))
    model = MoETransformer(cfg)
    f = [active_flops_per_token(model, 8, k) for k in (0, 1, 2, 3)]
    expert = 6 * 2 * 3 * 16 * 8  # fwd+bwd of one SwiGLU expert (3 d x ffn matrices), 2 layers
    assert [b - a for a, b in zip(f, f[1:], strict=False)] == pytest.approx([expert] * 3)
    assert active_flops_per_token(model, 8) == pytest.approx(f[3])  # default: top_k
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in model.layers:
            layer.mlp.router.weight.normal_(0, 0.5)
    out = model(torch.randint(0, 32, (4, 8)), labels=torch.randint(0, 32, (4, 8)))
    used = 0.0  # each token's slots by the threshold rule, from its router logits
    for r in out.routings:
        p = torch.softmax(r.router_logits, -1).sort(-1, descending=True).values
        before = p.cumsum(-1) - p
        used += float((before[:, :3] < 0.5).sum()) / r.num_tokens / 2
    assert any(float(r.dropped_fraction) > 0 for r in out.routings)
    assert routed_experts_per_token(out.routings, rc, 3) == pytest.approx(used, rel=1e-5)
    assert 1 <= used < 3
    assert routed_experts_per_token(out.routings, RouterConfig(top_k=2), 2) == 2.0


def test_learning_rate_schedules():
    """Warm-up to lr, then cosine to min_lr_ratio * lr at the last step, WSD's plateau and
    linear decay over the last decay_fraction of the steps, or constant; bad names refused."""
    from types import SimpleNamespace

    from train.config import OptimConfig
    from train.trainer import lr_at

    def lrs(schedule, **kw):
        cfg = SimpleNamespace(trainer=SimpleNamespace(max_steps=20), optim=OptimConfig(
            lr=1.0, warmup_steps=4, min_lr_ratio=0.1, schedule=schedule, **kw))
        return [lr_at(s, cfg) for s in range(20)]

    for name in ("cosine", "wsd", "constant"):
        assert lrs(name)[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    cos = lrs("cosine")
    assert all(a >= b for a, b in zip(cos[3:], cos[4:], strict=False)) and cos[-1] > 0.1
    assert cos[4 + 8] == pytest.approx(0.55)  # halfway through the decay: the mean
    wsd = lrs("wsd", decay_fraction=0.25)  # steps 15..19 decay
    assert wsd[4:15] == [1.0] * 11 and wsd[-1] == pytest.approx(0.1)
    assert wsd[15:] == pytest.approx([0.82, 0.64, 0.46, 0.28, 0.1])
    assert lrs("constant")[4:] == [1.0] * 16
    with pytest.raises(ValueError, match="optim.schedule"):
        lrs("linear")
    with pytest.raises(ValueError, match="decay_fraction"):
        lrs("wsd", decay_fraction=0.0)


def test_load_max_violation():
    from train.trainer import max_violation

    assert max_violation(torch.tensor([[10, 10, 10, 10]])) == 0.0
    assert max_violation(torch.tensor([[20, 10, 10, 0], [10, 10, 10, 10]])) == 0.5
    assert max_violation(torch.zeros(0, 0, dtype=torch.int64)) == 0.0


def test_gradient_clipping_is_torchs_on_one_process():
    """One process: the global norm and the clipped gradients are what torch's
    clip_grad_norm_ gives (experts and dense weights alike); under the bar nothing moves."""
    import copy

    from moe import ModelConfig, MoEConfig, MoETransformer
    from parallel import parallelize
    from routing import RouterConfig
    from train.trainer import clip_grad_norm

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, max_seq_len=8,
                      moe=MoEConfig(num_experts=4, expert_ffn=8, router=RouterConfig(top_k=2)))
    ids = torch.randint(0, 32, (3, 8))
    for bar in (0.05, 1e6):
        ours, ref = MoETransformer(cfg), None
        ref = copy.deepcopy(ours)
        for m in (ours, ref):
            m(ids, labels=ids).loss.backward()
        norm = clip_grad_norm(parallelize(ours, None), bar)
        want = torch.nn.utils.clip_grad_norm_(ref.parameters(), bar)
        assert norm == pytest.approx(float(want), rel=1e-6)
        assert norm > 0.05  # the first bar clips
        for (name, p), q in zip(ours.named_parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-8, msg=name)


def test_a_resumed_run_with_other_micro_batches_continues_after_the_rows_read():
    """20 rows read as 5 micro-batches of 4: with micro-batches of 6 the run continues at
    micro-batch 4 (after row 24: no row read twice), with 2 at micro-batch 10; a checkpoint
    of the same rows continues where it stopped, less the steps the run counts itself."""
    from train.trainer import resumed_data_offset

    notes = []
    state = {"micro_batches": 5, "micro_batch_rows": 4}
    assert resumed_data_offset(state, 0, 1, 6, notes.append) == 4
    assert resumed_data_offset(state, 0, 1, 2, notes.append) == 10
    assert resumed_data_offset(state, 2, 2, 4, notes.append) == 1  # 5 read, 2 steps of 2
    assert len(notes) == 2 and "20 rows read" in notes[0]
    assert resumed_data_offset({"data_step": 3}, 3, 1, 4, notes.append) == 0  # older ones
