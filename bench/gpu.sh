#!/usr/bin/env bash
# Stage 1 of a ~1.5B owl (CLIP ViT-L/14 + abstractor + a 1.1B LLaMA, random weights: nothing is
# downloaded) on one H100/H200 in bf16 with FSDP2 and compiled blocks, for a fixed number of steps;
# prints tokens/s and MFU and records them in bench/results.json. Target: MFU >= 40%.
#   gpu_stage1             128 images per step (the headline figure), then 3 steps under torch.profiler:
#                          operator tables and the device's busy time a step in bench/gpu_profile.txt
#   gpu_stage1_b192/_b256  192 images per step (256 where the GPU has over 120 GB: an H200), more device
#                          work per step against the same host work
#   gpu_stage1_host_floor  the same layers at tiny widths: the host's share of a step (Python, hooks, launches)
#   generation_1b_b32/_7b_b32  batched generation (bench/generation.py): tokens/s and images/s of 32 one-image
#                          requests answered together, at ~1.5B and at the paper's 7.2B
# About 7 minutes on an H200 (each training run builds the model and compiles its blocks). One run by hand:
#   bash bench/gpu.sh --batch-size 96 --no-compile --record-as my_run
# Other GPUs: pass their dense bf16 peak, e.g. --peak-flops 312e12 for an A100.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
if [ $# -gt 0 ]; then exec "$PY" bench/gpu_stage1.py "$@"; fi
# The larger batch: ~67 GiB at 192 images fits an H100's 80 GB; ~86 GiB at 256 an H200's 141 GB.
memory_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
large=192; [ "${memory_mib:-0}" -gt 120000 ] && large=256
status=0
"$PY" bench/gpu_stage1.py --profile bench/gpu_profile.txt || status=1
"$PY" bench/gpu_stage1.py --batch-size $large --record-as gpu_stage1_b$large || status=1
"$PY" bench/gpu_stage1.py --model 1b-narrow --steps 20 --record-as gpu_stage1_host_floor || status=1
"$PY" bench/generation.py --model 1b --batch-size 32 || status=1
"$PY" bench/generation.py --model 7b --batch-size 32 || status=1
exit $status
