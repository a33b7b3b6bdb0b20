# Sourced by bench/gpu_check.sh and bench/gpu_check_more.sh: the environment of a prepared H200
# call and its bounded steps. The caller sets LOG (the log file every step appends to).
set -u
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# the GPU tests compare with CPU engines: run those on the PyTorch reference ops, not the C++ CPU
# kernels (compiling six of them would take minutes of the device budget; they have CPU tests)
export QWEN35_NO_KERNELS=1
if ls .whl/*.whl >/dev/null 2>&1; then  # the carried wheels (gpu_check.sh's header says which)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/src:$PWD/tests"

step() {  # step SECONDS NAME COMMAND...: a bounded step, its output appended to $LOG
  local secs=$1 name=$2
  shift 2
  echo "=== $name ($(date -u +%T))" | tee -a "$LOG"
  timeout "$secs" "$@" 2>&1 | tee -a "$LOG" | tail -25
  echo "=== $name rc=${PIPESTATUS[0]}" | tee -a "$LOG"
}
