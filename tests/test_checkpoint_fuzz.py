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
    out.write_bytes(bytes(data))
    try:
        checkpoint.read(out)
        outcome = "read as valid"
    except UserError as e:
        outcome = "one-line error" if "\n" not in str(e) else "multi-line error"
    except BaseException as e:
        outcome = type(e).__name__
    seen[outcome] = seen.get(outcome, 0) + 1
print(json.dumps(seen))
"""


@pytest.mark.timeout(600)
def test_corrupted_checkpoints_give_one_line_errors(tmp_path):
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
    totals, per_child = {}, 50
    for first in range(0, 300, per_child):
        p = subprocess.run([sys.executable, "-c", CHILD, str(src), str(tmp_path / "bad.h5"), str(first),
                            str(per_child)], capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, f"child died (rc {p.returncode}) on seeds {first}..: {p.stderr[-2000:]}"
        for k, v in json.loads(p.stdout.strip().splitlines()[-1]).items():
            totals[k] = totals.get(k, 0) + v
    print(f"300 corruptions: {totals}")
    assert totals == {"one-line error": 300}, totals
