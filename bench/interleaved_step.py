"""Step time on interleaved documents against the single-image step, in either stage (issue 24 §3).

Both sides train owl-smol as ``make stage1`` / ``make stage2`` do (Lightning Trainer, the configs' precision,
clipping at 1.0) on batches of the same size from the stage's DataModule. Documents come from the generated
set of ``owl-lightning data interleaved``: each three paragraphs of real text (Python standard-library
docstrings), each followed by an easy-VQA image and its caption.

- ``--stage 1`` (vision + abstractor trained, LLM frozen; ``CaptionDataModule``): the easy-VQA caption shards
  (max_length 64, as experiments/stage1_smol.yaml) against the OBELICS shards (max_length 512), each a source
  of data_manifests/interleaved_stage1.yaml.
- ``--stage 2`` (abstractor + LoRA; ``InstructionDataModule``, packed, max_length 512 as
  experiments/stage2_smol.yaml): easy-VQA conversations against the OBELICS JSONL documents, each a source of
  data_manifests/interleaved_stage2.yaml.

Reported: the median step time of each after warm-up (of the fastest of alternating rounds: other work on a
shared machine only adds time), their ratio, and per sample (not per packed row) the expanded tokens (visual tokens included),
images and supervised tokens.

    python bench/interleaved_step.py [--stage 1] [--steps 8] [--warmup 2] [--batch-size 4] [--rounds 3]

(from the repository root; make data first)
"""

from __future__ import annotations

import argparse
import os
import statistics
from dataclasses import replace
from pathlib import Path

from common import record
from owl_lightning.config import IGNORE_INDEX, STAGE1, STAGE2, get_config
from owl_lightning.data.manifest import Manifest, ShardSource, load_manifest
from owl_lightning.data.shards import expand_shards
from owl_lightning.train.datamodules import CaptionDataModule, InstructionDataModule
from owl_lightning.train.flops import sequence_lengths
from owl_lightning.train.system import STAGE1_OPTIMIZER, STAGE2_OPTIMIZER, OwlSystem
from step_overhead import StepTimer, fit

# Each stage: its DataModule, recipe and optimizer, the shipped manifest that mixes documents into it, and the
# two sides timed, each one of that manifest's sources: {label: (source name, max_length)}; documents last.
STAGES = {
    1: (
        CaptionDataModule,
        STAGE1,
        STAGE1_OPTIMIZER,
        "data_manifests/interleaved_stage1.yaml",
        {"captions": ("easyvqa_captions", 64), "documents": ("documents", 512)},
    ),
    2: (
        InstructionDataModule,
        STAGE2,
        STAGE2_OPTIMIZER,  # the learning rate does not change a step's time
        "data_manifests/interleaved_stage2.yaml",
        {"easyvqa": ("easyvqa", 512), "documents": ("documents", 512)},
    ),
}


def only_source(manifest: Manifest, name: str) -> Manifest:
    """``manifest`` training on its source ``name`` alone (after checking that its data was built)."""
    source = next(source for source in manifest.train if source.name == name)
    first_file = expand_shards(source.shards)[0] if isinstance(source, ShardSource) else source.path
    if not Path(first_file).exists():
        raise SystemExit(f"no {name} data at {first_file}: run make data first")
    return replace(manifest, train=[source], val=[])


def batches(datamodule: type, manifest: Manifest, max_length: int, batch_size: int, count: int, system: OwlSystem) -> list[dict]:
    data = datamodule(
        manifest=str(manifest.path),
        processor=system.processor,
        batch_size=batch_size,
        num_workers=0,
        max_length=max_length,
        batches_per_epoch=count,
    )
    data.manifest = manifest  # setup() reads the file only when none is set
    data.setup("fit")
    loader = iter(data.train_dataloader())
    taken = [next(loader) for _ in range(count)]
    for batch in taken:  # what the DataModule takes out before the model sees a batch
        for key in ("stream_cursor", "dropped_images", "supervised_tokens"):
            batch.pop(key, None)
    return taken


def measure(system: OwlSystem, taken: list[dict], warmup: int) -> dict:
    timer = StepTimer()
    fit(system, taken, [timer])
    samples = sum(len(batch["source"]) for batch in taken)  # a packed row holds several
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
    parser.add_argument("--stage", type=int, choices=sorted(STAGES), default=1)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="timings of each side, alternating")
    args = parser.parse_args()

    datamodule, recipe, optimizer, manifest_path, sources = STAGES[args.stage]
    manifest = load_manifest(manifest_path)
    sides = {label: (only_source(manifest, name), max_length) for label, (name, max_length) in sources.items()}
    rounds: dict[str, list[dict]] = {label: [] for label in sides}
    for _ in range(args.rounds):  # alternating, so a change in the machine's load reaches both sides
        for label, (side_manifest, max_length) in sides.items():
            fresh = OwlSystem(config=get_config("owl-smol"), recipe=recipe, optimizer=optimizer)
            taken = batches(datamodule, side_manifest, max_length, args.batch_size, args.steps, fresh)
            rounds[label].append(measure(fresh, taken, args.warmup))
    # The least disturbed round: on a shared machine other work only ever adds time to a step.
    fastest = {label: {**runs[0], "step_s": min(r["step_s"] for r in runs)} for label, runs in rounds.items()}
    single_label = next(iter(sources))
    record(
        "interleaved_step" if args.stage == 1 else f"interleaved_step_stage{args.stage}",
        {
            **fastest,
            "step_ratio": round(fastest["documents"]["step_s"] / fastest[single_label]["step_s"], 2),
            "seconds_per_1k_tokens": {
                label: round(1000 * result["step_s"] / (result["tokens_per_sample"] * args.batch_size), 3)
                for label, result in fastest.items()
            },
            "batch_size": args.batch_size,
            "timed_steps": args.steps - args.warmup,
            "round_step_s": {label: [r["step_s"] for r in runs] for label, runs in rounds.items()},
            "load_average_1min_after": os.getloadavg()[0],
            "how": f"owl-smol stage {args.stage} through the Trainer (the configs' precision, clip 1.0), batches from "
            f"{datamodule.__name__} on {manifest_path}: {single_label} (max_length {sources[single_label][1]}) "
            "vs OBELICS-layout documents of "
            "3 x (docstring paragraph, image, caption) (max_length 512)",
        },
    )


if __name__ == "__main__":
    main()
