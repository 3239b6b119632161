"""Encoded samples → one padded (or packed) batch. Shared by the stage-1 shard pipeline and the stage-2 mixture."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain

import torch

from owl_lightning.config import IGNORE_INDEX
from owl_lightning.data.highres import Media, image_frames, image_grid, image_views, visual_tokens_of


@dataclass
class EncodedSample:
    """A tokenised sample before batching.

    ``input_ids`` hold one ``<image>`` token per image (the model expands it into the
    visual tokens); ``labels`` have the same length, ``IGNORE_INDEX`` where not supervised.
    ``images`` are preprocessed uint8 ``[3, H, W]`` tensors, AnyRes :class:`TiledImage` (tiles) or video
    :class:`VideoClip` (frames), in placeholder order (one ``<image>`` each).
    """

    input_ids: list[int]
    labels: list[int]
    images: list[Media] = field(default_factory=list)
    source: str = ""


def collate(
    samples: list[EncodedSample],
    pad_token_id: int,
    skipped: list[tuple[str, str]] | None = None,
    padding_side: str = "right",
    pack_visual_tokens_per_image: int | None = None,
) -> dict:
    """Pad samples into a batch, one sample a row, or pack several samples into each row.

    Packing (``pack_visual_tokens_per_image`` = the visual tokens of one view, V) puts samples end to end
    in rows — first-fit, longest first, lengths counted as the LLM sees them (each ``<image>`` as its
    visual tokens: V, more for a tiled image, ``F·V`` for a clip of F frames), rows up to ``MAX_ROW_FACTOR`` times the longest sample —
    so samples fill the room others leave.
    The rows' ``sample_ids`` then numbers each row's samples 1, 2, … (0: padding) and the
    model keeps them apart (block-diagonal causal attention, positions restarting per sample):
    the same loss as padding, with far less padding when lengths vary.

    Returns a dict with
        ``input_ids``, ``labels``: ``[B, T]`` long (padded on ``padding_side``); B rows, one per sample
        unless packed;
        ``sample_ids``: ``[B, T]`` long, 1 on real tokens (packed: the token's sample number in
        its row), 0 on padding;
        ``images``: ``[T, 3, H, W]`` uint8 pixels in channels-last memory layout, every view of every
        image of the batch, row-major in placeholder order (a tiled image's global view, then its tiles;
        a clip's frames in time order), or ``None`` when the batch has no image; T = M, the images
        (clips included), unless some are tiled or clips;
        ``image_counts``: ``[B]`` long, images per row;
        ``image_grids``: ``[M, 2]`` long, each image's (rows, cols) of tiles, ``(0, 0)`` for one view or a clip;
        ``image_frames``: ``[M]`` long, each clip's frames, 1 for a still;
        ``source``: ``list[str]``, one per sample; ``supervised_tokens``: ``list[int]``, each sample's
        tokens with a label (what the loss averages over); ``skipped``: the ``(reason, where)`` skips since
        the previous batch of this pipeline (see :mod:`owl_lightning.data.health`).
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    for index, sample in enumerate(samples):
        if len(sample.labels) != len(sample.input_ids):
            raise ValueError(f"sample {index}: {len(sample.labels)} labels for {len(sample.input_ids)} tokens")
    rows = [[sample] for sample in samples] if pack_visual_tokens_per_image is None else _pack(samples, pack_visual_tokens_per_image)
    input_ids = [list(chain.from_iterable(s.input_ids for s in row)) for row in rows]
    labels = [list(chain.from_iterable(s.labels for s in row)) for row in rows]
    sample_numbers = [list(chain.from_iterable([number] * len(s.input_ids) for number, s in enumerate(row, 1))) for row in rows]
    width = max(map(len, input_ids))

    def padded(values: list[list[int]], fill: int) -> torch.Tensor:
        # One tensor from padded lists: a tensor per row and slice writes cost 3x more.
        fills = [[fill] * (width - len(row)) for row in values]
        pairs = zip(values, fills) if padding_side == "right" else zip(fills, values)
        return torch.tensor([first + second for first, second in pairs], dtype=torch.long)

    images = [image for row in rows for sample in row for image in sample.images]
    return {
        "input_ids": padded(input_ids, pad_token_id),
        "sample_ids": padded(sample_numbers, 0),
        "labels": padded(labels, IGNORE_INDEX),
        "images": _stack_channels_last(images) if images else None,
        "image_counts": torch.tensor([sum(len(s.images) for s in row) for row in rows], dtype=torch.long),
        "image_grids": torch.tensor([image_grid(image) for image in images], dtype=torch.long).reshape(-1, 2),
        "image_frames": torch.tensor([image_frames(image) for image in images], dtype=torch.long),
        "source": [s.source for s in samples],
        "supervised_tokens": [len(s.labels) - s.labels.count(IGNORE_INDEX) for s in samples],
        "skipped": list(skipped or []),
    }


def _stack_channels_last(images: list[Media]) -> torch.Tensor:
    """Images → their views ``[T, 3, H, W]`` with channels-last strides: the layout the transform
    produces and the vision encoder computes in, so stacking is a plain copy (8x cheaper than
    gathering into channels-first order, ~11 µs an image at 128 px)."""
    return torch.cat([image_views(image).permute(0, 2, 3, 1) for image in images]).permute(0, 3, 1, 2)


# Packed rows may hold up to this many times the longest sample: longer rows leave less room
# unfilled but attend over more (masked) positions, a cost that grows with the row's square
# (the trade-off measured on the embedded data is in docs/benchmarks.md).
MAX_ROW_FACTOR = 2


def _pack(samples: list[EncodedSample], visual_tokens_per_image: int) -> list[list[EncodedSample]]:
    """Samples in rows, first-fit longest first. Row lengths tried: 1 to ``MAX_ROW_FACTOR`` times the
    longest sample's, and the total split evenly over n rows (with and without some slack), up to that;
    kept: the packing that leaves the fewest positions to compute (rows × the fullest row)."""

    def length(sample: EncodedSample) -> int:
        return len(sample.input_ids) + sum(visual_tokens_of(image, visual_tokens_per_image) - 1 for image in sample.images)

    def first_fit(capacity: int) -> list[list[EncodedSample]]:
        rows: list[list[EncodedSample]] = []
        room: list[int] = []
        for sample in sorted(samples, key=length, reverse=True):
            fits = next((index for index, free in enumerate(room) if length(sample) <= free), None)
            if fits is None:
                rows.append([sample])
                room.append(capacity - length(sample))
            else:
                rows[fits].append(sample)
                room[fits] -= length(sample)
        return rows

    def positions(rows: list[list[EncodedSample]]) -> int:
        return len(rows) * max(sum(length(s) for s in row) for row in rows)

    longest, total = max(map(length, samples)), sum(map(length, samples))
    capacities = {longest * factor for factor in range(1, MAX_ROW_FACTOR + 1)}
    capacities |= {-(-total // rows) + slack for rows in range(1, len(samples) + 1) for slack in (0, longest // 4)}
    return min((first_fit(c) for c in sorted(capacities) if longest <= c <= MAX_ROW_FACTOR * longest), key=positions)
