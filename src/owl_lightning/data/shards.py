"""Stage-1 data: image–caption WebDataset shards → padded batches, as an explicit list of stages.

Training (``train=True``), for each source::

    shard draws               shard URLs drawn with replacement, seeded, numbered 0, 1, ... (webdataset's
                              ResampledShards): an endless stream, so any number of shards serves any
                              number of ranks × workers
    → read tar                members grouped into samples by key, each tagged with its origin (draw,
                              index in the shard); a broken or truncated tar is recorded (TRUNCATED_TAR)
                              and left, and so is the rest of one expanding past MAX_SHARD_BYTES
                              (OVERSIZED_SHARD); a member past MAX_MEMBER_BYTES is never read, and its
                              sample is skipped (OVERSIZED_MEMBER)
    → shuffle samples         buffer of raw samples, seeded per (seed, epoch, rank, worker)
    → encode                  caption → encode_caption → decode_image → image_transform (AnyRes:
                              the image first, as its size sets the caption's room), or for an
                              interleaved document (source ``format: mmc4|obelics``) its .json →
                              text chunks and image slots in document order → encode_document;
                              for a clip (``format: video``) caption → encode_caption (the clip's
                              ``num_frames · V`` tokens) → video_reader (docs/video.md);
                              a bad sample is recorded with its reason (``unexpected`` for a
                              failure no check foresaw) and dropped

then the sources are mixed sample by sample by their weights (seeded), batched with
:func:`~owl_lightning.data.collate.collate`, each batch tagged with its worker's stream cursor (below),
and every DataLoader worker stops after its share of ``batches_per_epoch``, so every rank yields exactly
``batches_per_epoch`` batches per epoch.

Validation (``train=False``): every shard of every source once, split by rank then by DataLoader
worker, in order, no shuffling; the same encode and batch stages; the last partial batch is kept.
With fewer shards than ranks, every rank reads them all and keeps every ``world_size``-th sample.

Shards in img2dataset's layout (``000000000.jpg`` + ``.txt`` + ``.json``) are read as they are;
interleaved documents (MMC4's or OBELICS's record as ``KEY.json``, the document's k-th image as
``KEY.k.jpg``/``.png``/``.webp``, or for MMC4 base64 in ``image_info[k]["image_base64"]`` as OpenFlamingo's
shards hold it) too: :mod:`~owl_lightning.data.documents` gives the rules, docs/interleaved.md the layout. Video
clips with captions (``KEY.mp4``/``.webm``/``.mkv``/``.mov``/``.gif`` + ``KEY.txt``, as video2dataset writes
them) are read with ``format: video``.
URLs and ``pipe:`` commands go to webdataset untouched. Every skipped sample is recorded in the
pipeline's :class:`~owl_lightning.data.health.SkipLog` as ``"{shard}:{sample key}"`` and drained into
the next batch (``batch["skipped"]``). When nothing usable comes out at all (a wrong
``image_key``, every shard unreadable), the reader raises an error naming the source instead of
spinning forever without a batch.

Seeding: every random choice (shards, shuffle, mixing) seeds from ``(seed, epoch, rank, worker)``,
so ranks and workers read different streams, a rerun reads the same ones, and each epoch differs —
provided the caller calls :meth:`ShardPipeline.set_epoch` at the start of every epoch (Lightning
calls ``set_epoch`` only on samplers, not on an ``IterableDataset``). The rank is read when the
pipeline is built, from ``RANK``/``WORLD_SIZE`` or the initialised process group: build it in the
DataModule's ``setup``, not in ``__init__``.

Resuming mid-epoch: every training batch carries its worker's *stream cursor* (``batch["stream_cursor"]``,
see :meth:`_WeightedMix.cursor`): per source, the origin (shard draw, index and byte offset in the shard)
of the last raw sample read and of each raw sample waiting in the shuffle buffer, with the shuffle's and
the mix's RNG states: all that decides what comes next, and nothing that needs decoding. The training
loader keeps the cursor of the last batch training took from each worker and saves them in the
checkpoint; :meth:`ShardPipeline.resume_at` hands them back (:mod:`~owl_lightning.data.resume` says which
worker continues which stream). Each worker then passes over the shard draws it had finished without
opening them, reads again (bytes, no decoding) the samples its shuffle buffer held and the last one it
read — reached by a seek in a plain tar on disk, by reading through to them in a compressed or streamed
one — and goes on exactly where it stopped: the same batches and skips as the interrupted run, at a cost
that does not grow with the epoch. Shards must not change between a checkpoint and its resume. A
checkpoint without cursors (from an older version) resumes by rebuilding the consumed batches and
dropping them.
"""

from __future__ import annotations

import array
import bz2
import ctypes
import gzip
import logging
import lzma
import multiprocessing
import random
import re
import tarfile
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from functools import partial
from itertools import chain, count, islice
from pathlib import Path
from typing import BinaryIO

import torch
import webdataset as wds
from PIL import Image

from owl_lightning.data.collate import EncodedSample, collate
from owl_lightning.data.documents import DOCUMENT_FORMATS, ImageSlot, embedded_image, encode_document_sample, read_document
from owl_lightning.data.health import (
    BAD_TEXT,
    MALFORMED_RECORD,
    MISSING_IMAGE,
    MISSING_TEXT,
    MISSING_VIDEO,
    OVERSIZED_MEMBER,
    OVERSIZED_SHARD,
    TRUNCATED_TAR,
    SkipLog,
    SkipSample,
    parse_json_record,
)
from owl_lightning.data.highres import TiledImage
from owl_lightning.data.images import decode_image
from owl_lightning.data.manifest import ShardSource
from owl_lightning.data.resume import batches_consumed_by_role, worker_count_changed, worker_info, worker_role
from owl_lightning.data.video import VideoReader

log = logging.getLogger(__name__)

# A pipeline whose samples are all bad would otherwise spin forever without a batch, so no
# DataHealth check ever runs: past this many skips per batch sample the reader stops with an error.
STALL_SKIPS_PER_SAMPLE = 100
MIN_STALL_SKIPS = 1000

# Size limits of the shard reader. A member's size is read from its tar header before any of it is
# read, and a shard's expanded bytes are counted as they are decompressed, so a huge member is never
# held in memory and a compression bomb never expands past the limit. (The tar format's own extended
# header records, which tarfile reads whole, are bounded by the shard limit only.)
# A sample with a member past MAX_MEMBER_BYTES is skipped (OVERSIZED_MEMBER); reading goes on. Four
# times the largest JPEG of a 100-megapixel camera; an uncompressed TIFF at MAX_IMAGE_PIXELS is bigger.
MAX_MEMBER_BYTES = 128 << 20
# A shard expanding past MAX_SHARD_BYTES stops there (OVERSIZED_SHARD); the samples before are kept.
# img2dataset writes ~10k samples a shard: hundreds of MB, a few GB at full resolution.
MAX_SHARD_BYTES = 16 << 30

# Salts that keep the random streams of different stages apart under one seed.
_SHARD_SALT, _SHUFFLE_SALT, _MIX_SALT = 1, 2, 3
# Samples the shuffle buffer holds before it yields its first: webdataset's default, kept so streams stay as they were.
_SHUFFLE_INITIAL = 100


def expand_shards(spec: str) -> list[str]:
    """``"dir/train-{000000..000007}.tar"`` → the 8 paths, as webdataset expands them.

    Brace ranges and lists expand, ``::`` joins several specs, ``${NAME}`` reads ``WDS_NAME``
    from the environment. Anything else (URLs, ``pipe:`` commands) passes through as written.
    """
    if not spec.strip():
        raise ValueError("empty shard spec; give a path, URL or brace pattern such as 'shards/{000000..000009}.tar'")
    return wds.shardlists.expand_urls(spec)


class StreamPosition:
    """The epoch a pipeline is in and, after a resume, how many of that epoch's batches this rank had
    already consumed and the stream cursors to go on from.

    The epoch and the batch count are shared memory: only the main process writes them, and DataLoader
    workers — persistent or not, forked or spawned — read them when they start a pass. The cursors are a
    plain attribute, copied into workers when they start: a resumed loader loads its state before its
    first pass, so its workers have them.
    """

    def __init__(self) -> None:
        # Without a lock a Value pickles into workers under any start method.
        self.epoch = multiprocessing.Value(ctypes.c_longlong, 0, lock=False)
        self.resume_epoch = multiprocessing.Value(ctypes.c_longlong, -1, lock=False)
        self.resume_batches = multiprocessing.Value(ctypes.c_longlong, 0, lock=False)
        # Per worker role: the stream cursor of the last batch training took from it (None: it had delivered
        # none). None as a whole: not known (a checkpoint from before cursors), so consumed batches are rebuilt.
        self.resume_cursors: list[dict | None] | None = None

    def batches_done(self) -> int:
        """Batches of the current epoch consumed before this pass started (0 unless resumed into it)."""
        return self.resume_batches.value if self.resume_epoch.value == self.epoch.value else 0

    def resumed_cursor(self) -> dict | None:
        """The saved cursor of the calling worker's role when this pass resumes mid-epoch; None: the role's
        stream starts afresh (or is rebuilt, without cursors)."""
        done = self.batches_done()
        if not done or self.resume_cursors is None:
            return None
        role, num_workers = worker_role(done)
        if len(self.resume_cursors) != num_workers:
            raise ValueError(worker_count_changed(len(self.resume_cursors), num_workers))
        return self.resume_cursors[role]

    def resumed_source(self, index: int) -> dict | None:
        """Source ``index``'s part of :meth:`resumed_cursor` (None: it starts afresh)."""
        cursor = self.resumed_cursor()
        return None if cursor is None else cursor["sources"][index]


class ShardPipeline(wds.DataPipeline):
    """A webdataset pipeline yielding ready batches (use ``DataLoader(pipeline, batch_size=None)``).

    Every stage seeds from the :class:`StreamPosition` held here; :meth:`set_epoch` and
    :meth:`resume_at` update it for the workers' next pass.
    """

    # Each (rank, DataLoader worker) reads a stream of its own: resuming one needs the world size and the
    # worker count it was saved with (the training loader checks them).
    streams_per_worker = True

    def __init__(self, *stages, position: StreamPosition, batches_per_epoch: int | None = None) -> None:
        super().__init__(*stages)
        self.position = position
        self.batches_per_epoch = batches_per_epoch

    def __len__(self) -> int:
        """Batches per epoch on this rank. Lightning needs the number to resume a checkpoint saved on an
        epoch's last batch into the next epoch (without it, it counts that epoch as done too and skips it).
        An endless stream or a validation pass has none (TypeError, as ``len`` of an iterable)."""
        if self.batches_per_epoch is None:
            raise TypeError("this shard pipeline has no fixed number of batches per epoch")
        return self.batches_per_epoch

    def set_epoch(self, epoch: int) -> None:
        self.position.epoch.value = epoch

    def resume_at(self, epoch: int, batches_done: int, cursors: list[dict | None] | None = None) -> None:
        """Make the next pass over ``epoch`` continue after its first ``batches_done`` batches, exactly
        as the interrupted run would have (see :mod:`~owl_lightning.data.resume`).

        Args:
            cursors: per worker role (``max(1, num_workers)`` of them), the ``batch["stream_cursor"]`` of
                the last batch training took from it, None where it had delivered none. Each worker goes on
                from its role's cursor without decoding anything consumed. ``None`` (a checkpoint from an
                older version): each worker rebuilds its consumed batches — reading, decoding, collating —
                and drops them with their skips, which the restored run has counted already.
        """
        if cursors is None and batches_done:
            log.warning(
                "the training data state has no stream cursors (a checkpoint from an older owl_lightning): "
                "rebuilding the %d batches consumed in epoch %d to resume; this decodes every one of them",
                batches_done,
                epoch,
            )
        self.position.resume_epoch.value = epoch
        self.position.resume_batches.value = batches_done
        self.position.resume_cursors = None if cursors is None else list(cursors)


class _Seeds:
    """Seed of one random stream: distinct per (seed, epoch, rank, worker role, salt), the same on a rerun."""

    def __init__(self, seed: int, rank: int, position: StreamPosition) -> None:
        self.seed = seed
        self.rank = rank
        self.position = position

    def __call__(self, *salt: int) -> int:
        role, _ = worker_role(self.position.batches_done())
        # Integers only: make_seed hashes its arguments, and str hashes change per process.
        return wds.utils.make_seed(self.seed, self.position.epoch.value, self.rank, role, *salt)


def build_shard_pipeline(
    sources: list[ShardSource],
    *,
    image_transform: Callable[[Image.Image], torch.Tensor | TiledImage],
    encode_caption: Callable[..., tuple[list[int], list[int]]],
    pad_token_id: int,
    batch_size: int,
    encode_document: Callable[..., tuple[list[int], list[int], int]] | None = None,
    train: bool = True,
    seed: int = 0,
    shuffle_buffer: int = 1000,
    batches_per_epoch: int | None = None,
    skips: SkipLog | None = None,
    image_tokens: Callable[[Image.Image], int] | None = None,
    video_reader: VideoReader | None = None,
) -> ShardPipeline:
    """Build the stage-1 pipeline over ``sources``; it yields :func:`collate` batches.

    Args:
        sources: shard sources from a data manifest (weights are used in training only).
        image_transform: RGB PIL image → ``[3, H, W]`` tensor, uint8 for the model (all images the same
            size), or an AnyRes ``TiledImage``.
        encode_caption: caption → ``(input_ids, labels)`` of equal length, labels ``-100`` where not
            supervised; may raise :class:`SkipSample` (e.g. ``TOO_LONG``). With ``image_tokens`` it also
            takes the image's visual tokens: ``encode_caption(caption, tokens)``.
        pad_token_id: padding id for ``input_ids``.
        batch_size: samples per batch on this rank.
        encode_document: interleaved document as text chunks and image slots (``None``) in order, and
            each image's visual tokens (None: all alike) → ``(input_ids, labels, images kept)``
            (``ConversationTemplate.encode_document``); needed when a source has ``format`` mmc4 or obelics.
        train: endless, resampled, shuffled and weight-mixed (True), or every validation sample
            exactly once, in order (False).
        seed: base of every random choice; see the module docstring.
        shuffle_buffer: raw samples held per source and worker for shuffling (train only).
        batches_per_epoch: batches *this rank* yields per epoch (per pass over the DataLoader),
            divided over the DataLoader workers: worker ``w`` of ``W`` yields
            ``batches_per_epoch // W`` plus one if ``w < batches_per_epoch % W`` — what
            ``with_epoch`` does per worker, but summing to exactly ``batches_per_epoch`` per rank.
            Every rank passes the same number, so every rank steps the same number of times.
            ``None`` in training: an endless epoch (stop on ``max_steps``). In validation at most
            this many.
        skips: where skipped samples are recorded; each batch drains it into ``batch["skipped"]``.
        image_tokens: decoded image → its visual tokens, where they depend on its size (AnyRes:
            ``OwlProcessor.image_tokens``); None: every image costs the same.
        video_reader: encoded clip → its preprocessed frames (``OwlProcessor.video_reader``); needed when a
            source has ``format: video``.

    Returns:
        A :class:`ShardPipeline`; each batch is the dict :func:`collate` returns, with ``images``
        ``[M, 3, H, W]`` and ``image_counts`` ``[B]`` (all ones for captions, 1..max_images for documents),
        ``dropped_images``: the reason of each image slot left out of its batch's documents; in training also
        ``stream_cursor`` (see :meth:`_WeightedMix.cursor`).
    """
    if not sources:
        raise ValueError("no shard sources given; add at least one to the data manifest")
    documents = [source.name for source in sources if source.format in DOCUMENT_FORMATS]
    if documents and encode_document is None:
        raise ValueError(f"sources {documents} hold interleaved documents: pass encode_document (ConversationTemplate.encode_document)")
    clips = [source.name for source in sources if source.format == "video"]
    if clips and video_reader is None:
        raise ValueError(f"sources {clips} hold video clips: pass video_reader (OwlProcessor.video_reader)")
    if batch_size < 1 or (batches_per_epoch is not None and batches_per_epoch < 1):
        raise ValueError(f"batch_size and batches_per_epoch must be positive, got {batch_size} and {batches_per_epoch}")
    skips = skips if skips is not None else SkipLog()
    rank, world_size, _, _ = wds.utils.pytorch_worker_info()
    position = StreamPosition()
    seeds = _Seeds(seed, rank, position)
    shard_lists = {source.name: _existing_shards(source) for source in sources}
    # Stages are partials of module-level functions so that spawned workers can unpickle them.
    read = partial(
        _read_shards,
        skips=skips,
        stall_limit=max(MIN_STALL_SKIPS, STALL_SKIPS_PER_SAMPLE * batch_size),
        limits=TarLimits(MAX_MEMBER_BYTES, MAX_SHARD_BYTES),
    )
    encode_one = partial(
        _encode_sample,
        image_transform=image_transform,
        encode_caption=encode_caption,
        encode_document=encode_document,
        skips=skips,
        image_tokens=image_tokens,
        video_reader=video_reader,
    )
    encode = partial(_map_or_skip, fn=encode_one, skips=skips)
    batch = partial(_batched, batch_size=batch_size, pad_token_id=pad_token_id, skips=skips, finite=not train)
    share = partial(_worker_share, batches_per_epoch=batches_per_epoch, position=position)

    if train:
        shuffles = [_SeededShuffle(shuffle_buffer, partial(seeds, _SHUFFLE_SALT, index), position, index) for index in range(len(sources))]
        streams = [
            wds.DataPipeline(
                _ShardDraws(shard_lists[source.name], partial(seeds, _SHARD_SALT, index), position, index),
                partial(_tag_source, source=source),
                read,
                shuffles[index],
                encode,
            )
            for index, source in enumerate(sources)
        ]
        mix = _WeightedMix(streams, shuffles, [source.weight for source in sources], partial(seeds, _MIX_SALT), position)
        return ShardPipeline(
            mix, batch, partial(_with_stream_cursor, mix=mix), share, position=position, batches_per_epoch=batches_per_epoch
        )

    shards = [{"url": url, "source": source} for source in sources for url in shard_lists[source.name]]
    if len(shards) >= world_size:
        split_shards, split_samples = [partial(_split_by_rank_and_worker, rank=rank, world_size=world_size)], []
    else:  # too few shards to give every rank one: every rank reads them all and keeps its share of samples
        split_shards = [partial(_split_by_rank_and_worker, rank=0, world_size=1)]
        split_samples = [partial(_every_nth, start=rank, step=world_size)]
    # A callable source, not the list itself: DataPipeline splices a list argument in as stages.
    return ShardPipeline(partial(iter, shards), *split_shards, read, *split_samples, encode, batch, share, position=position)


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def _existing_shards(source: ShardSource) -> list[str]:
    """The source's shard URLs; local files that do not exist are dropped with a warning
    (img2dataset leaves gaps where a shard failed), and none existing at all is an error."""
    urls = expand_shards(source.shards)
    present = [url for url in urls if not _is_local(url) or Path(url).is_file()]
    if len(present) < len(urls):
        first_missing = next(url for url in urls if _is_local(url) and not Path(url).is_file())
        if not present:
            raise FileNotFoundError(
                f"source {source.name!r}: none of the {len(urls)} shard(s) of {source.shards!r} exist "
                f"(first: {first_missing}). Fix 'shards' in the data manifest, or create the data "
                "(the embedded data and the scenes task: make data)."
            )
        log.warning(
            "source %r: %d of %d shards missing, reading the rest (first missing: %s)",
            source.name,
            len(urls) - len(present),
            len(urls),
            first_missing,
        )
    return present


class _ShardDraws(torch.utils.data.IterableDataset):
    """One source's shard URLs drawn with replacement, seeded, endlessly: ``{"url", "draw"}``, the draws
    numbered 0, 1, ... in each pass.

    Resumed from a cursor, the draws whose samples were all consumed are passed over without being opened;
    a draw holding samples still waiting in the shuffle buffer, and the draw being read, come with
    ``"reread"``: which of their samples to read again (:class:`_Reread`).
    """

    def __init__(self, urls: list[str], seed: Callable[[], int], position: StreamPosition, source_index: int) -> None:
        self.urls = urls
        self.seed = seed
        self.position = position
        self.source_index = source_index

    def __iter__(self) -> Iterator[dict]:
        # Seeded and drawn as webdataset's ResampledShards does on a fresh worker's first pass (its own epoch 0,
        # seed 0): the shard order of earlier versions, whose checkpoints then resume onto the same stream.
        rng = random.Random(wds.utils.make_seed(self.seed(), 0, 0))
        rereads, first_unread = _rereads(self.position.resumed_source(self.source_index))
        for draw in count():
            url = self.urls[rng.randint(0, len(self.urls) - 1)]
            if draw >= first_unread:
                yield {"url": url, "draw": draw}
            elif draw in rereads:
                yield {"url": url, "draw": draw, "reread": rereads[draw]}


@dataclass(frozen=True)
class _Reread:
    """The raw samples of one shard draw that a resumed stream reads again: those in ``buffered`` (waiting in
    the shuffle buffer; index in the shard → byte offset where it starts) and, with ``onward`` (the index and
    offset of the last sample read), every sample after that one."""

    buffered: dict[int, int]
    onward: tuple[int, int] | None = None

    def wants(self, index: int) -> bool:
        return index in self.buffered or (self.onward is not None and index > self.onward[0])

    def spans(self, seekable: bool) -> list[tuple[int, int, int | None]]:
        """``(first index, its byte offset, stop index or None: to the shard's end)`` of each stretch to read,
        in order, not overlapping. ``seekable``: one stretch per run of consecutive wanted samples, each
        reached by a seek; otherwise one from the first wanted sample on (a stream can only be read through)."""
        starts = sorted(self.buffered.items())
        if self.onward is not None and self.onward[0] not in self.buffered:
            starts.append(self.onward)  # where reading on starts; the sample there is read, not wanted
        spans: list[tuple[int, int, int | None]] = []
        for index, offset in starts:
            if spans and (not seekable or spans[-1][2] == index):
                first, first_offset, _ = spans.pop()
                spans.append((first, first_offset, index + 1))
            else:
                spans.append((index, offset, index + 1))
        if self.onward is not None:
            first, first_offset, _ = spans.pop()  # the last stretch holds the onward sample: it goes on to the end
            spans.append((first, first_offset, None))
        return spans


def _rereads(cursor: dict | None) -> tuple[dict[int, _Reread], int]:
    """From one source's saved cursor: ``({draw: what of it to read again}, the first draw to read whole)``."""
    if cursor is None:
        return {}, 0
    read_draw, read_index, read_offset = cursor["read"]
    buffered: defaultdict[int, dict[int, int]] = defaultdict(dict)
    for draw, index, offset in cursor["buffer"].tolist():
        buffered[draw][index] = offset
    rereads = {draw: _Reread(samples) for draw, samples in buffered.items()}
    rereads[read_draw] = _Reread(buffered[read_draw], onward=(read_index, read_offset))
    return rereads, read_draw + 1


def _tag_source(shards: Iterable[dict], source: ShardSource) -> Iterator[dict]:
    for shard in shards:
        yield {**shard, "source": source}


def _split_by_rank_and_worker(shards: Iterable[dict], rank: int, world_size: int) -> Iterator[dict]:
    """Rank ``r`` reads shards ``r, r + world_size, ...``, and its workers split those the same way.
    The rank comes from build time: a spawned worker cannot see the process group."""
    worker_id, num_workers = worker_info()
    yield from islice(islice(shards, rank, None, world_size), worker_id, None, num_workers)


def _every_nth(samples: Iterable[dict], start: int, step: int) -> Iterator[dict]:
    """Raw samples ``start, start + step, …``: rank ``start`` of ``step``'s share, before any decoding."""
    yield from islice(samples, start, None, step)


def _read_shards(shards: Iterable[dict], skips: SkipLog, stall_limit: int, limits: TarLimits) -> Iterator[dict]:
    """``{"url", "source"}`` shards → raw samples ``{"__key__", "__url__", "__source__", "__offset__", ext: bytes}``;
    with ``"draw"`` (training) each sample also gets ``"__origin__"``: ``(draw, its index in the shard, its
    byte offset)``. Of a shard with ``"reread"`` (a resume) only the samples it wants are read.

    A shard that fails part-way (truncated, not a tar, past ``limits.max_shard_bytes``, or a failure
    nobody foresaw) is recorded against its URL and left: a tar stream cannot resync past a broken
    header. The samples read before the failure are kept."""
    for shard in shards:
        url = shard["url"]
        with closing(_indexed_samples(url, limits, shard.get("reread"))) as samples:
            while True:
                with skips.catch(url) as reading:
                    indexed = next(samples, None)
                if reading.skip is not None or indexed is None:
                    break
                index, sample = indexed
                sample["__source__"] = shard["source"]
                if "draw" in shard:
                    sample["__origin__"] = (shard["draw"], index, sample["__offset__"])
                yield sample
                _check_stall(skips, stall_limit, shard["source"])
        _check_stall(skips, stall_limit, shard["source"])  # also after a shard that gave nothing


def _indexed_samples(url: str, limits: TarLimits, reread: _Reread | None) -> Iterator[tuple[int, dict]]:
    """``(index in the shard, raw sample)`` of every sample of the shard at ``url``, or of those ``reread``
    wants. Those are reached by seeks where the shard is a plain tar on disk, else by reading through from
    the first (bytes only: nothing is decoded here). A stretch stops before the sample after its last
    wanted one, so a failure further on is not met again (and counted twice)."""
    if reread is None:
        yield from enumerate(_tar_samples(url, limits))
        return
    for first, offset, stop in reread.spans(seekable=_plain_local_tar(url)):
        with closing(_tar_samples(url, limits, start=offset)) as samples:
            stretch = samples if stop is None else islice(samples, stop - first)
            for index, sample in enumerate(stretch, start=first):
                if reread.wants(index):
                    yield index, sample


def _plain_local_tar(url: str) -> bool:
    """Whether the shard at ``url`` is an uncompressed tar on disk, where a sample is one seek away."""
    if not _is_local(url):
        return False
    try:
        with open(url, "rb") as file:
            head = file.read(max(len(magic) for magic in _DECOMPRESSORS))
    except OSError:
        return False
    return not any(head.startswith(magic) for magic in _DECOMPRESSORS)


@dataclass(frozen=True)
class TarLimits:
    """The shard reader's size limits (MAX_MEMBER_BYTES, MAX_SHARD_BYTES), fixed when a pipeline is built."""

    max_member_bytes: int
    max_shard_bytes: int


def _tar_samples(url: str, limits: TarLimits, start: int = 0) -> Iterator[dict]:
    """One shard's samples ``{"__key__", "__url__", "__offset__", ext: bytes}`` from byte ``start`` (where a
    sample begins) on: consecutive members sharing a key (``000123.jpg``, ``000123.txt``), grouped as
    webdataset groups them; ``__offset__`` is where the sample's first member begins. A sample with a member
    over the size limit, or with two members of one name, carries ``"__skip__"``: the SkipSample its encoding
    raises."""
    sample: dict | None = None
    try:
        for offset, name, data in _tar_members(url, limits, start):
            key, extension = wds.tariterators.base_plus_ext(name)
            if key is None:  # no extension: not part of any sample
                continue
            extension = extension.lower()
            if sample is None or key != sample["__key__"]:
                if sample is not None:
                    yield sample
                sample = {"__key__": key, "__url__": url, "__offset__": offset}
            if isinstance(data, SkipSample):
                sample.setdefault("__skip__", data)
            elif extension in sample:
                sample.setdefault("__skip__", SkipSample(MALFORMED_RECORD, f"two members named {name}"))
            else:
                sample[extension] = data
    except SkipSample:
        # The shard cannot be read on. As webdataset does, the sample read last goes on with the members
        # it has (encoding judges whether they suffice) before the shard's failure is recorded.
        if sample is not None:
            yield sample
        raise
    if sample is not None:
        yield sample


def _tar_members(url: str, limits: TarLimits, start: int = 0) -> Iterator[tuple[int, str, bytes | SkipSample]]:
    """``(offset, name, bytes)`` of each regular member of the tar at ``url`` (plain, .gz, .bz2 or .xz), in
    order, from byte ``start`` of the (decompressed) tar on, which must be where a member's headers begin;
    ``offset``: where this member's headers begin. For a member over ``limits.max_member_bytes``,
    ``(offset, name, SkipSample)`` instead: its bytes are never read.

    Raises ``SkipSample``: ``TRUNCATED_TAR`` when the tar cannot be read on, ``OVERSIZED_SHARD`` once it
    has expanded past ``limits.max_shard_bytes``."""
    try:
        with closing(wds.gopen(url)) as raw:
            stream = _decompressed(raw)
            if start and isinstance(stream, _Prepended) and getattr(raw, "seekable", lambda: False)():
                raw.seek(start)  # a plain tar in a file: straight there
                expanded = _CountedReads(raw, limits.max_shard_bytes, bytes_read=start)
            else:  # compressed, or a stream: read through to there (bytes, not headers: fast)
                expanded = _CountedReads(stream, limits.max_shard_bytes)
                while expanded.bytes_read < start and expanded.read(min(1 << 20, start - expanded.bytes_read)):
                    pass
            tar = tarfile.open(fileobj=expanded, mode="r|")
            for member in tar:
                if start + member.offset_data + member.size > limits.max_shard_bytes:  # stop before reading (expanding) it
                    raise SkipSample(OVERSIZED_SHARD, _shard_too_big(limits.max_shard_bytes))
                if member.isreg() and not _METADATA_MEMBER.match(member.name):
                    if member.size > limits.max_member_bytes:
                        yield (
                            start + member.offset,
                            member.name,
                            SkipSample(OVERSIZED_MEMBER, _member_too_big(member, limits.max_member_bytes)),
                        )
                    else:
                        yield start + member.offset, member.name, tar.extractfile(member).read()
                tar.members = []  # a shard has thousands of members: keep none of their headers
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as err:
        raise SkipSample(TRUNCATED_TAR, f"{type(err).__name__}: {err}. Re-create or re-download this shard.") from None


def _member_too_big(member: tarfile.TarInfo, limit: int) -> str:
    return (
        f"member {member.name} is {member.size:,} bytes, more than MAX_MEMBER_BYTES={limit:,}; "
        "shrink or drop that sample, or raise owl_lightning.data.shards.MAX_MEMBER_BYTES if it is genuine"
    )


# webdataset's rule: members named __...__ are metadata, not samples.
_METADATA_MEMBER = re.compile(r"__[^/]*__($|/)")
# The compressions tarfile's "r|*" recognises, by their leading bytes.
_DECOMPRESSORS: dict[bytes, Callable[[BinaryIO], BinaryIO]] = {
    b"\x1f\x8b": lambda stream: gzip.GzipFile(fileobj=stream),
    b"BZh": bz2.BZ2File,
    b"\xfd7zXZ\x00": lzma.LZMAFile,
}


def _decompressed(raw: BinaryIO) -> BinaryIO:
    """``raw`` as a plain tar stream, decompressed here rather than by tarfile so that every expanded
    byte passes through :class:`_CountedReads`."""
    head = raw.read(max(len(magic) for magic in _DECOMPRESSORS))
    stream = _Prepended(head, raw)
    for magic, decompress in _DECOMPRESSORS.items():
        if head.startswith(magic):
            return decompress(stream)
    return stream


class _Prepended:
    """``head`` (the bytes read to recognise the compression) followed by the rest of ``stream``."""

    def __init__(self, head: bytes, stream: BinaryIO) -> None:
        self.head, self.stream = head, stream

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(size)
        if size < 0:
            data, self.head = self.head + self.stream.read(), b""
        else:
            data, self.head = self.head[:size], self.head[size:]
        return data


class _CountedReads:
    """Reads of ``stream`` that raise ``SkipSample(OVERSIZED_SHARD)`` once more than ``limit`` bytes came out
    (``bytes_read``: those before the stream's position, for a stream that starts mid-shard)."""

    def __init__(self, stream: BinaryIO, limit: int, bytes_read: int = 0) -> None:
        self.stream, self.limit = stream, limit
        self.bytes_read = bytes_read

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.bytes_read += len(data)
        if self.bytes_read > self.limit:
            raise SkipSample(OVERSIZED_SHARD, _shard_too_big(self.limit))
        return data


def _shard_too_big(limit: int) -> str:
    return (
        f"it expands to more than MAX_SHARD_BYTES={limit:,} bytes; the samples after that are not read. "
        "Split it into smaller shards, or raise owl_lightning.data.shards.MAX_SHARD_BYTES if it is genuine"
    )


def _check_stall(skips: SkipLog, stall_limit: int, source: ShardSource) -> None:
    if len(skips.pending) <= stall_limit:
        return
    reasons = Counter(reason for reason, _ in skips.pending)
    raise RuntimeError(
        f"{len(skips.pending)} samples skipped without filling one batch "
        f"({', '.join(f'{r}={n}' for r, n in reasons.most_common())}; last: {skips.pending[-1][1]}). "
        f"Check source {source.name!r} in the data manifest: {_expected_members(source)}, and the shards must be readable."
    )


def _expected_members(source: ShardSource) -> str:
    if source.format == "captions":
        return f"image_key={source.image_key!r} and caption_key={source.caption_key!r} must name members its shards have"
    if source.format == "video":
        return f"video_key={source.video_key!r} and caption_key={source.caption_key!r} must name members its shards have"
    return f"format={source.format!r} needs a .json member in that schema per sample, its images as members KEY.k.{{{source.image_key}}}"


class _SeededShuffle(wds.PipelineStage):
    """Buffered shuffle of raw samples, reseeded at every pass from (seed, epoch, rank, worker).

    webdataset's ``shuffle`` (the same buffer moves and random draws), with the buffer and RNG of the pass
    held where :meth:`cursor` reads them, and restored from a saved cursor when the pass resumes one. Raw
    samples are still undecoded, so a cursor holds everything read but not yet used.
    """

    def __init__(self, buffer_size: int, seed: Callable[[], int], position: StreamPosition, source_index: int) -> None:
        self.buffer_size = buffer_size
        self.seed = seed
        self.position = position
        self.source_index = source_index
        self.live: _ShuffleState | None = None  # this pass's, once it has started

    def start_pass(self) -> None:
        """Forget the last pass: until this source is first read again, its cursor is where the pass starts."""
        self.live = None

    def run(self, samples: Iterable[dict]) -> Iterator[dict]:
        samples = iter(samples)
        saved = self.position.resumed_source(self.source_index)
        if saved is None:
            live = _ShuffleState([], random.Random(self.seed()), read=None)
        else:  # the reader yields the buffer's samples first (see _rereads)
            live = _ShuffleState(_refilled_buffer(samples, saved["buffer"]), _rng_from_state(saved["shuffle_rng"]), tuple(saved["read"]))
        self.live = live
        initial = min(_SHUFFLE_INITIAL, self.buffer_size)
        for sample in samples:
            live.take(sample)
            if len(live.buffer) < self.buffer_size:
                following = next(samples, None)
                if following is not None:
                    live.take(following)
            if len(live.buffer) >= initial:
                yield live.pick()
        while live.buffer:
            yield live.pick()

    def cursor(self) -> dict | None:
        """``{"read": origin of the last raw sample taken in, "buffer": int64 [n, 3] origins of the samples
        waiting, in buffer order, "shuffle_rng": int64 [625]}``; an origin is ``(draw, index in the shard,
        byte offset in the shard)``. Not read yet in this pass: the cursor the pass resumed from (None: the
        start)."""
        if self.live is None:
            return self.position.resumed_source(self.source_index)
        return self.live.cursor()


@dataclass
class _ShuffleState:
    """A shuffle's buffer of raw samples, its RNG, and the origin of the last sample it took in.

    ``origins`` holds the buffered samples' origins, flat, in buffer order, kept in step with every take and
    pick: a batch's cursor copies it rather than walking the whole buffer (docs/benchmarks.md has what the
    walk cost)."""

    buffer: list[dict]
    rng: random.Random
    read: tuple[int, int, int] | None
    origins: array.array = field(init=False)

    def __post_init__(self) -> None:
        self.origins = array.array("q", chain.from_iterable(sample["__origin__"] for sample in self.buffer))

    def take(self, sample: dict) -> None:
        self.buffer.append(sample)
        self.origins.extend(sample["__origin__"])
        self.read = sample["__origin__"]

    def pick(self) -> dict:
        """A random buffered sample, removed: webdataset's ``filters.pick`` (the same draw, the last sample
        moved into the picked one's slot), so streams stay as they were."""
        k = self.rng.randint(0, len(self.buffer) - 1)
        sample = self.buffer[k]
        self.buffer[k] = self.buffer[-1]
        self.buffer.pop()
        self.origins[3 * k : 3 * k + 3] = self.origins[-3:]
        del self.origins[-3:]
        return sample

    def cursor(self) -> dict:
        flat = array.array("q", self.origins)  # a copy: the batch keeps this moment's buffer
        origins = torch.frombuffer(flat, dtype=torch.int64).reshape(-1, 3) if flat else torch.zeros(0, 3, dtype=torch.int64)
        return {"read": list(self.read), "buffer": origins, "shuffle_rng": _rng_state(self.rng)}


def _refilled_buffer(samples: Iterator[dict], origins: torch.Tensor) -> list[dict]:
    """The saved shuffle buffer again, in its saved order: the first ``len(origins)`` samples ``samples``
    yields, which must be the samples at ``origins`` (``[n, 3]``: draw, index, offset)."""
    slots = {tuple(origin): slot for slot, origin in enumerate(origins.tolist())}
    buffer: list[dict | None] = [None] * len(slots)
    for sample in islice(samples, len(slots)):
        slot = slots.get(sample["__origin__"])
        if slot is None:
            break
        buffer[slot] = sample
    missing = [origin for origin, slot in slots.items() if buffer[slot] is None]
    if missing:
        draw, index, _ = missing[0]
        raise RuntimeError(
            f"cannot resume the training stream exactly: sample {index} of shard draw {draw} (and {len(missing) - 1} more) "
            "was not found again. A shard changed or went missing since the checkpoint (see the skip warnings above); "
            "restore the shards it was saved with"
        )
    return buffer


def _rng_state(rng: random.Random) -> torch.Tensor:
    """A ``random.Random``'s state as int64 ``[625]`` (624 Mersenne Twister words and the index)."""
    _, words, _ = rng.getstate()
    return torch.frombuffer(array.array("q", words), dtype=torch.int64)


def _rng_from_state(state: torch.Tensor) -> random.Random:
    rng = random.Random()
    rng.setstate((3, tuple(state.tolist()), None))  # version 3: CPython's; no Gaussian is pending, as nothing here draws one
    return rng


def _map_or_skip(samples: Iterable[dict], fn: Callable[[dict], EncodedSample], skips: SkipLog) -> Iterator[EncodedSample]:
    for sample in samples:
        with skips.catch(f"{sample['__url__']}:{sample['__key__']}") as encoding:
            encoded = fn(sample)
        if encoding.skip is None:
            yield encoded


def _encode_sample(
    raw: dict,
    image_transform: Callable[[Image.Image], torch.Tensor | TiledImage],
    encode_caption: Callable[..., tuple[list[int], list[int]]],
    encode_document: Callable[..., tuple[list[int], list[int], int]] | None,
    skips: SkipLog,
    image_tokens: Callable[[Image.Image], int] | None = None,
    video_reader: VideoReader | None = None,
) -> EncodedSample:
    """Raw tar sample → :class:`EncodedSample` with its preprocessed images (one for a caption, a clip for
    ``format: video``), or :class:`SkipSample`."""
    source: ShardSource = raw["__source__"]
    if "__skip__" in raw:  # refused while reading the tar (an oversized or duplicate member)
        raise raw["__skip__"]
    if source.format == "video":
        return _encode_clip(raw, source, encode_caption, video_reader)
    if source.format != "captions":
        return _encode_document(raw, image_transform, encode_document, skips, image_tokens)
    caption = _caption_of(raw, source.caption_key)
    if image_tokens is None:  # the cheap checks first: a sample with a bad caption costs no image decode
        input_ids, labels = encode_caption(caption)
        image = decode_image(_image_bytes_of(raw, source.image_key))
    else:  # an AnyRes image's visual tokens, which the caption must leave room for, depend on its size
        image = decode_image(_image_bytes_of(raw, source.image_key))
        input_ids, labels = encode_caption(caption, image_tokens(image))
    return EncodedSample(input_ids=input_ids, labels=labels, images=[image_transform(image)], source=source.name)


def _encode_clip(
    raw: dict,
    source: ShardSource,
    encode_caption: Callable[..., tuple[list[int], list[int]]],
    video_reader: VideoReader,
) -> EncodedSample:
    """A clip and its caption: the caption first (a clip always takes ``num_frames · V`` tokens), then the clip decoded."""
    caption = _caption_of(raw, source.caption_key)
    extension = next((extension for extension in source.video_key.split(";") if extension in raw), None)
    if extension is None:
        raise SkipSample(MISSING_VIDEO, f"no member with extension {source.video_key!r}; it has {_members(raw)}")
    input_ids, labels = encode_caption(caption, video_reader.visual_tokens)
    return EncodedSample(input_ids=input_ids, labels=labels, images=[video_reader(raw[extension])], source=source.name)


def _image_bytes_of(raw: dict, image_key: str) -> bytes:
    """Bytes of the first member present among ``image_key``'s extensions (``"jpg;png;webp"``)."""
    for extension in image_key.split(";"):
        if extension in raw:
            return raw[extension]
    raise SkipSample(MISSING_IMAGE, f"no member with extension {image_key!r}; it has {_members(raw)}")


def _caption_of(raw: dict, caption_key: str) -> str:
    """The caption from a text member (``"txt"``) or a field of the JSON member (``"json:caption"``)."""
    member, _, field = caption_key.partition(":")
    if member not in raw:
        raise SkipSample(MISSING_TEXT, f"no .{member} member; it has {_members(raw)}")
    try:
        text = raw[member].decode("utf-8")
    except UnicodeDecodeError as err:
        raise SkipSample(BAD_TEXT, f".{member} is not UTF-8: {err}") from None
    if field:
        record = parse_json_record(text, f".{member}")
        text = record.get(field) if isinstance(record, dict) else None
        if text is not None and not isinstance(text, str):
            raise SkipSample(BAD_TEXT, f"field {field!r} of .{member} is a {type(text).__name__}, not a string")
    if not text or not text.strip():
        raise SkipSample(MISSING_TEXT, f"empty caption in {caption_key!r}")
    return text.strip()


def _members(raw: dict) -> list[str]:
    return sorted(key for key in raw if not key.startswith("__"))


def _encode_document(
    raw: dict,
    image_transform: Callable[[Image.Image], torch.Tensor],
    encode_document: Callable[..., tuple[list[int], list[int], int]],
    skips: SkipLog,
    image_tokens: Callable[[Image.Image], int] | None = None,
) -> EncodedSample:
    """Raw tar sample of an interleaved document (its record as the ``.json`` member, image ``k`` as member
    ``k.{image_key}`` or MMC4's ``image_base64``) → :class:`EncodedSample`, by the rules of
    :func:`~owl_lightning.data.documents.encode_document_sample`. The document is skipped when its .json is
    missing or malformed."""
    source: ShardSource = raw["__source__"]
    if "json" not in raw:
        raise SkipSample(MISSING_TEXT, f"no .json member holding the {source.format} document; it has {_members(raw)}")
    document = read_document(parse_json_record(raw["json"], ".json member"), source.format, source.name)

    def member_bytes(slot: ImageSlot) -> bytes:
        for extension in source.image_key.split(";"):
            if f"{slot.index}.{extension}" in raw:
                return raw[f"{slot.index}.{extension}"]
        if slot.embedded is None:
            raise SkipSample(MISSING_IMAGE, f"no member .{slot.index}.{{{source.image_key.replace(';', ',')}}} and no image_base64")
        return embedded_image(slot)

    where = f"{raw['__url__']}:{raw['__key__']}"
    return encode_document_sample(document, member_bytes, encode_document, image_transform, source.max_images, skips, where, image_tokens)


class _WeightedMix(torch.utils.data.IterableDataset):
    """Endless per-sample mix of endless streams: each sample comes from stream ``i`` with
    probability ``weights[i] / sum(weights)``, drawn by an RNG seeded at every pass. ``shuffles[i]`` is
    stream ``i``'s shuffle stage; with the mix's RNG they say where the whole stream stands (:meth:`cursor`)."""

    def __init__(
        self,
        streams: list[Iterable[EncodedSample]],
        shuffles: list[_SeededShuffle],
        weights: list[float],
        seed: Callable[[], int],
        position: StreamPosition,
    ) -> None:
        self.streams = streams
        self.shuffles = shuffles
        self.weights = weights
        self.seed = seed
        self.position = position

    def __iter__(self) -> Iterator[EncodedSample]:
        saved = self.position.resumed_cursor()
        if saved is not None and len(saved["sources"]) != len(self.streams):
            raise ValueError(
                f"the checkpoint's training data was read from {len(saved['sources'])} shard source(s), the data manifest "
                f"has {len(self.streams)}: resume with the manifest the checkpoint was saved with"
            )
        self.role, _ = worker_role(self.position.batches_done())
        self.rng = random.Random(self.seed()) if saved is None else _rng_from_state(saved["mix_rng"])
        for shuffle in self.shuffles:
            shuffle.start_pass()
        iterators = [iter(stream) for stream in self.streams]
        while True:
            (chosen,) = self.rng.choices(iterators, weights=self.weights)
            yield next(chosen)

    def cursor(self) -> dict:
        """Where this worker's stream stands between two samples: ``{"role": the worker role it reads for,
        "sources": [per source, _SeededShuffle.cursor], "mix_rng": int64 [625]}``."""
        return {"role": self.role, "sources": [shuffle.cursor() for shuffle in self.shuffles], "mix_rng": _rng_state(self.rng)}


def _batched(samples: Iterable[EncodedSample], batch_size: int, pad_token_id: int, skips: SkipLog, finite: bool) -> Iterator[dict]:
    """Samples → :func:`collate` batches.

    Of a ``finite`` stream (validation) a full batch is handed on only when the next sample arrives, and
    the last partial batch is kept, so the skips met while reading ahead — and the last ones — travel with
    a batch instead of being left behind. Of an endless one (training) a batch is handed on as soon as it
    is full: nothing read is held back, so the stream cursor it carries is exactly where the stream stands,
    and the skips met while filling the next batch travel with that one."""
    batch: list[EncodedSample] = []
    for sample in samples:
        if finite and len(batch) == batch_size:
            yield _collated(batch, pad_token_id, skips)
            batch = []
        batch.append(sample)
        if not finite and len(batch) == batch_size:
            yield _collated(batch, pad_token_id, skips)
            batch = []
    if finite and batch:
        yield _collated(batch, pad_token_id, skips)


def _collated(samples: list[EncodedSample], pad_token_id: int, skips: SkipLog) -> dict:
    """:func:`collate` with the skips and dropped image slots since the previous batch."""
    batch = collate(samples, pad_token_id, skipped=skips.drain())
    batch["dropped_images"] = skips.drain_dropped_images()
    return batch


def _with_stream_cursor(batches: Iterable[dict], mix: _WeightedMix) -> Iterator[dict]:
    """Each training batch with ``"stream_cursor"``: where its worker's stream stands right after it."""
    for batch in batches:
        batch["stream_cursor"] = mix.cursor()
        yield batch


def _worker_share(batches: Iterable[dict], batches_per_epoch: int | None, position: StreamPosition) -> Iterator[dict]:
    """This DataLoader worker's share of the rank's ``batches_per_epoch`` (see build_shard_pipeline),
    less the batches its role had already delivered before a resume. Resumed from a cursor, the stream
    starts after them; without one (an older checkpoint) they are rebuilt and dropped, with their skips,
    which the restored run has counted already. webdataset's ``with_epoch`` counts per worker, and the
    worker count is only known here."""
    done = position.batches_done()
    role, num_workers = worker_role(done)
    delivered = batches_consumed_by_role(role, num_workers, done)
    rebuilt = delivered if position.resume_cursors is None else 0
    if batches_per_epoch is None:
        yield from islice(batches, rebuilt, None)
        return
    share = batches_per_epoch // num_workers + (role < batches_per_epoch % num_workers)
    yield from islice(batches, rebuilt, rebuilt + max(0, share - delivered))
