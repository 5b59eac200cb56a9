"""The command line as users run it: spawned mpiexec jobs at 1, 2 and 4 ranks.

Bad input must give one `mpitrain: error:` line, exit code 2 from every rank, no
traceback and no hang. Run outside MPI (scripts/test.sh runs `pytest -m launcher`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.launcher
NPS = [1, 2, 4]


@pytest.fixture(scope="module")
def digits(tmp_path_factory, mpirun):
    out = tmp_path_factory.mktemp("digits") / "digits.h5"
    r = mpirun(1, "data", "digits", "--out", out)
    assert r.returncode == 0, r.stderr
    return out


def test_help_and_console_script():
    for cmd in ([sys.executable, "-m", "mpitrain", "--help"],
                [shutil.which("mpitrain") or os.path.join(os.path.dirname(sys.executable), "mpitrain"), "--help"]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "mpiexec -n N python -m mpi4py -m mpitrain" in r.stdout.replace("\n", " ")


def bad_data(tmp, name, n=30, y=None):
    import h5py
    import numpy as np

    p = tmp / f"{name}.h5"
    y = np.arange(n) % 3 if y is None else np.array(y)
    with h5py.File(p, "w") as f:
        f.attrs["num_classes"] = 10
        for split in ("train", "test"):
            f[f"{split}/x"] = np.zeros((len(y), 8, 8), np.float32)
            f[f"{split}/y"] = y
    return p


def bad_ckpt(tmp):
    import h5py

    p = tmp / "ckpt-000000001.h5"
    with h5py.File(p, "w") as f:
        f["x"] = [1, 2, 3]
    return p


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory, digits, mpirun):
    """A real checkpoint of the bad-input cases' job (jobs/digits.toml), one step."""
    run = tmp_path_factory.mktemp("good")
    r = mpirun(1, "train", "jobs/digits.toml", "--set", f"data.path={digits}", "--set", f"output.dir={run}",
               "--set", "train.max_steps=1", "--set", "train.progress=false")
    assert r.returncode == 0, r.stderr[-2000:]
    return next(run.glob("ckpt-*.h5"))


def crafted_ckpt(tmp, good, name, **change):
    """The good checkpoint with parts of its tree replaced (`position={...}`, or a whole
    component; None deletes it), written with valid checksums (so only the load-time checks
    against the job can catch it); `momentum` and `model_text` plant a wrong array;
    `version` writes another format version."""
    import h5py

    from mpitrain import checkpoint

    tree = checkpoint.read(good)
    meta = tree.pop("meta")
    if change.pop("momentum", None):  # a momentum buffer of the wrong shape
        tree["optim"]["state"]["0"]["momentum_buffer"] = np.zeros((3, 3), np.float32)
    if change.pop("model_text", None):
        tree["model"][next(iter(tree["model"]))] = np.array(b"not an array")
    version = change.pop("version", None)
    for k, v in change.items():
        if v is None:
            del tree[k]
        else:
            tree[k] = tree[k] | v if isinstance(tree.get(k), dict) else v
    if "optim" in tree:
        tree["optim"]["param_groups"] = json.dumps(tree["optim"]["param_groups"])
    p = tmp / f"{name}" / "ckpt-000000001.h5"
    p.parent.mkdir(exist_ok=True)
    if version is None:
        checkpoint.write(p, tree, meta)
    else:  # the same file, stamped with another version (and a trailer over the new bytes)
        checkpoint.write(p, tree, meta)
        image = bytearray(checkpoint.verified_bytes(p))
        q = p.with_name("v.h5")
        q.write_bytes(bytes(image))
        with h5py.File(q, "r+") as f:
            f.attrs["format_version"] = version
        image = q.read_bytes()
        p.write_bytes(image + checkpoint._trailer(image))
    return p


def nan_data(tmp):
    import h5py

    p = tmp / "nan.h5"
    with h5py.File(p, "w") as f:
        for split in ("train", "test"):
            x = np.zeros((30, 8, 8), np.float32)
            x[4, 2, 2] = np.nan
            f[f"{split}/x"], f[f"{split}/y"] = x, np.arange(30) % 3
    return p


def attr_data(tmp, name, value):
    import h5py

    p = bad_data(tmp, name)
    with h5py.File(p, "a") as f:
        f.attrs["num_classes"] = value
    return p


def token_data(tmp, name, tokens, vocab_size=65):
    import h5py

    p = tmp / f"{name}.h5"
    with h5py.File(p, "w") as f:
        f.attrs["vocab_size"] = vocab_size
        f["train/tokens"] = np.asarray(tokens, np.uint8)
        f["test/tokens"] = np.asarray(tokens, np.uint8)
    return p


def float_data(tmp):
    import h5py

    p = tmp / "floaty.h5"
    with h5py.File(p, "w") as f:
        for split in ("train", "test"):
            f[f"{split}/x"], f[f"{split}/y"] = np.zeros((30, 8, 8), np.float32), np.zeros(30, np.float32)
    return p


CONFIG_ONLY = {"fp16 on CPU", "factory not importable", "factory unknown argument", "loss not importable", "nan lr", "inf beta", "nan watchdog", "inf warmup", "dropout 1.5", "huge seed", "huge staleness",
               "huge epochs", "output.dir {foo}", "output.dir {name", "wrong type", "negative size",
               "unknown shuffle", "old flat sync key", "bad strategy option", "comm section", "accumulate 0"}


def bad_cases(tmp, digits, np_, good_ckpt):
    (tmp / "bad.toml").write_text("[train]\nepoch = 3\n")
    (tmp / "broken.toml").write_text("[train\n")
    (tmp / "afile").write_text("")
    ok = ["jobs/digits.toml", "--set", f"data.path={digits}", "--set", f"output.dir={tmp}/run"]
    return {
        "unknown key": ([tmp / "bad.toml"], "unknown key train.epoch"),
        "malformed TOML": ([tmp / "broken.toml"], "malformed TOML"),
        "missing job": ([tmp / "nope.toml"], "no such job file"),
        "wrong type": (ok + ["--set", "train.epochs='x'"], "train.epochs: expected an integer"),
        "negative size": (ok + ["--set", "train.batch_size=-1"], "train.batch_size: expected a value > 0"),
        "missing data": (ok + ["--set", f"data.path={tmp}/none.h5"], "data file not found"),
        "not hdf5": (ok + ["--set", f"data.path={tmp}/bad.toml"], "not an HDF5 file"),
        "wrong dataset": (ok + ["--set", "data.x=images"], "train/images: no such dataset"),
        "wrong group": (ok + ["--set", "data.train=training"], "no group 'training'"),
        "unknown model": (ok + ["--set", "model.name=vgg"], "unknown model 'vgg'"),
        "unknown strategy": (ok + ["--set", "sync.strategy=gossip"], "unknown strategy 'gossip'"),
        "unknown optimizer": (ok + ["--set", "optim.name=lamb"], "unknown optimizer 'lamb'"),
        "global shuffle partitioned": (ok + ["--set", "data.shuffle=global"], "needs data.mode = 'replicated'"),
        "unwritable output": (ok + ["--set", f"output.dir={tmp}/afile/run"], "output.dir: cannot write"),
        "labels as inputs": (ok + ["--set", "data.x=y"], "inputs must be (samples, features...)"),
        "labels out of range": (ok + ["--set", f"data.path={bad_data(tmp, 'labels', y=[0, 1, 12] * 10)}"],
                                "labels must lie in"),
        "empty data set": (ok + ["--set", f"data.path={bad_data(tmp, 'empty', n=0)}"], "empty split"),
        "fewer samples than ranks": (ok + ["--set", f"data.path={bad_data(tmp, 'tiny', n=1)}"]
                                     + ["--set", "train.resume=never"], "cannot be partitioned over")
        if np_ > 1 else (ok + ["--set", "optim.betas=[2, 0.9]", "--set", "optim.name=adam"],
                         "optim.betas: expected two numbers in [0, 1)"),
        "wrong dtype": (ok + ["--set", f"data.path={bad_data(tmp, 'dtype', y=[b'a'] * 30)}"],
                        "targets must be integer labels or float values"),
        "corrupted checkpoint": (ok + ["--set", f"train.resume={bad_ckpt(tmp)}"], "not an mpitrain checkpoint"),
        "missing checkpoint": (ok + ["--set", f"train.resume={tmp}/none.h5"], "no such checkpoint"),
        "checkpoint step -5": (ok + ["--set", "train.resume="
                                     f"{crafted_ckpt(tmp, good_ckpt, 's', position={'step': -5})}"], "step -5 < 0"),
        "checkpoint epoch 1e6": (ok + ["--set", "train.resume="
                                       f"{crafted_ckpt(tmp, good_ckpt, 'e', position={'epoch': 10**6})}"],
                                 "epoch 1000000 outside"),
        "checkpoint samples -1000": (ok + ["--set", "train.resume="
                                           f"{crafted_ckpt(tmp, good_ckpt, 'n', position={'samples_in_epoch': -1000})}"],
                                     "samples_in_epoch -1000 outside"),
        "checkpoint RNG shape": (ok + ["--set", "train.resume=" + str(crafted_ckpt(
            tmp, good_ckpt, 'r', ranks={"0": {"rng": {"torch_cpu": np.zeros(7, np.uint8)}}}))],
                                 "rank 0's CPU random state is (7,)"),
        "checkpoint of a newer format": (ok + ["--set", f"train.resume={crafted_ckpt(tmp, good_ckpt, 'v', version=3)}"],
                                         "checkpoint format version 3; this mpitrain"),
        "checkpoint without optimizer": (ok + ["--set", f"train.resume={crafted_ckpt(tmp, good_ckpt, 'o', optim=None)}"],
                                         "incomplete checkpoint: no optim"),
        "checkpoint momentum shape": (ok + ["--set", f"train.resume={crafted_ckpt(tmp, good_ckpt, 'm', momentum=1)}"],
                                      "has shape (3, 3)"),
        "checkpoint text for an array": (ok + ["--set", "train.resume="
                                               f"{crafted_ckpt(tmp, good_ckpt, 't', model_text=1)}"],
                                         "checkpoint from another model"),
        "factory not importable": (ok + ["--set", "model.factory='nosuchpkg.models:net'"],
                                   "model.factory = 'nosuchpkg.models:net': cannot import it"),
        "factory unknown argument": (ok + ["--set", "model.factory='mpitrain.models:mlp'", "--set",
                                           "model.args.depth=3"], "unexpected keyword argument 'depth'"),
        "loss not importable": (ok + ["--set", "train.loss='nosuchpkg:loss'"], "train.loss = 'nosuchpkg:loss'"),
        "nan lr": (ok + ["--set", "optim.lr=nan"], "optim.lr: expected a finite number"),
        "inf beta": (ok + ["--set", "sync.strategy=easgd", "--set", "sync.easgd.beta=inf"], "a finite number"),
        "nan watchdog": (ok + ["--set", "train.watchdog_s=nan"], "train.watchdog_s: expected a finite number"),
        "inf warmup": (ok + ["--set", "optim.warmup_epochs=inf"], "optim.warmup_epochs: expected a finite"),
        "dropout 1.5": (ok + ["--set", "model.dropout=1.5"], "model.dropout: expected a value < 1.0"),
        "huge seed": (ok + ["--set", "train.seed=9223372036854775807"], "train.seed: expected a value <="),
        "huge staleness": (ok + ["--set", "sync.strategy=ssp", "--set", "sync.ssp.staleness=1000000"],
                           "sync.ssp.staleness: expected a value <= 1000"),
        "huge epochs": (ok + ["--set", "train.epochs=1000000000000"], "train.epochs: expected a value <="),
        "output.dir {foo}": (ok + ["--set", "output.dir='runs/{foo}'"], "is not a valid folder pattern"),
        "output.dir {name": (ok + ["--set", "output.dir='runs/{name'"], "is not a valid folder pattern"),
        "NaN in data": (ok + ["--set", f"data.path={nan_data(tmp)}", "--set", "data.mode=replicated"],
                        "row 4 is not finite"),
        "num_classes text": (ok + ["--set", f"data.path={attr_data(tmp, 'nct', 'ten')}"],
                             "attribute num_classes must be an integer"),
        "num_classes 1e9": (ok + ["--set", f"data.path={attr_data(tmp, 'ncb', 10**9)}"],
                            "attribute num_classes must be an integer"),
        "unknown shuffle": (ok + ["--set", "data.shuffle=random"], "data.shuffle: expected one of"),
        "servers without workers": (ok + ["--set", "sync.strategy=ps_sync", "--set", "sync.ps_sync.servers=9"],
                                    "sync.ps_sync.servers = 9 leaves no worker"),
        "old flat sync key": (ok + ["--set", "sync.strategy=bmuf", "--set", "sync.bmuf_momentum=0.5"],
                              "sync.bmuf_momentum is now sync.bmuf.momentum"),
        "bad strategy option": (ok + ["--set", "sync.strategy=ssp", "--set", "sync.ssp.staleness=-1"],
                                "sync.ssp.staleness: expected a value >= 0"),
        "comm section": (ok + ["--set", "comm.cuda_path=staged"], "cuda_path is now sync.allreduce.cuda_path"),
        "dynamic with allreduce": (ok + ["--set", "data.assign=dynamic"], "data.assign = 'dynamic' needs"),
        "seq_len too large": (ok + ["--set", f"data.path={token_data(tmp, 'tok', np.arange(200) % 60)}", "--set",
                                    "model.name=gpt", "--set", "data.seq_len=250"], "use a smaller data.seq_len"),
        "token id >= vocab_size": (ok + ["--set", f"data.path={token_data(tmp, 'big', np.arange(200) % 60, 50)}",
                                         "--set", "model.name=gpt", "--set", "data.seq_len=8"],
                                   "token ids must lie in [0, vocab_size = 50), found [0, 59]"),
        "cross_entropy on float targets": (ok + ["--set", f"data.path={float_data(tmp)}", "--set",
                                                 "train.loss=cross_entropy"], "does not fit float targets"),
        "fp16 on CPU": (ok + ["--set", "train.precision=fp16"], "train.precision = 'fp16' needs train.device"),
        "accumulate 0": (ok + ["--set", "train.accumulate=0"], "train.accumulate: expected a value > 0"),
    }


@pytest.mark.timeout(600)
@pytest.mark.parametrize("np_", NPS)
def test_bad_input_one_line_exit_2_every_rank(np_, tmp_path, digits, mpirun, good_ckpt):
    for name, (args, message) in bad_cases(tmp_path, digits, np_, good_ckpt).items():
        if name in CONFIG_ONLY and np_ != max(NPS):  # rejected by config validation alike on every rank
            continue
        r = mpirun(np_, "train", *args, timeout=60)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2, (name, r.returncode, r.stderr[-2000:])
        assert "Traceback" not in r.stderr, (name, r.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("mpitrain: error: "), (name, r.stderr)
        assert message in lines[0], (name, lines[0])


@pytest.mark.timeout(600)
@pytest.mark.parametrize("np_", NPS)
def test_digits_end_to_end(np_, tmp_path, digits, mpirun):
    r = mpirun(np_, "train", "jobs/digits.toml", "--set", f"data.path={digits}", "--set",
               f"output.dir={tmp_path}/run", "--set", "train.epochs=10", "--set", "train.progress=false",
               timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 10
    for key in ("epoch", "step", "train_loss", "test_loss", "test_acc", "samples_per_s", "wall_s"):
        assert key in rows[-1]
    assert rows[-1]["test_acc"] >= 0.95, rows[-1]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    # the resolved config is saved and is itself a valid job file
    r2 = mpirun(1, "config", tmp_path / "run" / "config.toml", timeout=60)
    assert r2.returncode == 0 and "epochs = 10" in r2.stdout


@pytest.mark.timeout(300)
def test_data_commands(tmp_path, mpirun):
    r = mpirun(2, "data", "synthetic", "--out", tmp_path / "syn.h5", "--samples", 3000, "--test-samples", 200,
               "--features", 16, "--classes", 5)
    assert r.returncode == 0 and "train 3000, test 200" in r.stdout, r.stderr
    r = mpirun(2, "train", "jobs/digits.toml", "--set", f"data.path={tmp_path}/syn.h5", "--set",
               "model.name=mlp", "--set", "train.epochs=1", "--set", f"output.dir={tmp_path}/run")
    assert r.returncode == 0, r.stderr[-2000:]
    r = mpirun(2, "data", "synthetic", "--out", tmp_path / "x.h5", "--samples", 0)
    assert r.returncode == 2 and r.stderr.strip().startswith("mpitrain: error: data synthetic: --samples")
    r = mpirun(2, "data", "convert", tmp_path / "missing.npz", tmp_path / "y.h5")
    assert r.returncode == 2 and "missing.npz: no such file" in r.stderr


@pytest.mark.timeout(300)
def test_text_to_language_model(tmp_path, mpirun, repo_root):
    """The bundled Tiny Shakespeare -> token stream -> jobs/shakespeare.toml (a few steps)."""
    out = tmp_path / "shk.h5"
    r = mpirun(2, "data", "text", repo_root / "data/shakespeare/tinyshakespeare.txt", "--out", out)
    assert r.returncode == 0 and r.stdout.strip() == f"{out}: train 1003854, test 111540 tokens, vocab 65 (char)", \
        r.stdout + r.stderr
    r = mpirun(2, "train", "jobs/shakespeare.toml", "--set", f"data.path={out}", "--set", f"output.dir={tmp_path}/run",
               "--set", "train.max_steps=30", "--set", "train.progress=false", "--set", "model.args.n_layer=1",
               timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["step"] == 30 and row["test_ppl"] < 30 and "test_acc" not in row, row  # 65 symbols: ppl 65 at start


@pytest.mark.timeout(300)
@pytest.mark.parametrize("np_", NPS)
def test_kvstore_example_script(np_, mpirun):
    r = mpirun(np_, script="scripts/kvstore_example.py", timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    err = float(r.stdout.rsplit("max error", 1)[1])
    assert err < 1e-3, r.stdout


@pytest.mark.timeout(300)
@pytest.mark.parametrize("np_", NPS)
def test_custom_training_script(np_, tmp_path, digits, mpirun):
    """scripts/train_custom.py: a user's model and loop through the Python API."""
    r = mpirun(np_, "--data", digits, "--strategy", "local_sgd", "--option", "period=2", "--epochs", "6",
               "--checkpoint", tmp_path / "api.h5", script="scripts/train_custom.py", timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    final = float(r.stdout.rsplit("final test accuracy", 1)[1])
    assert final >= 0.95, r.stdout
    restored, saved = r.stdout.split("test accuracy ")[-2].split(" (saved ")
    assert float(restored) == float(saved.split(")")[0]), r.stdout


@pytest.mark.timeout(300)
def test_compare_and_report_commands(tmp_path, digits, mpirun, repo_root):
    spec = tmp_path / "cmp.toml"
    spec.write_text(f'job = "{repo_root}/jobs/digits.toml"\nout = "{tmp_path}/cmp"\ntarget = 0.5\n'
                    f'set = ["train.epochs=2", "data.path={digits}", "model.name=mlp"]\n'
                    '[[run]]\nname = "allreduce"\nset = ["sync.strategy=allreduce"]\n'
                    '[[run]]\nname = "local H=2"\nset = ["sync.strategy=local_sgd", "sync.local_sgd.period=2"]\n')
    r = mpirun(2, "compare", spec, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "cmp"
    for name in ("table.md", "table.csv", "accuracy_vs_time.png", "accuracy_vs_epoch.png"):
        assert (out / name).is_file()
    assert "local H=2" in (out / "table.md").read_text()
    r = mpirun(1, "report", out / "allreduce", out / "local-H-2", "--out", tmp_path / "again")
    assert r.returncode == 0 and (tmp_path / "again" / "table.csv").is_file(), r.stderr
    r = mpirun(2, "report", tmp_path / "nope", "--out", tmp_path / "x")
    assert r.returncode == 2 and r.stderr.strip() == f"mpitrain: error: {tmp_path / 'nope'}: no such run folder"


@pytest.mark.timeout(300)
def test_bench_straggler_runs_a_comparison_file(tmp_path, digits, mpirun, repo_root):
    spec = tmp_path / "straggler.toml"
    spec.write_text(f'job = "{repo_root}/jobs/digits.toml"\nout = "{tmp_path}/runs"\ntarget = 0.5\n'
                    f'set = ["train.epochs=1", "data.path={digits}", "model.name=mlp", "model.hidden=[32]"]\n'
                    '[[run]]\nname = "allreduce"\nset = ["sync.strategy=allreduce"]\n'
                    '[[run]]\nname = "ssp s=1"\nset = ["sync.strategy=ssp", "sync.ssp.staleness=1"]\n')
    r = mpirun(2, "bench", "straggler", "--spec", spec, "--rank", 1, "--factor", 2, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert lines[0].startswith("# mpitrain bench straggler: 2 ranks, rank 1 2.0x slower"), r.stdout
    rows = {ln.split("  ")[0].strip(): ln.split() for ln in lines[2:]}
    assert list(rows) == ["allreduce", "ssp s=1"], r.stdout
    assert float(rows["allreduce"][2]) == 1.0  # the first run is the baseline of the ratios
    for name in ("allreduce", "ssp-s-1"):
        assert (tmp_path / "runs" / name / "metrics.jsonl").is_file()
    r = mpirun(2, "bench", "straggler", "--spec", tmp_path / "nope.toml")
    assert r.returncode == 2
    assert r.stderr.strip() == f"mpitrain: error: {tmp_path / 'nope.toml'}: no such comparison file"


def _train_args(digits, run, *more):
    return ["train", "jobs/digits.toml", "--set", f"data.path={digits}", "--set", f"output.dir={run}",
            "--set", "model.name=mlp", "--set", "model.hidden=[32]", "--set", "train.progress=false",
            "--set", "data.mode=replicated", *more]


def _last_step(run):
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return rows[-1]["step"], rows


@pytest.mark.timeout(600)
@pytest.mark.parametrize("old, new", [(2, 1), (2, 4), (4, 2)])
def test_resume_at_another_world_size(tmp_path, digits, mpirun, old, new):
    run = tmp_path / "run"
    r = mpirun(old, *_train_args(digits, run, "--set", "train.epochs=3", "--set", "train.max_steps=40"))
    assert r.returncode == 0, r.stderr[-2000:]
    r = mpirun(new, *_train_args(digits, run, "--set", "train.epochs=3"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from step 40" in r.stderr and f"written at {old} ranks" in r.stderr
    step, rows = _last_step(run)
    assert rows[-1]["epoch"] == 3 and rows[-1]["ranks"] == new
    # exactly-once continuation: the rest of the interrupted epoch in batches of the new size
    n, b, ceil = 1438, 16, lambda a, c: -(-a // c)
    e, k = divmod(40, ceil(n, b * old))
    expect = 40 + ceil(n - k * b * old, b * new) + (3 - e - 1) * ceil(n, b * new)
    assert step == expect, (step, expect)


def _rank_pids(run):
    out = subprocess.run(["pgrep", "-f", f"output.dir={run}"], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out if os.path.basename(os.readlink(f"/proc/{p}/exe")).startswith("python")]


def _wait_for_checkpoint(run, timeout=120):
    import time

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if list(run.glob("ckpt-*.h5")):
            return
        time.sleep(0.2)
    raise AssertionError("no checkpoint appeared")


@pytest.mark.timeout(600)
@pytest.mark.timeout(300)
@pytest.mark.parametrize("phase", ["loading data", "resuming", "training", "evaluation", "checkpoint", "teardown"])
def test_a_failure_on_one_rank_in_any_phase_ends_the_job(tmp_path, digits, mpirun, phase):
    """An exception on rank 1 alone, in each phase: its traceback on stderr, the job ends
    within seconds (no rank waits forever in a collective), no torn metrics line."""
    import json
    import time

    run = tmp_path / "run"
    mpirun.env["MPITRAIN_INJECT_FAULT"] = f"{phase}:1"
    try:
        t0 = time.monotonic()
        r = mpirun(2, *_train_args(digits, run, "--set", "train.epochs=3", "--set", "output.checkpoint_every=20",
                                   "--set", "train.watchdog_s=600"), timeout=120)
        took = time.monotonic() - t0
    finally:
        del mpirun.env["MPITRAIN_INJECT_FAULT"]
    assert r.returncode != 0, r.stderr[-2000:]
    assert f"injected fault in {phase} on rank 1" in r.stderr, r.stderr[-2000:]
    assert took < 30, took  # start-up included; the watchdog (600 s) played no part
    if (run / "metrics.jsonl").exists():
        [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


MPIEXEC_TERM = "SIGTERM (Open MPI's mpiexec sends SIGTERM to every rank for a SIGINT/Ctrl-C or SIGTERM it receives)"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("sig, code, seen", [("SIGUSR1", 75, "SIGUSR1"), ("SIGTERM", 1, MPIEXEC_TERM),
                                             ("SIGINT", 1, MPIEXEC_TERM)])
def test_signal_to_mpiexec(tmp_path, digits, mpirun, sig, code, seen):
    """What a user or a batch script sends to mpiexec itself: SIGUSR1 is forwarded to every
    rank (exit 75); SIGTERM and SIGINT (Ctrl-C) reach the ranks as SIGTERM (Open MPI 4.1,
    measured: mpiexec does not forward SIGINT) and also stop every rank after a checkpoint,
    but Open MPI's mpiexec then reports 1 as its own status (README: send SIGUSR1). The log
    names the signal the ranks got and says what it may stand for."""
    import signal

    run = tmp_path / "run"
    p = mpirun.spawn(2, *_train_args(digits, run, "--set", "train.epochs=500", "--set", "output.checkpoint_every=50"))
    _wait_for_checkpoint(run)
    p.send_signal(getattr(signal, sig))
    _, err = p.communicate(timeout=120)
    assert p.returncode == code, (p.returncode, err[-2000:])
    assert f"stopped by {seen} after step" in err, err[-2000:]


@pytest.mark.timeout(600)
def test_sigusr1_checkpoints_and_exits_75_then_resumes(tmp_path, digits, mpirun):
    import signal
    import time

    run = tmp_path / "run"
    p = mpirun.spawn(2, *_train_args(digits, run, "--set", "train.epochs=200", "--set", "output.checkpoint_every=20"))
    _wait_for_checkpoint(run)
    for pid in _rank_pids(run):
        os.kill(pid, signal.SIGUSR1)
    t0 = time.monotonic()
    out, err = p.communicate(timeout=120)
    assert p.returncode == 75, err[-2000:]
    assert "stopped by SIGUSR1 after step" in err and time.monotonic() - t0 < 60
    stopped = int(err.split("stopped by SIGUSR1 after step ")[1].split(";")[0])
    r = mpirun(2, *_train_args(digits, run, "--set", "train.epochs=200", "--set", f"train.max_steps={stopped + 5}"))
    assert r.returncode == 0 and f"resuming from step {stopped}" in r.stderr, r.stderr[-2000:]
    assert _last_step(run)[0] == stopped + 5


@pytest.mark.timeout(600)
def test_killed_rank_ends_the_job_then_rerun_resumes(tmp_path, digits, mpirun):
    import random
    import signal
    import time

    run = tmp_path / "run"
    args = _train_args(digits, run, "--set", "train.epochs=400", "--set", "output.checkpoint_every=20")
    p = mpirun.spawn(4, *args)
    _wait_for_checkpoint(run)
    pids = sorted(_rank_pids(run))
    victim = random.choice(pids[1:])  # not the first-started rank
    t0 = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    p.communicate(timeout=60)
    took = time.monotonic() - t0
    assert p.returncode != 0 and took < 30, (p.returncode, took)
    before = max(int(c.name[5:14]) for c in run.glob("ckpt-*.h5"))
    r = mpirun(4, *_train_args(digits, run, "--set", "train.epochs=400", "--set", f"train.max_steps={before + 10}"))
    assert r.returncode == 0 and f"resuming from step {before}" in r.stderr, r.stderr[-2000:]
    assert _last_step(run)[0] == before + 10


@pytest.mark.timeout(300)
@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tiny tmpfs as the full disk (needs root)")
@pytest.mark.parametrize("strategy", ["allreduce", "zero"])
def test_disk_full_keeps_the_previous_checkpoint(tmp_path, digits, mpirun, strategy):
    """The run folder is a 600 kB tmpfs: the first ~340 kB checkpoint fits, the second
    cannot (its temporary file fills the disk; zero: every rank writes its pieces)."""
    run = tmp_path / "run"
    run.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(run)], check=True)
    try:
        big = ["--set", "model.hidden=[512]", "--set", f"sync.strategy={strategy}"]
        r = mpirun(2, *_train_args(digits, run, "--set", "train.max_steps=5", *big))
        assert r.returncode == 0, r.stderr[-2000:]
        before = {p.name: p.read_bytes() for p in run.glob("ckpt-*.h5")}
        r = mpirun(2, *_train_args(digits, run, "--set", "train.max_steps=10", *big), timeout=240)
        assert r.returncode == 2, r.stderr[-2000:]
        line = [ln for ln in r.stderr.splitlines() if ln.startswith("mpitrain: error:")]
        assert len(line) == 1 and "checkpoint at step 10 failed: No space left on device" in line[0], r.stderr
        assert "previous checkpoint ckpt-000000005.h5 intact" in line[0]
        assert {p.name: p.read_bytes() for p in run.glob("ckpt-*.h5")} == before
        assert not list(run.glob("*.tmp"))
    finally:
        subprocess.run(["umount", str(run)], check=False)


@pytest.mark.timeout(300)
@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tiny tmpfs as the full disk (needs root)")
def test_disk_full_while_appending_metrics_ends_the_job_at_once(tmp_path, digits, mpirun):
    """Only rank 0 writes metrics.jsonl: its failure is its own, so it prints one line and
    aborts the job (never a hang in a collective), and leaves no torn line."""
    import json
    import time

    run = tmp_path / "run"
    run.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(run)], check=True)
    try:
        t0 = time.monotonic()
        r = mpirun(2, *_train_args(digits, run, "--set", "train.epochs=60", "--set", "output.checkpoint_every=0"),
                   timeout=120)
        took = time.monotonic() - t0
        assert r.returncode == 2, r.stderr[-2000:]
        assert "mpitrain: error (rank 0):" in r.stderr and "cannot append the epoch" in r.stderr, r.stderr[-2000:]
        assert "No space left on device" in r.stderr
        rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
        assert rows and [row["epoch"] for row in rows] == list(range(1, len(rows) + 1))
        assert took < 60, took
    finally:
        subprocess.run(["umount", str(run)], check=False)


def _pid_of_rank(run, rank):
    for pid in _rank_pids(run):
        env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        if f"OMPI_COMM_WORLD_RANK={rank}".encode() in env:
            return pid
    return None


def _sigstop_and_wait(p, pid) -> tuple[str, float]:
    """SIGSTOP pid and wait for the job's end; (stderr, seconds). The stopped process is
    continued and killed afterwards whatever happened."""
    import signal
    import time

    t0 = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    try:
        _, err = p.communicate(timeout=120)
    finally:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    return err, time.monotonic() - t0


@pytest.mark.timeout(600)
@pytest.mark.parametrize("rank", [0, "random"])
def test_watchdog_names_a_stopped_rank(tmp_path, digits, mpirun, rank):
    """SIGSTOP of rank 0, or of a random rank at a random moment of training: the others
    wait for it in a collective; the watchdog tells the stopped rank from the waiting ones."""
    import random
    import time

    run = tmp_path / "run"
    p = mpirun.spawn(3, *_train_args(digits, run, "--set", "train.epochs=1000", "--set", "train.watchdog_s=4",
                                     "--set", "output.checkpoint_every=0"))
    while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text():
        assert p.poll() is None, p.communicate()[1][-2000:]
        time.sleep(0.1)
    rng = random.Random()
    time.sleep(rng.uniform(0, 1.5))
    victim = rank if rank == 0 else rng.randrange(3)
    err, took = _sigstop_and_wait(p, _pid_of_rank(run, victim))
    assert p.returncode == 3, (p.returncode, err[-2000:])
    assert f"stopped or dead: {victim} (last" in err, err[-2000:]
    assert took < 30, took


@pytest.mark.timeout(300)
def test_watchdog_names_a_rank_stopped_during_start_up(tmp_path, digits, mpirun):
    """A rank stopped before training (here: while the others load data and build the job)."""
    import time

    run = tmp_path / "run"
    mpirun.env["MPITRAIN_WATCHDOG_S"] = "4"
    try:
        p = mpirun.spawn(2, *_train_args(digits, run, "--set", "train.watchdog_s=4"))
    finally:
        del mpirun.env["MPITRAIN_WATCHDOG_S"]
    # past MPI_Init (a rank stopped before it blocks the others inside MPI_Init, before any
    # Python code runs: only the launcher's or Slurm's time limit reaches that), still in build
    while not (run / "config.toml").exists():
        assert p.poll() is None, p.communicate()[1][-2000:]
        time.sleep(0.01)
    err, _ = _sigstop_and_wait(p, _pid_of_rank(run, 1))
    # rank 0 waits either in the agreement after writing config.toml (the Python watchdog
    # aborts the job) or already in the collective HDF5 open, which holds the GIL: the Python
    # watchdog cannot run, so the C-level backstop (faulthandler, 2 x watchdog_s + 10 s) ends
    # it. Rank 0 gets there within the watchdog's first poll, so the backstop must be armed
    # when the watchdog starts, not at its first poll.
    assert p.returncode != 0, err[-2000:]
    assert "mpitrain: watchdog on" in err or "Timeout (0:00:18)!" in err, err[-2000:]


@pytest.mark.timeout(300)
def test_a_rank_stopped_while_leaving_does_not_hang_the_job(tmp_path, digits, mpirun):
    """Training done, watchdog threads ended, then rank 1 is stopped (MPITRAIN_INJECT_FAULT
    "exit:1": it SIGSTOPs itself): rank 0 would wait in the last collectives (heartbeat
    free, MPI_Finalize) forever; the C-level backstop ends it after 2 x 2 + 10 s and the
    launcher ends the job."""
    import signal
    import time

    run = tmp_path / "run"
    mpirun.env["MPITRAIN_INJECT_FAULT"] = "exit:1"
    t0 = time.monotonic()
    try:
        r = mpirun(2, *_train_args(digits, run, "--set", "train.watchdog_s=2"), timeout=120)
    finally:
        del mpirun.env["MPITRAIN_INJECT_FAULT"]
        for pid in _rank_pids(run):  # whatever happened: no stopped process left behind
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
    took = time.monotonic() - t0
    assert (run / "metrics.jsonl").read_text().strip(), r.stderr[-2000:]  # it trained and wrote its rows
    assert r.returncode != 0 and "Timeout (0:00:14)!" in r.stderr, (r.returncode, r.stderr[-2000:])
    assert took < 90, took


@pytest.mark.timeout(300)
def test_long_evaluation_does_not_trip_the_watchdog(tmp_path, mpirun):
    """A 5 s watchdog; evaluating 300k samples on a 1M-parameter MLP takes longer, but every
    batch evaluated counts as progress (and ranks that finish first wait on it)."""
    data = tmp_path / "big.h5"
    r = mpirun(2, "data", "synthetic", "--out", data, "--samples", "2000", "--test-samples", "300000",
               "--features", "32", "--classes", "4", timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    r = mpirun(2, "train", "jobs/digits.toml", "--set", f"data.path={data}", "--set", f"output.dir={tmp_path / 'run'}",
               "--set", "model.name=mlp", "--set", "model.hidden=[1024,1024]", "--set", "train.epochs=1",
               "--set", "train.watchdog_s=5", "--set", "train.progress=false", "--set", "optim.warmup_epochs=0",
               timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "watchdog" not in r.stderr


@pytest.mark.timeout(300)
def test_watchdog_aborts_a_hung_job_naming_the_rank(tmp_path, digits, mpirun):
    import time

    t0 = time.monotonic()
    # rank 1 "hangs" (sleeps 1000x its compute time) inside step 3; the others wait for it
    r = mpirun(2, *_train_args(digits, tmp_path / "run", "--set", "train.slowdown_rank=1", "--set",
                               "train.slowdown_factor=100000", "--set", "train.watchdog_s=5"), timeout=120)
    took = time.monotonic() - t0
    assert r.returncode == 3, (r.returncode, r.stderr[-2000:])
    assert "mpitrain: watchdog on rank" in r.stderr and "ranks behind: 1 (computing step 1 (training))" in r.stderr
    assert "stopped or dead" not in r.stderr  # rank 1 sleeps: it is alive
    assert took < 60, took


HANGING_LOOP = r"""
import sys, torch, torch.nn.functional as F, mpitrain
world = mpitrain.init()
torch.manual_seed(0)
model = torch.nn.Linear(4, 2)
model, opt = mpitrain.distribute(model, torch.optim.SGD(model.parameters(), lr=0.1), watchdog_s=3)
for step in range(50):
    if world.rank == world.size - 1 and step == 3:
        world.barrier()  # a bug: this rank skips the step and waits elsewhere
    opt.zero_grad()
    opt.backward(F.mse_loss(model(torch.ones(2, 4)), torch.zeros(2, 2)))
    opt.step()
opt.close()
"""


def test_a_user_loop_that_diverges_between_ranks_ends_with_exit_3(tmp_path, mpirun):
    """The Python API runs the job runner's watchdog: a rank that leaves the loop's lockstep
    does not hang the job forever; every rank ends with exit 3 within seconds."""
    script = tmp_path / "hang.py"
    script.write_text(HANGING_LOOP)
    r = mpirun(2, script=script, timeout=120)
    assert r.returncode == 3, (r.returncode, r.stderr[-2000:])
    assert "watchdog" in r.stderr and "no progress" in r.stderr, r.stderr[-2000:]


@pytest.mark.timeout(300)
def test_out_of_memory_is_one_line_exit_5(tmp_path, digits, mpirun):
    """A model that does not fit (10^10 parameters under a 3 GiB address-space cap per
    rank): one line naming the cause and what to change, exit 5, no traceback, no hang."""
    import resource
    import subprocess

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))
    args = _train_args(digits, tmp_path / "oom", "--set", "model.hidden=[100000, 100000]")
    r = subprocess.run(mpirun.command(2, *args), capture_output=True, text=True, timeout=240, cwd=mpirun.root,
                       env=mpirun.env, preexec_fn=cap)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("mpitrain: error")]
    assert r.returncode == 5, (r.returncode, r.stderr[-2000:])
    assert errors and all("out of memory" in ln and "sync.strategy = 'zero'" in ln for ln in errors), r.stderr
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
