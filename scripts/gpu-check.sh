#!/usr/bin/env bash
# The GPU check (one machine, one GPU, Ubuntu 24.04, no network; ~5-8 min): the
# CUDA-aware Open MPI from shared/gpu, the preflight (CUDA build flags, CUDA-awareness
# with and without MPITRAIN_CUDA_AWARE=1, h5py's MPI), the CUDA tests on the staged and
# the direct path, `bench step` and `bench allreduce` on the GPU, and an fp16 + compression
# digits run where h5py has MPI. Each stage has a timeout; a failed stage does not stop
# the others; the summary is ${OUT:-./gpu-check-out}/summary.txt (one line per stage, the
# logs beside it); the exit status is 1 if any stage failed.
#   bash scripts/gpu-check.sh            # run it (stages that need CUDA skip without a GPU)
#   bash scripts/gpu-check.sh --dry-run  # print each stage's command, run nothing
# Env: MPITRAIN_VENV (default .venv: used as it is if present, e.g. carried; else
#      scripts/setup.sh makes it, which needs the network), OMPI_TARBALL (default: the first of
#      shared/gpu/, ../shared/gpu/, gpu/ ompi-4.1.4-cuda.tar.xz), OMPI_PREFIX (/opt/ompi-cuda),
#      NP (2 ranks on the one GPU), GPU_CHECK_DEVICE=cpu (try the script on a machine without a
#      GPU: the stages run on the CPU, bf16 for fp16, instead of skipping).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
OUTDIR=${OUT:-$ROOT/gpu-check-out}
VENV=${MPITRAIN_VENV:-$ROOT/.venv}
PREFIX=${OMPI_PREFIX:-/opt/ompi-cuda}
NP=${NP:-2}
DEV=${GPU_CHECK_DEVICE:-cuda}
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
export ROOT OUTDIR VENV PREFIX NP DEV DRY PY=python
mkdir -p "$OUTDIR"
SUMMARY=$OUTDIR/summary.txt
: >"$SUMMARY"
FAILED=0
t_start=$SECONDS

note() { printf '%s\n' "$*" | tee -a "$SUMMARY"; }

# stage NAME TIMEOUT_S COMMAND...: run it with a timeout, its output in OUTDIR/NAME.log;
# one summary line PASS / FAIL (exit status) / SKIP (exit 77)
stage() {
  local name=$1 limit=$2
  shift 2
  local log=$OUTDIR/$name.log t0=$SECONDS rc
  if [ "$DRY" = 1 ]; then
    note "DRY  $name (timeout ${limit}s): $*"
    return 0
  fi
  # a fresh bash with this script's functions (timeout runs programs, not functions)
  timeout --kill-after=10 "$limit" bash -c "set -o pipefail; $(declare -f); \"\$@\"" stage "$@" >"$log" 2>&1
  rc=$?
  local took=$((SECONDS - t0))
  case $rc in
    0) note "PASS $name (${took}s)" ;;
    77) note "SKIP $name (${took}s): $(tail -n 1 "$log")" ;;
    124|137) note "FAIL $name: timed out after ${limit}s (log: $log)"; FAILED=1 ;;
    *) note "FAIL $name (exit $rc, ${took}s; log: $log): $(tail -n 1 "$log" | cut -c1-200)"; FAILED=1 ;;
  esac
  return $rc
}

# ---- the CUDA-aware Open MPI ---------------------------------------------------------
install_ompi() {
  if [ -x "$PREFIX/bin/mpiexec" ]; then
    echo "present: $PREFIX"
    return 0
  fi
  local tb=${OMPI_TARBALL:-}
  if [ -z "$tb" ]; then
    for c in shared/gpu ../shared/gpu gpu; do
      [ -f "$c/ompi-4.1.4-cuda.tar.xz" ] && tb=$c/ompi-4.1.4-cuda.tar.xz && break
    done
  fi
  [ -n "$tb" ] && [ -f "$tb" ] || { echo "no ompi-4.1.4-cuda.tar.xz found (set OMPI_TARBALL)"; return 1; }
  local top
  top=$(tar -tJf "$tb" | head -n 1 | cut -d/ -f1)
  [ "/opt/$top" = "$PREFIX" ] || { echo "the tarball holds $top/, not $(basename "$PREFIX")/"; return 1; }
  tar -C /opt -xJf "$tb" && echo "unpacked $tb into /opt/$top"
}
stage ompi 120 install_ompi
if [ -x "$PREFIX/bin/mpiexec" ]; then  # mpi4py's wheel and h5py then load this libmpi
  export PATH=$PREFIX/bin:$PATH LD_LIBRARY_PATH=$PREFIX/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi

# ---- the virtual environment: carried, or made by setup.sh (needs the network) ---------
setup_venv() {
  if [ -x "$VENV/bin/python" ]; then
    echo "using $VENV"
    return 0
  fi
  MPITRAIN_VENV=$VENV bash scripts/setup.sh
}
stage venv 300 setup_venv
if [ ! -x "$VENV/bin/python" ] && [ "$DRY" = 0 ]; then
  note "no Python environment at $VENV: nothing else can run"
  exit 1
fi
# shellcheck disable=SC1091
[ "$DRY" = 1 ] || { . "$VENV/bin/activate"; . scripts/mpienv.sh; }
mpi() { mpiexec -n "$NP" "$PY" -m mpi4py "$@"; }  # NP ranks, an exception on one aborts all

has_cuda() { [ "$DRY" = 1 ] || "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; }
has_h5mpi() { [ "$DRY" = 1 ] || "$PY" -c 'import sys, h5py; sys.exit(not h5py.get_config().mpi)' 2>/dev/null; }
need_cuda() { [ "$DEV" = cpu ] || has_cuda || { echo "torch sees no CUDA device (torch $("$PY" -c 'import torch; print(torch.__version__)' 2>&1))"; exit 77; }; }

# ---- preflight -----------------------------------------------------------------------
preflight() {
  local bad=0
  echo "mpiexec: $(command -v mpiexec) ($(mpiexec --version 2>/dev/null | head -n 1))"
  "$PY" - <<'EOF' || bad=1
import torch, mpi4py
from mpi4py import MPI
print(f"torch {torch.__version__}, built for CUDA {torch.version.cuda}, cuda available {torch.cuda.is_available()}"
      + (f", {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
print(f"mpi4py {mpi4py.__version__} on {MPI.Get_library_version().splitlines()[0].strip(chr(0))}")
EOF
  local built
  built=$(ompi_info --parsable --all 2>/dev/null | grep -m1 'mpi_built_with_cuda_support:value' | cut -d: -f7)
  echo "ompi_info mpi_built_with_cuda_support: ${built:-unknown}"
  if has_cuda && [ "$built" != "true" ]; then echo "FAIL: the Open MPI on PATH is not built with CUDA"; bad=1; fi
  # Open MPI 4.x answers how it was built, not whether CUDA works: never trusted without the variable
  local off on
  off=$(env -u MPITRAIN_CUDA_AWARE "$PY" -c 'from mpitrain.comm import buffers; print(buffers.cuda_aware())')
  on=$(MPITRAIN_CUDA_AWARE=1 "$PY" -c 'from mpitrain.comm import buffers; print(buffers.cuda_aware())')
  echo "cuda_aware(): without MPITRAIN_CUDA_AWARE $off, with MPITRAIN_CUDA_AWARE=1 $on"
  [ "$on" = "True" ] || { echo "FAIL: MPITRAIN_CUDA_AWARE=1 is not honoured"; bad=1; }
  if has_cuda; then  # the direct path really works: a CUDA buffer summed by MPI itself
    MPITRAIN_CUDA_AWARE=1 mpi -c '
import torch
from mpitrain.comm import World
w = World.create()
dev = w.select_device("cuda")
t = torch.full((1 << 20,), float(w.rank + 1), device=dev)
w.allreduce_(t)
ok = bool((t == w.size * (w.size + 1) / 2).all())
assert w.direct_cuda and ok, (w.direct_cuda, ok)
if w.is_root: print(f"direct CUDA allreduce on {dev}: correct sums")
' || { echo "FAIL: direct CUDA allreduce"; bad=1; }
  fi
  "$PY" -c 'import h5py; print(f"h5py {h5py.__version__}, HDF5 {h5py.version.hdf5_version}, MPI {h5py.get_config().mpi}")' \
    || echo "h5py does not import (the digits run will be skipped)"
  return $bad
}
stage preflight 120 preflight

# ---- the CUDA tests, staged and direct -------------------------------------------------
cuda_tests() {  # $1: 0 staged, 1 direct
  need_cuda
  local files=(tests/test_cuda.py tests/comm/test_buffers.py tests/comm/test_collectives.py)
  has_h5mpi && files+=(tests/test_resume.py)  # its GPU test trains digits
  MPITRAIN_CUDA_AWARE=$1 mpi -m pytest --with-mpi -q -p no:cacheprovider --timeout=240 --timeout-method=thread \
    -rs -k "cuda or gpu or staged_copies or test_cuda.py" "${files[@]}"
}
stage tests-staged 200 cuda_tests 0
stage tests-direct 200 cuda_tests 1

# ---- bench step: equal parameters across overlap modes; thread vs none -----------------
bench_step() {
  need_cuda
  mpi -m mpitrain bench step --device "$DEV" --steps 20 --warmup 5 --repeats 3 --hidden 1024,1024,1024 \
    --no-ddp | tee "$OUTDIR/bench-step.txt"
  "$PY" - "$OUTDIR/bench-step.txt" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
ms = {m[1]: float(m[2]) for m in re.finditer(r"^mpitrain sync \((\w+)\)\s+([\d.]+)", text, re.M)}
diffs = [float(d) for d in re.findall(r": ([\d.]+e[-+]\d+)", text.split("max |param difference|")[-1])]
print(f"thread {ms.get('thread')} ms/step, none {ms.get('none')} ms/step, max |param diff| {max(diffs, default=None)}")
assert "on cpu" in text or "CUDA direct" in text or "CUDA staged" in text, "the header names no CUDA path"
assert len(ms) == 3 and diffs and max(diffs) <= 1e-5, "parameters differ between the overlap modes"
EOF
}
stage bench-step 150 bench_step

# ---- bench allreduce, staged and direct -------------------------------------------------
bench_allreduce() {  # $1: 0 staged, 1 direct
  need_cuda
  local want=staged
  [ "$1" = 1 ] && want=direct
  MPITRAIN_CUDA_AWARE=$1 mpi -m mpitrain bench allreduce --device "$DEV" --sizes 64K,4M,64M --iters 5 \
    | tee "$OUTDIR/bench-allreduce-$want.txt"
  [ "$DEV" = cpu ] || grep -q "CUDA $want" "$OUTDIR/bench-allreduce-$want.txt" || { echo "the header does not say CUDA $want"; return 1; }
}
stage bench-allreduce-staged 120 bench_allreduce 0
stage bench-allreduce-direct 120 bench_allreduce 1

# ---- fp16 + compression on digits (needs h5py with MPI) ----------------------------------
digits_run() {
  need_cuda
  has_h5mpi || { echo "h5py has no MPI support here: no digits run"; exit 77; }
  local data=$OUTDIR/data/digits.h5 kind
  [ -f "$data" ] || "$PY" -m mpitrain data digits --out "$data" || return 1
  for kind in sign powersgd; do
    MPITRAIN_CUDA_AWARE=1 mpi -m mpitrain train jobs/digits.toml --set data.path="$data" \
      --set train.device="$DEV" --set train.precision="$([ "$DEV" = cpu ] && echo bf16 || echo fp16)" --set sync.strategy=allreduce \
      --set sync.allreduce.compress.kind=$kind --set train.epochs=2 --set train.resume=never \
      --set train.progress=false --set output.dir="$OUTDIR/runs/digits-fp16-$kind" || return 1
    tail -n 1 "$OUTDIR/runs/digits-fp16-$kind/metrics.jsonl"
  done
}
stage digits-fp16-compress 200 digits_run

note "total $((SECONDS - t_start))s; $([ $FAILED = 0 ] && echo "no stage failed" || echo "some stage FAILED")"
exit $FAILED
