#!/usr/bin/env bash
# The GPU measurements of issues 4 and 8 in one device call (see BENCHMARKS.md, "On a GPU").
# Runs under the device image's python3 (its jax with CUDA, torch, transformers); the two packages
# of ours it lacks travel as wheels in .whl/ (omegaconf, tensorboardX). Results land in $OUT.
# Make the wheels here first (echo /.whl/ >> .git/info/exclude):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 -d .whl omegaconf==2.4.0 tensorboardX==2.6.5
#   device run: bash scripts/gpu_checks.sh      (carry: .whl; ~4 minutes on an H200)
set -u
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax, flax, transformers, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
timeout 240 python3 scripts/bench_decode_hbm.py 2>&1 | grep -v "^W0\|^I0" | tee "$OUT/decode_ours.jsonl"
timeout 120 python3 scripts/bench_decode_hbm.py --torch 2>&1 | tee "$OUT/decode_torch.jsonl"
timeout 200 python3 scripts/bench_sft.py --mfu --remat dots 2>&1 | tail -5 | tee "$OUT/mfu.json"
