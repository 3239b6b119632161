"""Both stages train through a corpus of broken and hostile data (tests/hostile_corpus.py): every bad
record is skipped with its reason, the run completes under the default skip limit as well as with none,
no file outside the data roots is opened, and a resumed run counts every skip once."""

import importlib
import os
import sys
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from owl_lightning.data.health import EMPTY_SOURCE, OVERSIZED_SHARD, PATH_OUTSIDE_ROOT, TOO_LONG, TRUNCATED_TAR
from owl_lightning.train.datamodules import CaptionDataModule, InstructionDataModule
from tests.helpers import InterruptAt, Interrupted, fit, tiny_system
from tests.hostile_corpus import LIMITS, write_hostile_instructions, write_hostile_shards, write_outside

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
    """Every (reason, where) the DataModule's training health counter receives, at setup and from batches."""
    skips = []
    update, record_read = data.health.update, data.health.record_read

    def record_batch(sources, skipped, **counts):
        skips.extend(tuple(s) for s in skipped)
        update(sources, skipped, **counts)

    def record_source(source, path, kept, skipped):
        skips.extend(tuple(s) for s in skipped)
        record_read(source, path, kept, skipped)

    monkeypatch.setattr(data.health, "update", record_batch)
    monkeypatch.setattr(data.health, "record_read", record_source)
    return skips


def apply_corpus_limits(monkeypatch) -> None:
    for module, name, value in LIMITS:
        monkeypatch.setattr(importlib.import_module(module), name, value)


# The hostile runs pass under the limit a user gets by default, not only with skipping unbounded.
SKIP_LIMITS = pytest.mark.parametrize("skip_limit", [{"max_skip_fraction": 1.0}, {}], ids=["unlimited", "default"])


def train(system, data, tmp_path, steps: int) -> L.Trainer:
    return fit(system, data, tmp_path, steps, limit_val_batches=1, num_sanity_val_steps=0, val_check_interval=steps)


def never_opened_outside(opened: list[str], outside: Path) -> None:
    escaped = [path for path in opened if Path(os.path.realpath(path)).is_relative_to(outside)]
    assert not escaped, f"files outside the data roots were opened: {escaped}"


@SKIP_LIMITS
def test_stage1_trains_through_hostile_shards(tmp_path, monkeypatch, opened_files, skip_limit):
    apply_corpus_limits(monkeypatch)
    outside = write_outside(tmp_path).parent
    manifest, expected = write_hostile_shards(tmp_path)
    opened_files.clear()  # from here on only the run's reads count
    system = tiny_system("stage1", warmup_steps=0)
    data = CaptionDataModule(
        manifest=str(manifest), processor=system.processor, batch_size=4, num_workers=0, shuffle_buffer=4, **skip_limit
    )
    skips = recorded_skips(data, monkeypatch)
    trainer = train(system, data, tmp_path, steps=12)

    assert trainer.global_step == 12 and data.health.used == 48
    # Every skip is a record of the corpus, with the reason it was planted for ...
    broken_shards = {where: reason for reason, where in skips if reason in (TRUNCATED_TAR, OVERSIZED_SHARD)}
    shards = tmp_path / "shards"
    assert broken_shards == {
        str(shards / "empty-000000.tar"): TRUNCATED_TAR,
        str(shards / "cut-000000.tar"): TRUNCATED_TAR,
        str(shards / "bomb-000000.tar.gz"): OVERSIZED_SHARD,
    }
    assert {where: reason for reason, where in skips if where not in broken_shards}.items() <= expected.items()
    # ... and every kind of bad record was met.
    assert {reason for reason, _ in skips} == set(expected.values())
    never_opened_outside(opened_files, outside)


@SKIP_LIMITS
def test_stage2_trains_through_hostile_instruction_files(tmp_path, monkeypatch, opened_files, skip_limit):
    outside = write_outside(tmp_path).parent
    manifest, expected = write_hostile_instructions(tmp_path)
    opened_files.clear()  # from here on only the run's reads count
    system = tiny_system("stage2", warmup_steps=0)
    data = InstructionDataModule(
        manifest=str(manifest), processor=system.processor, batch_size=4, num_workers=0, max_length=256, **skip_limit
    )
    skips = recorded_skips(data, monkeypatch)
    # One epoch (7 batches): llava, the source with most batches to get through, is read whole.
    trainer = train(system, data, tmp_path, steps=7)

    assert trainer.global_step == 7
    assert {where: reason for reason, where in skips} == expected  # every bad record, each with its reason
    assert sum(reason == PATH_OUTSIDE_ROOT for reason in expected.values()) == 3  # ../, absolute, symlink
    assert {TOO_LONG, EMPTY_SOURCE} <= set(expected.values())
    assert set(data.health.used_by_source) == {"llava", "owl", "alpaca"}
    never_opened_outside(opened_files, outside)
    images = tmp_path / "instructions" / "images"
    assert any(Path(path).parent == images for path in opened_files)  # the hook does see image reads


@pytest.mark.parametrize(("stage", "interrupt_at", "steps"), [("stage1", 5, 10), ("stage2", 4, 7)])
def test_a_resumed_run_counts_every_skip_once(tmp_path, monkeypatch, stage, interrupt_at, steps):
    """Interrupted mid-run and resumed from its checkpoint, a run over the hostile corpus ends with the skip
    counts of a run that never stopped: the sources read again at setup replace their read-time counts,
    and the batches replayed to reach the resume point do not bring their skips again."""
    apply_corpus_limits(monkeypatch)
    write_outside(tmp_path)
    manifest, _ = (write_hostile_shards if stage == "stage1" else write_hostile_instructions)(tmp_path)

    def run(folder: Path, interrupt: bool = False, ckpt_path: Path | None = None):
        L.seed_everything(0)
        system = tiny_system(stage, warmup_steps=0)
        module, options = (CaptionDataModule, {"shuffle_buffer": 4}) if stage == "stage1" else (InstructionDataModule, {"max_length": 256})
        data = module(manifest=str(manifest), processor=system.processor, batch_size=4, num_workers=0, **options)
        callbacks = [ModelCheckpoint(dirpath=folder, save_last=True, save_top_k=0, every_n_train_steps=1)]
        callbacks += [InterruptAt(interrupt_at)] if interrupt else []
        fit(system, data, folder, steps, ckpt_path, val_check_interval=3, limit_val_batches=1, num_sanity_val_steps=1, callbacks=callbacks)
        return data

    straight = run(tmp_path / "straight")
    with pytest.raises(Interrupted):
        run(tmp_path / "resumed", interrupt=True)
    resumed = run(tmp_path / "resumed", ckpt_path=tmp_path / "resumed" / "last.ckpt")

    assert straight.health.skipped > 0
    assert resumed.health.state_dict() == straight.health.state_dict()
    assert resumed.val_health.state_dict() == straight.val_health.state_dict()
