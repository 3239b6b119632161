"""Stage-1 data pipeline throughput versus its floor (issue 3).

Ours: ``CaptionDataModule.train_dataloader()`` — resampled shards, shuffle, decode, timm
transform, caption tokenisation, padded batches. Floor: the same tars read with ``tarfile``,
the same images decoded, converted to RGB and resized with PIL alone, nothing else; same
DataLoader worker count. Both are timed over the same number of samples in steady state (after worker start-up
and the shuffle buffer's first fill), in alternating rounds (ours, floor, ours, ...) so that a change in the
machine's speed during the run reaches both; the medians are compared. Target: ours ≥ 0.9 × floor.

    python bench/stage1_data.py [--batches 150] [--workers 1] [--rounds 3]
"""

from __future__ import annotations

import argparse
import io
import statistics
import tarfile
import time

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from common import record
from owl_lightning.config import get_config
from owl_lightning.data.processor import OwlProcessor
from owl_lightning.data.shards import expand_shards
from owl_lightning.models.vision import vision_data_config
from owl_lightning.train.datamodules import CaptionDataModule


class PilFloor(IterableDataset):
    """Tar members → PIL decode → RGB → resize; each worker reads its own tars, in a loop."""

    def __init__(self, shards: list[str], image_size: int, batch_size: int) -> None:
        self.shards, self.image_size, self.batch_size = shards, image_size, batch_size

    def __iter__(self):
        info = get_worker_info()
        mine = self.shards[info.id :: info.num_workers] if info else self.shards
        batch = []
        while True:
            for shard in mine:
                with tarfile.open(shard) as tar:
                    for member in tar:
                        if member.name.endswith((".png", ".jpg", ".webp")):
                            image = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
                            batch.append(image.resize((self.image_size, self.image_size), Image.BICUBIC))
                            if len(batch) == self.batch_size:
                                yield batch  # the images travel to the main process, as ours do
                                batch = []


def samples_per_second(loader, batches: int, count, warmup: int) -> float:
    iterator = iter(loader)
    for _ in range(warmup):  # worker start-up and the shuffle buffer's first fill are not steady state
        next(iterator)
    start, samples = time.perf_counter(), 0
    for _ in range(batches):
        samples += count(next(iterator))
    return samples / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", default="data_manifests/embedded_stage1.yaml")
    parser.add_argument("--batches", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="timings of each, alternating")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the data path, not the model, is measured: keep the main process light

    processor = OwlProcessor(get_config("owl-smol"))
    data = CaptionDataModule(
        manifest=args.manifest, processor=processor, batch_size=args.batch_size, num_workers=args.workers, batches_per_epoch=10**6
    )
    data.setup("fit")
    warmup = 1 + data.hparams.shuffle_buffer // args.batch_size
    shards = [s for source in data.manifest.train for s in expand_shards(source.shards)]
    size = vision_data_config(processor.config.vision)["input_size"][-1]
    ours, floor = [], []
    for _ in range(args.rounds):
        ours.append(samples_per_second(data.train_dataloader(), args.batches, lambda b: b["input_ids"].shape[0], warmup))
        floor_loader = DataLoader(PilFloor(shards, size, args.batch_size), batch_size=None, num_workers=args.workers)
        floor.append(samples_per_second(floor_loader, args.batches, len, warmup))
    ours_median, floor_median = statistics.median(ours), statistics.median(floor)
    record(
        "stage1_data",
        {
            "ours_samples_per_s": round(ours_median, 1),
            "floor_samples_per_s": round(floor_median, 1),
            "ratio": round(ours_median / floor_median, 3),
            "round_ratios": [round(o / f, 3) for o, f in zip(ours, floor)],
            "ours_rounds": [round(o, 1) for o in ours],
            "floor_rounds": [round(f, 1) for f in floor],
            "target_ratio": 0.9,
            "workers": args.workers,
            "batch_size": args.batch_size,
            "batches": args.batches,
            "warmup_batches": warmup,
            "image_size": size,
            "how": "CaptionDataModule.train_dataloader() (uint8 batches, sent by value) vs tarfile + PIL "
            "decode/RGB/resize, PIL images sent to the main process; same workers; medians of alternating rounds",
        },
    )


if __name__ == "__main__":
    main()
