"""Gradient accumulation trains as one larger batch: N micro-batches of b samples give the weights of
one batch of N x b samples.

The loss is a mean over supervised tokens, and micro-batches hold different numbers of them (captions
of different lengths), so OwlSystem weighs each micro-batch by its tokens (``OwlSystem.training_step``).
One process here; two (FSDP2 and DDP), with the gradient collectives counted, in ``test_fsdp.py``.
"""

import torch

from owl_lightning.train.datamodules import CaptionDataModule
from tests.helpers import OptimizerStepReport, fit, largest_difference, tiny_system

# 10 micro-batches of 2 in accumulation windows of 3: optimizer steps 1-3 see the 18 samples that
# batches of 6 bring in 3 steps; step 4 is the epoch's last window, of one micro-batch.
MICRO_BATCH, WINDOW, STEPS = 2, 3, 4
# AdamW moves a weight by lr * g / (|g| + eps). Where |g| is below eps (some weights' gradient is zero
# in exact arithmetic, e.g. the attention key biases), float32 rounding in g, ~1e-9 in a sum of larger
# terms, moves it lr / eps times that: 1e-5 at the stage-1 eps of 1e-6, against a 1e-6 tolerance. At
# eps 1e-3 rounding moves weights by ~2e-7, and weighing micro-batches equally instead of by their
# tokens by ~4e-3 (and by 2e-2 at eps 1e-6).
OPTIMIZER = {"lr": 1e-2, "warmup_steps": 0, "eps": 1e-3}


def train(tmp_path, manifest, batch_size: int, accumulate: int, batches_per_epoch: int) -> OptimizerStepReport:
    torch.manual_seed(0)  # the model's initial weights
    system = tiny_system("stage1", **OPTIMIZER)
    data = CaptionDataModule(
        manifest=str(manifest), processor=system.processor, batch_size=batch_size, num_workers=0, batches_per_epoch=batches_per_epoch
    )
    report = OptimizerStepReport(str(tmp_path / f"report_b{batch_size}"))
    fit(
        system,
        data,
        tmp_path / f"b{batch_size}",
        steps=STEPS,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=1.0,
        callbacks=[report],
    )
    return report


def test_accumulated_micro_batches_train_as_one_larger_batch(tmp_path, caption_manifest):
    accumulated = train(tmp_path, caption_manifest, MICRO_BATCH, WINDOW, batches_per_epoch=10)
    large = train(tmp_path, caption_manifest, MICRO_BATCH * WINDOW, 1, batches_per_epoch=STEPS)

    assert [m["stepped"] for m in accumulated.micro_batches] == [False, False, True] * 3 + [True]
    assert len(large.micro_batches) == len(large.weights) == len(accumulated.weights) == STEPS
    # Micro-batches of one step differ in supervised tokens: a mean per micro-batch would weigh them wrongly.
    tokens = [m["supervised"] for m in accumulated.micro_batches[:WINDOW]]
    assert len(set(tokens)) > 1, tokens
    for step in range(3):
        assert largest_difference(accumulated.weights[step], large.weights[step]) <= 1e-6, f"step {step + 1}"
    assert largest_difference(accumulated.weights[0], accumulated.weights[2]) > 1e-3  # it trained
