"""Bytes FSDP2 all-gathers per rank per step for the frozen LLM, by frozen placement, measured on CPU
processes (gloo); and the step time and MFU they project for owl-llama7b on 8, 64 and 512 GPUs.

Measured: ``owl-lightning stage1 fit`` on owl-smol (SmolLM2-135M frozen, fp32) for 2 steps of 2
captions a rank: ``shard`` and ``replicate`` on 2 processes, ``shard`` and ``hsdp`` on 4 processes taken
as 2 "nodes" of 2. ``tests/helpers.AllGatherReport`` counts at ``torch.distributed.all_gather_single``
(FSDP2's all-gather) and attributes each to the parameters of the unit that issued it.

Projected (docs/scaling.md): the per-step volumes the measurement confirms (frozen weights: 2 x their
bytes x (group - 1) / group, a forward and a backward gather) applied to owl-llama7b's parameter counts,
against compute time from its FLOPs at the MFU one GPU measured (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from common import record

ROOT = Path(__file__).resolve().parent.parent
RUNS = [("shard", 2), ("replicate", 2), ("shard", 4), ("hsdp", 4)]
NODE_SIZE = 2

# The projection's assumptions, per GPU (docs/scaling.md says where each comes from).
PEAK_FLOPS = 989e12  # H100/H200 dense bf16
MEASURED_MFU = 0.404  # one H200, stage 1 at ~1.5B, 192 images a step, compiled (docs/benchmarks.md)
INTRA_NODE_BYTES_PER_S = 450e9  # NVLink
INTER_NODE_BYTES_PER_S = 50e9  # 400 Gb/s InfiniBand per GPU
GPUS_PER_NODE = 8
GLOBAL_BATCH = 4096  # the paper's stage-1 pairs a step
MICRO_BATCH = 64  # pairs a GPU a forward (stage1_llama7b.yaml)
CAPTION_TOKENS = 34  # BOS + 32 + EOS, as bench/gpu_stage1.py: 99 LLM tokens a sample with the 65 visual ones


def measure(placement: str, processes: int, tmp: Path) -> dict:
    """One run's bytes received per rank per step by kind: the median over its steps, and rank 0's."""
    out = tmp / f"{placement}{processes}"
    report = {"class_path": "helpers.AllGatherReport", "init_args": {"out": str(out), "node_size": NODE_SIZE}}
    strategy = {
        "class_path": "owl_lightning.train.parallel.AtomicModelParallelStrategy",
        "init_args": {
            "data_parallel_size": processes,
            "tensor_parallel_size": 1,
            "frozen_placement": placement,
            "hsdp_shard_size": NODE_SIZE,
        },
    }
    settings = {
        "trainer": {
            "accelerator": "cpu",
            # fp32: owl-smol's BatchNorm fails under FSDP2 in bf16 on the CPU (bf16 weights, fp32 statistics).
            "precision": "32-true",
            "devices": processes,
            "max_steps": 2,
            "num_sanity_val_steps": 0,
            "limit_val_batches": 0,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "default_root_dir": str(out),
            "strategy": strategy,
            "callbacks": [report],
        },
        "data": {"num_workers": 0, "batch_size": 2},
    }
    config = tmp / f"{placement}{processes}.yaml"
    config.write_text(json.dumps(settings))
    command = [sys.executable, "-m", "owl_lightning", "stage1", "fit"]
    command += [
        "--config",
        str(ROOT / "experiments/base.yaml"),
        "--config",
        str(ROOT / "experiments/stage1_smol.yaml"),
        "--config",
        str(config),
    ]
    # One thread per process: the ranks share the machine's cores.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    steps = json.loads((out / "rank0.json").read_text())["micro_batches"]
    kinds = {kind for step in steps for kind in step["bytes"]}
    return {
        key: {kind: statistics.median(step[key].get(kind, 0) for step in steps) for kind in sorted(kinds)}
        for key in ("bytes", "bytes_across_nodes")
    }


def owl_llama7b_sizes() -> dict:
    """owl-llama7b's stage-1 parameter counts and training FLOPs of one sample (built on meta: nothing allocated)."""
    from owl_lightning.config import STAGE1, get_config
    from owl_lightning.models.owl import build_owl
    from owl_lightning.train.flops import StepFlops

    with torch.device("meta"):
        model = build_owl(get_config("owl-llama7b"), pretrained=False, tokenizer=None)
    model.apply_recipe(STAGE1)
    flops = StepFlops.of(model)
    tokens = flops.visual_tokens_per_image + CAPTION_TOKENS
    sample = flops.per_image + tokens * flops.per_token + tokens * (tokens + 1) / 2 * flops.per_causal_pair
    return {
        "frozen_params": sum(p.numel() for p in model.parameters() if not p.requires_grad),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "flops_per_sample": sample + (CAPTION_TOKENS - 1) * flops.per_supervised_token,
    }


def collective_seconds(volume: float, group: int, nodes_spanned: int) -> float:
    """Time to receive ``volume`` x (group - 1) / group bytes in a ring over ``group`` GPUs on ``nodes_spanned``
    nodes: the part from other nodes over the inter-node links, the rest over NVLink."""
    across = volume * (nodes_spanned - 1) / nodes_spanned
    within = volume * (group - 1) / group - across
    return across / INTER_NODE_BYTES_PER_S + within / INTRA_NODE_BYTES_PER_S


def project(sizes: dict, gpus: int, placement: str) -> dict:
    """One step of owl-llama7b stage 1 at the paper's global batch on ``gpus`` GPUs: compute and
    communication seconds per GPU, the step (communication hidden under compute as far as it lasts)
    and its MFU, and the MFU were nothing hidden."""
    nodes = max(1, gpus // GPUS_PER_NODE)
    per_gpu = GLOBAL_BATCH // gpus
    micro_batches = max(1, per_gpu // MICRO_BATCH)
    flops = per_gpu * sizes["flops_per_sample"]
    compute = flops / (MEASURED_MFU * PEAK_FLOPS)
    trainable = sizes["trainable_params"]
    # Trainable: bf16 gathers in forward and backward of every micro-batch, one fp32 reduce-scatter a step.
    communication = 2 * micro_batches * collective_seconds(2 * trainable, gpus, nodes) + collective_seconds(4 * trainable, gpus, nodes)
    frozen = 2 * sizes["frozen_params"]  # bf16
    if placement == "shard":
        communication += 2 * micro_batches * collective_seconds(frozen, gpus, nodes)
    elif placement == "hsdp":
        communication += 2 * micro_batches * collective_seconds(frozen, min(gpus, GPUS_PER_NODE), 1)
    step = max(compute, communication)
    return {
        "gpus": gpus,
        "placement": placement,
        "pairs_per_gpu": per_gpu,
        "micro_batches": micro_batches,
        "compute_s": round(compute, 3),
        "communication_s": round(communication, 3),
        "step_s": round(step, 3),
        "mfu": round(flops / (step * PEAK_FLOPS), 3),
        # FSDP2 prefetches the next unit's gather during this one's compute; without any overlap:
        "mfu_no_overlap": round(flops / ((compute + communication) * PEAK_FLOPS), 3),
        "bound_by": "communication" if communication > compute else "compute",
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        measured = {f"{placement}_{processes}_processes": measure(placement, processes, Path(tmp)) for placement, processes in RUNS}
    sizes = owl_llama7b_sizes()
    projection = [project(sizes, gpus, placement) for gpus in (8, 64, 512) for placement in ("shard", "hsdp", "replicate")]
    for row in projection:
        print(row)
    record(
        "frozen_placement",
        {
            "measured_bytes_per_rank_per_step": measured,
            "how": "owl-lightning stage1 fit, owl-smol in fp32 (frozen LLM 4 bytes a parameter), 2 steps of 2 captions a rank, "
            "FSDP2 over CPU processes "
            f"(gloo), {NODE_SIZE} processes to a node; rank 0's bytes received in all-gathers, median over steps, "
            "by what they gather (tests/helpers.AllGatherReport)",
            "owl_llama7b_stage1": sizes,
            "projection": projection,
        },
    )


if __name__ == "__main__":
    main()
