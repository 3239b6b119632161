"""Checks before the first step: can this run write its checkpoints and logs at all?

An output folder that cannot be created or written, or a disk without room for one checkpoint,
would otherwise surface at the first save — after an hour of training that is then lost.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import lightning as L

# Room asked for beyond one checkpoint: the atomic save writes the new file beside the old one.
MARGIN = 1.1


class OutputNotWritable(RuntimeError):
    """An output folder of the run cannot be created, written, or holds too little free space."""


def output_folders(trainer: L.Trainer) -> list[Path]:
    """Local folders this run writes: checkpoint folders and the logger's folder."""
    folders = [callback.dirpath for callback in trainer.checkpoint_callbacks if callback.dirpath]
    folders += [logger.log_dir for logger in trainer.loggers if getattr(logger, "log_dir", None)]
    return sorted({Path(folder) for folder in folders if "://" not in str(folder)})


def check_writable(folder: Path) -> None:
    """Create ``folder`` and write, flush and delete a probe file in it; raise :class:`OutputNotWritable` if any step fails."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-probe-") as probe:
            probe.write(b"probe")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as err:
        raise OutputNotWritable(
            f"cannot write to output folder {folder}: {err.strerror or err}. Fix its permissions, or point the run "
            "elsewhere (--trainer.default_root_dir, the ModelCheckpoint dirpath and the logger's save_dir in the config)."
        ) from None


def check_free_space(folder: Path, needed_bytes: int) -> None:
    """Raise :class:`OutputNotWritable` unless ``folder``'s disk has room for ``needed_bytes`` (plus a margin)."""
    free = shutil.disk_usage(folder).free
    if free < needed_bytes * MARGIN:
        raise OutputNotWritable(
            f"{folder} has {free / 2**20:,.0f} MiB free, but one checkpoint of this run takes about "
            f"{needed_bytes / 2**20:,.0f} MiB. Free some space or write checkpoints to another disk (ModelCheckpoint dirpath)."
        )


def check_outputs(trainer: L.Trainer, checkpoint_bytes: int) -> None:
    """Every output folder writable; every checkpoint folder with room for one checkpoint of ``checkpoint_bytes``."""
    checkpoint_folders = {Path(callback.dirpath) for callback in trainer.checkpoint_callbacks if callback.dirpath}
    for folder in output_folders(trainer):
        check_writable(folder)
        if folder in checkpoint_folders:
            check_free_space(folder, checkpoint_bytes)
