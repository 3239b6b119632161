#!/usr/bin/env bash
# Stage 1 of a ~1.5B owl (CLIP ViT-L/14 + abstractor + a 1.1B LLaMA, random weights: nothing is
# downloaded) on one H100/H200 in bf16 with FSDP2, for a fixed number of steps; prints tokens/s and
# MFU and records them in bench/results.json ("gpu_stage1"). Target: MFU >= 40%.
#   bash bench/gpu.sh                                   # 5 warm-up + 30 timed steps, 64 images per step
#   bash bench/gpu.sh --batch-size 96 --activation-checkpointing
# Other GPUs: pass their dense bf16 peak, e.g. --peak-flops 312e12 for an A100.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
exec "$PY" bench/gpu_stage1.py "$@"
