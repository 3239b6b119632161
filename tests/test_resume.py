"""Exact resume: a run interrupted mid-epoch and resumed from its checkpoint ends with the same
weights as one that never stopped — the streamed shards (stage 1) and the instruction mixture
(stage 2) continue where they stopped, with 0 and 2 DataLoader workers."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from owl_lightning.train.datamodules import CaptionDataModule, InstructionDataModule
from tests.helpers import InterruptAt, Interrupted, fit, tiny_system

STEPS = 14


def build(stage: str, manifest, workers: int):
    L.seed_everything(0)  # the same initial weights (and owl-tiny's random LLM) in every run
    if stage == "stage1":
        system = tiny_system("stage1", lr=1e-2, warmup_steps=0)
        data = CaptionDataModule(manifest=str(manifest), processor=system.processor, batch_size=4, num_workers=workers, shuffle_buffer=8)
    else:
        system = tiny_system("stage2", lr=1e-2, warmup_steps=0)
        data = InstructionDataModule(manifest=str(manifest), processor=system.processor, batch_size=4, num_workers=workers, max_length=256)
    return system, data


def train(stage, manifest, workers, folder, interrupt_at=None, ckpt_path=None):
    system, data = build(stage, manifest, workers)
    callbacks = [ModelCheckpoint(dirpath=folder, save_last=True, save_top_k=0, every_n_train_steps=1)]
    if interrupt_at is not None:
        callbacks.append(InterruptAt(interrupt_at))
    # Validation in the middle too: it must not disturb the training stream or the RNG.
    trainer = fit(
        system, data, folder, STEPS, ckpt_path, val_check_interval=2, limit_val_batches=1, num_sanity_val_steps=1, callbacks=callbacks
    )
    return system, trainer


def trained_weights(system) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in system.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("stage, interrupt_at", [("stage1", 3), ("stage1", 12), ("stage2", 3), ("stage2", 6), ("stage2", 7)])
def test_interrupted_and_resumed_run_ends_with_the_same_weights(
    tmp_path, caption_manifest, instruction_manifest, stage, interrupt_at, workers
):
    """Stage 1: 12 batches per epoch, so step 3 is mid-epoch and step 12 the first of the second. Stage 2:
    6 per epoch, so step 7 is mid-way through the second epoch (the mixture reshuffles per epoch). A
    checkpoint saved on an epoch's last batch (steps 12 and 6) goes on with the next epoch."""
    manifest = caption_manifest if stage == "stage1" else instruction_manifest
    straight, _ = train(stage, manifest, workers, tmp_path / "straight")

    with pytest.raises(Interrupted):
        train(stage, manifest, workers, tmp_path / "resumed", interrupt_at=interrupt_at)
    resumed, trainer = train(stage, manifest, workers, tmp_path / "resumed", ckpt_path=tmp_path / "resumed" / "last.ckpt")

    assert trainer.global_step == STEPS
    expected, got = trained_weights(straight), trained_weights(resumed)
    assert expected.keys() == got.keys() and expected
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)


def test_resume_after_a_different_batch_sees_different_data(tmp_path, caption_manifest):
    """The check above has teeth: a resumed run that restarts its stream from the epoch's first
    batch (what a plain DataLoader does) ends with different weights."""
    straight, _ = train("stage1", caption_manifest, 0, tmp_path / "straight")
    with pytest.raises(Interrupted):
        train("stage1", caption_manifest, 0, tmp_path / "resumed", interrupt_at=3)
    checkpoint = torch.load(tmp_path / "resumed" / "last.ckpt", weights_only=True)
    for state in checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]:
        state["batches_done"] = 0
    torch.save(checkpoint, tmp_path / "rewound.ckpt")
    rewound, _ = train("stage1", caption_manifest, 0, tmp_path / "resumed", ckpt_path=tmp_path / "rewound.ckpt")
    expected, got = trained_weights(straight), trained_weights(rewound)
    assert any(not torch.allclose(got[name], expected[name], rtol=0, atol=1e-6) for name in expected)


def test_stage1_resume_with_another_worker_count_is_refused_by_name(tmp_path, caption_manifest):
    """Each DataLoader worker reads a stream of its own: the checkpoint records how many there were."""
    with pytest.raises(Interrupted):
        train("stage1", caption_manifest, 0, tmp_path / "resumed", interrupt_at=3)
    with pytest.raises(ValueError, match=r"num_workers=0 per process, this run has num_workers=2.*--data\.num_workers 0"):
        train("stage1", caption_manifest, 2, tmp_path / "resumed", ckpt_path=tmp_path / "resumed" / "last.ckpt")
