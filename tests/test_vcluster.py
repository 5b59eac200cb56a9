"""Multi-node jobs on the virtual cluster of scripts/vcluster.sh: 2 nodes (vn1, vn2: own
network namespace, hostname and /tmp) x 2 CPUs, 1 Gbit/s NICs, a slurmd on each.

Run by scripts/test.sh's last stage (pytest -m vcluster), which brings the cluster up with
`vcluster.sh up --nodes 2 --cpus-per-node 2 --rate 1gbit`, sets SLURM_CONF and brings it down
afterwards. Every file the jobs read or write lies under the repository (runs/vcluster-test-*):
each node has its own /tmp, so pytest's tmp_path would be seen by one node only.
The cluster gives every task OMPI_MCA_osc=sm,ucx: with Open MPI 4.1 over TCP an RMA window
across nodes (mpitrain's heartbeat, the parameter-server strategies) fails otherwise
(MPI_ERR_WIN); see the top of scripts/vcluster.sh.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.vcluster

NODES = ("vn1", "vn2")
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
         "DEADLINE")
# a small fast model: test accuracy ~0.97 after 4 epochs at 4 ranks (batch 8 per rank)
SMALL = ("--set train.progress=false --set model.name=mlp --set model.hidden=[64] --set train.batch_size=8 "
         "--set optim.lr=0.1")
# each strategy family, with what it needs to pass 0.9 in 2 epochs: bmuf's default block
# momentum (1 - 1/N = 0.75) needs many more epochs (0.69 after 2, 0.72 after 4; 0.94 with 0.5)
STRATEGIES = {"allreduce": "", "ps_sync": "", "ssp": "", "async": "", "easgd_async": "", "local_sgd": "",
              "bmuf": "--set sync.bmuf.momentum=0.5"}

# Imported by every Python of a job through PYTHONPATH (set only in the test jobs' environment):
# each MPI rank of `mpitrain train` says where it runs, so the job's log shows the nodes.
SITECUSTOMIZE = '''\
import os, socket, sys
if "mpitrain" in sys.argv and "train" in sys.argv:
    _rank = os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("SLURM_PROCID"))  # mpirun, srun
    print(f"[vcluster-test] rank {_rank} on {socket.gethostname()}", file=sys.stderr, flush=True)
'''


class VCluster:
    """sbatch / scontrol against the virtual cluster, from the repository root; job logs go
    to the test's shared folder (not runs/slurm-*.out: job ids restart at 1 on every `up`)."""

    def __init__(self, root: Path, shared: Path, wait_for):
        self.root, self.shared, self.wait_for = root, shared, wait_for

    def env(self, **more) -> dict:
        return dict(os.environ, PYTHONPATH=str(self.shared / "site"), **more)

    def sbatch(self, script, env=None, args=(), wait=True, timeout=600):
        """Submit; with wait, return (job, exit code) once it ended (polled every 0.5 s:
        `sbatch --wait` polls at growing intervals and may add ~30 s)."""
        cmd = ["sbatch", "--parsable", f"--output={self.shared}/slurm-%x-%j.out", *args, str(script)]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=self.root, env=self.env(**(env or {})),
                           timeout=60)
        job = r.stdout.strip().split(";")[0]
        assert r.returncode == 0 and job, f"sbatch failed (exit {r.returncode}): {r.stderr}"
        if not wait:
            return job, None
        self.wait_for(lambda: self.job_info(job).get("JobState") in ENDED, timeout, f"job {job} to end")
        return job, int(self.job_info(job)["ExitCode"].split(":")[0])

    @staticmethod
    def job_info(job) -> dict:
        out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
        return dict(re.findall(r"(\w+)=(\S+)", out))

    def log_of(self, job, name="mpitrain-digits") -> str:
        path = self.shared / f"slurm-{name}-{job}.out"
        return path.read_text() if path.exists() else f"(no log {path})"

    def tail(self, job, name="mpitrain-digits", n=4000) -> str:
        return f"\n--- job {job} log (tail) ---\n{self.log_of(job, name)[-n:]}"


@pytest.fixture(scope="module")
def vc(repo_root, wait_for):
    conf = os.environ.get("SLURM_CONF", "")
    if not conf or "ClusterName=mpitrain-vc" not in Path(conf).read_text():
        pytest.fail("SLURM_CONF is not the virtual cluster's: run `bash scripts/vcluster.sh up --nodes 2 "
                    "--cpus-per-node 2 --rate 1gbit` and export the SLURM_CONF it prints")
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True).stdout.split()
    assert nodes[0::2] == list(NODES), f"expected nodes {NODES}, sinfo says {nodes}"
    (repo_root / "runs").mkdir(exist_ok=True)
    shared = Path(tempfile.mkdtemp(prefix="vcluster-test-", dir=repo_root / "runs"))
    (shared / "site").mkdir()
    (shared / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    subprocess.run([sys.executable, "-m", "mpitrain", "data", "digits", "--out", str(shared / "digits.h5")],
                   cwd=repo_root, check=True, capture_output=True, timeout=120)
    yield VCluster(repo_root, shared, wait_for)
    if not os.environ.get("MPITRAIN_KEEP"):  # MPITRAIN_KEEP=1: keep the logs and runs to look at
        shutil.rmtree(shared, ignore_errors=True)


def last_row(run: Path) -> dict:
    assert (run / "metrics.jsonl").is_file(), f"no {run}/metrics.jsonl"
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])


def short(vc, run, *more) -> dict:
    return {"MPITRAIN_SET": f"--set data.path={vc.shared / 'digits.h5'} --set output.dir={run} "
                            f"{SMALL} "
                            + " ".join(more)}


def ranks_by_node(log: str) -> dict:
    where: dict = {}
    for rank, host in re.findall(r"\[vcluster-test\] rank (\d+) on ([A-Za-z0-9.-]+)", log):
        where.setdefault(host, set()).add(int(rank))
    return where


@pytest.mark.timeout(240)
@pytest.mark.parametrize("launch", ["srun", "mpirun"])
def test_digits_job_on_two_nodes(vc, launch):
    run = vc.shared / f"digits-{launch}"
    job, rc = vc.sbatch("jobs/digits.sbatch", {"LAUNCH": launch, **short(vc, run, "--set train.epochs=4")},
                        args=["--nodes=2", "--ntasks-per-node=2"], timeout=200)
    log = vc.log_of(job)
    assert rc == 0, vc.tail(job)
    info = vc.job_info(job)
    assert (info["JobState"], info["NumNodes"], info["NumTasks"], info["NodeList"]) == \
        ("COMPLETED", "2", "4", "vn[1-2]"), (info, vc.tail(job))
    assert ("srun --mpi=pmix" if launch == "srun" else "mpirun -n 4") in log, vc.tail(job)
    assert ranks_by_node(log) == {"vn1": {0, 1}, "vn2": {2, 3}}, vc.tail(job)
    # mpitrain's own view: MPI's node-local groups match the hostnames (no warning), and
    # each rank uses its node's 2 CPUs / 2 local ranks = 1 thread; the data is read in
    # partitions (collective mpio reads of one shared HDF5 file by ranks on both nodes)
    assert "placement: 2 nodes: vn1 ranks 0-1, vn2 ranks 2-3; 1 thread per rank\n" in log, vc.tail(job)
    assert "partitioned data" in log, vc.tail(job)
    row = last_row(run)
    assert row["ranks"] == 4 and row["epoch"] == 4 and row["test_acc"] >= 0.95, (row, vc.tail(job))


STRATEGIES_JOB = '''\
#!/usr/bin/env bash
#SBATCH --job-name=vc-strategies
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=2
#SBATCH --time=00:10:00
# every strategy family across the node boundary, one short digits run each (mpirun)
set -uo pipefail
cd "$SLURM_SUBMIT_DIR"
. .venv/bin/activate
. scripts/mpienv.sh
train() {{  # train STRATEGY [--set ...]
  echo "[strategies] $1"
  timeout -k 5 120 mpirun -n "$SLURM_NTASKS" python -m mpi4py -m mpitrain train jobs/digits.toml \\
    --set sync.strategy=$1 --set output.dir={out}/$1 --set data.path={data} --set train.epochs={epochs} \\
    {small} "${{@:2}}"
  echo "[strategies] $1 exit $?"
}}
{lines}
'''


@pytest.mark.timeout(420)
def test_every_strategy_across_nodes(vc):
    out = vc.shared / "strategies"
    script = vc.shared / "strategies.sbatch"
    lines = "\n".join(f"train {name} {extra}".rstrip() for name, extra in STRATEGIES.items())
    script.write_text(STRATEGIES_JOB.format(lines=lines, out=out, epochs=2, small=SMALL, data=vc.shared / "digits.h5"))
    job, rc = vc.sbatch(script, timeout=400)
    log = vc.log_of(job, "vc-strategies")
    assert rc == 0, vc.tail(job, "vc-strategies")
    exits = dict(re.findall(r"\[strategies\] (\w+) exit (\d+)", log))
    assert exits == {s: "0" for s in STRATEGIES}, (exits, vc.tail(job, "vc-strategies", 8000))
    where = ranks_by_node(log)
    assert set(where) == set(NODES), (where, vc.tail(job, "vc-strategies"))
    acc = {s: last_row(out / s)["test_acc"] for s in STRATEGIES}
    ranks = {s: last_row(out / s)["ranks"] for s in STRATEGIES}
    assert all(a >= 0.9 for a in acc.values()), f"test_acc {acc}" + vc.tail(job, "vc-strategies", 8000)
    assert set(ranks.values()) == {4}, ranks


def ranks_in(node) -> list[int]:
    """The pids of `mpitrain train` processes in node's network namespace."""
    pids = subprocess.run(["ip", "netns", "pids", node], capture_output=True, text=True).stdout.split()
    found = []
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"mpitrain" in cmd and b"train" in cmd and any(c.endswith(b"python") for c in cmd[:1]):
            found.append(int(pid))
    return found


@pytest.mark.timeout(300)
@pytest.mark.parametrize("launch", ["srun", "mpirun"])
def test_rank_killed_on_second_node_ends_job_and_rerun_resumes(vc, launch):
    """kill -9 of one rank on vn2: the job ends within 30 s (srun --kill-on-bad-exit, or
    mpirun's daemon on vn2 reporting the death); the same job submitted again resumes from
    the newest checkpoint and finishes."""
    run = vc.shared / f"killed-{launch}"
    # rank 0 sleeps 10x its compute time: steps are slow enough to kill mid-run
    env = {"LAUNCH": launch, **short(vc, run, "--set train.epochs=50 --set train.max_steps=80",
                                     "--set output.checkpoint_every=10 --set train.slowdown_rank=0",
                                     "--set train.slowdown_factor=10")}
    args = ["--nodes=2", "--ntasks-per-node=2"]
    job, _ = vc.sbatch("jobs/digits.sbatch", env, args=args, wait=False)
    vc.wait_for(lambda: list(run.glob("ckpt-*.h5")), 120, "the first checkpoint" + vc.tail(job))
    victims = ranks_in("vn2")
    assert len(victims) == 2, (victims, vc.tail(job))
    os.kill(victims[0], signal.SIGKILL)
    took = vc.wait_for(lambda: vc.job_info(job).get("JobState") not in ("RUNNING", "COMPLETING", None), 30,
                    f"job {job} to end after kill -9 of a rank on vn2" + vc.tail(job))
    info = vc.job_info(job)
    assert info["JobState"] == "FAILED", (info, vc.tail(job))
    assert not ranks_in("vn1") and not ranks_in("vn2"), "ranks left running after the job ended"
    print(f"job {job} ended {took:.1f} s after kill -9 of rank pid {victims[0]} on vn2")
    saved = sorted(int(p.stem.split("-")[1]) for p in run.glob("ckpt-*.h5"))
    job2, rc = vc.sbatch("jobs/digits.sbatch", env, args=args, timeout=240)
    log2 = vc.log_of(job2)
    assert rc == 0, vc.tail(job2)
    m = re.search(r"resuming from step (\d+)", log2)
    assert m and int(m.group(1)) in saved, (saved, vc.tail(job2))
    assert ranks_by_node(log2) == {"vn1": {0, 1}, "vn2": {2, 3}}, vc.tail(job2)
    row = last_row(run)
    assert row["step"] == 80 and row["ranks"] == 4, row


@pytest.mark.timeout(600)
def test_preemption_cycle_on_two_nodes(vc):
    """USR1 to the batch shell of a 2-node job (what --signal=B:USR1 sends before the time
    limit) -> every rank on both nodes checkpoints, exit 75, the job requeues itself; the
    second run resumes on both nodes and ends with the parameters of an uninterrupted run."""
    import h5py
    import numpy as np

    run, ref = vc.shared / "preempt", vc.shared / "preempt-ref"
    steps = "--set train.epochs=50 --set train.max_steps=80 --set output.checkpoint_every=10"
    slow = "--set train.slowdown_rank=3 --set train.slowdown_factor=10"  # a rank on vn2; no arithmetic change
    args = ["--nodes=2", "--ntasks-per-node=2"]
    job, _ = vc.sbatch("jobs/digits.sbatch", short(vc, run, steps, slow), args=args, wait=False)
    vc.wait_for(lambda: list(run.glob("ckpt-*.h5")), 120, "the first checkpoint" + vc.tail(job))
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    vc.wait_for(lambda: vc.job_info(job).get("JobState") == "PENDING", 60, "the requeue" + vc.tail(job))
    info, log = vc.job_info(job), vc.log_of(job)
    assert info["Restarts"] == "1", (info, vc.tail(job))
    stopped = int(re.search(r"stopped by SIGUSR1 after step (\d+)", log).group(1))
    assert 0 < stopped < 80 and (run / f"ckpt-{stopped:09d}.h5").is_file(), vc.tail(job)
    vc.wait_for(lambda: not subprocess.run(["squeue", "-h", "-s", "-j", job], capture_output=True,
                                        text=True).stdout.strip(), 60, "the old job step to end")
    assert not ranks_in("vn1") and not ranks_in("vn2"), "ranks left running after the checkpointed stop"
    # slurmd revoked the old run's credential with a time in whole seconds: a run of the same
    # job id started in that second is refused ("Job credential revoked")
    time.sleep(3)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)  # not in ~2 min
    vc.wait_for(lambda: vc.job_info(job).get("JobState") in ENDED, 240, "the requeued run" + vc.tail(job))
    log = vc.log_of(job)
    assert vc.job_info(job)["JobState"] == "COMPLETED", vc.tail(job)
    assert f"resuming from step {stopped}" in log and "restart 1:" in log, vc.tail(job)
    assert log.count("placement: 2 nodes: vn1 ranks 0-1, vn2 ranks 2-3") == 2, vc.tail(job)
    assert last_row(run)["step"] == 80
    _, rc = vc.sbatch("jobs/digits.sbatch", short(vc, ref, steps), args=args, timeout=240)
    assert rc == 0
    final = [d / "ckpt-000000080.h5" for d in (run, ref)]
    with h5py.File(final[0], "r") as a, h5py.File(final[1], "r") as b:
        for k in a["model"]:
            assert np.array_equal(a["model"][k][()], b["model"][k][()]), k


@pytest.mark.timeout(120)
def test_second_up_with_other_settings_while_a_job_runs_is_refused(vc):
    job, _ = vc.sbatch("--wrap=sleep 60", wait=False)  # a job that runs while `up` is asked to change
    try:
        vc.wait_for(lambda: vc.job_info(job).get("JobState") == "RUNNING", 30, f"job {job} to start")
        r = subprocess.run(["bash", "scripts/vcluster.sh", "up", "--nodes", "3"], cwd=vc.root,
                           capture_output=True, text=True, timeout=90)
        assert r.returncode == 1, r
        assert r.stderr.strip().splitlines() == [
            "[vcluster] error: already up with 2 nodes x 2 CPUs and jobs are running: not changing to 3 x 2 "
            "(scancel them or 'scripts/vcluster.sh down' first)"], r.stderr
        assert vc.job_info(job).get("JobState") == "RUNNING"
        nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True).stdout.split()
        assert nodes == list(NODES)
    finally:
        subprocess.run(["scancel", job])
