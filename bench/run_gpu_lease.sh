#!/usr/bin/env bash
# One call for a short GPU lease (15 minutes with start-up): the figures issues 3 and 6 ask
# for, the most wanted first, each step under its own limit (the defaults add up to 550 s, so
# the call fits a 580 s timeout_s and the lease keeps a margin for its start). Steps that a
# limit stops still write the rows they finished. Run from the repository root with OUT set;
# before the lease: bash bench/prepare_gpu_carry.sh, then carry [".whl", ".peers",
# ".triton-cache.tgz"] (prebuilt Triton kernels: bench/prebuild.py).
#   1) offloaded decode at Mixtral-8x7B layer shapes (issue 6): budgets holding 25% / 50% of
#      the experts, ours with prefetch, with prefetch gated at 0.5, with misses of <= 2 tokens
#      run on the host CPU, and without prefetch, vs transformers + accelerate vs the PCIe
#      bound, bf16 experts, batch 1
#   2) one MoE layer's forward+backward at 16k tokens (issue 3): ours vs the same-FLOPs dense
#      GEMM (the ceiling) vs MegaBlocks and megatron-core's GroupedMLP (neither timed yet),
#      transformers' grouped_mm block, ScatterMoE, DeepSpeed; 230 s, as Triton compiles and
#      autotunes on a fresh machine
#   3) where ours spends its time at 16k tokens, Qwen3-30B-A3B shape first (the furthest
#      from its target: 0.41 of dense on 2026-11-28), then Mixtral: each primitive alone,
#      with the grouped-GEMM candidates side by side (bench.kernels --breakdown), 45 s, rows
#      printed as they are timed
#   4) the Triton kernel tests on the GPU, as far as 40 s takes them (-x: the first failure
#      ends them; bench.kernels checks ours against float64 at each shape as well)
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
  --batches 1 --quants none --prefetch-min-weights 0.5 --host-compute-tokens 2 --dir /tmp/mserve \
  --out "$OUT/RESULTS.md" --json-out "$OUT/serve.json" 2>&1 | tee "$OUT/serve.log"
limited "${KERNEL_TIMEOUT:-230}" python3 -m bench.kernels "${smoke[@]}" \
  --shapes mixtral,olmoe,qwen3 "${tokens[@]}" \
  --impls ours,dense,megablocks,megatron-grouped,hf-grouped,scattermoe,deepspeed --out "$OUT/RESULTS.md" 2>&1 \
  | tee "$OUT/kernels.log"
limited "${BREAKDOWN_TIMEOUT:-45}" python3 -m bench.kernels "${smoke[@]}" --breakdown \
  --shapes "${BREAKDOWN_SHAPE:-qwen3,mixtral}" "${tokens[@]}" 2>&1 | tee "$OUT/breakdown.log"
MOE_TRITON_AUTOTUNE=0 limited "${TEST_TIMEOUT:-40}" python3 -m pytest -q -x -p no:cacheprovider \
  tests/test_kernels_triton.py 2>&1 | tail -5 | tee "$OUT/pytest_gpu.log"
