"""Stage-2 instruction mixture: every batch holds each source in proportion to its weight.

The paper trains on equal numbers of text-only and multimodal samples per step; weights
generalise that. The dataset is stateless: global batch ``b`` of epoch ``e`` is a pure function of
``(seed, e, b)``, so every rank and worker can compute its own batches with no communication,
and resuming mid-epoch needs nothing but ``(epoch, next batch index)``.

How batch ``b`` is built:

1. Quotas. Source ``s`` gets ``floor(B·w_s/Σw)`` samples, and the ``B − Σ floor`` leftover slots go
   to the sources with the largest accumulated fractional remainders (ties: manifest order), each
   winner paying 1 back. So every batch is full, each source gets ``floor`` or ``ceil`` of its share,
   and after ``n`` batches its count is within one sample of ``n·B·w_s/Σw``.
2. Samples. Source ``s``'s samples are the next consecutive slots of a random permutation of
   that source, seeded by ``(seed, epoch, s, wrap)``; past its end a fresh permutation starts.
3. Failures. A sample whose image is missing, corrupt or outside the image root, that the
   template refuses (too long, placeholder/image mismatch), or that fails in any way nobody
   foresaw (``unexpected``), is recorded in :attr:`skips` and replaced by a draw from the same
   source seeded by ``(seed, epoch, b, slot, attempt)``.
4. Splitting. Global batch ``b`` goes to rank ``b % world_size`` and, within it, to DataLoader
   worker ``(b // world_size) % num_workers``; every rank yields ``batches_per_epoch // world_size``.
   A run resumed mid-epoch (:meth:`InstructionMixture.resume_at`) starts at the rank's next batch,
   its workers rotated so batches still arrive in order (:mod:`~owl_lightning.data.resume`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from fractions import Fraction
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset

from owl_lightning.data.collate import EncodedSample, collate
from owl_lightning.data.documents import Document, ImageSlot, embedded_image, encode_document_sample
from owl_lightning.data.health import SkipLog
from owl_lightning.data.highres import TiledImage
from owl_lightning.data.images import decode_image, resolve_under_root
from owl_lightning.data.manifest import VIDEO_INSTRUCTION_FORMATS, InstructionSource
from owl_lightning.data.resume import role_positions, worker_role
from owl_lightning.data.template import Conversation, ConversationTemplate
from owl_lightning.data.video import VideoReader

# Replacement draws for one slot before the source is declared broken (not one bad sample, but
# e.g. a wrong image_root): the run stops with a message instead of spinning.
MAX_ATTEMPTS = 32


def batch_quotas(weights: list[float], batch_size: int, num_batches: int) -> np.ndarray:
    """Samples per source in each batch: ``[num_batches, num_sources]`` int64, rows sum to ``batch_size``.

    Largest-remainder rounding of ``batch_size·w/Σw`` with the fractional remainders carried from
    batch to batch (see the module docstring). Exact rational arithmetic: weights 1:3 give 2:6 in
    every batch of 8, with no float rounding to tip a tie.
    """
    if not weights or any(w <= 0 for w in weights):
        raise ValueError(f"source weights must be positive, got {weights}")
    exact = [Fraction(w).limit_denominator(1_000_000) for w in weights]
    shares = [batch_size * w / sum(exact) for w in exact]
    base = [math.floor(share) for share in shares]
    denominator = math.lcm(*(share.denominator for share in shares))
    credit_per_batch = [int((share - floor) * denominator) for share, floor in zip(shares, base)]
    leftover = batch_size - sum(base)
    credits = [0] * len(weights)
    quotas = np.empty((num_batches, len(weights)), dtype=np.int64)
    for batch in range(num_batches):
        credits = [credit + step for credit, step in zip(credits, credit_per_batch)]
        winners = sorted(range(len(weights)), key=lambda s: (-credits[s], s))[:leftover]
        quotas[batch] = base
        for source in winners:
            quotas[batch, source] += 1
            credits[source] -= denominator
    return quotas


class InstructionMixture(IterableDataset):
    """Ready, padded batches of instruction samples mixed by source weight (use ``DataLoader(batch_size=None)``).

    Args:
        sources: each source with its conversations, or documents (from :func:`~owl_lightning.data.instruct.read_conversations`).
        template: tokenises a conversation (its ``max_length`` and ``visual_tokens_per_image`` apply).
        image_transform: RGB PIL image → ``[3, H, W]`` uint8 tensor or AnyRes ``TiledImage`` (the model's preprocessing).
        batch_size: samples per batch on each rank.
        pad_token_id: the tokenizer's pad token.
        seed: with the epoch and batch index, fixes every batch's content.
        batches_per_epoch: global batches per epoch (all ranks together), rounded down to a multiple of
            ``world_size``. Default: enough that the source with the most batches to get through
            (its size over its average per-batch quota) is seen once.
        rank, world_size: this process's share of the batches.
        pack: pack several samples into each row (:func:`~owl_lightning.data.collate.collate`):
            same loss, far less padding when short conversations meet long texts.
        image_tokens: decoded image → its visual tokens, where they depend on its size (AnyRes:
            ``OwlProcessor.image_tokens``); None: every image ``template.visual_tokens_per_image``.
        video_reader: encoded clip → its preprocessed frames (``OwlProcessor.video_reader``); needed by
            sources of a video format (``video_chatgpt``), whose clips take ``num_frames · V`` visual tokens.

    Yields the dicts of :func:`~owl_lightning.data.collate.collate` (``input_ids``/``labels``/
    ``sample_ids`` ``[B, T]``, ``images`` ``[M, 3, H, W]`` or ``None``, ``image_counts`` ``[B]``,
    ``source``, ``skipped``) plus ``batch_index``: the global batch number within the epoch, and
    ``dropped_images``: the reason of each image slot left out of its documents (:mod:`~owl_lightning.data.documents`).
    Call :meth:`set_epoch` before each epoch; DataLoader workers copy the dataset when they start,
    so with ``persistent_workers=True`` a later ``set_epoch`` does not reach them.
    """

    def __init__(
        self,
        sources: list[tuple[InstructionSource, list[Conversation]]],
        template: ConversationTemplate,
        image_transform: Callable[[Image.Image], torch.Tensor | TiledImage],
        batch_size: int,
        pad_token_id: int,
        seed: int = 0,
        batches_per_epoch: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        pack: bool = False,
        image_tokens: Callable[[Image.Image], int] | None = None,
        video_reader: VideoReader | None = None,
    ) -> None:
        super().__init__()
        if not sources:
            raise ValueError("InstructionMixture needs at least one source")
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}")
        for source, conversations in sources:
            if source.weight <= 0:
                raise ValueError(
                    f"instruction source {source.name!r} needs a positive weight, got {source.weight}; drop it from the manifest instead"
                )
            if not conversations:
                raise ValueError(
                    f"instruction source {source.name!r} ({source.path}) has no usable conversation; "
                    "see the skip warnings above, fix the file or drop it from the manifest"
                )
            video = source.format in VIDEO_INSTRUCTION_FORMATS
            if source.media_root is None and any(conv.images for conv in conversations):
                root = "video_root" if video else "image_root"
                raise ValueError(
                    f"instruction source {source.name!r} ({source.path}) refers to {'clips' if video else 'images'} but has "
                    f"no {root}; set {root} in the data manifest"
                )
            if video and video_reader is None:
                raise ValueError(f"instruction source {source.name!r} holds video clips: pass video_reader (OwlProcessor.video_reader)")
        weights = [source.weight for source, _ in sources]
        if batches_per_epoch is None:
            # Each source's size over its average samples per batch; the slowest sets the epoch.
            batches_per_epoch = max(
                math.ceil(len(conversations) * sum(weights) / (batch_size * source.weight)) for source, conversations in sources
            )
            batches_per_epoch = math.ceil(batches_per_epoch / world_size) * world_size
        if batches_per_epoch < world_size:
            raise ValueError(f"batches_per_epoch={batches_per_epoch} gives some of the {world_size} ranks no batch")
        self.sources = sources
        self.template = template
        self.image_transform = image_transform
        self.batch_size = batch_size
        self.pad_token_id = pad_token_id
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.pack = pack
        self.image_tokens = image_tokens
        self.video_reader = video_reader
        self.batches_per_rank = batches_per_epoch // world_size
        self.batches_per_epoch = self.batches_per_rank * world_size
        self.epoch = 0
        self._resume = (-1, 0)  # (epoch, batches of it this rank had consumed)
        self.skips = SkipLog()
        self._quotas = batch_quotas(weights, batch_size, self.batches_per_epoch)
        # Slot of each source's first sample in batch b: its samples in batches 0..b-1.
        self._first_slots = np.cumsum(self._quotas, axis=0) - self._quotas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """The next pass over ``epoch`` starts at this rank's batch ``batches_done`` (nothing to replay:
        every batch is a function of its index)."""
        self._resume = (epoch, batches_done)

    def __len__(self) -> int:
        return self.batches_per_rank

    def __iter__(self) -> Iterator[dict]:
        epoch = self.epoch
        done = self._resume[1] if self._resume[0] == epoch else 0
        first, step = role_positions(*worker_role(done), done)
        permutations: dict[int, tuple[int, np.ndarray]] = {}
        for position in range(first, self.batches_per_rank, step):
            yield self._batch(epoch, self.rank + self.world_size * position, permutations)

    def _batch(self, epoch: int, batch_index: int, permutations: dict[int, tuple[int, np.ndarray]]) -> dict:
        samples: list[EncodedSample] = []
        for source_index, quota in enumerate(self._quotas[batch_index]):
            for offset in range(quota):
                slot = int(self._first_slots[batch_index, source_index]) + offset
                index = self._permuted(source_index, epoch, slot, permutations)
                samples.append(self._sample(source_index, epoch, batch_index, len(samples), index))
        batch = collate(
            samples,
            self.pad_token_id,
            skipped=self.skips.drain(),
            pack_visual_tokens_per_image=self.template.visual_tokens_per_image if self.pack else None,
        )
        batch["batch_index"] = batch_index
        batch["dropped_images"] = self.skips.drain_dropped_images()
        return batch

    def _permuted(self, source_index: int, epoch: int, slot: int, permutations: dict[int, tuple[int, np.ndarray]]) -> int:
        """Conversation at ``slot`` of source ``source_index``'s epoch order (a fresh permutation per pass)."""
        size = len(self.sources[source_index][1])
        wrap, position = divmod(slot, size)
        cached_wrap, permutation = permutations.get(source_index, (None, None))
        if cached_wrap != wrap:
            # Each worker walks its batches in order, so one permutation per source is all it holds.
            permutation = np.random.default_rng([self.seed, epoch, source_index, wrap]).permutation(size)
            permutations[source_index] = (wrap, permutation)
        return int(permutation[position])

    def _sample(self, source_index: int, epoch: int, batch_index: int, slot: int, index: int) -> EncodedSample:
        """Encode conversation ``index``, or record why not and try seeded replacements from the same source."""
        source, conversations = self.sources[source_index]
        for attempt in range(1, MAX_ATTEMPTS + 1):
            conv = conversations[index]
            with self.skips.catch(conv.origin):
                return self._encode(source, conv)
            index = int(np.random.default_rng([self.seed, epoch, batch_index, slot, attempt]).integers(len(conversations)))
        raise RuntimeError(
            f"instruction source {source.name!r}: {MAX_ATTEMPTS} samples in a row could not be used, last {self.skips.last}. "
            f"Check {source.path} and its {'video_root' if source.format in VIDEO_INSTRUCTION_FORMATS else 'image_root'} "
            f"({source.media_root}) in the data manifest."
        )

    def _encode(self, source: InstructionSource, conv: Conversation | Document) -> EncodedSample:
        def decoded(path: str) -> Image.Image:
            return decode_image(resolve_under_root(path, Path(source.image_root)))

        if isinstance(conv, Document):
            return encode_document_sample(
                conv,
                partial(_document_image, Path(source.image_root or ".")),
                self.template.encode_document,
                self.image_transform,
                source.max_images,
                self.skips,
                conv.origin,
                self.image_tokens,
            )
        if source.format in VIDEO_INSTRUCTION_FORMATS:  # every clip costs num_frames views: fit the text first
            input_ids, labels, num_images = self.template.encode(conv, [self.video_reader.visual_tokens] * len(conv.images))
            root = Path(source.media_root)
            images = [self.video_reader(resolve_under_root(path, root)) for path in conv.images[:num_images]]
        elif self.image_tokens is None:  # every image costs the same: fit the text first, decode only the images kept
            input_ids, labels, num_images = self.template.encode(conv)
            images = [self.image_transform(decoded(path)) for path in conv.images[:num_images]]
        else:  # an AnyRes image's cost depends on its size: decode before fitting the text
            pictures = [decoded(path) for path in conv.images]
            input_ids, labels, num_images = self.template.encode(conv, [self.image_tokens(picture) for picture in pictures])
            images = [self.image_transform(picture) for picture in pictures[:num_images]]
        return EncodedSample(input_ids, labels, images, source=source.name)


def _document_image(image_root: Path, slot: ImageSlot) -> Path | bytes:
    """A stage-2 document's image: the file its record names under ``image_root``, else MMC4's base64."""
    return resolve_under_root(slot.name, image_root) if slot.name else embedded_image(slot)
