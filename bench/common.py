"""Shared by the benchmarks: results go into one JSON file, one entry per benchmark."""

from __future__ import annotations

import json
import platform
import re
import statistics
import time
from pathlib import Path

import torch

from owl_lightning.config import auto_trainer_precision, compute_dtype
from owl_lightning.inference import autocast

RESULTS = Path(__file__).with_name("results.json")
# What the embedded configs train in on this machine: bf16 autocast where the CPU computes bf16 natively, else fp32.
TRAIN_PRECISION = auto_trainer_precision()
TRAIN_DTYPE = compute_dtype(TRAIN_PRECISION)


def train_autocast():
    """The embedded configs' autocast on the CPU (nothing under fp32)."""
    return autocast(torch.device("cpu"), TRAIN_DTYPE)


def machine() -> dict:
    return {
        "cpu_threads": torch.get_num_threads(),
        "train_precision": TRAIN_PRECISION,
        "platform": platform.platform(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def record(name: str, entry: dict) -> None:
    """Merge ``entry`` under ``name`` into bench/results.json and print it."""
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[name] = {**entry, "machine": machine()}
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({name: results[name]}, indent=2))


def rss_kib(field: str) -> int:
    """This process's ``/proc/self/status`` memory figure ``field`` (``VmRSS``, ``VmHWM``: the peak) in KiB."""
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work (timings must include it); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_step_seconds(model: torch.nn.Module, batch: dict, steps: int) -> float:
    """Median seconds of ``steps`` forward + backward passes of an OwlModel on a collated ``batch``, in the
    configs' precision, after one untimed warm-up pass."""
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        with train_autocast():
            out = model(
                batch["input_ids"],
                batch["sample_ids"],
                batch["labels"],
                batch["images"],
                batch["image_counts"],
                image_grids=batch["image_grids"],
                image_frames=batch["image_frames"],
            )
        out.loss.backward()
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return statistics.median(times[1:])
