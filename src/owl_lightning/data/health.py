"""Skipped-sample accounting: nothing a dataset contains crashes a run, and nothing is skipped silently.

Every stage that handles one record at a time runs it under :meth:`SkipLog.catch`: a bad record —
of a kind some check names (:class:`SkipSample` with a reason below) or of a kind nobody foresaw
(reason ``unexpected``) — becomes one counted skip with its file and record, and the stage goes on.

Skips happen where samples are read: in DataLoader worker processes. Each pipeline owns a
:class:`SkipLog`; a worker records every skip there and the collate step drains it into the
batch it builds (``batch["skipped"]``), so the counts travel to the main process with the
data itself — no shared memory, no extra channel, and they survive any number of workers.
Records refused while a source is read at setup are handed over directly (:meth:`DataHealth.record_read`).
In the main process :class:`DataHealth` adds them up, logs them, and stops the run with a
message naming the worst shard/file once a skip fraction passes the configured limit.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import TracebackType

from owl_lightning.files import loads_strict

log = logging.getLogger(__name__)

# Skip reasons: one vocabulary for every reader, so TensorBoard shows one chart per reason.
CORRUPT_IMAGE = "corrupt_image"
UNSUPPORTED_IMAGE = "unsupported_image"  # a format or mode we refuse to open (EPS, ...) or to guess about
DECOMPRESSION_BOMB = "decompression_bomb"
MISSING_IMAGE = "missing_image"
MISSING_TEXT = "missing_text"
BAD_TEXT = "bad_text"  # not UTF-8, wrong type, lone surrogates
TRUNCATED_TAR = "truncated_tar"  # a shard that cannot be read (on): truncated, empty, not a tar
OVERSIZED_MEMBER = "oversized_member"  # a tar member past shards.MAX_MEMBER_BYTES: its sample is skipped
OVERSIZED_SHARD = "oversized_shard"  # a tar expanding past shards.MAX_SHARD_BYTES: the rest of it is skipped
MALFORMED_RECORD = "malformed_record"  # bad JSON, wrong field types, unknown role, empty conversation
IMAGE_COUNT_MISMATCH = "image_count_mismatch"
PATH_OUTSIDE_ROOT = "path_outside_root"
TOO_LONG = "too_long"  # truncation would leave no supervised token, or megabytes of text
CORRUPT_VIDEO = "corrupt_video"  # a clip no decoder can read: truncated, damaged, not the container it claims
UNSUPPORTED_VIDEO = "unsupported_video"  # a container or codec we refuse (data/video.py), or no video stream
MISSING_VIDEO = "missing_video"
VIDEO_TOO_SHORT = "video_too_short"  # fewer decodable frames than video.min_frames
VIDEO_TOO_LONG = "video_too_long"  # past video.MAX_DURATION_S or MAX_DECODED_FRAMES: cut it into clips
EMPTY_SOURCE = "empty_source"  # an instruction file without one usable record (e.g. 0 bytes)
UNEXPECTED = "unexpected"  # an exception no check foresaw; the detail names its type

# Reasons an image slot of an interleaved document is dropped while the document itself is kept. They are
# counted apart from skips (DataHealth.dropped_images): a dropped slot is part of a used sample, so it must
# neither count against max_skip_fraction nor pass unnoticed. A slot whose image is missing or cannot be
# decoded is dropped under the image's own skip reason (missing_image, corrupt_image, ...).
OVER_MAX_IMAGES = "over_max_images"  # past the source's max_images: the document's later images
PAST_MAX_LENGTH = "past_max_length"  # its <image> token (or all the text after it) fell past max_length
AFTER_LAST_TEXT = "after_last_text"  # no text follows it in the document: nothing would attend to it

# How much of a skip's detail goes into a warning (the detail may quote the record itself).
_DETAIL_CHARACTERS = 300


class SkipSample(Exception):
    """Raised by a pipeline stage for one bad sample; caught by the stage that records it."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def parse_json_record(text: str | bytes, what: str) -> object:
    """``json.loads`` of one record, or :class:`SkipSample` saying why not. ``what`` names it in the detail
    (``"line"``, ``".json member"``). Deep nesting is malformed too: 100,000 ``[`` make the parser raise
    ``RecursionError``, which must cost one record, not the run."""
    try:
        return loads_strict(text)
    except UnicodeDecodeError as err:
        raise SkipSample(BAD_TEXT, f"{what} is not UTF-8: {err}") from None
    except ValueError as err:  # bad JSON, NaN/Infinity, nesting too deep for the parser
        raise SkipSample(MALFORMED_RECORD, f"{what} is not valid JSON: {err}") from None


@dataclass
class SkipLog:
    """Worker-local record of skips since the last batch. Picklable, so each worker gets its own."""

    pending: list[tuple[str, str]] = field(default_factory=list)
    dropped_images: list[str] = field(default_factory=list)  # the reason of each image slot dropped from a kept sample
    warnings_left: int = 20  # per worker; after that only the counts say it
    last: str = ""  # the latest skip, "where (reason: detail)", for error messages

    def record(self, reason: str, where: str, detail: str = "", error: BaseException | None = None) -> None:
        """Count one skipped sample. ``where`` names the shard/file and sample (``shard.tar:000123``);
        ``error``, for an unforeseen failure, puts its traceback in the warning."""
        self.pending.append((reason, where))
        self.last = f"{where} ({reason}: {detail})" if detail else f"{where} ({reason})"
        if self.warnings_left > 0:
            self.warnings_left -= 1
            shown = detail if len(detail) <= _DETAIL_CHARACTERS else detail[:_DETAIL_CHARACTERS] + "..."
            log.warning("skipped %s (%s)%s", where, reason, f": {shown}" if shown else "", exc_info=error)

    def catch(self, where: str) -> CaughtSkip:
        """``with skips.catch(where): ...``: whatever the block raises for one record becomes a counted skip.

        A :class:`SkipSample` is recorded with its reason; any other exception — a kind of bad record no
        check foresaw, or a bug — with reason ``unexpected`` and its type in the detail (the first few with
        their traceback in the log). Either way the block is left and the caller goes on to the next record.
        ``MemoryError`` and non-``Exception`` errors (``KeyboardInterrupt``) are not records' faults: they
        pass. After the block, the context's ``skip`` is what was recorded (``None``: nothing)."""
        return CaughtSkip(self, where)

    def drop_image(self, reason: str, where: str, detail: str = "") -> None:
        """Count one image slot dropped from a sample that is used (``over_max_images``, ``missing_image``, ...).
        ``detail``, given for a defect in the data (not for a cap), puts it in the first warnings."""
        self.dropped_images.append(reason)
        if detail and self.warnings_left > 0:
            self.warnings_left -= 1
            log.warning("dropped image %s from its document (%s): %s", where, reason, detail[:_DETAIL_CHARACTERS])

    def drain(self) -> list[tuple[str, str]]:
        pending, self.pending = self.pending, []
        return pending

    def drain_dropped_images(self) -> list[str]:
        dropped, self.dropped_images = self.dropped_images, []
        return dropped


class CaughtSkip:
    """The context manager of :meth:`SkipLog.catch`."""

    def __init__(self, skips: SkipLog, where: str) -> None:
        self.skips = skips
        self.where = where
        self.skip: SkipSample | None = None

    def __enter__(self) -> CaughtSkip:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None) -> bool:
        if error is None or not isinstance(error, Exception) or isinstance(error, MemoryError):
            return False
        if isinstance(error, SkipSample):
            self.skip = error
            self.skips.record(error.reason, self.where, error.detail)
        else:
            self.skip = SkipSample(UNEXPECTED, f"{type(error).__name__}: {error}")
            self.skips.record(UNEXPECTED, self.where, self.skip.detail, error=error)
        return True  # handled: the caller's next statement runs


class SkipRateExceeded(RuntimeError):
    pass


@dataclass
class SourceReadCounts:
    """One source as read when the data is set up: its file, the records kept, and those refused by reason."""

    path: str
    kept: int = 0
    skipped_by_reason: Counter = field(default_factory=Counter)

    @property
    def skipped(self) -> int:
        return sum(self.skipped_by_reason.values())


@dataclass
class DataHealth:
    """Main-process totals of the data used and skipped, by reason, by source and by shard/file.

    Two kinds of skip, each held against what it was one of:

    * read-time skips: records refused while a source is read whole at setup (stage 2's instruction
      files), against the records read. Kept per source, so reading a source again (a second
      ``setup``, a resumed run) replaces its counts rather than adding to them.
    * stream skips: samples refused while batches are built, against the samples drawn (used + skipped).
      They arrive with the batches, so a resumed run, which restores these totals and goes on with the
      batch after its checkpoint, counts each one once.

    Args:
        max_skip_fraction: stop when either fraction exceeds this ...
        min_samples: ... once at least this many records (or samples) were seen (small counts are noise).
    """

    max_skip_fraction: float = 0.1
    min_samples: int = 200
    used: int = 0
    skipped_by_reason: Counter = field(default_factory=Counter)  # stream skips ...
    skipped_by_location: Counter = field(default_factory=Counter)  # ... and where they were
    used_by_source: Counter = field(default_factory=Counter)
    supervised_tokens_by_source: Counter = field(default_factory=Counter)  # the loss's tokens, by source
    dropped_images_by_reason: Counter = field(default_factory=Counter)  # image slots left out of used samples
    read_by_source: dict[str, SourceReadCounts] = field(default_factory=dict)

    @property
    def skipped(self) -> int:
        """Stream skips (see the class docstring)."""
        return sum(self.skipped_by_reason.values())

    # -- read-time ---------------------------------------------------------------------------------

    def record_read(self, source: str, path: str, kept: int, skipped: list[tuple[str, str]]) -> None:
        """What reading ``source`` (file ``path``) gave: ``kept`` usable records and the ``skipped`` ones.
        Replaces the counts of an earlier read of the same source; call :meth:`check_read` after the last source."""
        self.read_by_source[source] = SourceReadCounts(path, kept, Counter(reason for reason, _ in skipped))

    def read_skip_fraction(self) -> float:
        skipped = sum(counts.skipped for counts in self.read_by_source.values())
        seen = skipped + sum(counts.kept for counts in self.read_by_source.values())
        return skipped / seen if seen else 0.0

    def check_read(self) -> None:
        """Raise :class:`SkipRateExceeded` if too many of the records read at setup were refused."""
        by_reason = sum((counts.skipped_by_reason for counts in self.read_by_source.values()), Counter())
        by_file = Counter({counts.path: counts.skipped for counts in self.read_by_source.values() if counts.skipped})
        kept = sum(counts.kept for counts in self.read_by_source.values())
        self._check("records read at setup", kept, by_reason, by_file)

    # -- stream ------------------------------------------------------------------------------------

    def update(
        self,
        sources: list[str],
        skipped: list[tuple[str, str]],
        dropped_images: Iterable[str] = (),
        supervised_tokens: Iterable[int] = (),
    ) -> None:
        """Add one batch: the source name of each sample in it, the skips drained into it, the reason of each
        image slot dropped from its samples (interleaved documents; not skips: they never stop a run), and
        each sample's supervised tokens (in the order of ``sources``)."""
        self.used += len(sources)
        self.used_by_source.update(sources)
        for source, tokens in zip(sources, supervised_tokens):
            self.supervised_tokens_by_source[source] += tokens
        self.dropped_images_by_reason.update(dropped_images)
        for reason, where in skipped:
            self.skipped_by_reason[reason] += 1
            self.skipped_by_location[_file_of(where)] += 1
        self.check()

    def skip_fraction(self) -> float:
        seen = self.used + self.skipped
        return self.skipped / seen if seen else 0.0

    def check(self) -> None:
        """Raise :class:`SkipRateExceeded` if too many of the samples drawn for batches were skipped."""
        self._check("samples drawn for batches", self.used, self.skipped_by_reason, self.skipped_by_location)

    def clear_stream_counts(self) -> None:
        """Start the stream counts afresh (each validation pass reads the same records again)."""
        self.used = 0
        self.skipped_by_reason, self.skipped_by_location, self.used_by_source = Counter(), Counter(), Counter()
        self.supervised_tokens_by_source = Counter()
        self.dropped_images_by_reason = Counter()

    def _check(self, what: str, kept: int, skipped_by_reason: Counter, skipped_by_location: Counter) -> None:
        skipped = sum(skipped_by_reason.values())
        seen = kept + skipped
        if seen < self.min_samples or skipped / seen <= self.max_skip_fraction:
            return
        worst, count = skipped_by_location.most_common(1)[0]
        reasons = ", ".join(f"{r}={n}" for r, n in skipped_by_reason.most_common())
        raise SkipRateExceeded(
            f"{skipped} of {seen} {what} skipped ({skipped / seen:.1%}) is above "
            f"max_skip_fraction={self.max_skip_fraction:.1%}. Reasons: {reasons}. Most skips come from "
            f"{worst} ({count}). Fix or remove that data, or raise --data.max_skip_fraction."
        )

    # -- reporting and checkpoints -------------------------------------------------------------------

    def metrics(self, prefix: str = "data") -> dict[str, float]:
        """Flat dict for ``LightningModule.log_dict``: skip counts by reason (read-time and stream together),
        both skip fractions, image slots dropped from used samples by reason, and each source's realised
        share of the samples (``share/``) and of the supervised tokens (``token_share/``: its weight in the
        loss, which averages over those tokens; a source of long answers outweighs its share of samples)."""
        skipped = self.skipped_by_reason + sum((counts.skipped_by_reason for counts in self.read_by_source.values()), Counter())
        out: dict[str, float] = {f"{prefix}/skipped/{r}": float(n) for r, n in skipped.items()}
        out.update({f"{prefix}/dropped_images/{r}": float(n) for r, n in self.dropped_images_by_reason.items()})
        out[f"{prefix}/skipped_fraction"] = self.skip_fraction()
        if self.read_by_source:
            out[f"{prefix}/skipped_fraction_at_read"] = self.read_skip_fraction()
        for source, n in self.used_by_source.items():
            out[f"{prefix}/share/{source}"] = n / max(self.used, 1)
        supervised = sum(self.supervised_tokens_by_source.values())
        for source, n in self.supervised_tokens_by_source.items():
            out[f"{prefix}/token_share/{source}"] = n / max(supervised, 1)
        return out

    def state_dict(self) -> dict:
        return {
            "used": self.used,
            "skipped_by_reason": dict(self.skipped_by_reason),
            "skipped_by_location": dict(self.skipped_by_location),
            "used_by_source": dict(self.used_by_source),
            "supervised_tokens_by_source": dict(self.supervised_tokens_by_source),
            "dropped_images_by_reason": dict(self.dropped_images_by_reason),
            "read_by_source": {
                source: {"path": counts.path, "kept": counts.kept, "skipped_by_reason": dict(counts.skipped_by_reason)}
                for source, counts in self.read_by_source.items()
            },
        }

    def load_state_dict(self, state: dict) -> None:
        self.used = state["used"]
        self.skipped_by_reason = Counter(state["skipped_by_reason"])
        self.skipped_by_location = Counter(state["skipped_by_location"])
        self.used_by_source = Counter(state["used_by_source"])
        self.supervised_tokens_by_source = Counter(state.get("supervised_tokens_by_source", {}))  # absent before token shares
        self.dropped_images_by_reason = Counter(state.get("dropped_images_by_reason", {}))  # absent before interleaved documents
        self.read_by_source = {
            source: SourceReadCounts(counts["path"], counts["kept"], Counter(counts["skipped_by_reason"]))
            for source, counts in state.get("read_by_source", {}).items()  # absent in checkpoints of older versions
        }


def _file_of(where: str) -> str:
    """``shard.tar:000123``, ``data.jsonl:34`` or ``data.json#17`` → the file; other locations stay whole."""
    for separator in ("#", ":"):
        head, sep, tail = where.rpartition(separator)
        if sep and head and "/" not in tail:
            return head
    return where
