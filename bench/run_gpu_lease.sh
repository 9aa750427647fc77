#!/usr/bin/env bash
# One call for a short GPU lease (15 minutes with start-up): the figures issues 3 and 6 ask
# for, the most wanted first, each step under its own limit (the defaults add up to 565 s, so
# the call fits a 590 s timeout_s and the lease keeps a margin for its start). Steps that a
# limit stops still write the rows they finished. Run from the repository root with OUT set;
# before the lease: bash bench/prepare_gpu_carry.sh, then carry [".whl", ".peers",
# ".triton-cache.tgz"] (prebuilt Triton kernels: bench/prebuild.py).
#   1) offloaded decode at Mixtral-8x7B layer shapes (issue 6): budgets holding 25% / 50% of
#      the experts, ours (cross-layer prefetch behind its precision gate), without the gate,
#      with half of each predicted expert copied ahead and the rest when used (a wrong guess
#      costs half a copy: --prefetch-fraction), with misses of <= 2 tokens run on the host
#      CPU, and without prefetch, vs transformers +
#      accelerate vs the PCIe bound, bf16 experts, batch 1
#   2) where that decode's time goes (bench/serve_timeline.py): link, kernels and host waits
#      per token under 25% and 100% of the experts, profiled, and the link's idle time per
#      layer with the --prefetch-fraction that would fill it, 45 s
#   3) one MoE layer's forward+backward at 16k tokens (issue 3), Qwen3-30B-A3B shape first
#      (the one under its target on 2026-11-30): ours vs the same-FLOPs dense GEMM (the
#      ceiling), ours replayed from CUDA graphs (a step waits for the device nowhere: the
#      host's ~5 ms of launches become two), ours with the SwiGLU and the combine as separate
#      kernels (as timed on 2026-11-30, before they moved into the GEMMs' epilogues and y
#      stopped being kept: the gain side by side), vs megatron-core's GroupedMLP (its router
#      mended, not timed yet), MegaBlocks, ScatterMoE, transformers' grouped_mm block,
#      DeepSpeed; each step now starts with its gradients set to None, 235 s
#   4) where ours spends its time (bench.kernels --breakdown): skipped unless BREAKDOWN_TIMEOUT
#      is set (recorded on 2026-11-30)
#   5) the GPU-only serving tests (the expert step queued without waiting for the device; the
#      budget held), 30 s, then the Triton kernel tests, as far as 20 s takes them (-x: the first
#      failure ends them; bench.kernels checks ours against float64 at each shape as well)
# SMOKE=1 rehearses the same steps on the CPU at tiny shapes (the interpreter runs Triton).
set -uo pipefail
source bench/gpu_env.sh
smoke=()
tokens=(--tokens 16384)
if [ "${SMOKE:-0}" = 1 ]; then
  smoke=(--smoke)
  tokens=()
  export TRITON_INTERPRET=1
else
  nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.current,pcie.link.width.current \
    --format=csv > "$OUT/gpu.txt" 2>&1
fi
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
  | tee -a "$OUT/gpu.txt"
limited "${SERVE_TIMEOUT:-235}" python3 -m bench.serve "${smoke[@]}" --layers "${LAYERS:-4}" \
  --batches 1 --quants none --prefetch-min-precisions 0 --prefetch-fractions 0.5 \
  --host-compute-tokens 2 --dir /tmp/mserve \
  --out "$OUT/RESULTS.md" --json-out "$OUT/serve.json" 2>&1 | tee "$OUT/serve.log"
limited "${TIMELINE_TIMEOUT:-45}" python3 -m bench.serve_timeline "${smoke[@]}" \
  --layers "${LAYERS:-4}" --dir /tmp/mserve --out "$OUT/RESULTS.md" \
  --json-out "$OUT/timeline.json" 2>&1 | tee "$OUT/timeline.log"
limited "${KERNEL_TIMEOUT:-235}" python3 -m bench.kernels "${smoke[@]}" \
  --shapes qwen3,olmoe,mixtral "${tokens[@]}" \
  --impls ours,ours-graphed,dense,ours-apart,megatron-grouped,megablocks,scattermoe,hf-grouped,deepspeed --out "$OUT/RESULTS.md" 2>&1 \
  | tee "$OUT/kernels.log"
limited "${BREAKDOWN_TIMEOUT:-0}" python3 -m bench.kernels "${smoke[@]}" --breakdown \
  --shapes "${BREAKDOWN_SHAPE:-qwen3,mixtral}" "${tokens[@]}" 2>&1 | tee "$OUT/breakdown.log"
limited "${SERVE_TEST_TIMEOUT:-30}" python3 -m pytest -q -p no:cacheprovider -rs -m gpu \
  tests/test_serve.py 2>&1 | tail -6 | tee "$OUT/pytest_gpu.log"
MOE_TRITON_AUTOTUNE=0 limited "${TEST_TIMEOUT:-20}" python3 -m pytest -q -x -p no:cacheprovider \
  tests/test_kernels_triton.py 2>&1 | tail -5 | tee -a "$OUT/pytest_gpu.log"
