"""A step whose loss or gradient is not finite makes no update and is counted; K in a row stop the
run with a message naming the step and where its batch came from."""

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from owl_lightning.checkpoints import read_checkpoint
from owl_lightning.config import get_config
from owl_lightning.data.processor import OwlProcessor
from owl_lightning.train.datamodules import CaptionDataModule
from owl_lightning.train.system import OwlSystem, gradients_finite
from tests.helpers import fit, tiny_system


class Snapshots(Callback):
    """Trainable weights before every step."""

    def __init__(self) -> None:
        self.before: list[dict[str, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.before.append({n: p.detach().clone() for n, p in pl_module.model.named_parameters() if p.requires_grad})


def poisoned_system(bad_steps: set[int], where: str, **kwargs) -> OwlSystem:
    """owl-tiny stage 1 whose loss (``where="loss"``) or gradients (``"grad"``) are NaN at ``bad_steps``."""
    system = tiny_system("stage1", lr=1e-2, warmup_steps=0, **kwargs)
    system.configure_model()
    forward = system.forward

    def poisoned(batch):
        out = forward(batch)
        if system.global_step in bad_steps:
            if where == "loss":
                out.loss = out.loss * float("nan")
            else:
                out.loss.register_hook(lambda grad: grad * float("nan"))
        return out

    system.forward = poisoned
    return system


def data(manifest) -> CaptionDataModule:
    return CaptionDataModule(manifest=str(manifest), processor=OwlProcessor(get_config("owl-tiny")), batch_size=4, num_workers=0)


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_nonfinite_step_is_skipped_and_counted(tmp_path, caption_manifest, where):
    system = poisoned_system({1}, where)
    snapshots = Snapshots()
    trainer = fit(system, data(caption_manifest), tmp_path, steps=3, callbacks=[snapshots])
    final = {n: p.detach() for n, p in system.model.named_parameters() if p.requires_grad}
    assert trainer.global_step == 3 and system.nonfinite_steps == 1
    assert all(torch.isfinite(p).all() for p in final.values())
    step0, step1, step2 = snapshots.before
    assert any(not torch.equal(step0[n], step1[n]) for n in step0)  # step 0 updated
    assert all(torch.equal(step1[n], step2[n]) for n in step1)  # step 1 made no update at all
    assert any(not torch.equal(step2[n], final[n]) for n in step2)  # and training went on


def test_nonfinite_steps_in_a_row_stop_the_run_naming_step_and_sources(tmp_path, caption_manifest):
    system = poisoned_system({1, 2, 3}, "loss", max_nonfinite_steps=2)
    with pytest.raises(FloatingPointError, match=r"2 optimizer steps in a row .* at step 2 .*squares x4"):
        fit(system, data(caption_manifest), tmp_path, steps=5)
    assert system.nonfinite_steps == 2


def test_the_counts_are_saved_in_checkpoints_and_restored(tmp_path, caption_manifest):
    system = poisoned_system({1}, "loss")
    trainer = fit(system, data(caption_manifest), tmp_path, steps=3)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    saved = read_checkpoint(tmp_path / "run.ckpt")
    assert saved["step_counts"] == {"nonfinite_steps": 1, "nonfinite_in_a_row": 0, "empty_batches": 0}
    resumed = poisoned_system(set(), "loss")
    resumed.on_load_checkpoint(saved)
    assert resumed.nonfinite_steps == 1


def test_a_finite_step_resets_the_count(tmp_path, caption_manifest):
    system = poisoned_system({0, 2, 4}, "loss", max_nonfinite_steps=2)
    trainer = fit(system, data(caption_manifest), tmp_path, steps=5)
    assert trainer.global_step == 5 and system.nonfinite_steps == 3


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_gradients_finite_finds_one_bad_element_among_many_gradients(bad):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4), torch.nn.Linear(4, 1))
    assert gradients_finite(model)  # no gradients yet
    model(torch.randn(3, 8)).sum().backward()
    assert gradients_finite(model)
    model[1].weight.grad[2, 5] = bad
    assert not gradients_finite(model)
