#!/usr/bin/env bash
# README command 1: set up, prepare the bundled digits data, train jobs/digits.toml on 4 ranks.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
. scripts/mpienv.sh
. .venv/bin/activate
NP=${NP:-4}
[ -f data/digits/digits.h5 ] || { echo "[demo] preparing data/digits/digits.h5"; mpitrain data digits; }
echo "[demo] mpiexec -n $NP python -m mpi4py -m mpitrain train jobs/digits.toml $*"
mpiexec -n "$NP" python -m mpi4py -m mpitrain train jobs/digits.toml "$@"
run=runs/digits
python - "$run" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(f"{sys.argv[1]}/metrics.jsonl") if l.strip()]
last = rows[-1]
print(f"[demo] final test accuracy {last['test_acc']:.4f} after {last['epoch']} epochs "
      f"({last['step']} steps, {last['wall_s']:.1f} s); outputs in {sys.argv[1]}/: "
      "config.toml, metrics.jsonl")
sys.exit(0 if last["test_acc"] >= 0.97 else "[demo] error: test accuracy below 0.97")
PY
