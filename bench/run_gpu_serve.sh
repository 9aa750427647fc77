#!/usr/bin/env bash
# One GPU lease for serving: the offloaded-decode benchmark (bench/serve.py: ours with and
# without prefetch vs transformers + accelerate vs the PCIe bound, Mixtral-8x7B layer shapes,
# 4 layers, budgets holding 25% and 50% of the experts), then the serving tests on the GPU
# (side-stream prefetch, the budget check). Run from the repository root with OUT set.
set -uo pipefail
OUT=${OUT:-/tmp/moe-serve-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.current,pcie.link.width.current \
  --format=csv > "$OUT/gpu.txt" 2>&1
if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
python3 -c "import torch, transformers, accelerate; print(torch.__version__, transformers.__version__, accelerate.__version__)" \
  | tee -a "$OUT/gpu.txt"
timeout "${SERVE_TIMEOUT:-360}" python3 -m bench.serve --layers "${LAYERS:-4}" --dir /tmp/mserve \
  --out "$OUT/RESULTS.md" --json-out "$OUT/serve.json" 2>&1 | tee "$OUT/serve.log"
timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -x -p no:cacheprovider tests/test_serve.py \
  2>&1 | tail -20 | tee "$OUT/pytest_gpu.log"
