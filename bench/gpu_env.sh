# Sourced by bench/gpu_check.sh and bench/gpu_check_more.sh: the environment of a prepared H200
# call and its bounded steps. The caller sets LOG (the log file every step appends to).
set -u
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# a step that runs out of time is stopped with SIGABRT: faulthandler then prints where every
# thread was (the first H200 call lost four steps to timeouts without a line of why)
export PYTHONFAULTHANDLER=1
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
  timeout -s ABRT -k 5 "$secs" "$@" 2>&1 | tee -a "$LOG" | tail -25
  echo "=== $name rc=${PIPESTATUS[0]}" | tee -a "$LOG"
}

gpu_pytest() {  # gpu_pytest SECONDS LOGFILE TEST_FILES...: pytest -m gpu, bounded
  local secs=$1 log=$2
  shift 2
  local pt="" rc
  python3 -c "import pytest_timeout" 2>/dev/null && pt="--timeout=60"  # one hanging test
  # pytest-xdist (on the image): the tests' time is mostly compiling (Triton, fla's autotuning),
  # CPU work that six processes share out; each holds its own small models on the one GPU
  python3 -c "import xdist" 2>/dev/null && pt="$pt -n 6"
  # SIGINT first: pytest stops and prints its summary; report_failures printed each failure
  timeout -s INT -k 15 "$secs" python3 -m pytest -q -m gpu "$@" -p no:cacheprovider \
    -p report_failures -rfEs --tb=short --durations=8 $pt >"$log" 2>&1
  rc=$?
  echo "=== pytest $* rc=$rc" | tee -a "$LOG"
  grep -E "^(=== FAILED|FAILED|ERROR)|passed|failed" "$log" | tail -30
}

pack_fla_configs() {  # fla's tuned configs of this machine's runs -> $OUT/fla_configs.tgz
  step 15 "fla configs" python3 bench/fla_configs.py --out /tmp/fla_configs
  tar czf "$OUT/fla_configs.tgz" -C /tmp/fla_configs . && ls -l "$OUT/fla_configs.tgz" | tee -a "$LOG"
}
