"""Tests of `lctrain submit`: the rendered sbatch script, the checks before rendering, and real
submissions to a single-node Slurm cluster (.ci/slurm_setup.sh starts one; CI runs it).

The tests marked `slurm` need that cluster. They fail, with the fix in the message, when sbatch is
missing; set LCTRAIN_NO_SLURM=1 to skip them on a machine without Slurm.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lctrain.config import load_config
from lctrain.submit import SubmitError, render
from lctrain.submit import main as submit_main

REPO = Path(__file__).resolve().parent.parent
TINY = [
    "model.d_model=32", "model.layer_pattern=GS", "model.n_heads=2", "model.head_dim=16",
    "model.attn_heads=2", "model.attn_head_dim=16", "model.window=16", "model.chunk_size=16",
    "data.seq_len=32", "data.micro_batch_size=2", "train.warmup_steps=1", "train.log_every=1",
    "train.progress=false", "train.tensorboard=false",
]
JOB_WAIT_S = 300



def slurm_test(fn):
    """Marked `slurm`; skipped only when LCTRAIN_NO_SLURM=1 (a missing cluster is a failure)."""
    fn = pytest.mark.skipif(os.environ.get("LCTRAIN_NO_SLURM") == "1", reason="LCTRAIN_NO_SLURM=1")(fn)
    return pytest.mark.slurm(fn)


def _submit(args: list[str], capsys) -> tuple[int, str, str]:
    rc = submit_main(args)
    out, err = capsys.readouterr()
    return rc, out, err


def _fake_slurm_tools(bin_dir: Path, record: Path) -> None:
    """`scontrol show hostnames` prints two nodes; `srun` records its argv, one argument a line."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'node-a\\nnode-b\\n'\n")
    (bin_dir / "srun").write_text(
        f"#!/bin/sh\n: > {record}\nfor a in \"$@\"; do printf '%s\\n' \"$a\" >> {record}; done\n"
        f"env | grep -E '^(NCCL_NVLS_ENABLE|DS_ACCELERATOR|MASTER_ADDR|MASTER_PORT)=' | sort > {record}.env\n"
    )
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)


def _run_script_with_fakes(script: Path, tmp_path: Path, *, nodes: int,
                           cpus: str | None = None) -> tuple[list[str], dict]:
    """Execute the rendered script with fake srun/scontrol and Slurm's job variables; -> (srun argv, env)."""
    record = tmp_path / "srun_args.txt"
    _fake_slurm_tools(tmp_path / "fakebin", record)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NCCL_", "DS_ACCELERATOR", "MASTER_"))}
    env.update(PATH=f"{tmp_path / 'fakebin'}:{env['PATH']}", SLURM_JOB_ID="4242", SLURM_NNODES=str(nodes),
               SLURM_JOB_NUM_NODES=str(nodes), SLURM_JOB_NODELIST="node-[a-b]")
    if cpus:
        env["SLURM_CPUS_PER_TASK"] = cpus
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    job_env = dict(line.split("=", 1) for line in (tmp_path / "srun_args.txt.env").read_text().splitlines())
    return record.read_text().splitlines(), job_env


def _option(argv: list[str], name: str) -> str:
    assert name in argv, f"{name} missing from {argv}"
    return argv[argv.index(name) + 1]


# ---------------------------------------------------------------- rendering (dry run)
def test_dry_run_gpu_script_is_valid_bash_with_the_right_torchrun(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out_dir = tmp_path / "run"
    rc, out, err = _submit([
        str(REPO / "recipes" / "default.yaml"), "parallel.cp=2", "train.steps=7", "--nodes", "2",
        "--gpus-per-node", "4", "--partition", "gpu", "--time", "02:00:00", "--account", "proj1",
        "--output-dir", str(out_dir), "--dry-run",
    ], capsys)
    assert rc == 0, err
    script, config = out_dir / "slurm" / "job.sbatch", out_dir / "slurm" / "config.yaml"
    assert str(script) in out and "not submitted" in out
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    directives = re.findall(r"^#SBATCH (\S+)$", text, flags=re.M)
    for want in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=4", "--partition=gpu", "--time=02:00:00",
                 "--account=proj1", "--requeue", f"--output={out_dir}/slurm/%j.out", "--open-mode=append"):
        assert want in directives, (want, directives)
    assert "{{" not in text and not re.search(r"^##", text, flags=re.M)

    argv, job_env = _run_script_with_fakes(script, tmp_path, nodes=2)
    # srun: one task per node, then torchrun with the c10d rendezvous on the first node
    assert argv[:2] == ["--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    torchrun = argv[2]
    assert Path(torchrun).name == "torchrun" or argv[2:5] == [sys.executable, "-m", "torch.distributed.run"]
    assert _option(argv, "--nnodes") == "2"
    assert _option(argv, "--nproc-per-node") == "4"
    assert _option(argv, "--rdzv-backend") == "c10d"
    assert _option(argv, "--rdzv-endpoint") == "node-a:29500"
    assert _option(argv, "--rdzv-id") == "4242"
    assert argv[-4:] == ["-m", "lctrain.cli", "train", str(config)]
    assert job_env["NCCL_NVLS_ENABLE"] == "0" and job_env["MASTER_ADDR"] == "node-a"
    assert "DS_ACCELERATOR" not in job_env

    # the config the job trains with: the resolved one, with an absolute out_dir, and it validates
    cfg = load_config(config)
    assert cfg.parallel.cp == 2 and cfg.train.steps == 7 and cfg.train.out_dir == str(out_dir)
    assert cfg.train.device == "auto" and cfg.parallel.dist_backend == "auto"


def test_cpu_job_uses_gloo_and_cp_tp_pp_processes(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, err = _submit([*TINY, "parallel.cp=2", "train.out_dir=relative_run", "--gpus-per-node", "0",
                            "--port", "29611", "--dry-run"], capsys)
    assert rc == 0, err
    out_dir = tmp_path / "relative_run"  # relative out_dir resolved against the submitting directory
    script = out_dir / "slurm" / "job.sbatch"
    text = script.read_text()
    assert "#SBATCH --gpus-per-node" not in text
    assert re.search(r"^#SBATCH --cpus-per-task=2$", text, flags=re.M)
    argv, job_env = _run_script_with_fakes(script, tmp_path, nodes=1, cpus="2")
    assert argv[2] == "--cpus-per-task=2"  # the step gets the job's CPUs
    assert _option(argv, "--nproc-per-node") == "2" and _option(argv, "--nnodes") == "1"
    assert _option(argv, "--rdzv-endpoint") == "node-a:29611"
    assert job_env["DS_ACCELERATOR"] == "cpu" and job_env["NCCL_NVLS_ENABLE"] == "0"
    cfg = load_config(out_dir / "slurm" / "config.yaml")
    assert cfg.train.device == "cpu" and cfg.parallel.dist_backend == "gloo"
    assert cfg.train.out_dir == str(out_dir)


def test_render_refuses_unfilled_placeholders():
    with pytest.raises(SubmitError, match="nodes"):
        render("#!/bin/bash\n## {{ documented }} is fine\n#SBATCH --nodes={{ nodes }}\n", {})
    assert render("#!/bin/bash\n## doc {{ x }}\necho {{ a }}\n", {"a": "1"}) == "#!/bin/bash\necho 1\n"


# ---------------------------------------------------------------- errors, before anything is written
@pytest.mark.parametrize("args, words", [
    (["parallel.cp=4", "data.seq_len=256", "model.window=16", "--nodes", "1", "--gpus-per-node", "6"],
     ["--gpus-per-node 6", "parallel.cp*tp*pp", "= 4", "--nodes"]),
    (["parallel.cp=2", "parallel.tp=2", "data.seq_len=256", "model.window=16", "--nodes", "3", "--gpus-per-node", "2"],
     ["--nodes 3", "= 6 processes", "= 2*2*1 = 4"]),
    (["parallel.cp=2", "data.seq_len=256", "model.window=16", "parallel.nproc_per_node=3", "--gpus-per-node", "0"],
     ["parallel.nproc_per_node", "3 processes do not factor into tp*cp*pp"]),  # the config check comes first
    (["parallel.nproc_per_node=4", "--gpus-per-node", "8"], ["parallel.nproc_per_node=4", "--gpus-per-node 8"]),
    (["parallel.pp=2", "--nodes", "2", "--gpus-per-node", "2"], ["= 4 would be 2 data-parallel", "parallel.pp=1"]),
    (["train.device=cuda", "--gpus-per-node", "0"], ["train.device=cuda", "--gpus-per-node"]),
    (["train.device=cpu", "--gpus-per-node", "8"], ["train.device=cpu", "--gpus-per-node 0"]),
    (["--nodes", "0"], ["--nodes"]),
    (["model.layer_pattern=GX"], ["model.layer_pattern", "'X'"]),  # the config is validated first
    (["model.no_such_key=1"], ["no_such_key"]),
    (["--time", "two hours"], ["--time", "HH:MM:SS"]),
    (["--sbatch-arg", "qos=high"], ["--sbatch-arg", "--qos=high"]),
])
def test_bad_requests_exit_2_naming_the_fix_and_write_nothing(tmp_path, capsys, args, words):
    out_dir = tmp_path / "run"
    rc, out, err = _submit([*args, "--output-dir", str(out_dir), "--dry-run"], capsys)
    assert rc == 2, (out, err)
    for word in words:
        assert word in err, (word, err)
    assert not (out_dir / "slurm").exists()


def test_missing_sbatch_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    rc, out, err = _submit([*TINY, "--gpus-per-node", "0", "--output-dir", str(tmp_path / "run")], capsys)
    assert rc == 2 and "sbatch not found" in err and "--dry-run" in err


def test_cli_routes_submit(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lctrain.cli", "submit", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "--gpus-per-node" in proc.stdout and "--dry-run" in proc.stdout


# ---------------------------------------------------------------- real submissions (single-node cluster)
def _require_cluster() -> None:
    if subprocess.run(["sh", "-c", "command -v sbatch"], capture_output=True).returncode != 0:
        pytest.fail("sbatch is not installed: run `sudo bash .ci/slurm_setup.sh` (a one-node cluster), "
                    "or set LCTRAIN_NO_SLURM=1 to skip the Slurm tests")
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    if "is UP" not in ping.stdout:
        pytest.fail(f"no Slurm controller answers ({ping.stdout.strip() or ping.stderr.strip()}); "
                    "run `sudo bash .ci/slurm_setup.sh` or set LCTRAIN_NO_SLURM=1")


def _job_state(job_id: str) -> str | None:
    proc = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True)
    match = re.search(r"\bJobState=(\S+)", proc.stdout)
    return match.group(1) if match else None  # None: the controller forgot the job (long finished)


def _wait(job_id: str, log: Path) -> str:
    """Wait for the job to end (bounded); -> its final state. Cancels it on time-out."""
    deadline = time.monotonic() + JOB_WAIT_S
    while time.monotonic() < deadline:
        state = _job_state(job_id)
        if state not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED"):
            return state or "GONE"
        time.sleep(1)
    subprocess.run(["scancel", job_id])
    tail = log.read_text()[-3000:] if log.exists() else "(no log)"
    pytest.fail(f"job {job_id} did not finish in {JOB_WAIT_S} s (state {_job_state(job_id)}); log:\n{tail}")


def _submitted_job_id(out: str) -> str:
    match = re.search(r"submitted job (\d+)", out)
    assert match, out
    return match.group(1)


PROBE = """\
import os, torch, torch.distributed as dist
dist.init_process_group("gloo")
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
with open(os.path.join(os.environ["PROBE_DIR"], f"rank{dist.get_rank()}.txt"), "w") as f:
    f.write(" ".join([str(dist.get_world_size()), str(int(t.item())), os.environ["LOCAL_RANK"],
                      os.environ.get("NCCL_NVLS_ENABLE", "-"), os.environ.get("DS_ACCELERATOR", "-")]))
dist.destroy_process_group()
"""


@slurm_test
def test_slurm_rendered_job_runs_a_two_process_gloo_world(tmp_path, capsys, monkeypatch):
    """The launch machinery alone: the rendered script, its training command swapped for a probe
    that all-reduces over the torchrun world srun started. Separates Slurm trouble from training trouble."""
    _require_cluster()
    monkeypatch.chdir(tmp_path)
    out_dir = tmp_path / "run"
    rc, out, err = _submit([*TINY, "parallel.cp=2", "--gpus-per-node", "0", "--port", "29571",
                            "--output-dir", str(out_dir), "--dry-run"], capsys)
    assert rc == 0, err
    script = out_dir / "slurm" / "job.sbatch"
    (tmp_path / "probe.py").write_text(PROBE)
    text = script.read_text()
    assert "-m lctrain.cli train " in text
    script.write_text(re.sub(r"-m lctrain\.cli train \S+", shlex.quote(str(tmp_path / "probe.py")), text))
    env = {**os.environ, "PROBE_DIR": str(tmp_path)}
    proc = subprocess.run(["sbatch", "--parsable", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().split(";")[0]
    log = out_dir / "slurm" / f"{job_id}.out"
    state = _wait(job_id, log)
    assert state in ("COMPLETED", "GONE"), (state, log.read_text() if log.exists() else "")
    ranks = sorted(p.read_text().split() for p in tmp_path.glob("rank*.txt"))
    # world of 2, all-reduce of 1 + 2, one local rank each, NVLS off and the CPU accelerator exported
    assert ranks == [["2", "3", "0", "0", "cpu"], ["2", "3", "1", "0", "cpu"]], log.read_text()
    assert f"job {job_id} (restart 0)" in log.read_text()


@slurm_test
def test_slurm_submit_trains_two_steps_and_checkpoints(tmp_path, capsys, monkeypatch):
    """`lctrain submit` for real: a tiny CPU job (cp=2, 2 gloo processes) trains 2 steps and leaves ckpt/latest."""
    _require_cluster()
    monkeypatch.chdir(tmp_path)
    out_dir = tmp_path / "run"
    rc, out, err = _submit([*TINY, "model.layer_pattern=GSMA", "parallel.cp=2", "train.steps=2",
                            f"data.cache_dir={tmp_path / 'cache'}", "--gpus-per-node", "0", "--port", "29572",
                            "--time", "00:10:00", "--output-dir", str(out_dir)], capsys)
    assert rc == 0, err
    job_id = _submitted_job_id(out)
    log = out_dir / "slurm" / f"{job_id}.out"
    state = _wait(job_id, log)
    text = log.read_text() if log.exists() else "(no log)"
    assert state in ("COMPLETED", "GONE"), (state, text[-3000:])
    latest = out_dir / "ckpt" / "latest"
    assert latest.is_file(), text[-3000:]
    assert latest.read_text().strip() == "step_2"
    step = out_dir / "ckpt" / "step_2"
    assert (step / "trainer.json").is_file() and {p.name for p in step.glob("rank*.pt")} == {"rank0.pt", "rank1.pt"}
