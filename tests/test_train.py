"""Tests of the training job: loss, LR schedule, checkpoints (atomic, resumable), the CLI and CP launch.

They run the real model, data loader and mesh on CPU with a tiny config (TINY) and a dataset cache
shared by the session.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from lctrain.config import load_config
from lctrain.train import checkpoint as ckpt_mod
from lctrain.train.optim import build_optimizer, build_scheduler, lr_factor, param_groups
from lctrain.train.step import lm_loss

TINY = [
    "model.d_model=32", "model.layer_pattern=GS", "model.n_heads=2", "model.head_dim=16",
    "model.attn_heads=2", "model.attn_head_dim=16", "model.window=16", "model.chunk_size=16",
    "data.seq_len=32", "data.micro_batch_size=2", "train.steps=3", "train.warmup_steps=1",
    "train.log_every=1", "train.progress=false", "train.tensorboard=false", "train.lr=1e-2",
]


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One embedded-dataset cache for the whole session (the TINY dataset is built once)."""
    return tmp_path_factory.mktemp("lctrain_cache")


@pytest.fixture
def parts(data_cache):
    """The overrides every in-process run takes: TINY plus the shared data cache."""
    return [f"data.cache_dir={data_cache}"]


def _metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def _run(parts: list[str], out_dir: Path, *extra: str) -> int:
    from lctrain.cli import main

    return main(["train", *TINY, *parts, f"train.out_dir={out_dir}", *extra])


# ---------------------------------------------------------------- loss and schedule
def test_lm_loss_equals_cross_entropy_mean():
    torch.manual_seed(0)
    vocab = 11
    head = torch.nn.Embedding(vocab, vocab)

    def model(ids, position_offset=0):
        return head(ids)

    ids = torch.randint(0, vocab, (3, 7))
    labels = torch.randint(0, vocab, (3, 7))
    labels[0, :4] = -100
    loss, mean = lm_loss(model, ids, labels)
    want = F.cross_entropy(head(ids).reshape(-1, vocab), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(mean, want)
    assert loss.requires_grad and not mean.requires_grad
    # token weights scale each token's loss; the normalisation (valid tokens) and the reported mean stay
    weights = torch.ones(3, 7)
    weights[1, 2:5] = 20.0
    wloss, wmean = lm_loss(model, ids, labels, token_weights=weights)
    per_token = F.cross_entropy(head(ids).reshape(-1, vocab), labels.reshape(-1), ignore_index=-100, reduction="none")
    torch.testing.assert_close(wloss, (per_token * weights.reshape(-1)).sum() / (labels != -100).sum())
    torch.testing.assert_close(wmean, want)
    with pytest.raises(ValueError, match="token_weights"):
        lm_loss(model, ids, labels, token_weights=weights[:, :3])


def test_answer_weights_from_the_batch():
    from lctrain.train.step import answer_weights

    mask = torch.tensor([[0, 1, 1, 0]], dtype=torch.uint8)
    torch.testing.assert_close(answer_weights({"answer_mask": mask}, 20.0, "cpu"),
                               torch.tensor([[1.0, 20.0, 20.0, 1.0]]))
    assert answer_weights({"answer_mask": mask}, 1.0, "cpu") is None
    assert answer_weights({}, 20.0, "cpu") is None


def test_lr_schedule_shape():
    kw = dict(warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    f = [lr_factor(s, **kw) for s in range(130)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:10], f[1:10]))  # warmup rises
    assert all(a >= b for a, b in zip(f[10:110], f[11:110]))  # cosine falls
    assert f[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 50 / 99)))
    assert f[109] == pytest.approx(0.1) and f[129] == pytest.approx(0.1)  # floor, then flat


def test_scheduler_drives_optimizer_lr():
    cfg = load_config(None, ["train.lr=2.0", "train.warmup_steps=2", "train.steps=6", "train.min_lr_ratio=0.5"])
    p = torch.nn.Parameter(torch.zeros(2, 2))
    opt = build_optimizer(torch.nn.ParameterList([p]), cfg.train)
    sched = build_scheduler(opt, cfg.train)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    want = [2.0 * lr_factor(s, warmup_steps=2, total_steps=6, min_lr_ratio=0.5) for s in range(6)]
    assert seen == pytest.approx(want)


def test_trainer_step_reports_loss_and_grad_norm_of_its_micro_batches():
    """Trainer.step over two micro-batches: the mean of their losses and the norm of the mean gradient,
    as one process computes them by hand on a copy of the model, then one optimizer update."""
    import copy

    from lctrain.train.trainer import Trainer

    cfg = load_config(None, [*TINY, "train.grad_clip=0"])
    trainer = Trainer(cfg, torch.device("cpu"), data=False)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 2, 33), generator=g)
    batches = [{"input_ids": x[:, :-1], "labels": x[:, 1:]} for x in ids]
    ref = copy.deepcopy(trainer.model)
    shares = [lm_loss(ref, b["input_ids"], b["labels"]) for b in batches]
    (sum(loss for loss, _ in shares) / 2).backward()
    want_norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in ref.parameters() if p.grad is not None))
    metrics = trainer.step(batches)
    assert metrics.step == trainer.step_count == 1
    assert metrics.loss == pytest.approx(float(sum(mean for _, mean in shares) / 2), rel=1e-6)
    assert metrics.grad_norm == pytest.approx(float(want_norm), rel=1e-5)
    assert metrics.lr == pytest.approx(cfg.train.lr * lr_factor(0, warmup_steps=1, total_steps=3,
                                                                min_lr_ratio=cfg.train.min_lr_ratio))
    assert all(p.grad is None for p in trainer.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(trainer.model.parameters(), ref.parameters()))


def test_no_weight_decay_on_norms_biases_embeddings():
    model = torch.nn.ModuleDict({"emb": torch.nn.Embedding(10, 4), "lin": torch.nn.Linear(4, 4),
                                 "norm": torch.nn.LayerNorm(4)})
    groups = param_groups(model, 0.1)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(model["lin"].weight)}
    assert sum(len(g["params"]) for g in groups) == 5


# ---------------------------------------------------------------- the job, checkpoints, resume
class _Crash(Exception):
    pass


def test_train_writes_checkpoint_and_resume_continues(tmp_path, parts, monkeypatch):
    from lctrain.train import trainer

    full, split = tmp_path / "full", tmp_path / "split"
    assert _run(parts, full, "train.steps=5") == 0
    assert ckpt_mod.latest_checkpoint(full).name == "step_5"
    # the split run dies right after its step-3 checkpoint ...
    real_save = trainer.save_checkpoint

    def save_then_crash(*args, **kwargs):
        path = real_save(*args, **kwargs)
        raise _Crash(path)

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_crash)
    with pytest.raises(_Crash):
        _run(parts, split, "train.steps=5", "train.ckpt_every=3")
    monkeypatch.setattr(trainer, "save_checkpoint", real_save)
    ckpt = ckpt_mod.latest_checkpoint(split)
    assert ckpt is not None and ckpt.name == "step_3"
    assert (split / "config.yaml").is_file() and not list((split / "ckpt").glob("*.tmp"))
    assert torch.load(ckpt / "rank0.pt", weights_only=False)["loader"] is not None
    # ... and resuming continues at step 4 from the same loader position: the same losses and LRs
    assert _run(parts, split, "train.steps=5", "train.ckpt_every=3") == 0
    full_m, split_m = _metrics(full), _metrics(split)
    # each step once, and the restart marked where it happened
    assert [(m.get("event"), m["step"]) for m in split_m] == [(None, 1), (None, 2), (None, 3), ("resume", 3), (None, 4),
                                                              (None, 5)]
    split_m = [m for m in split_m if "event" not in m]
    for a, b in zip(full_m, split_m):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a, b)
        assert a["lr"] == pytest.approx(b["lr"])
    assert ckpt_mod.latest_checkpoint(split).name == "step_5"


def test_save_final_false_writes_no_checkpoint_at_the_end(tmp_path, parts, capsys):
    """train.save_final=false (what `lctrain bench layouts` runs with): no save after the last step, but the
    saves by steps still happen, and the done line says so."""
    assert _run(parts, tmp_path / "none", "train.steps=2", "train.save_final=false") == 0
    assert ckpt_mod.latest_checkpoint(tmp_path / "none") is None
    assert "no final checkpoint (train.save_final=false" in capsys.readouterr().out
    assert _run(parts, tmp_path / "by_steps", "train.steps=3", "train.ckpt_every=2", "train.save_final=false") == 0
    assert ckpt_mod.latest_checkpoint(tmp_path / "by_steps").name == "step_2"


def test_resume_refuses_a_different_model(tmp_path, parts, capsys):
    assert _run(parts, tmp_path, "train.steps=1") == 0
    assert _run(parts, tmp_path, "train.steps=2", "model.d_model=48") == 2
    err = capsys.readouterr().err
    assert "model.d_model" in err and "train.resume=false" in err


def test_load_model_for_eval_without_distributed(tmp_path, parts):
    import torch.distributed as dist

    assert _run(parts, tmp_path, "train.steps=2") == 0
    assert not (dist.is_available() and dist.is_initialized())
    for where in (tmp_path, tmp_path / "ckpt", tmp_path / "ckpt" / "latest", tmp_path / "ckpt" / "step_2"):
        model, cfg = ckpt_mod.load_model_for_eval(where, "cpu")
        assert cfg.model.d_model == 32 and not model.training
    # the loaded weights are the trained ones, not a fresh init
    from lctrain.models import build_model

    fresh = build_model(cfg.model)
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    with pytest.raises(ckpt_mod.CheckpointError, match="not a checkpoint"):
        ckpt_mod.load_model_for_eval(tmp_path / "nowhere")


def test_failed_save_leaves_previous_checkpoint_loadable(tmp_path, parts, monkeypatch):
    assert _run(parts, tmp_path, "train.steps=2") == 0
    before = ckpt_mod.latest_checkpoint(tmp_path)
    real_save = ckpt_mod.dcp.save

    def crash_midway(state, checkpoint_id):
        real_save(state, checkpoint_id=checkpoint_id)  # files written into step_4.tmp ...
        raise OSError("disk full")  # ... then the save dies before the rename

    monkeypatch.setattr(ckpt_mod.dcp, "save", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        _run(parts, tmp_path, "train.steps=4")
    assert (tmp_path / "ckpt" / "step_4.tmp").is_dir()
    assert ckpt_mod.latest_checkpoint(tmp_path) == before
    model, _ = ckpt_mod.load_model_for_eval(tmp_path)
    monkeypatch.setattr(ckpt_mod.dcp, "save", real_save)
    assert _run(parts, tmp_path, "train.steps=4") == 0  # the stale .tmp is cleaned up by the next save
    assert ckpt_mod.latest_checkpoint(tmp_path).name == "step_4"
    assert not (tmp_path / "ckpt" / "step_4.tmp").exists()


def test_bad_override_exits_2_before_any_work(tmp_path, capsys):
    """The config error names the key, on one line, and nothing is written (no data build, no out_dir)."""
    from lctrain.cli import main

    assert main(["train", "train.stepz=3", f"train.out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "train.stepz" in err and "\n" not in err.strip()
    assert main(["train", "data.seq_len=100", "parallel.cp=3", f"train.out_dir={tmp_path}"]) == 2
    assert "data.seq_len" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- recipes
RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize("name", ["default.yaml", "gdn_swa_16k.yaml", "hybrid_131k_cp8.yaml",
                                  "loglinear_gdn_position_loss.yaml", "gdn_h1_1p3b.yaml", "gdn_h2_1p3b.yaml"])
def test_recipes_validate(name):
    cfg = load_config(RECIPES / name)
    if name.startswith("gdn_h"):  # the Gated DeltaNet hybrids H1 (GDN + SWA) and H2 (Mamba-2 + GDN + SWA), 1.3B class
        from lctrain.models import build_model

        with torch.device("meta"):
            n_params = build_model(cfg.model).num_parameters()
        assert cfg.model.d_model == 2048 and len(cfg.model.layer_pattern) == 24 and 1.3e9 < n_params < 1.45e9
        assert set(cfg.model.layer_pattern) == (set("GS") if "h1" in name else set("MGS"))
    if name == "gdn_swa_16k.yaml":
        assert cfg.parallel.cp == 2 and cfg.data.seq_len == 16384
    if name == "hybrid_131k_cp8.yaml":
        assert cfg.parallel.cp == 8 and cfg.data.seq_len == 131072


def test_default_recipe_mirrors_the_defaults():
    from lctrain.config import default_config

    assert OmegaConf.to_container(load_config(RECIPES / "default.yaml")) == OmegaConf.to_container(default_config())


# ---------------------------------------------------------------- CP / DP gradient semantics (2 gloo processes)
def _positionwise_model(vocab=13, dim=8):
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Embedding(vocab, dim), torch.nn.Tanh(), torch.nn.Linear(dim, vocab))


class _PosModel(torch.nn.Module):
    """Token-wise model (no mixing across positions), so a CP shard's logits need no communication."""

    def __init__(self):
        super().__init__()
        self.net = _positionwise_model()

    def forward(self, ids, position_offset=0):
        return self.net(ids)


def _grad_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    from lctrain.train.grad_comm import reduce_gradients

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 13, (2, 2, 12), generator=g)
        labels = torch.randint(0, 13, (2, 2, 12), generator=g)
        labels[0, 0, :9] = -100  # uneven valid tokens across the two CP shards
        results = {}
        # context parallel: both ranks hold halves of sequence batch 0
        model = _PosModel()
        shard = slice(rank * 6, (rank + 1) * 6)
        loss, mean = lm_loss(model, ids[0][:, shard], labels[0][:, shard], cp_group=dist.group.WORLD,
                             position_offset=rank * 6)
        loss.backward()
        reduce_gradients(list(model.parameters()), dist.group.WORLD, dp_size=1)
        results["cp_mean"] = mean
        results["cp_grads"] = [p.grad.clone() for p in model.parameters()]
        # data parallel: rank r holds sequence batch r
        model = _PosModel()
        loss, mean = lm_loss(model, ids[rank], labels[rank])
        loss.backward()
        reduce_gradients(list(model.parameters()), dist.group.WORLD, dp_size=2)
        results["dp_grads"] = [p.grad.clone() for p in model.parameters()]
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_cp_and_dp_gradients_match_one_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_grad_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 13, (2, 2, 12), generator=g)
    labels = torch.randint(0, 13, (2, 2, 12), generator=g)
    labels[0, 0, :9] = -100
    model = _PosModel()
    loss, _ = lm_loss(model, ids[0], labels[0])
    loss.backward()
    want_cp = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    dp_losses = [lm_loss(model, ids[r], labels[r])[0] for r in range(2)]
    (sum(dp_losses) / 2).backward()
    want_dp = [p.grad.clone() for p in model.parameters()]
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["cp_mean"], loss.detach())
        for a, b in zip(got["cp_grads"], want_cp):
            torch.testing.assert_close(a, b)
        for a, b in zip(got["dp_grads"], want_dp):
            torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- self-launched context parallelism
@pytest.mark.slow
def test_cp2_self_launch_runs_two_steps(tmp_path, data_cache):
    """`lctrain train parallel.cp=2` with no torchrun around it starts 2 gloo processes itself."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "lctrain.cli", "train", *TINY, "model.layer_pattern=GSMA", "parallel.cp=2",
           "train.steps=2", f"train.out_dir={out}", f"data.cache_dir={data_cache}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "launching 2 local processes" in proc.stdout
    assert "(dp 1 x cp 2 x tp 1 x pp 1)" in proc.stdout
    steps = _metrics(out)
    assert [m["step"] for m in steps] == [1, 2] and all(math.isfinite(m["loss"]) for m in steps)
    ckpt = ckpt_mod.latest_checkpoint(out)
    assert ckpt.name == "step_2" and {p.name for p in ckpt.glob("rank*.pt")} == {"rank0.pt", "rank1.pt"}
    # both ranks resume from it
    proc = subprocess.run([*cmd[:-3], "train.steps=3", *cmd[-2:]], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and [m["step"] for m in _metrics(out) if "event" not in m] == [1, 2, 3]


def test_cpu_threads_policy_ignores_the_machine_load(monkeypatch):
    """Issue 17 (7): the thread count used to follow the load average (and drop mid-run), so the same
    seed gave different losses; now it is OMP_NUM_THREADS or the cores per local rank, whatever the load."""
    from lctrain.train import device

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert device.cpu_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(device.os, "cpu_count", lambda: 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    for load in (0.5, 9.0):
        monkeypatch.setattr(device.os, "getloadavg", lambda load=load: (load, load, load))
        assert device.cpu_threads() == 4
    assert not hasattr(device, "CpuThreadsGuard")  # nothing changes the count mid-run


# ---------------------------------------------------------------- tensor parallelism and resharding
def _losses(out_dir: Path) -> list[float]:
    return [m["loss"] for m in _metrics(out_dir) if "loss" in m]  # step records (not the restart notes)


def _grad_norms(out_dir: Path) -> list[float]:
    """Each step's global gradient norm (TP shards' squares summed over the group, replicated ones once)."""
    return [m["grad_norm"] for m in _metrics(out_dir) if "grad_norm" in m]


TP_MODEL = ["model.layer_pattern=GSMA", "model.n_heads=4", "model.attn_heads=4", "model.head_dim=8",
            "model.attn_head_dim=8"]


@pytest.mark.parametrize("bad, key", [
    (["model.n_heads=3", "parallel.tp=2"], "model.n_heads"),
    (["model.attn_heads=3", "parallel.tp=2"], "model.attn_heads"),
    (["model.vocab_size=259", "parallel.tp=2"], "model.vocab_size"),
    (["parallel.pp=3"], "parallel.pp"),  # 2 layers, 3 stages
    (["parallel.tp=2", "parallel.nproc_per_node=3"], "parallel.nproc_per_node"),
    (["parallel.sequence_parallel=true"], "parallel.sequence_parallel"),  # needs tp > 1: refused, not ignored
    (["train.init_from=/nonexistent/run"], "train.init_from"),
])
def test_bad_layouts_exit_2_before_any_work(tmp_path, capsys, bad, key):
    from lctrain.cli import main

    assert main(["train", *TINY, *bad, f"train.out_dir={tmp_path}"]) == 2
    assert key in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def _launch(data_cache, out_dir: Path, *overrides: str) -> str:
    """`lctrain train TINY overrides` in a subprocess that launches its own gloo ranks; its stdout."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "lctrain.cli", "train", *TINY, *overrides, f"train.out_dir={out_dir}",
           f"data.cache_dir={data_cache}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


# the layer kinds of TP_MODEL's complement: log-linear (level weights split with their heads), Deltaformer,
# and a global layer with multi-head latent attention (heads split, latent replicated)
TP_MODEL_REST = ["model.layer_pattern=LKFA", "model.n_heads=4", "model.attn_heads=4", "model.head_dim=8",
                 "model.attn_head_dim=8", "model.loglinear_levels=6", "model.mla_kv_rank=8", "model.mla_rope_dim=4",
                 "model.attn_conv_size=0"]


@pytest.mark.slow
def test_tp2_cli_log_linear_deltaformer_mla_with_chunked_loss_equal_one_process(tmp_path, parts, data_cache):
    """`lctrain train parallel.tp=2` (2 gloo processes) on L, K, F and MLA layers, with the vocab-parallel
    loss in sequence chunks, logs the losses and gradient norms of the one-process run with the whole
    logits; each rank holds about half the parameters; its checkpoint loads in one process with the
    one-process run's weights."""
    ref = tmp_path / "ref"
    assert _run(parts, ref, *TP_MODEL_REST, "train.steps=2") == 0
    out = tmp_path / "tp2"
    stdout = _launch(data_cache, out, *TP_MODEL_REST, "parallel.tp=2", "train.steps=2", "train.loss_chunk_tokens=24")
    assert "(dp 1 x cp 1 x tp 2" in stdout
    n_all, n_rank = (float(x) for x in
                     __import__("re").search(r"([\d.]+)M parameters \(([\d.]+)M per rank\)", stdout).groups())
    assert 0.45 * n_all <= n_rank <= 0.56 * n_all, stdout
    assert _losses(out) == pytest.approx(_losses(ref), rel=1e-5)
    assert _grad_norms(out) == pytest.approx(_grad_norms(ref), rel=1e-5)
    # the checkpoint holds full tensors (level weights, Deltaformer and MLA shards gathered): one process
    # loads it, and the weights are the one-process run's. Adam's first steps move every weight by ~lr
    # whatever its gradient's size, so float32 rounding of small gradients shows up to ~3e-5 (0.3% of
    # one step); a shard out of place would move weights by their own size (~0.4)
    got, want = ckpt_mod.load_model_for_eval(out)[0].state_dict(), ckpt_mod.load_model_for_eval(ref)[0].state_dict()
    assert got["blocks.0.mixer.l_bias"].shape == want["blocks.0.mixer.l_bias"].shape == (4, 6)
    assert set(got) == set(want)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-4, msg=name)


def test_tp2_sequence_parallel_cli_losses_equal_one_process(tmp_path, parts, data_cache):
    """`lctrain train parallel.tp=2 parallel.sequence_parallel=true` (2 gloo processes, checkpointed
    blocks, the chunked loss) logs the losses and gradient norms of the one-process run."""
    common = [*TP_MODEL, "train.steps=2", "model.activation_checkpointing=full", "train.loss_chunk_tokens=24"]
    ref = tmp_path / "ref"
    assert _run(parts, ref, *common) == 0
    out = tmp_path / "tp2sp"
    stdout = _launch(data_cache, out, *common, "parallel.tp=2", "parallel.sequence_parallel=true")
    assert "(dp 1 x cp 1 x tp 2 sequence-parallel x pp 1)" in stdout
    assert _losses(out) == pytest.approx(_losses(ref), rel=1e-5)
    assert _grad_norms(out) == pytest.approx(_grad_norms(ref), rel=1e-5)


@pytest.mark.slow
def test_tp2_cp2_cli_losses_equal_one_process_and_resume_with_tp1(tmp_path, parts, data_cache, capsys):
    """`lctrain train parallel.tp=2 parallel.cp=2` (4 gloo processes) logs the losses of the
    one-process run; its checkpoint loads for evals in one process and resumes with tp=cp=1, and with
    pp=2 (2 pipeline stages), the next step's loss equal to the one of the run that never stopped;
    `train.init_from` starts a new run from those weights (another RoPE base)."""
    ref = tmp_path / "ref"
    assert _run(parts, ref, *TP_MODEL) == 0
    assert "parameters (" in capsys.readouterr().out
    ref_losses = _losses(ref)

    out = tmp_path / "tp2cp2"
    stdout = _launch(data_cache, out, *TP_MODEL, "parallel.tp=2", "parallel.cp=2", "train.steps=2")
    assert "(dp 1 x cp 2 x tp 2 x pp 1)" in stdout
    n_all, n_rank = (float(x) for x in
                     __import__("re").search(r"([\d.]+)M parameters \(([\d.]+)M per rank\)", stdout).groups())
    assert 0.45 * n_all <= n_rank <= 0.55 * n_all, stdout
    got = _losses(out)
    assert got == pytest.approx(ref_losses[:2], rel=1e-5)
    assert _grad_norms(out) == pytest.approx(_grad_norms(ref)[:2], rel=1e-5)
    model, _ = ckpt_mod.load_model_for_eval(out)  # evals load the tp=2 x cp=2 checkpoint in one process
    assert model.embed.weight.shape == (model.cfg.vocab_size, 32) and model.tp_group is None
    shutil.copytree(out, tmp_path / "tp2cp2_then_pp2")
    assert "resumed from" in _launch(data_cache, tmp_path / "tp2cp2_then_pp2", *TP_MODEL, "parallel.pp=2")
    assert _losses(tmp_path / "tp2cp2_then_pp2")[2:] == pytest.approx(ref_losses[2:], rel=1e-5)

    assert _run(parts, out, *TP_MODEL) == 0  # resume with tp=1, cp=1 for step 3
    assert "resumed from" in capsys.readouterr().out
    assert _losses(out)[2:] == pytest.approx(ref_losses[2:], rel=1e-5)

    new = tmp_path / "init_from"
    assert _run(parts, new, *TP_MODEL, "train.steps=1", f"train.init_from={out}", "model.rope.base=20000") == 0
    assert "weights from" in capsys.readouterr().out
    assert len(_losses(new)) == 1


@pytest.mark.slow
def test_cp2_pp2_cli_losses_equal_one_process_and_resume_with_pp1(tmp_path, parts, data_cache, capsys):
    """`lctrain train parallel.cp=2 parallel.pp=2` (4 gloo processes, 2 pipeline stages, each step's 2
    micro-batches through megatron-core's 1F1B schedule) logs the losses of the one-process run and
    counts the one-process model's parameters; its checkpoint resumes with pp=1, the next step's loss
    equal to the run that never stopped."""
    ref = tmp_path / "ref"
    assert _run(parts, ref, *TP_MODEL, "train.grad_accum=2") == 0
    n_ref = float(__import__("re").search(r"([\d.]+)M parameters", capsys.readouterr().out).group(1))
    ref_losses = _losses(ref)

    out = tmp_path / "cp2pp2"
    stdout = _launch(data_cache, out, *TP_MODEL, "train.grad_accum=2", "parallel.cp=2", "parallel.pp=2",
                     "train.steps=2")
    assert "(dp 1 x cp 2 x tp 1 x pp 2)" in stdout
    n_all, fewest, most = (float(x) for x in __import__("re").search(
        r"([\d.]+)M parameters \(([\d.]+)M to ([\d.]+)M per rank\)", stdout).groups())
    assert n_all == n_ref and 0.45 * n_all < fewest < most < 0.6 * n_all, stdout  # the tied table on both ends
    assert _losses(out) == pytest.approx(ref_losses[:2], rel=1e-5)
    model, _ = ckpt_mod.load_model_for_eval(out)  # the stages' parts make the whole model for evals
    assert len(model.blocks) == 4 and model.lm_head.weight is model.embed.weight

    assert _run(parts, out, *TP_MODEL, "train.grad_accum=2") == 0  # resume with pp=1, cp=1 for step 3
    assert "resumed from" in capsys.readouterr().out
    assert _losses(out)[2:] == pytest.approx(ref_losses[2:], rel=1e-5)
