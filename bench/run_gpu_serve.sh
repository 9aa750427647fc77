#!/usr/bin/env bash
# One GPU lease for serving: the offloaded-decode benchmark (bench/serve.py: ours with and
# without prefetch vs transformers + accelerate vs the PCIe bound, Mixtral-8x7B layer shapes,
# 4 layers, budgets holding 25% and 50% of the experts, bf16 and packed int8 experts), then the
# serving tests on the GPU (side-stream prefetch, the budget check, the Triton path incl.
# in-kernel dequantization), and, when LOAD_TIMEOUT is set, bench/serve_load.py. Run from the
# repository root with OUT set. Before the lease:
# bash bench/prepare_gpu_carry.sh (the accelerate wheel), then carry [".whl"].
set -uo pipefail
source bench/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.current,pcie.link.width.current \
  --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, transformers, accelerate; print(torch.__version__, transformers.__version__, accelerate.__version__)" \
  | tee -a "$OUT/gpu.txt"
limited "${SERVE_TIMEOUT:-420}" python3 -m bench.serve --layers "${LAYERS:-4}" --dir /tmp/mserve \
  --out "$OUT/RESULTS.md" --json-out "$OUT/serve.json" 2>&1 | tee "$OUT/serve.log"
# The serving tests on CUDA: two families' parity grids (Mixtral; DeepSeek-V3 for MLA's
# latent attention through SDPA on the GPU) of the eight, GPT-OSS's MXFP4 tests (sinks, and
# packed MXFP4 experts in the Triton GEMM), the rest of the file in full.
limited "${TEST_TIMEOUT:-150}" python3 -m pytest -q -x -p no:cacheprovider tests/test_serve.py \
  -k "not (qwen2_moe or qwen3_moe or olmoe or deepseek_v2 or glm4_moe or (gpt_oss and not mxfp4))" \
  2>&1 | tail -20 | tee "$OUT/pytest_gpu.log"
# Opt-in (LOAD_TIMEOUT=300): sequential vs static vs continuous batching under Poisson load
# (prompts read in the decode forward, or in forwards of their own: continuous-split).
limited "${LOAD_TIMEOUT:-0}" python3 -m bench.serve_load --layers "${LAYERS:-4}" --requests 24 \
  --dir /tmp/mserve_load --out "$OUT/RESULTS.md" 2>&1 | tail -8 | tee "$OUT/serve_load.log"
# Opt-in (DEEPSEEK_TIMEOUT=300): the same table at DeepSeek-V2-Lite layer shapes (MLA with its
# latent KV cache, 64 experts top-6, 2 shared, a dense first layer).
limited "${DEEPSEEK_TIMEOUT:-0}" python3 -m bench.serve --shape deepseek-v2-lite \
  --layers "${LAYERS:-4}" --batches 1 --quants none --dir /tmp/mserve_ds \
  --out "$OUT/RESULTS.md" 2>&1 | tail -8 | tee "$OUT/serve_deepseek.log"
# Opt-in (GPT_OSS_TIMEOUT=300): GPT-OSS-20B layer shapes, experts as MXFP4 on the Hub: packed
# (4.25 bits a weight over the link and in the slots) vs decoded to bf16 at load.
limited "${GPT_OSS_TIMEOUT:-0}" python3 -m bench.serve --shape gpt-oss-20b \
  --layers "${LAYERS:-4}" --batches 1 --quants mxfp4,none --dir /tmp/mserve_oss \
  --out "$OUT/RESULTS.md" 2>&1 | tail -8 | tee "$OUT/serve_gpt_oss.log"
