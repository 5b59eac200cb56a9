"""scripts/vcluster.sh's bad input: one line, exit 2, nothing made (runs anywhere: the
arguments are checked before anything needs root)."""

from __future__ import annotations

import os
import subprocess

import pytest

pytestmark = pytest.mark.launcher


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args, says", [
    ([], "missing command: up, down or status"),
    (["start"], "unknown command 'start': up, down or status"),
    (["up", "--nodes", "0"], "--nodes must be at least 1"),
    (["up", "--nodes", "two"], "--nodes must be a whole number, not 'two'"),
    (["up", "--nodes", "100000"], "--nodes 100000 is more than 4 x this machine's"),
    (["up", "--cpus-per-node", "0"], "--cpus-per-node must be a whole number 1..1024, not '0'"),
    (["up", "--rate", "fast"], "unknown rate 'fast': use e.g. 1gbit, 10gbit, 500mbit, or none"),
    (["up", "--latency", "-1"], "--latency must be milliseconds (a number >= 0), not '-1'"),
    (["up", "--nodes"], "--nodes needs a value"),
    (["up", "--colour", "red"], "unknown option '--colour'"),
    (["down", "--nodes", "2"], "--nodes applies to 'up' only"),
])
def test_bad_arguments(repo_root, tmp_path, args, says):
    state = tmp_path / "vc"
    r = subprocess.run(["bash", "scripts/vcluster.sh", *args], cwd=repo_root, capture_output=True, text=True,
                       env=dict(os.environ, MPITRAIN_VCLUSTER_DIR=str(state)), timeout=30)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and says in lines[0], r
    assert lines[0].startswith("[vcluster] usage error: ") and not r.stdout
    assert not state.exists()
