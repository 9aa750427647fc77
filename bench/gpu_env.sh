# Sourced by the bench/run_gpu*.sh scripts: $OUT, the carried wheels on PYTHONPATH, versions.
OUT=${OUT:-/tmp/moe-bench-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
# Triton builds made ahead of time for this GPU's shapes (bench/prebuild.py, run by
# bench/prepare_gpu_carry.sh with the device's Triton): found in the cache, not compiled here
if [ -f .triton-cache.tgz ]; then
  mkdir -p /tmp/triton-cache && tar -xzf .triton-cache.tgz -C /tmp/triton-cache \
    && export TRITON_CACHE_DIR=/tmp/triton-cache \
    && echo "Triton cache: $(ls /tmp/triton-cache | wc -l) builds made ahead of time"
fi
# autotune timings kept on disk: a later step (another process) reuses an earlier one's
export TRITON_CACHE_AUTOTUNING=1

# limited SECONDS CMD...: CMD under `timeout SECONDS`; 0 skips the step (plain `timeout 0`
# would mean no limit at all).
limited() {
  local seconds=$1
  shift
  if [ "$seconds" -le 0 ]; then
    echo "skipped (its timeout is 0): $*"
    return 0
  fi
  timeout "$seconds" "$@"
}
