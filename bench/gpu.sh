#!/usr/bin/env bash
# Stage 1 of a ~1.5B owl (CLIP ViT-L/14 + abstractor + a 1.1B LLaMA, random weights: nothing is
# downloaded) on one H100/H200 in bf16 with FSDP2 and compiled blocks, for a fixed number of steps;
# prints tokens/s and MFU and records them in bench/results.json. Target: MFU >= 40%.
#   gpu_stage1             128 images per step (the headline figure)
#   gpu_stage1_b192        192 images per step (more device work per step against the same host work)
#   gpu_stage1_host_floor  the same layers at tiny widths: the host's share of a step (Python, hooks, launches)
# About 6 minutes on an H100 (each run builds the model and compiles its blocks). One run by hand:
#   bash bench/gpu.sh --batch-size 96 --no-compile --record-as my_run
# Other GPUs: pass their dense bf16 peak, e.g. --peak-flops 312e12 for an A100.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
if [ $# -gt 0 ]; then exec "$PY" bench/gpu_stage1.py "$@"; fi
status=0
"$PY" bench/gpu_stage1.py || status=1
"$PY" bench/gpu_stage1.py --batch-size 192 --record-as gpu_stage1_b192 || status=1
"$PY" bench/gpu_stage1.py --model 1b-narrow --steps 20 --record-as gpu_stage1_host_floor || status=1
exit $status
