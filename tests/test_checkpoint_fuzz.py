"""Corrupt checkpoints never crash a reader: a few hundred seeded corruptions of metadata,
data and trailer bytes, and truncations, each loaded in a child process (a segfault in
HDF5 would kill only the child). Every one must end in the one-line UserError."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.launcher

CHILD = r"""
import json, random, sys
from pathlib import Path
from mpitrain import checkpoint
from mpitrain.errors import UserError
src, out, first, count = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
reseal = len(sys.argv) > 5  # recompute the whole-file checksum after the damage (a crafted file)
good = src.read_bytes()
seen = {}
for seed in range(first, first + count):
    rng = random.Random(seed)
    data = bytearray(good)
    kind = rng.choice(["metadata", "anywhere", "trailer", "truncate"])
    if kind == "truncate":
        data = data[:rng.randrange(len(data))]
    else:
        lo, hi = {"metadata": (0, 4096), "anywhere": (0, len(data)),
                  "trailer": (len(data) - checkpoint.TRAILER_LEN, len(data))}[kind]
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(lo, min(hi, len(data)))
            data[i] = (data[i] + rng.randrange(1, 256)) % 256
    if reseal:
        image = bytes(data[:-checkpoint.TRAILER_LEN]) if len(data) > checkpoint.TRAILER_LEN else bytes(data)
        data = image + checkpoint._trailer(image)
    out.write_bytes(bytes(data))
    try:
        checkpoint.read(out, isolated=reseal)
        outcome = "read as valid"
    except UserError as e:
        outcome = "one-line error" if "\n" not in str(e) else "multi-line error"
    except BaseException as e:
        outcome = type(e).__name__
    seen[outcome] = seen.get(outcome, 0) + 1
print(json.dumps(seen))
"""


def _good(tmp_path):
    import numpy as np

    from mpitrain import checkpoint

    tree = {"position": {"step": 7, "epoch": 1, "samples_in_epoch": 3},
            "model": {"0.weight": np.ones((4, 3), np.float32), "0.bias": np.zeros(4)},
            "optim": {"state": {"0": {"momentum_buffer": np.ones((4, 3), np.float32)}},
                      "param_groups": '[{"lr": 0.1, "momentum": 0.9, "params": [0, 1]}]'},
            "strategy": {"x_center": np.arange(5, dtype=np.float32)},
            "ranks": {str(r): {"rng": {"torch_cpu": np.zeros(16, np.uint8)}} for r in range(2)}}
    src = tmp_path / "ckpt-000000007.h5"
    checkpoint.write(src, tree, {"world_size": 2, "strategy": "allreduce", "model": "mlp",
                                 "config": "[train]\nepochs = 1\n"})
    assert checkpoint.read(src)["position"]["step"] == 7
    return src


def _fuzz(tmp_path, src, total, *extra):
    totals, per_child = {}, 50
    for first in range(0, total, per_child):
        p = subprocess.run([sys.executable, "-c", CHILD, str(src), str(tmp_path / "bad.h5"), str(first),
                            str(per_child), *extra], capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, f"child died (rc {p.returncode}) on seeds {first}..: {p.stderr[-2000:]}"
        for k, v in json.loads(p.stdout.strip().splitlines()[-1]).items():
            totals[k] = totals.get(k, 0) + v
    return totals


@pytest.mark.timeout(600)
def test_resealed_corruptions_never_crash_a_reader(tmp_path):
    """Damage, then a recomputed checksum (a hand-edited or hostile file): libhdf5 parses
    it, but in a child process with a memory cap (checkpoint.probe); every one ends in a
    one-line UserError or reads as a valid file, never a crash, a traceback or an OOM."""
    totals = _fuzz(tmp_path, _good(tmp_path), 300, "reseal")
    print(f"300 re-sealed corruptions: {totals}")
    assert set(totals) <= {"one-line error", "read as valid"} and totals.get("one-line error", 0) >= 50, totals


@pytest.mark.timeout(600)
def test_corrupted_checkpoints_give_one_line_errors(tmp_path):
    totals = _fuzz(tmp_path, _good(tmp_path), 300)
    print(f"300 corruptions: {totals}")
    assert totals == {"one-line error": 300}, totals
