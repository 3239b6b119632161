"""Both stages train through a corpus of broken and hostile data (tests/hostile_corpus.py): every bad
record is skipped with its reason, the run completes, and no file outside the data roots is opened."""

import os
import sys
from pathlib import Path

import lightning as L
import PIL.Image
import pytest
from tests.helpers import tiny_system
from tests.hostile_corpus import SIDE, write_hostile_instructions, write_hostile_shards, write_outside

from owl_lightning.data.health import EMPTY_SOURCE, PATH_OUTSIDE_ROOT, TOO_LONG, TRUNCATED_TAR
from owl_lightning.train.datamodules import CaptionDataModule, InstructionDataModule

_opened: list[str] = []
_recording = [False]


def _audit(event: str, args: tuple) -> None:
    if _recording[0] and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _opened.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # hooks cannot be removed; this one only records while a test asks it to


@pytest.fixture
def opened_files():
    _opened.clear()
    _recording[0] = True
    yield _opened
    _recording[0] = False


def recorded_skips(data, monkeypatch) -> list[tuple[str, str]]:
    """Every (reason, where) the DataModule's health counter receives."""
    skips = []
    update = data.health.update

    def record(sources, skipped):
        skips.extend(tuple(s) for s in skipped)
        update(sources, skipped)

    monkeypatch.setattr(data.health, "update", record)
    return skips


def train(system, data, tmp_path, steps: int) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=steps,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        val_check_interval=steps,
        check_val_every_n_epoch=None,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
    )
    trainer.fit(system, data)
    return trainer


def never_opened_outside(opened: list[str], outside: Path) -> None:
    escaped = [path for path in opened if Path(os.path.realpath(path)).is_relative_to(outside)]
    assert not escaped, f"files outside the data roots were opened: {escaped}"


def test_stage1_trains_through_hostile_shards(tmp_path, monkeypatch, opened_files):
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", SIDE * SIDE * 2)  # the 128-px image is a bomb, 32-px ones are not
    outside = write_outside(tmp_path).parent
    manifest, expected = write_hostile_shards(tmp_path)
    opened_files.clear()  # from here on only the run's reads count
    system = tiny_system("stage1", warmup_steps=0)
    data = CaptionDataModule(
        manifest=str(manifest), processor=system.processor, batch_size=4, num_workers=0, shuffle_buffer=4, max_skip_fraction=1.0
    )
    skips = recorded_skips(data, monkeypatch)
    trainer = train(system, data, tmp_path, steps=12)

    assert trainer.global_step == 12 and data.health.used == 48
    # Every skip is a record of the corpus, with the reason it was planted for ...
    truncated_tars = {where for reason, where in skips if reason == TRUNCATED_TAR}
    assert truncated_tars == {str(tmp_path / "shards" / f"{name}-000000.tar") for name in ("empty", "cut")}
    assert {where: reason for reason, where in skips if reason != TRUNCATED_TAR}.items() <= expected.items()
    # ... and every kind of bad record was met.
    assert {reason for reason, _ in skips} == set(expected.values())
    never_opened_outside(opened_files, outside)


def test_stage2_trains_through_hostile_instruction_files(tmp_path, monkeypatch, opened_files):
    outside = write_outside(tmp_path).parent
    manifest, expected = write_hostile_instructions(tmp_path)
    opened_files.clear()  # from here on only the run's reads count
    system = tiny_system("stage2", warmup_steps=0)
    data = InstructionDataModule(
        manifest=str(manifest), processor=system.processor, batch_size=4, num_workers=0, max_length=256, max_skip_fraction=1.0
    )
    skips = recorded_skips(data, monkeypatch)
    # One epoch: llava, the source with most batches to get through, is read whole.
    trainer = train(system, data, tmp_path, steps=6)

    assert trainer.global_step == 6
    assert {where: reason for reason, where in skips} == expected  # every bad record, each with its reason
    assert sum(reason == PATH_OUTSIDE_ROOT for reason in expected.values()) == 3  # ../, absolute, symlink
    assert {TOO_LONG, EMPTY_SOURCE} <= set(expected.values())
    assert set(data.health.used_by_source) == {"llava", "owl", "alpaca"}
    never_opened_outside(opened_files, outside)
    images = tmp_path / "instructions" / "images"
    assert any(Path(path).parent == images for path in opened_files)  # the hook does see image reads
