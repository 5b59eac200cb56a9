"""Comparison report: table columns and plots from run folders; clear errors for bad ones."""

import csv
import json

import pytest

from mpitrain import compare, report
from mpitrain.errors import UserError

pytestmark = pytest.mark.mpi


def fake_run(d, strategy, accs, rate=1000.0):
    d.mkdir(parents=True)
    (d / "config.toml").write_text(f'[sync]\nstrategy = "{strategy}"\n[output]\nname = "{d.name}"\n')
    with open(d / "metrics.jsonl", "w") as f:
        for e, acc in enumerate(accs, 1):
            f.write(json.dumps({"epoch": e, "step": 10 * e, "ranks": 2, "train_loss": 1.0 / e, "test_loss": 1.0,
                                "test_acc": acc, "samples_per_s": rate, "wall_s": 2.0 * e,
                                "comm_bytes_per_step": 4096.0}) + "\n")


def test_report_files_and_columns(tmp_path):
    fake_run(tmp_path / "a", "allreduce", [0.5, 0.9, 0.98])
    fake_run(tmp_path / "b", "local_sgd", [0.4, 0.8, 0.95], rate=2000.0)
    msg = report.report([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "out"), 0.97, "t")
    for name in ("table.md", "table.csv", "accuracy_vs_time.png", "accuracy_vs_epoch.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0 and name in msg
    rows = list(csv.DictReader(open(tmp_path / "out" / "table.csv")))
    assert list(rows[0]) == report.columns("test_acc")
    assert rows[0]["strategy"] == "allreduce" and float(rows[0]["time_to_target_s"]) == 6.0
    assert rows[1]["time_to_target_s"] == "" and float(rows[1]["samples_per_s"]) == 2000.0
    assert float(rows[1]["final_test_acc"]) == 0.95 and float(rows[0]["comm_bytes_per_step"]) == 4096
    md = (tmp_path / "out" / "table.md").read_text()
    assert "| a | allreduce | 2 | 3 | 0.9800 |" in md and "4.1 KB" in md
    assert (tmp_path / "out" / "accuracy_vs_time.png").read_bytes()[:4] == b"\x89PNG"


def test_loss_target_is_reached_from_above(tmp_path):
    """Language models: the goal is a loss at most the target; best = the lowest."""
    for name, losses in (("a", [2.2, 1.85, 1.7]), ("b", [2.4, 2.0, 1.95])):
        d = tmp_path / name
        d.mkdir()
        (d / "metrics.jsonl").write_text("".join(json.dumps(
            {"epoch": e, "ranks": 4, "test_loss": v, "test_ppl": 2.718 ** v, "samples_per_s": 100.0,
             "wall_s": 10.0 * e}) + "\n" for e, v in enumerate(losses, 1)))
    msg = report.report([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "out"), 1.9, "lm", "test_loss")
    assert "loss_vs_time.png" in msg and (tmp_path / "out" / "loss_vs_epoch.png").read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.DictReader(open(tmp_path / "out" / "table.csv")))
    assert float(rows[0]["time_to_target_s"]) == 20.0 and rows[1]["time_to_target_s"] == ""
    assert float(rows[0]["best_test_loss"]) == 1.7 and float(rows[1]["final_test_loss"]) == 1.95
    assert "time to 1.9 (s)" in (tmp_path / "out" / "table.md").read_text()
    with pytest.raises(UserError, match="metric: expected one of"):
        report.report([str(tmp_path / "a")], str(tmp_path / "out"), 1.9, "lm", "test_bleu")


@pytest.mark.parametrize("make, message", [
    (lambda d: None, "no such run folder"),
    (lambda d: d.mkdir(), "not a run folder (no metrics.jsonl)"),
    (lambda d: (d.mkdir(), (d / "metrics.jsonl").write_text("")), "empty"),
    (lambda d: (d.mkdir(), (d / "metrics.jsonl").write_text("{oops\n")), "metrics.jsonl:1: not a JSON line"),
    (lambda d: (d.mkdir(), (d / "metrics.jsonl").write_text('{"epoch": 1}\n')), "rows lack samples_per_s"),
    (lambda d: (d.mkdir(), (d / "metrics.jsonl").write_text(
        '{"epoch": 1, "samples_per_s": "fast", "wall_s": 1, "test_acc": [0.9]}\n')),
     "metrics.jsonl:1: samples_per_s, test_acc must be numbers"),
    (lambda d: (d.mkdir(), (d / "metrics.jsonl").write_text('[1, 2]\n')), "rows lack"),
])
def test_bad_run_folders(tmp_path, make, message):
    make(tmp_path / "r")
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        report.report([str(tmp_path / "r")], str(tmp_path / "out"), 0.97)


def test_compare_file_validation(tmp_path, repo_root):
    bad = {
        "nothing = 1\n": "unknown key nothing",
        'job = "x.toml"\n': "no [[run]] tables",
        'job = "x.toml"\ntarget = 2\n[[run]]\nname = "a"\n': "target: expected a number in (0, 1]",
        'job = "x.toml"\nmetric = "test_loss"\ntarget = -1\n[[run]]\nname = "a"\n': "target: expected a number in (0, inf)",
        'job = "x.toml"\nmetric = "loss"\n[[run]]\nname = "a"\n': "metric: expected one of",
        'job = "x.toml"\n[[run]]\nname = "a"\n[[run]]\nname = "a"\n': "run name 'a' appears twice",
        'job = "x.toml"\n[[run]]\nname = "a"\nset = "sync.strategy=x"\n': "expected a list",
    }
    for text, message in bad.items():
        (tmp_path / "c.toml").write_text(text)
        with pytest.raises(UserError) as e:
            compare.load_compare(str(tmp_path / "c.toml"))
        assert message in str(e.value), (text, str(e.value))
    spec = compare.load_compare(str(repo_root / "jobs" / "compare-digits.toml"))
    assert spec.job.name == "digits.toml" and len(spec.runs) >= 8


def test_run_folder_names():
    from pathlib import Path

    spec = compare.CompareSpec(Path("job.toml"), Path("out"), 0.9, (), (), "t")
    assert spec.run_dir("local H=2") == Path("out/local-H-2")
    assert spec.run_dir("async, dynamic batches") == Path("out/async--dynamic-batches")


@pytest.mark.parametrize("name", ["compare-digits.toml", "compare-synthetic.toml", "straggler-digits.toml"])
def test_shipped_comparison_files_are_valid(repo_root, name):
    """Every run of the comparison files in jobs/ resolves to a valid config (new-style keys)."""
    from mpitrain import config

    spec = compare.load_compare(str(repo_root / "jobs" / name))
    assert len(spec.runs) >= 2
    strategies = set()
    for run_name, extra in spec.runs:
        cfg = config.load(spec.job, [*spec.overrides, *extra, f"output.name={run_name}"])
        strategies.add(cfg.sync.strategy)
    assert len(strategies) >= 2
