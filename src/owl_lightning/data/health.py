"""Skipped-sample accounting: nothing a dataset contains crashes a run, and nothing is skipped silently.

Skips happen where samples are read: in DataLoader worker processes. Each pipeline owns a
:class:`SkipLog`; a worker records every skip there and the collate step drains it into the
batch it builds (``batch["skipped"]``), so the counts travel to the main process with the
data itself — no shared memory, no extra channel, and they survive any number of workers.
In the main process :class:`DataHealth` adds them up, logs them, and stops the run with a
message naming the worst shard/file once the skip fraction passes the configured limit.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# Skip reasons: one vocabulary for every reader, so TensorBoard shows one chart per reason.
CORRUPT_IMAGE = "corrupt_image"
UNSUPPORTED_IMAGE = "unsupported_image"  # decodes, but a mode/bit depth we refuse to guess about
DECOMPRESSION_BOMB = "decompression_bomb"
MISSING_IMAGE = "missing_image"
MISSING_TEXT = "missing_text"
BAD_TEXT = "bad_text"  # not UTF-8, wrong type
TRUNCATED_TAR = "truncated_tar"
MALFORMED_RECORD = "malformed_record"  # bad JSON, wrong field types, unknown role, empty conversation
IMAGE_COUNT_MISMATCH = "image_count_mismatch"
PATH_OUTSIDE_ROOT = "path_outside_root"
TOO_LONG = "too_long"  # truncation would leave no supervised token, or megabytes of text
EMPTY_SOURCE = "empty_source"  # an instruction file without one usable record (e.g. 0 bytes)


class SkipSample(Exception):
    """Raised by a pipeline stage for one bad sample; caught by the stage that records it."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class SkipLog:
    """Worker-local record of skips since the last batch. Picklable, so each worker gets its own."""

    pending: list[tuple[str, str]] = field(default_factory=list)
    warnings_left: int = 20  # per worker; after that only the counts say it

    def record(self, reason: str, where: str, detail: str = "") -> None:
        """Count one skipped sample. ``where`` names the shard/file and sample (``shard.tar:000123``)."""
        self.pending.append((reason, where))
        if self.warnings_left > 0:
            self.warnings_left -= 1
            log.warning("skipped %s (%s)%s", where, reason, f": {detail}" if detail else "")

    def drain(self) -> list[tuple[str, str]]:
        pending, self.pending = self.pending, []
        return pending


class SkipRateExceeded(RuntimeError):
    pass


@dataclass
class DataHealth:
    """Main-process totals of samples used and skipped, by reason, by source and by shard/file.

    Args:
        max_skip_fraction: stop when skipped / (used + skipped) exceeds this ...
        min_samples: ... once at least this many samples were read (small counts are noise).
    """

    max_skip_fraction: float = 0.1
    min_samples: int = 200
    used: int = 0
    skipped_by_reason: Counter = field(default_factory=Counter)
    skipped_by_location: Counter = field(default_factory=Counter)
    used_by_source: Counter = field(default_factory=Counter)

    @property
    def skipped(self) -> int:
        return sum(self.skipped_by_reason.values())

    def update(self, sources: list[str], skipped: list[tuple[str, str]]) -> None:
        """Add one batch: the source name of each sample in it and the skips drained into it."""
        self.used += len(sources)
        self.used_by_source.update(sources)
        for reason, where in skipped:
            self.skipped_by_reason[reason] += 1
            self.skipped_by_location[_file_of(where)] += 1
        self.check()

    def skip_fraction(self) -> float:
        seen = self.used + self.skipped
        return self.skipped / seen if seen else 0.0

    def check(self) -> None:
        seen = self.used + self.skipped
        if seen < self.min_samples or self.skip_fraction() <= self.max_skip_fraction:
            return
        worst, count = self.skipped_by_location.most_common(1)[0]
        reasons = ", ".join(f"{r}={n}" for r, n in self.skipped_by_reason.most_common())
        raise SkipRateExceeded(
            f"{self.skipped} of {seen} samples skipped ({self.skip_fraction():.1%}) is above "
            f"max_skip_fraction={self.max_skip_fraction:.1%}. Reasons: {reasons}. Most skips come from "
            f"{worst} ({count}). Fix or remove that data, or raise --data.max_skip_fraction."
        )

    def metrics(self) -> dict[str, float]:
        """Flat dict for ``LightningModule.log_dict``: skip counts by reason and realised source shares."""
        out: dict[str, float] = {f"data/skipped/{r}": float(n) for r, n in self.skipped_by_reason.items()}
        out["data/skipped_fraction"] = self.skip_fraction()
        for source, n in self.used_by_source.items():
            out[f"data/share/{source}"] = n / max(self.used, 1)
        return out

    def state_dict(self) -> dict:
        return {
            "used": self.used,
            "skipped_by_reason": dict(self.skipped_by_reason),
            "skipped_by_location": dict(self.skipped_by_location),
            "used_by_source": dict(self.used_by_source),
        }

    def load_state_dict(self, state: dict) -> None:
        self.used = state["used"]
        self.skipped_by_reason = Counter(state["skipped_by_reason"])
        self.skipped_by_location = Counter(state["skipped_by_location"])
        self.used_by_source = Counter(state["used_by_source"])


def _file_of(where: str) -> str:
    """``shard.tar:000123``, ``data.jsonl:34`` or ``data.json#17`` → the file; other locations stay whole."""
    for separator in ("#", ":"):
        head, sep, tail = where.rpartition(separator)
        if sep and head and "/" not in tail:
            return head
    return where
