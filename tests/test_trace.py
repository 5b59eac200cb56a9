"""train.trace: a merged Chrome/Perfetto timeline, and the share of communication hidden
behind backward that `mpitrain report` prints."""

import json

import pytest

from mpitrain import report, trace
from mpitrain.train import train

pytestmark = pytest.mark.mpi


def test_hidden_fraction_is_the_overlap_with_backward():
    ev = [{"ph": "X", "pid": 0, "name": "backward", "ts": 0, "dur": 10},
          {"ph": "X", "pid": 0, "name": "bucket", "ts": 5, "dur": 10},  # 5 of 10 inside backward
          {"ph": "X", "pid": 1, "name": "backward", "ts": 0, "dur": 10},
          {"ph": "X", "pid": 1, "name": "bucket", "ts": 20, "dur": 10}]  # none: after backward
    assert trace.hidden_fraction({"traceEvents": ev}) == 0.25
    assert trace.hidden_fraction({"traceEvents": ev[:1]}) is None


def test_trace_of_every_rank_merged_by_rank_0(world, shared_tmp, digits_h5, make_cfg):
    cfg = make_cfg(shared_tmp / "run", digits_h5, train={"batch_size": 16, "epochs": 1, "max_steps": 7,
                                                        "trace": True},
                   sync={"strategy": "allreduce", "allreduce": {"overlap": "thread", "bucket_mb": 0.01,
                                                               "first_bucket_mb": 0.005}})
    train(cfg, world, world.logger())
    world.barrier()
    t = json.loads((shared_tmp / "run" / "trace.json").read_text())
    spans = [e for e in t["traceEvents"] if e["ph"] == "X"]
    assert {e["pid"] for e in spans} == set(range(world.size))
    for rank in range(world.size):
        mine = [e for e in spans if e["pid"] == rank]
        for name in ("data", "forward", "backward", "wait", "reduce", "optimizer"):
            assert sum(e["name"] == name for e in mine) == 7, (rank, name)
        buckets = [e for e in mine if e["name"] == "bucket"]
        assert buckets and all(e["tid"] == "comm" and e["dur"] >= 0 for e in buckets)
        assert len(buckets) % 7 == 0 and len(buckets) // 7 >= 2  # several buckets per step
        assert sum(e["name"] == "evaluation" for e in mine) == 1
    names = {e["args"]["name"] for e in t["traceEvents"] if e["ph"] == "M"}
    assert {"rank 0", "training", "communication thread"} <= names
    if world.is_root:
        msg = report.report([str(shared_tmp / "run")], str(shared_tmp / "out"), 0.5)
        assert "of the gradient reductions ran hidden behind backward" in msg


def test_tensorboard_event_files(world, shared_tmp, digits_h5, make_cfg):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = make_cfg(shared_tmp / "tb", digits_h5, train={"batch_size": 32, "epochs": 2},
                   output={"tensorboard": True})
    train(cfg, world, world.logger())
    world.barrier()
    if world.is_root:
        rows = [json.loads(ln) for ln in (shared_tmp / "tb" / "metrics.jsonl").read_text().splitlines()]
        acc = EventAccumulator(str(shared_tmp / "tb" / "tensorboard"))
        acc.Reload()
        assert {"train_loss", "test_acc", "samples_per_s", "comm_bytes_per_step"} <= set(acc.Tags()["scalars"])
        got = [(e.step, e.value) for e in acc.Scalars("test_acc")]
        assert got == [(r["step"], pytest.approx(r["test_acc"])) for r in rows]


def test_launch_time_spans_claim_no_overlap(world, shared_tmp, monkeypatch):
    """Where a rank drives a GPU the spans time kernel launches: the merged trace says so
    and no share of hidden communication is computed from it; on CPUs nothing changes."""
    import torch

    assert trace.Tracer.clock() == ("launch" if torch.cuda.is_initialized() else "host")
    ev = [[{"ph": "X", "pid": 0, "tid": "main", "name": "backward", "ts": 0, "dur": 10},
           {"ph": "X", "pid": 0, "tid": "comm", "name": "bucket", "ts": 5, "dur": 10}]]
    host = trace.merge(ev)
    assert host["otherData"] == {"clock": "host"} and trace.overlap_note(host) is None
    assert trace.hidden_fraction(host) == 0.5
    launch = trace.merge(ev, "launch")
    assert trace.hidden_fraction(launch) is None and "kernel launches" in trace.overlap_note(launch)
    # one rank on a GPU is enough for the whole trace to say so
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: world.rank == world.size - 1)
    t = trace.Tracer(world.rank)
    t.start()
    with t.span("backward"):
        pass
    t.add("bucket", t.now(), t.now(), "comm", bucket=0, bytes=4)
    path = shared_tmp / "trace.json"
    trace.save(world, t, path, world.logger())
    got = json.loads(path.read_text())
    assert got["otherData"]["clock"] == "launch" and trace.hidden_fraction(got) is None
    assert {e["pid"] for e in got["traceEvents"] if e["ph"] == "X"} == set(range(world.size))
    world.barrier()  # every rank read the file before the fixture removes it
