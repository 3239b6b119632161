"""QLoRA: the base LLM loaded in 4 bits (bitsandbytes, on the CPU too) with LoRA adapters trained on top."""

import bitsandbytes as bnb
import pytest
import torch

from owl_lightning.checkpoints import load_owl
from owl_lightning.config import TrainRecipe, get_config
from owl_lightning.models.llm import build_llm
from owl_lightning.train.datamodules import InstructionDataModule
from tests.helpers import fit, tiny_system


@pytest.fixture
def qlora_overrides(tmp_path):
    """owl-tiny with its LLM saved as a model folder (4-bit loading quantizes pretrained weights) and loaded in nf4."""
    folder = tmp_path / "tiny-llm"
    build_llm(get_config("owl-tiny").llm, load_weights=False).save_pretrained(folder)
    return {"llm.source": str(folder), "llm.quantization": "nf4"}


def test_qlora_trains_the_adapters_and_abstractor_over_a_4bit_base(tmp_path, instruction_manifest, qlora_overrides):
    system = tiny_system("stage2", config_overrides=qlora_overrides, warmup_steps=0, lr=1e-2)
    system.configure_model()
    llm = system.model.llm
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in llm.modules()) == 2 * 7  # every projection of both blocks
    trainable = {n for n, p in system.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("abstractor.") for n in trainable)
    before = {n: p.detach().clone() for n, p in system.model.named_parameters()}
    data = InstructionDataModule(manifest=str(instruction_manifest), processor=system.processor, batch_size=4, num_workers=0)
    trainer = fit(system, data, tmp_path, steps=2)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    moved = {n for n, p in system.model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert any("lora_B" in n for n in moved) and any(n.startswith("abstractor.") for n in moved)
    assert moved <= trainable  # the 4-bit base and everything frozen stayed as they were

    # A checkpoint leaves the 4-bit base out and gets it back, quantized again, from the named source.
    path = tmp_path / "qlora.ckpt"
    trainer.save_checkpoint(path)
    loaded = load_owl(path, llm_source=qlora_overrides["llm.source"])
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in loaded.llm.modules()) == 2 * 7
    ids = torch.tensor([[257, 72, 105]])
    system.model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids, torch.ones_like(ids), ids).loss, system.model(ids, torch.ones_like(ids), ids).loss)


def test_a_4bit_llm_cannot_be_fully_fine_tuned_nor_built_without_weights(qlora_overrides):
    with pytest.raises(ValueError, match="use recipe llm: lora"):
        tiny_system("stage2", config_overrides=qlora_overrides, recipe=TrainRecipe(llm="full")).configure_model()
    with pytest.raises(ValueError, match="set llm.source to a model folder"):
        build_llm(get_config("owl-tiny", {"llm.quantization": "nf4"}).llm)
