"""A training step must not wait for the accelerator: each ``.item()``, ``bool(tensor)`` or ``nonzero``
on a device tensor stalls the host until the device has done all the work queued before it.

The token layout is made on the host before a batch moves (``OwlSystem.transfer_batch_to_device``),
so from a batch's start to the optimizer-step hook the step reads back only what the HF LLM reads
itself (its attention-mask check). These tests count the reads on the CPU, where they are the same
operators (``_local_scalar_dense`` under ``item``/``int``/``bool``, and ``nonzero``)."""

import torch
from lightning.pytorch.callbacks import Callback
from torch.utils._python_dispatch import TorchDispatchMode

from owl_lightning.train.datamodules import CaptionDataModule
from tests.helpers import caption_batch, fit, tiny_system

aten = torch.ops.aten
READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.equal.default}


class HostReads(TorchDispatchMode):
    """Counts the operators that read a tensor's values back to the host."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in READS
        return func(*args, **(kwargs or {}))


def test_a_step_with_its_layout_made_beforehand_reads_back_only_what_the_llm_reads(tiny_model, tiny_tokenizer):
    batch = caption_batch(tiny_tokenizer, (20, 5), padded_to=30)
    tensors = {key: batch[key] for key in ("input_ids", "sample_ids", "labels", "images", "image_counts")}
    layout = tiny_model.layout(**tensors)
    embeds = tiny_model.input_embeddings(batch["input_ids"], batch["images"], layout)

    with HostReads() as llm_reads:
        tiny_model.llm(
            inputs_embeds=embeds,
            attention_mask=layout.llm_mask,
            position_ids=layout.position_ids,
            logits_to_keep=layout.keep,
            use_cache=False,
        )
    with HostReads() as step_reads:
        tiny_model(**tensors, layout=layout).loss.backward()
    with HostReads() as without_layout:
        tiny_model(**tensors)

    assert step_reads.count == llm_reads.count <= 2
    assert without_layout.count > step_reads.count  # making the layout on the device reads, as this test would see


class ReadsBeforeTheOptimizerStep(Callback):
    """Reads from each batch's start to the optimizer-step hook, and those inside the LLM's forward."""

    def __init__(self) -> None:
        self.mode: HostReads | None = None
        self.step: list[int] = []
        self.llm: list[int] = []

    def on_train_start(self, trainer, pl_module) -> None:
        llm = pl_module.model.llm
        llm.register_forward_pre_hook(lambda *_: self.llm.append(-self.mode.count))
        llm.register_forward_hook(lambda *_: self.llm.__setitem__(-1, self.llm[-1] + self.mode.count))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.mode = HostReads().__enter__()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.mode.__exit__(None, None, None)
        self.step.append(self.mode.count)


def test_training_steps_read_back_nothing_outside_the_llm_before_the_optimizer_step(tmp_path, caption_manifest):
    system = tiny_system("stage1", warmup_steps=0)
    data = CaptionDataModule(manifest=str(caption_manifest), processor=system.processor, batch_size=4, num_workers=0)
    reads = ReadsBeforeTheOptimizerStep()
    fit(system, data, tmp_path, steps=3, callbacks=[reads])
    assert len(reads.step) == len(reads.llm) == 3
    assert reads.step == reads.llm
