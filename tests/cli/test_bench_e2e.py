"""`mpitrain bench e2e` as users run it: a spawned 2-rank job on digits prints one table
(no timing assertions: only that every figure is there and positive), and bad input gives
one `mpitrain: error:` line and exit 2. Run outside MPI (pytest -m launcher)."""

from __future__ import annotations

import subprocess

import pytest

pytestmark = pytest.mark.launcher
COLUMNS = ["variant", "precision", "ms/step", "samples/s (global)", "time/epoch (s)", "x one-process",
           "step time vs DDP"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory, mpirun):
    out = tmp_path_factory.mktemp("digits") / "digits.h5"
    r = mpirun(1, "data", "digits", "--out", out)
    assert r.returncode == 0, r.stderr
    return out


def bench(mpirun, tmp, *args, timeout=240):
    """Run the bench on 2 ranks with TMPDIR = tmp (so what it leaves behind can be seen)."""
    return subprocess.run(mpirun.command(2, "bench", "e2e", *args), capture_output=True, text=True,
                          timeout=timeout, cwd=mpirun.root, env=dict(mpirun.env, TMPDIR=str(tmp)))


def table(stdout: str) -> list[dict]:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("|")]
    assert lines and lines[0] == "| " + " | ".join(COLUMNS) + " |", stdout
    assert lines[1] == "|" + "---|" * len(COLUMNS), stdout
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]
    assert all(len(r) == len(COLUMNS) for r in rows), stdout
    return [dict(zip(COLUMNS, r)) for r in rows]


@pytest.mark.timeout(600)
def test_bench_e2e_digits_table(tmp_path, digits, mpirun):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    r = bench(mpirun, tmp, "--job", "jobs/digits.toml", "--set", f"data.path={digits}",
              "--set", f"output.dir={tmp_path}/run", "--steps", 3, "--warmup", 1, "--repeats", 1)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert out.count("# mpitrain bench e2e: 2 ranks x ") == 1 and out.startswith("# mpitrain bench e2e"), out
    assert "21,386 params" in out and "N = 2 ranks, B = 16/rank, G = 32 global per step" in out, out
    rows = table(out)
    assert out.count("| variant |") == 1, out
    assert [(row["variant"].split(" (")[0], row["precision"]) for row in rows] == [
        (v, p) for p in ("fp32", "bf16") for v in ("mpitrain", "one process", "torch DDP")], out
    for row in rows:
        for col in COLUMNS[2:]:
            assert float(row[col]) > 0, (col, row)
        if row["variant"].startswith("one process"):
            assert row["x one-process"] == "1.00", row
        if row["variant"].startswith("torch DDP"):
            assert row["step time vs DDP"] == "1.00", row
    goals = [ln for ln in out.splitlines() if ln.startswith("# goal")]
    assert len(goals) == 2 and goals[0].startswith("# goal >= 1.5x") and goals[1].startswith("# goal <= 0.8x"), out
    assert all(g.endswith(" MET") or g.endswith(" NOT MET") for g in goals), goals
    # the variants train the same model on the same batches: same parameters (fp32, no dropout in digits)
    diffs = next(ln for ln in out.splitlines() if ln.startswith("# max |parameter difference|"))
    for kind in ("single", "ddp"):
        assert float(diffs.split(f"{kind} fp32 ")[1].split(",")[0]) < 1e-4, diffs
    # nothing written: no run folder of the job, the temporary one removed
    assert not (tmp_path / "run").exists()
    assert not list(tmp.glob("mpitrain-bench-e2e-*")), list(tmp.iterdir())


@pytest.mark.timeout(300)
def test_bench_e2e_without_baselines(tmp_path, digits, mpirun):
    r = bench(mpirun, tmp_path, "--job", "jobs/digits.toml", "--set", f"data.path={digits}", "--steps", 2,
              "--warmup", 0, "--repeats", 1, "--no-ddp", "--no-single", "--precision", "fp32")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = table(r.stdout)
    assert [(row["variant"], row["x one-process"], row["step time vs DDP"]) for row in rows] == [
        ("mpitrain (allreduce)", "-", "-")], r.stdout
    assert "(fp32): not measured (--no-single)" in r.stdout and "(fp32): not measured (--no-ddp)" in r.stdout


@pytest.mark.timeout(300)
def test_bench_e2e_bad_input_one_line_exit_2(tmp_path, digits, mpirun):
    ok = ["--set", f"data.path={digits}", "--steps", 1, "--repeats", 1, "--warmup", 0]
    cases = {
        "no job file": (["--job", tmp_path / "nope.toml", *ok], f"{tmp_path / 'nope.toml'}: no such job file"),
        "bad --set": (["--job", "jobs/digits.toml", *ok, "--set", "train.batch_size=0"], "train.batch_size"),
        "bad precision": (["--job", "jobs/digits.toml", *ok, "--precision", "fp32,fp16"], "--precision"),
        "no steps": (["--job", "jobs/digits.toml", *ok, "--steps", 0], "--steps 0: expected an integer >= 1"),
        "missing data": (["--job", "jobs/digits.toml", *ok, "--set", f"data.path={tmp_path / 'no.h5'}"],
                         "data file not found"),
    }
    for name, (args, message) in cases.items():
        r = bench(mpirun, tmp_path, *args, timeout=120)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2, (name, r.returncode, r.stderr[-2000:])
        assert "Traceback" not in r.stderr, (name, r.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("mpitrain: error: "), (name, r.stderr)
        assert message in lines[0], (name, lines[0])
        assert "| variant |" not in r.stdout, (name, r.stdout)


@pytest.mark.timeout(600)
def test_bench_model_digits_table(tmp_path, digits, mpirun):
    """`bench model`: the fitted transport, one row per variant whose prediction adds up
    (compute + codec + communication), the codec measured only for compressors."""
    r = subprocess.run(mpirun.command(2, "bench", "model", "--job", "jobs/digits.toml", "--set",
                                      f"data.path={digits}", "--steps", 3, "--repeats", 1, "--sizes", "64k,256k",
                                      "--iters", 3), capture_output=True, text=True, timeout=400, cwd=mpirun.root,
                       env=dict(mpirun.env, TMPDIR=str(tmp_path)))
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "# transport fit on 2 ranks: alpha " in out, out
    compute = float(out.split(" compute only ")[1].split(" ms/step")[0])
    lines = [ln for ln in out.splitlines() if ln.startswith("| ")]
    assert lines[0] == "| variant | predicted ms/step | of which codec | measured ms/step | predicted / measured |"
    rows = {c[0]: [float(x) for x in c[1:]] for c in ([x.strip() for x in ln.strip("|").split("|")]
                                                       for ln in lines[1:9])}
    assert list(rows) == ["allreduce", "allreduce fp16", "allreduce topk 1%", "allreduce powersgd r2",
                          "allreduce sign", "zero-1", "zero-2", "local_sgd H=4"], out
    for name, (pred, codec, measured, ratio) in rows.items():
        assert (codec > 0) == ("allreduce " in name), (name, codec)
        assert pred >= compute + codec - 0.01 and measured > 0 and ratio == pytest.approx(pred / measured, abs=0.01)
