"""What a stage-1 resume costs (issue 21 §3): seconds from process start to the first batch of a run
resumed after 100 and after 100,000 consumed samples. Target: the second at most 1.5 × the first.

Synthetic shards in img2dataset's layout (small PNGs, ``.txt`` + ``.json``; 10,000 samples a shard, as
img2dataset writes them) go into a temporary folder. The real training loader reads them:
``CaptionDataModule.train_dataloader()`` with owl-tiny's processor (its timm transform and caption template;
32 px, so reading 100,000 samples to get there is quick), a stand-in for the Trainer (epoch 0, one process),
and batches taken as training takes them (``on_before_batch_transfer``). One run saves the loader's state
after 100 and after 100,000 samples; then, for each state, a fresh Python process imports everything,
builds the data module, loads the state and takes one batch, timed from just before the process is
started. For comparison: the same state without its stream cursors, which resumes as older versions did
(rebuilding every consumed batch).

    python bench/resume_cost.py [--workers 2] [--repeats 3] [--batch-size 100]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import webdataset as wds
import yaml
from PIL import Image

from common import record
from owl_lightning.config import get_config
from owl_lightning.data.processor import OwlProcessor
from owl_lightning.train.datamodules import CaptionDataModule

CONSUMED = (100, 100_000)
SAMPLES_PER_SHARD = 10_000
SHARDS = 4  # drawn with replacement: 100,000 samples read shards again and again
IMAGE_SIDE = 16


def write_shards(folder: Path) -> Path:
    """``SHARDS`` tars of ``SAMPLES_PER_SHARD`` samples and a data manifest for them; returns the manifest."""
    rng = np.random.default_rng(0)
    images = []
    for _ in range(16):  # a few distinct images, encoded once: writing stays quick
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8)).save(buffer, format="PNG")
        images.append(buffer.getvalue())
    for shard in range(SHARDS):
        with wds.TarWriter(str(folder / f"train-{shard:06d}.tar")) as sink:
            for key in range(shard * SAMPLES_PER_SHARD, (shard + 1) * SAMPLES_PER_SHARD):
                caption = f"synthetic picture number {key}"
                sink.write({"__key__": f"{key:09d}", "png": images[key % 16], "txt": caption, "json": json.dumps({"caption": caption})})
    manifest = folder / "manifest.yaml"
    source = {"name": "synthetic", "shards": str(folder / f"train-{{000000..{SHARDS - 1:06d}}}.tar"), "image_key": "png"}
    manifest.write_text(yaml.safe_dump({"train": [{**source, "num_samples": SHARDS * SAMPLES_PER_SHARD}]}))
    return manifest


def training_data(manifest: Path, workers: int, batch_size: int):
    """The data module and its training loader as a Trainer would have them at the start of epoch 0."""
    processor = OwlProcessor(get_config("owl-tiny"))
    # One long epoch, as the paper's manifest makes it.
    data = CaptionDataModule(
        manifest=str(manifest), processor=processor, batch_size=batch_size, num_workers=workers, batches_per_epoch=10**6
    )
    data.trainer = SimpleNamespace(current_epoch=0, world_size=1, global_rank=0, training=True)
    data.setup("fit")
    return data, data.train_dataloader()


def take(data, batches) -> dict:
    """The next batch, taken as training takes it (counted by the loader, its cursor kept)."""
    return data.on_before_batch_transfer(next(batches), 0)


def save_states(manifest: Path, folder: Path, workers: int, batch_size: int) -> dict[int, Path]:
    """Run the loader to each count in CONSUMED and save its state there; returns ``{consumed: file}``. Its
    workers stop when it returns, before anything is timed."""
    data, loader = training_data(manifest, workers, batch_size)
    batches, taken, files = iter(loader), 0, {}
    for consumed in CONSUMED:
        for _ in range(consumed // batch_size - taken):
            take(data, batches)
        taken = consumed // batch_size
        files[consumed] = folder / f"state_{consumed}.pt"
        torch.save(loader.state_dict(), files[consumed])
    return files


def without_cursors(state_file: Path) -> Path:
    """The state as older versions saved it: the epoch and the batch count only."""
    state = torch.load(state_file, weights_only=True)
    older = state_file.with_name(f"{state_file.stem}_without_cursors.pt")
    torch.save({"epoch": state["epoch"], "batches_done": state["batches_done"]}, older)
    return older


def first_resumed_batch(manifest: Path, state_file: Path, workers: int, batch_size: int) -> dict:
    """A fresh process resumes from ``state_file`` and takes one batch: seconds from before its start,
    and from the data module's construction."""
    command = [sys.executable, __file__, "--resume", str(state_file), "--manifest", str(manifest)]
    command += ["--workers", str(workers), "--batch-size", str(batch_size)]
    started = time.time()
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    child = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "from_process_start_s": round(child["first_batch_at"] - started, 3),
        "from_construction_s": round(child["from_construction_s"], 3),
    }


def resume_and_take_one(args: argparse.Namespace) -> None:
    """The measured process: build the training data, load the saved state, take the first batch."""
    built = time.time()
    data, loader = training_data(Path(args.manifest), args.workers, args.batch_size)
    loader.load_state_dict(torch.load(args.resume, weights_only=True))
    batch = take(data, iter(loader))
    first_batch_at = time.time()
    assert batch["input_ids"].shape[0] == args.batch_size
    print(json.dumps({"first_batch_at": first_batch_at, "from_construction_s": first_batch_at - built}), flush=True)


def median_of(runs: list[dict], key: str) -> float:
    return round(statistics.median(run[key] for run in runs), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per state; the median is kept")
    parser.add_argument("--resume", help=argparse.SUPPRESS)  # the measured child process
    parser.add_argument("--manifest", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.resume:
        resume_and_take_one(args)
        return
    if any(consumed % args.batch_size for consumed in CONSUMED):
        parser.error(f"--batch-size must divide {CONSUMED}")

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        manifest = write_shards(folder)
        written_s = time.perf_counter() - start
        start = time.perf_counter()
        states = save_states(manifest, folder, args.workers, args.batch_size)
        run_to_states_s = time.perf_counter() - start
        runs = {
            consumed: [first_resumed_batch(manifest, state, args.workers, args.batch_size) for _ in range(args.repeats)]
            for consumed, state in states.items()
        }
        # Once only: at 100,000 samples this rebuilds them all.
        rebuilt = {
            consumed: first_resumed_batch(manifest, without_cursors(state), args.workers, args.batch_size)
            for consumed, state in states.items()
        }

    first, last = CONSUMED
    after = {consumed: median_of(measured, "from_process_start_s") for consumed, measured in runs.items()}
    record(
        "stage1_resume",
        {
            "after_100_s": after[first],
            "after_100000_s": after[last],
            "ratio": round(after[last] / after[first], 3),
            "target_ratio": 1.5,
            "from_construction_after_100_s": median_of(runs[first], "from_construction_s"),
            "from_construction_after_100000_s": median_of(runs[last], "from_construction_s"),
            "without_cursors_after_100_s": rebuilt[first]["from_process_start_s"],
            "without_cursors_after_100000_s": rebuilt[last]["from_process_start_s"],
            "runs": {str(consumed): measured for consumed, measured in runs.items()},
            "workers": args.workers,
            "batch_size": args.batch_size,
            "shards": SHARDS,
            "samples_per_shard": SAMPLES_PER_SHARD,
            "shard_write_s": round(written_s, 1),
            "run_to_states_s": round(run_to_states_s, 1),
            "how": "seconds from just before a fresh process starts to its first batch after loading the saved loader "
            "state (median of the repeats): CaptionDataModule.train_dataloader(), owl-tiny processor (32 px), "
            f"{IMAGE_SIDE} px PNG shards in a temp dir; without_cursors: the same state stripped to epoch + "
            "batch count (the resume of older versions, which rebuilds every consumed batch), one run each",
        },
    )


if __name__ == "__main__":
    main()
