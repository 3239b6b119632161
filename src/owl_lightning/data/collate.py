"""One encoded sample → one padded batch. Shared by the stage-1 shard pipeline and the stage-2 mixture."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

IGNORE_INDEX = -100  # label of every position that is not supervised (PyTorch's cross-entropy default)


@dataclass
class EncodedSample:
    """A tokenised sample before batching.

    ``input_ids`` hold one ``<image>`` token per image (the model expands it into the
    visual tokens); ``labels`` have the same length, ``IGNORE_INDEX`` where not supervised.
    ``images`` are preprocessed ``[3, H, W]`` uint8 tensors in placeholder order.
    """

    input_ids: list[int]
    labels: list[int]
    images: list[torch.Tensor] = field(default_factory=list)
    source: str = ""


def collate(
    samples: list[EncodedSample],
    pad_token_id: int,
    skipped: list[tuple[str, str]] | None = None,
    padding_side: str = "right",
) -> dict:
    """Pad samples into a batch.

    Returns a dict with
        ``input_ids``, ``attention_mask``, ``labels``: ``[B, T]`` long (padded on ``padding_side``);
        ``images``: ``[M, 3, H, W]`` uint8 pixels, every image of the batch, sample-major in placeholder
        order, or ``None`` when the batch has no image;
        ``image_counts``: ``[B]`` long, images per sample;
        ``source``: ``list[str]`` of length B; ``skipped``: the ``(reason, where)`` skips since the
        previous batch of this pipeline (see :mod:`owl_lightning.data.health`).
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    batch_size = len(samples)
    width = max(len(s.input_ids) for s in samples)
    input_ids = torch.full((batch_size, width), pad_token_id, dtype=torch.long)
    labels = torch.full((batch_size, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, width), dtype=torch.long)
    for row, sample in enumerate(samples):
        if len(sample.labels) != len(sample.input_ids):
            raise ValueError(f"sample {row}: {len(sample.labels)} labels for {len(sample.input_ids)} tokens")
        n = len(sample.input_ids)
        cols = slice(0, n) if padding_side == "right" else slice(width - n, width)
        input_ids[row, cols] = torch.tensor(sample.input_ids, dtype=torch.long)
        labels[row, cols] = torch.tensor(sample.labels, dtype=torch.long)
        attention_mask[row, cols] = 1
    images = [image for sample in samples for image in sample.images]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "images": torch.stack(images) if images else None,
        "image_counts": torch.tensor([len(s.images) for s in samples], dtype=torch.long),
        "source": [s.source for s in samples],
        "skipped": list(skipped or []),
    }
