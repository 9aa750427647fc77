#!/usr/bin/env bash
# One GPU lease, one prepared script: install the carried peer wheels, time the MoE layer
# against its peers (bench/kernels.py), then run the Triton kernel tests on the real GPU.
# Run from the repository root with OUT set (the device tool sets it); results land in $OUT.
# Before the lease: bash bench/prepare_gpu_carry.sh, then carry [".whl", ".peers",
# ".triton-cache.tgz"].
set -uo pipefail
source bench/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
  --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
  | tee -a "$OUT/gpu.txt"
# 1) where the time goes: each stage of ours next to a dense mm of its FLOPs
limited "${BREAKDOWN_TIMEOUT:-90}" python3 -m bench.kernels --breakdown \
  --shapes mixtral,olmoe,qwen3 --tokens 16384 2>&1 | tee "$OUT/breakdown.log"
# 2) ours vs the fast peers and the ceiling, all shapes, 4k and 16k tokens
limited "${BENCH_TIMEOUT:-240}" python3 -m bench.kernels --shapes mixtral,olmoe,qwen3 \
  --tokens 4096,16384 --impls ours,ours-triton,dense,hf-grouped,scattermoe,deepspeed,reference \
  --out "$OUT/RESULTS.md" 2>&1 | tee "$OUT/bench.log"
# 3) the slow loop peers at 4k tokens only (10-15x behind at the fine-grained shapes), with
#    megatron-core (SequentialMLP loops over experts without Transformer Engine)
limited "${LOOP_TIMEOUT:-90}" python3 -m bench.kernels --shapes mixtral,olmoe,qwen3 \
  --tokens 4096 --impls ours,loop,hf,megatron,dense --out "$OUT/RESULTS.md" 2>&1 | tee "$OUT/loops.log"
# 4) the Triton kernel tests on the real GPU
MOE_TRITON_AUTOTUNE=0 limited "${TEST_TIMEOUT:-120}" python3 -m pytest -q -x -p no:cacheprovider \
  tests/test_kernels_triton.py tests/test_kernels_triton_routing.py 2>&1 | tee "$OUT/pytest_gpu.log"
