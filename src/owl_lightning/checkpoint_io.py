"""Checkpoint files that a kill cannot corrupt, read back without running pickled code.

Lightning writes a checkpoint straight over the previous ``last.ckpt``: a ``kill -9`` (or a full
disk) in the middle of that write leaves a truncated file and nothing to resume from. Here every
save goes to a hidden temporary file beside the target, is flushed to disk, and then renamed over
it — a rename within one folder is atomic, so the target is always either the old checkpoint or
the new one, whole. Reads use ``torch.load(weights_only=True)``: a checkpoint from elsewhere
cannot execute code on load.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)


def partial_path(path: Path) -> Path:
    """Where a save to ``path`` is written before the rename (one per process)."""
    return path.with_name(f".{path.name}.partial-{os.getpid()}")


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with atomic local writes and weights-only reads (module docstring).
    Remote paths (``s3://...``) are left to Lightning's fsspec writer."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.partial-*"):  # left by a save that was killed
            stale.unlink(missing_ok=True)
        partial = partial_path(path)
        try:
            with open(partial, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        # The rename itself must reach the disk too, or a power cut could undo it.
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any = "cpu", weights_only: bool | None = None) -> dict[str, Any]:
        if weights_only is False:
            log.warning("loading %s with weights_only=False: it may run code it contains", path)
        return super().load_checkpoint(path, map_location=map_location, weights_only=True if weights_only is None else weights_only)
