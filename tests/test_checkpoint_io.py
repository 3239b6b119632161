"""Checkpoints survive a kill in the middle of a save, load without running code, and a run that
cannot write its outputs says so before its first step."""

import logging
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

import owl_lightning.train.preflight as preflight
from owl_lightning.train.checkpoint_io import SafeCheckpointIO
from owl_lightning.train.datamodules import CaptionDataModule
from tests.helpers import fit, tiny_system

# Saves {"step": 1}, then starts saving {"step": 2, ...} and stalls inside that write; the test
# kills it there with SIGKILL, as `kill -9` would.
SAVE_THEN_STALL = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch
    from owl_lightning.train.checkpoint_io import SafeCheckpointIO

    class Stall:
        def __reduce__(self):
            Path(sys.argv[3]).touch()  # we are inside the second save
            time.sleep(60)
            return (int, (0,))

    path, writer = Path(sys.argv[1]), sys.argv[2]
    save = SafeCheckpointIO().save_checkpoint if writer == "safe" else lambda c, p: torch.save(c, p)
    save({"step": 1, "weights": torch.ones(1000)}, path)
    save({"step": 2, "weights": torch.zeros(1000), "stall": Stall()}, path)
""")


def kill_inside_second_save(tmp_path, writer: str):
    path, marker = tmp_path / "last.ckpt", tmp_path / "inside-save"
    process = subprocess.Popen([sys.executable, "-c", SAVE_THEN_STALL, str(path), writer, str(marker)])
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert process.poll() is None and time.monotonic() < deadline, "the saving process never reached the second save"
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    return path


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = kill_inside_second_save(tmp_path, "safe")
    checkpoint = SafeCheckpointIO().load_checkpoint(path)
    assert checkpoint["step"] == 1 and torch.equal(checkpoint["weights"], torch.ones(1000))
    # The killed save's temporary file is cleared by the next save.
    assert list(tmp_path.glob(".last.ckpt.partial-*"))
    SafeCheckpointIO().save_checkpoint({"step": 3}, path)
    assert not list(tmp_path.glob(".last.ckpt.partial-*"))
    assert SafeCheckpointIO().load_checkpoint(path)["step"] == 3


def test_the_kill_lands_inside_the_write(tmp_path):
    """Writing straight to the target, the same kill destroys the previous checkpoint — so the test above
    really kills mid-write."""
    path = kill_inside_second_save(tmp_path, "direct")
    with pytest.raises((RuntimeError, EOFError, pickle.UnpicklingError)):  # a truncated zip archive
        torch.load(path, weights_only=True)


class NotATensor:
    pass


def test_checkpoints_load_weights_only(tmp_path):
    path = tmp_path / "hostile.ckpt"
    torch.save({"state_dict": {}, "payload": NotATensor()}, path)
    with pytest.raises(pickle.UnpicklingError):
        SafeCheckpointIO().load_checkpoint(path)


def tiny_run(caption_manifest):
    system = tiny_system("stage1", lr=1e-2, warmup_steps=0)
    data = CaptionDataModule(manifest=str(caption_manifest), processor=system.processor, batch_size=4, num_workers=0)
    steps = []
    original = system.training_step
    system.training_step = lambda *a: steps.append(1) or original(*a)
    return system, data, steps


def test_the_base_config_names_the_safe_checkpoint_io_and_a_run_without_it_is_warned(tmp_path, caption_manifest, caplog):
    base = yaml.safe_load((Path(__file__).parents[1] / "experiments" / "base.yaml").read_text())
    assert base["trainer"]["plugins"] == [{"class_path": "owl_lightning.train.checkpoint_io.SafeCheckpointIO"}]
    warning = "SafeCheckpointIO in trainer.plugins"
    with caplog.at_level(logging.WARNING):
        fit(*tiny_run(caption_manifest)[:2], tmp_path, steps=1)
    assert warning in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        trainer = fit(*tiny_run(caption_manifest)[:2], tmp_path, steps=1, plugins=[SafeCheckpointIO()])
    assert isinstance(trainer.strategy.checkpoint_io, SafeCheckpointIO) and warning not in caplog.text


def fit_saving_to(system, data, tmp_path, folder):
    trainer = L.Trainer(
        max_steps=1,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
        callbacks=[ModelCheckpoint(dirpath=folder)],
    )
    trainer.fit(system, data)


def test_an_unwritable_output_folder_stops_the_run_before_its_first_step(tmp_path, caption_manifest):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # even root cannot create a folder inside a file
    system, data, steps = tiny_run(caption_manifest)
    with pytest.raises(preflight.OutputNotWritable, match=r"cannot write to output folder .*a-file/checkpoints"):
        fit_saving_to(system, data, tmp_path, blocker / "checkpoints")
    assert not steps


def test_a_disk_without_room_for_one_checkpoint_stops_the_run_before_its_first_step(tmp_path, caption_manifest, monkeypatch):
    system, data, steps = tiny_run(caption_manifest)
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda folder: SimpleNamespace(total=2**30, used=2**30 - 1024, free=1024))
    with pytest.raises(preflight.OutputNotWritable, match=r"has 0 MiB free, but one checkpoint of this run takes about"):
        fit_saving_to(system, data, tmp_path, tmp_path / "checkpoints")
    assert not steps


def test_every_run_ends_with_its_final_state_in_last_ckpt(tmp_path, caption_manifest):
    """5 steps saving every 2: Lightning's own callback leaves last.ckpt at step 4, ours at step 5."""
    from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint

    from owl_lightning.train.callbacks import ModelCheckpoint as OwlModelCheckpoint

    steps = {}
    for name, kind in (("lightning", LightningModelCheckpoint), ("owl", OwlModelCheckpoint)):
        system = tiny_system("stage1", warmup_steps=0)
        data = CaptionDataModule(manifest=str(caption_manifest), processor=system.processor, batch_size=4, num_workers=0)
        folder = tmp_path / name
        checkpoint = kind(dirpath=folder, save_last=True, save_top_k=0, every_n_train_steps=2)
        fit(system, data, tmp_path / name, steps=5, callbacks=[checkpoint], enable_checkpointing=True)
        steps[name] = torch.load(folder / "last.ckpt", weights_only=True)["global_step"]
    assert steps == {"lightning": 4, "owl": 5}
