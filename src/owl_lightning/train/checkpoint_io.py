"""Checkpoint files that a kill cannot corrupt, read back without running pickled code.

Lightning writes a checkpoint straight over the previous ``last.ckpt``: a ``kill -9`` (or a full
disk) in the middle of that write leaves a truncated file and nothing to resume from. Here every
save goes through :func:`owl_lightning.files.atomic_write`: the target is always either the old
checkpoint or the new one, whole. Reads use ``torch.load(weights_only=True)``: a checkpoint from
elsewhere cannot execute code on load. Name it in a run's YAML::

    trainer:
      plugins:
        - owl_lightning.train.checkpoint_io.SafeCheckpointIO
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from owl_lightning.files import atomic_write

log = logging.getLogger(__name__)


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with atomic local writes and weights-only reads (module docstring).
    Remote paths (``s3://...``) are left to Lightning's fsspec writer."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        atomic_write(path, lambda file: torch.save(checkpoint, file))

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any = "cpu", weights_only: bool | None = None) -> dict[str, Any]:
        if weights_only is False:
            log.warning("loading %s with weights_only=False: it may run code it contains", path)
        return super().load_checkpoint(path, map_location=map_location, weights_only=True if weights_only is None else weights_only)
