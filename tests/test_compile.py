"""``compile``: each block runs through torch.compile and trains exactly as eager; generation stays eager."""

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch._dynamo.utils import counters
from torch.distributed.tensor import DTensor

from owl_lightning.train.datamodules import CaptionDataModule, InstructionDataModule
from owl_lightning.train.parallel import AtomicModelParallelStrategy, blocks, compile_blocks
from tests.helpers import fit, tiny_system

pytestmark = pytest.mark.slow  # torch.compile: minutes on 2 cores

NO_DROPOUT = {"abstractor.attention_dropout": 0.0, "lora.dropout": 0.0}  # compiled dropout draws other masks


class Losses(Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(float(outputs["loss"]))


def train(stage: str, manifest, tmp_path, compile: bool, strategy: str) -> tuple[list[float], dict[str, torch.Tensor], object]:
    torch.manual_seed(0)
    if stage == "stage1":
        system = tiny_system("stage1", config_overrides=NO_DROPOUT, lr=1e-2, warmup_steps=0, compile=compile)
        data = CaptionDataModule(manifest=str(manifest), processor=system.processor, batch_size=4, num_workers=0)
    else:
        system = tiny_system("stage2", config_overrides=NO_DROPOUT, lr=1e-2, warmup_steps=0, compile=compile)
        data = InstructionDataModule(manifest=str(manifest), processor=system.processor, batch_size=4, num_workers=0, max_length=256)
    losses = Losses()
    strategy = AtomicModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1) if strategy == "fsdp2" else "auto"
    fit(system, data, tmp_path / str(compile), steps=3, callbacks=[losses], strategy=strategy)
    # Sharded (DTensor) parameters compare as their local shard: the whole tensor on one process.
    trained = {
        n: (p.to_local() if isinstance(p, DTensor) else p).detach().clone() for n, p in system.model.named_parameters() if p.requires_grad
    }
    return losses.values, trained, system


@pytest.mark.parametrize("stage, strategy", [("stage1", "single"), ("stage2", "single"), ("stage1", "fsdp2")])
def test_compiled_blocks_train_as_eager(stage, strategy, tmp_path, caption_manifest, instruction_manifest, own_process_group):
    manifest = caption_manifest if stage == "stage1" else instruction_manifest
    eager_losses, eager_weights, eager_system = train(stage, manifest, tmp_path, compile=False, strategy=strategy)
    graphs_before = counters["stats"]["unique_graphs"]
    compiled_losses, compiled_weights, system = train(stage, manifest, tmp_path, compile=True, strategy=strategy)

    assert all(block._compiled_call_impl is not None for block in blocks(system.model))
    assert list(system.state_dict()) == list(eager_system.state_dict())  # checkpoints load either way
    assert counters["stats"]["unique_graphs"] > graphs_before  # the compiled code really ran
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    for name, weight in eager_weights.items():
        torch.testing.assert_close(compiled_weights[name], weight, rtol=1e-4, atol=1e-5, msg=name)


def test_generation_with_compiled_blocks_stays_eager(tiny_model, tiny_tokenizer):
    prompt = torch.tensor([[tiny_tokenizer.bos_token_id, *tiny_tokenizer.encode("a red", add_special_tokens=False)]])
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": tiny_tokenizer.pad_token_id}
    eager = tiny_model.eval().generate(prompt, torch.ones_like(prompt), **kwargs)
    compile_blocks(tiny_model)
    graphs_before = counters["stats"]["unique_graphs"]
    compiled = tiny_model.generate(prompt, torch.ones_like(prompt), **kwargs)
    assert counters["stats"]["unique_graphs"] == graphs_before
    assert torch.equal(compiled, eager)
