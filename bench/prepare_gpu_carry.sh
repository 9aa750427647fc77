#!/usr/bin/env bash
# Prepare, on this (networked) machine, what the lent GPU machine cannot download: the peer
# packages as wheels in .whl/ (for its Python 3.12; bench/gpu_env.sh installs them there) for
# the device tool's `carry` (".whl", and ".peers" for ScatterMoE and MegaBlocks). Both folders
# are ignored by git: peer code is brought beside the project for a run, never committed.
#   bash bench/prepare_gpu_carry.sh
#   then: run ... carry [".whl", ".peers", ".triton-cache.tgz"]
# It also builds every Triton kernel for sm_90 with the device's Triton version, offline, and
# packs the builds the benchmark's layer steps need into .triton-cache.tgz, a Triton cache
# (DEVICE_TRITON=none skips both).
# ScatterMoE has no wheel: fetch github:shawntan/scattermoe with the search tool's `fetch`
# and copy its scattermoe/ package to .peers/scattermoe (bench/kernels.py imports it there).
set -euo pipefail
PY=${PYTHON:-python3}
mkdir -p .whl
# binary wheels for CPython 3.12 on x86_64 (the device's interpreter); megatron-core 0.16.1 is
# its last release with the legacy GroupedMLP (the `megatron-grouped` row of bench/kernels.py)
PLATFORMS="--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64"
PLATFORMS="$PLATFORMS --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64"
# shellcheck disable=SC2086
$PY -m pip download -q --only-binary=:all: --python-version 3.12 $PLATFORMS --no-deps -d .whl \
  pydantic==2.14.4 pydantic_core==2.50.5 annotated_types typing_inspection \
  hjson accelerate==1.15.0 megatron-core==0.16.1
# DeepSpeed ships as a source package: build a pure-Python wheel without its CUDA ops
DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
# MegaBlocks and its stk ship as source packages whose CUDA extension needs nvcc: bring their
# Python packages to .peers/ (bench/peer_shims.py stands in for the extension)
if [ ! -d .peers/megablocks ] || [ ! -d .peers/stk ]; then
  tmp=$(mktemp -d)
  $PY -m pip download -q --no-deps --no-build-isolation --no-binary :all: -d "$tmp" \
    megablocks==0.10.0 stanford-stk==0.7.1
  mkdir -p .peers
  tar -xzf "$tmp"/megablocks-0.10.0.tar.gz -C "$tmp"
  tar -xzf "$tmp"/stanford_stk-0.7.1.tar.gz -C "$tmp"
  rm -rf .peers/megablocks .peers/stk
  cp -r "$tmp"/megablocks-0.10.0/megablocks "$tmp"/stanford_stk-0.7.1/stk .peers/
  rm -rf "$tmp"
fi
if [ ! -d .peers/scattermoe ]; then
  echo "note: .peers/scattermoe is missing (see the comment at the top of this script)" >&2
fi
# pre-flight: every Triton kernel must build for sm_90 with the device's Triton (3.6.0 on the
# lent H200, bench/kernels_offline.py), before any of the lease is spent on finding out
DEVICE_TRITON=${DEVICE_TRITON:-3.6.0}
if [ "$DEVICE_TRITON" != none ]; then
  venv=/tmp/triton-$DEVICE_TRITON
  if [ ! -x "$venv/bin/python" ]; then
    $PY -m venv "$venv"
    "$venv/bin/pip" install -q torch==2.13.0 "triton==$DEVICE_TRITON" numpy safetensors
  fi
  env -u TRITON_INTERPRET PYTHONPATH="$PWD" "$venv/bin/python" -m bench.kernels_offline \
    --json > /tmp/kernels_offline_device.json
  echo "kernels build for sm_90 with triton $DEVICE_TRITON: $(python3 -c "
import json; rows = json.load(open('/tmp/kernels_offline_device.json'))
print(len(rows), 'builds,', sum(r['spill_bytes'] > 0 for r in rows), 'spilling')")"
  # the builds the benchmark's layer steps will need, in a Triton cache carried to the device
  # (bench/gpu_env.sh unpacks it): the lease compiles none of them
  cache=$(mktemp -d)
  TRITON_CACHE_DIR=$cache env -u TRITON_INTERPRET PYTHONPATH="$PWD" "$venv/bin/python" \
    -m bench.prebuild --shapes mixtral,olmoe,qwen3 --tokens 4096,16384,32768
  tar -czf .triton-cache.tgz -C "$cache" . && rm -rf "$cache"
  du -sh .triton-cache.tgz
fi
du -sh .whl
