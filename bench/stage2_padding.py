"""Padding in stage-2 batches: real tokens over all positions the LLM computes (issue 6, item 5).

The embedded stage-2 data mixes easy-VQA conversations (~100 tokens with the 17 visual ones) with
Python-docstring answers (~50–90 tokens): one sample a row, every row is padded to the longest.
Packed (the default), samples share rows. Counted on real batches of ``InstructionDataModule``,
lengths as the LLM sees them (each ``<image>`` as its visual tokens). Target: ≥ 0.9. Also timed:
owl-smol's forward + backward (LoRA, the configs' precision) on the same batches both ways — the mixture
gives batch ``i`` the same samples whether packed or not.

    python bench/stage2_padding.py [--batches 100]
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import record, train_autocast
from owl_lightning.config import IMAGE_TOKEN, STAGE2, get_config
from owl_lightning.data.processor import OwlProcessor
from owl_lightning.models.owl import build_owl
from owl_lightning.train.datamodules import InstructionDataModule
from owl_lightning.train.flops import sequence_lengths


def loaders(pack: bool, batch_size: int):
    data = InstructionDataModule(
        processor=OwlProcessor(get_config("owl-smol")), batch_size=batch_size, num_workers=0, max_length=512, pack=pack
    )
    data.setup("fit")
    return data, data.train_dataloader()


def real_and_computed(batch: dict, visual: int, image_token_id: int) -> tuple[int, int]:
    """Real tokens, and positions computed: every row is as long as the longest after expanding ``<image>``."""
    row_lengths = (batch["sample_ids"] > 0).sum(1) + batch["image_counts"] * (visual - 1)
    return int(sequence_lengths(batch, visual, image_token_id).sum()), batch["input_ids"].shape[0] * int(row_lengths.max())


def step_seconds(model, batch: dict) -> float:
    start = time.perf_counter()
    with train_autocast():
        out = model(batch["input_ids"], batch["sample_ids"], batch["labels"], batch["images"], batch["image_counts"])
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=100, help="batches counted")
    parser.add_argument("--timed-batches", type=int, default=10, help="of those, timed (after 2 warm-up steps)")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    (data, padded), (_, packed) = loaders(False, args.batch_size), loaders(True, args.batch_size)
    config = data.processor.config
    image_token_id = data.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    model = build_owl(config, tokenizer=data.tokenizer)
    model.apply_recipe(STAGE2)
    counts = {"padded": [0, 0], "packed": [0, 0]}
    seconds: dict[str, list[float]] = {"padded": [], "packed": []}
    for index, batches in zip(range(args.batches), zip(padded, packed)):
        for name, batch in zip(("padded", "packed"), batches):
            real, computed = real_and_computed(batch, model.visual_tokens_per_image, image_token_id)
            counts[name][0] += real
            counts[name][1] += computed
            if 2 <= index < 2 + args.timed_batches:
                seconds[name].append(step_seconds(model, batch))
            elif index < 2:
                step_seconds(model, batch)  # warm-up
    fraction = {name: real / computed for name, (real, computed) in counts.items()}
    median = {name: statistics.median(values) for name, values in seconds.items()}
    record(
        "stage2_padding",
        {
            "real_fraction_padded": round(fraction["padded"], 3),
            "real_fraction_packed": round(fraction["packed"], 3),
            "target": 0.9,
            "step_s_padded": round(median["padded"], 3),
            "step_s_packed": round(median["packed"], 3),
            "batches": args.batches,
            "timed_batches": args.timed_batches,
            "batch_size": args.batch_size,
            "how": "InstructionDataModule on data_manifests/embedded_stage2.yaml: real tokens (visual included) over rows x longest "
            "row, one sample a row vs packed; owl-smol forward+backward (LoRA q/v, the configs' precision), median, same batches",
        },
    )


if __name__ == "__main__":
    main()
