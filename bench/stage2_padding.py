"""Padding in stage-2 batches: real tokens over all positions the LLM computes (issue 6, item 5).

The embedded stage-2 data mixes short easy-VQA conversations (~70 tokens with the 17 visual ones)
with Python-docstring answers up to ~300 tokens, 3:1 per batch: one sample a row, the short ones
are mostly padding. Packed (the default), samples share rows and the ratio nears 1. Counted on
real batches of ``InstructionDataModule``, lengths as the LLM sees them (each ``<image>`` as its
visual tokens). Target: ≥ 0.9.

    python bench/stage2_padding.py [--batches 100]
"""
from __future__ import annotations

import argparse

from common import record
from owl_lightning.config import get_config
from owl_lightning.data.modules import InstructionDataModule
from owl_lightning.flops import sequence_lengths
from owl_lightning.models.llm import IMAGE_TOKEN


def real_fraction(pack: bool, batches: int, batch_size: int) -> float:
    data = InstructionDataModule(batch_size=batch_size, num_workers=0, max_length=512, pack=pack)
    data.setup("fit")
    visual = get_config(data.hparams.model_name).visual_tokens_per_image
    image_token_id = data.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    real = computed = 0
    for _, batch in zip(range(batches), data.train_dataloader()):
        real += int(sequence_lengths(batch, visual, image_token_id).sum())
        rows = batch["input_ids"].shape[0]
        # Every row is as long as the longest one after its <image> tokens are expanded.
        row_lengths = (batch["attention_mask"] > 0).sum(1) + batch["image_counts"] * (visual - 1)
        computed += rows * int(row_lengths.max())
    return real / computed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    padded = real_fraction(False, args.batches, args.batch_size)
    packed = real_fraction(True, args.batches, args.batch_size)
    record("stage2_padding", {
        "real_fraction_padded": round(padded, 3), "real_fraction_packed": round(packed, 3), "target": 0.9,
        "batches": args.batches, "batch_size": args.batch_size,
        "how": "InstructionDataModule on data_manifests/embedded_stage2.yaml: real tokens (visual included) over rows x longest row, one sample a row vs packed",
    })


if __name__ == "__main__":
    main()
