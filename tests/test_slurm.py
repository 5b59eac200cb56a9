"""jobs/*.sbatch on a real single-node Slurm (scripts/slurm-local.sh), as users submit them.

Run by scripts/test.sh after it starts the local Slurm (pytest -m slurm, SLURM_CONF set).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

import h5py
import numpy as np
import pytest

pytestmark = pytest.mark.slurm


class Slurm:
    """sbatch / scontrol against the local cluster, from the repository root."""

    def __init__(self, root):
        self.root = root

    def sbatch(self, script, env=None, wait=True, timeout=600):
        cmd = ["sbatch", "--parsable"] + (["--wait"] if wait else []) + [script]
        e = dict(os.environ, **(env or {}))
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=self.root, env=e, timeout=timeout)
        job = r.stdout.strip().split(";")[0]
        return job, r.returncode

    @staticmethod
    def job_info(job) -> dict:
        out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
        return dict(re.findall(r"(\w+)=(\S+)", out))

    def log_of(self, job, name="mpitrain-digits"):
        return (self.root / "runs" / f"slurm-{name}-{job}.out").read_text()


@pytest.fixture(scope="module")
def slurm(repo_root):
    if not os.environ.get("SLURM_CONF"):
        pytest.fail("SLURM_CONF is not set: start the cluster with scripts/slurm-local.sh start")
    (repo_root / "runs").mkdir(exist_ok=True)
    subprocess.run(["bash", "scripts/slurm-local.sh", "start"], cwd=repo_root, check=True, capture_output=True)
    return Slurm(repo_root)


def last_row(run):
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])


def short(run, *more):
    return {"MPITRAIN_SET": f"--set output.dir={run} --set train.progress=false --set model.name=mlp "
                            f"--set model.hidden=[32] " + " ".join(more)}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("launch", ["srun", "mpirun"])
def test_digits_job(slurm, tmp_path, launch):
    job, rc = slurm.sbatch("jobs/digits.sbatch", {"LAUNCH": launch, **short(tmp_path / "run", "--set train.epochs=3")})
    assert rc == 0, slurm.log_of(job)[-3000:]
    info = slurm.job_info(job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0" and info["NumTasks"] == "4"
    row = last_row(tmp_path / "run")
    assert row["epoch"] == 3 and row["ranks"] == 4 and row["test_acc"] > 0.8
    assert f"{'srun --mpi=pmix' if launch == 'srun' else 'mpirun -n 4'}" in slurm.log_of(job)


@pytest.mark.timeout(600)
def test_synthetic_job(slurm, tmp_path):
    env = {"MPITRAIN_DATA": str(tmp_path / "syn.h5"), "MPITRAIN_SAMPLES": "4000",
           **short(tmp_path / "run", f"--set data.path={tmp_path / 'syn.h5'} --set train.epochs=1")}
    job, rc = slurm.sbatch("jobs/synthetic.sbatch", env)
    assert rc == 0, slurm.log_of(job, "mpitrain-synthetic")[-3000:]
    with h5py.File(tmp_path / "syn.h5", "r") as f:
        assert f["train/x"].shape == (4000, 784)
    assert last_row(tmp_path / "run")["ranks"] == 4


@pytest.mark.timeout(600)
def test_compare_job(slurm, tmp_path, repo_root):
    spec = tmp_path / "cmp.toml"
    spec.write_text(f'job = "{repo_root}/jobs/digits.toml"\nout = "{tmp_path}/cmp"\n'
                    'set = ["train.epochs=1", "model.name=mlp", "train.progress=false"]\n'
                    '[[run]]\nname = "allreduce"\nset = ["sync.strategy=allreduce"]\n'
                    '[[run]]\nname = "local_sgd"\nset = ["sync.strategy=local_sgd"]\n')
    job, rc = slurm.sbatch("jobs/compare.sbatch", {"MPITRAIN_COMPARE": str(spec)})
    assert rc == 0, slurm.log_of(job, "mpitrain-compare")[-3000:]
    for name in ("table.md", "table.csv", "accuracy_vs_time.png", "accuracy_vs_epoch.png"):
        assert (tmp_path / "cmp" / name).is_file()


@pytest.mark.timeout(600)
def test_bad_config_fails_fast_without_requeue(slurm, tmp_path):
    job, rc = slurm.sbatch("jobs/digits.sbatch", short(tmp_path / "run", "--set train.epochs=-1"))
    assert rc == 2
    info = slurm.job_info(job)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0"
    errors = [ln for ln in slurm.log_of(job).splitlines() if ln.startswith("mpitrain: error:")]
    assert errors == ["mpitrain: error: jobs/digits.toml (with --set): train.epochs: expected a value > 0, got -1"]


@pytest.mark.timeout(900)
def test_preemption_checkpoints_requeues_and_resumes(slurm, tmp_path, wait_for):
    """USR1 to the batch shell (what --signal=B:USR1 sends) -> checkpoint, exit 75, requeue;
    the second run resumes from the checkpoint and ends where an uninterrupted run ends,
    with the same parameters."""
    run, ref = tmp_path / "run", tmp_path / "ref"
    # rank 0 sleeps 100x its compute time so the signal surely lands mid-run (~0.1 s/step);
    # sleeping changes no arithmetic, so the parameters must still match bit for bit
    steps = ("--set train.epochs=50 --set train.max_steps=120 --set output.checkpoint_every=10 "
             "--set train.slowdown_rank=0 --set train.slowdown_factor=100")
    job, _ = slurm.sbatch("jobs/digits.sbatch", short(run, steps), wait=False)
    wait_for(lambda: list(run.glob("ckpt-*.h5")), 300, "the first checkpoint")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    wait_for(lambda: slurm.job_info(job).get("JobState") == "PENDING", 120, "the requeue")
    info = slurm.job_info(job)
    assert info["Restarts"] == "1", info
    log = slurm.log_of(job)
    stopped = int(re.search(r"stopped by SIGUSR1 after step (\d+)", log).group(1))
    assert 0 < stopped < 120 and (run / f"ckpt-{stopped:09d}.h5").is_file()
    # let the old step's processes finish, then start the requeued job now (not in ~2 min)
    wait_for(lambda: not subprocess.run(["squeue", "-h", "-s", "-j", job], capture_output=True,
                                        text=True).stdout.strip(), 60, "the old job step to end")
    time.sleep(3)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
    wait_for(lambda: slurm.job_info(job).get("JobState") in ("COMPLETED", "FAILED"), 600, "the second run")
    assert slurm.job_info(job)["JobState"] == "COMPLETED", slurm.log_of(job)[-3000:]
    log = slurm.log_of(job)
    assert f"resuming from step {stopped}" in log and "restart 1:" in log
    assert last_row(run)["step"] == 120
    job2, rc = slurm.sbatch("jobs/digits.sbatch", short(ref, steps))
    assert rc == 0
    final = [sorted(d.glob("ckpt-*.h5"))[-1] for d in (run, ref)]
    assert [p.name for p in final] == ["ckpt-000000120.h5"] * 2
    with h5py.File(final[0], "r") as a, h5py.File(final[1], "r") as b:
        for k in a["model"]:
            assert np.array_equal(a["model"][k][()], b["model"][k][()]), k
