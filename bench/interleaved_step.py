"""Stage-1 step time on interleaved documents against the single-image caption step (issue 24 §3).

Both sides train owl-smol's stage 1 as ``make stage1`` does (Lightning Trainer, the configs' precision, clipping at
1.0) on batches of the same size from ``CaptionDataModule``: captions from the embedded easy-VQA shards
(max_length 64, as experiments/stage1_smol.yaml), documents from the generated OBELICS shards of ``owl-lightning data interleaved`` — each
document three paragraphs of real text (Python standard-library docstrings), each followed by an easy-VQA
image and its caption (max_length 512). Reported: the median step time of each after warm-up (of the
fastest of alternating rounds: other work on a shared machine only adds time), their ratio, and per
sample the expanded tokens (visual tokens included), images and supervised tokens.

    python bench/interleaved_step.py [--steps 8] [--warmup 2] [--batch-size 4] [--rounds 3]     (from the repository root; make data first)
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import yaml

from common import record
from owl_lightning.config import IGNORE_INDEX, STAGE1, get_config
from owl_lightning.data.shards import expand_shards
from owl_lightning.train.datamodules import CaptionDataModule
from owl_lightning.train.flops import sequence_lengths
from owl_lightning.train.system import STAGE1_OPTIMIZER, OwlSystem
from step_overhead import StepTimer, fit


def documents_manifest(folder: Path, shards: str) -> Path:
    """A stage-1 manifest of the generated document shards (``owl-lightning data interleaved``)."""
    if not expand_shards(shards) or not Path(expand_shards(shards)[0]).is_file():
        raise SystemExit(f"no document shards at {shards}: run make data first")
    manifest = folder / "documents.yaml"
    manifest.write_text(
        yaml.safe_dump({"train": [{"name": "documents", "shards": str(Path(shards).resolve()), "format": "obelics", "max_images": 3}]})
    )
    return manifest


def batches(manifest: str, max_length: int, batch_size: int, count: int, system: OwlSystem) -> list[dict]:
    data = CaptionDataModule(
        manifest=manifest, processor=system.processor, batch_size=batch_size, num_workers=0, max_length=max_length, batches_per_epoch=count
    )
    data.setup("fit")
    loader = iter(data.train_dataloader())
    taken = [next(loader) for _ in range(count)]
    for batch in taken:
        batch.pop("stream_cursor")
        batch.pop("dropped_images")
    return taken


def measure(system: OwlSystem, taken: list[dict], warmup: int) -> dict:
    timer = StepTimer()
    fit(system, taken, [timer])
    samples = sum(batch["input_ids"].shape[0] for batch in taken)
    flops = system.flops
    expanded = sum(float(sequence_lengths(b, flops.visual_tokens_per_image, flops.image_token_id).sum()) for b in taken)
    return {
        "step_s": round(statistics.median(timer.seconds[warmup:]), 3),
        "tokens_per_sample": round(expanded / samples, 1),
        "images_per_sample": round(sum(int(b["image_counts"].sum()) for b in taken) / samples, 2),
        "supervised_per_sample": round(sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in taken) / samples, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", default="data_manifests/embedded_stage1.yaml")
    parser.add_argument("--documents", default="data/interleaved/stage1/train-000000.tar")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="timings of each side, alternating")
    args = parser.parse_args()

    def system() -> OwlSystem:
        return OwlSystem(config=get_config("owl-smol"), recipe=STAGE1, optimizer=STAGE1_OPTIMIZER)

    with tempfile.TemporaryDirectory() as folder:
        documents = documents_manifest(Path(folder), args.documents)
        sides = {"captions": (args.captions, 64), "documents": (str(documents), 512)}
        rounds: dict[str, list[dict]] = {side: [] for side in sides}
        for _ in range(args.rounds):  # alternating, so a change in the machine's load reaches both sides
            for side, (manifest, max_length) in sides.items():
                fresh = system()
                rounds[side].append(measure(fresh, batches(manifest, max_length, args.batch_size, args.steps, fresh), args.warmup))
    # The least disturbed round: on a shared machine other work only ever adds time to a step.
    captions, interleaved = ({**runs[0], "step_s": min(r["step_s"] for r in runs)} for runs in rounds.values())
    record(
        "interleaved_step",
        {
            "captions": captions,
            "documents": interleaved,
            "step_ratio": round(interleaved["step_s"] / captions["step_s"], 2),
            "seconds_per_1k_tokens": {
                side: round(1000 * result["step_s"] / (result["tokens_per_sample"] * args.batch_size), 3)
                for side, result in (("captions", captions), ("documents", interleaved))
            },
            "batch_size": args.batch_size,
            "timed_steps": args.steps - args.warmup,
            "round_step_s": {side: [r["step_s"] for r in runs] for side, runs in rounds.items()},
            "load_average_1min_after": os.getloadavg()[0],
            "how": "owl-smol stage 1 through the Trainer (the configs' precision, clip 1.0), batches from CaptionDataModule: easy-VQA "
            "captions (max_length 64) vs OBELICS-layout documents of 3 x (docstring paragraph, image, caption) (max_length 512)",
        },
    )


if __name__ == "__main__":
    main()
