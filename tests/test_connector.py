"""The connector choice (``OwlConfig.connector``): LLaVA-1.5's MLP projector in the abstractor's slot
trains through both stages, and every count that follows from the visual tokens (the template's length
checks, packing, FLOPs) uses its token count."""

import pytest
import torch
from PIL import Image

from owl_lightning.checkpoints import read_checkpoint
from owl_lightning.inference import OwlAssistant, Request
from owl_lightning.models.projector import MLPProjector
from owl_lightning.train.datamodules import CaptionDataModule, InstructionDataModule
from tests.helpers import COLOURS, fit, tiny_system

MLP = {"connector": "mlp"}
MLP_TOKENS = 17  # owl-tiny's ViT on a 32 px image: (32 / 8)² patches and CLS


def test_the_projector_maps_every_encoder_token_and_refuses_another_count():
    projector = MLPProjector(num_tokens=6, vision_width=8, llm_width=12)
    assert projector(torch.randn(3, 6, 8)).shape == (3, 6, 12)
    with pytest.raises(ValueError, match="built for 6 encoder tokens per image, got 5"):
        projector(torch.randn(3, 5, 8))


def trained_connector_changed(system, before: dict[str, torch.Tensor]) -> bool:
    # Images only: the video frames' temporal embedding (docs/video.md) gets no gradient and stays where it was.
    parameters = system.model.abstractor.named_parameters()
    return all(not torch.equal(before[name], param) for name, param in parameters if not name.startswith("temporal_embedding."))


def test_both_stages_train_the_mlp_connector_and_a_chat_reads_the_checkpoint(tmp_path, caption_manifest, instruction_manifest):
    torch.manual_seed(0)
    stage1 = tiny_system("stage1", MLP, lr=1e-2, warmup_steps=0)
    captions = CaptionDataModule(manifest=str(caption_manifest), processor=stage1.processor, batch_size=4, num_workers=0)
    assert captions.processor.template().visual_tokens_per_image == MLP_TOKENS
    stage1.configure_model()
    assert isinstance(stage1.model.abstractor, MLPProjector)
    before = {name: param.detach().clone() for name, param in stage1.model.abstractor.named_parameters()}
    trainer = fit(stage1, captions, tmp_path / "stage1", steps=3)
    assert trained_connector_changed(stage1, before)
    trainer.save_checkpoint(tmp_path / "stage1.ckpt")

    stage2 = tiny_system("stage2", MLP, lr=1e-2, warmup_steps=0, init_from=str(tmp_path / "stage1.ckpt"))
    instructions = InstructionDataModule(manifest=str(instruction_manifest), processor=stage2.processor, batch_size=4, num_workers=0)
    stage2.configure_model()
    for name, param in stage2.model.abstractor.named_parameters():  # stage 2 starts from stage 1's projector
        torch.testing.assert_close(param, stage1.model.abstractor.get_parameter(name))
    before = {name: param.detach().clone() for name, param in stage2.model.abstractor.named_parameters()}
    trainer = fit(stage2, instructions, tmp_path / "stage2", steps=3)
    assert trained_connector_changed(stage2, before)
    trainer.save_checkpoint(tmp_path / "stage2.ckpt")
    assert read_checkpoint(tmp_path / "stage2.ckpt")["hyper_parameters"]["config"]["connector"] == "mlp"

    assistant = OwlAssistant.from_checkpoint(tmp_path / "stage2.ckpt", device="cpu", precision="fp32")
    assert isinstance(assistant.model.abstractor, MLPProjector)
    request = Request.single("What colour is it?", [Image.new("RGB", (32, 32), COLOURS["red"])])
    sample = assistant.encode(request)
    assert assistant.prompt_tokens(sample) == len(sample.input_ids) - 1 + MLP_TOKENS
    assert len(assistant.answer([request], max_new_tokens=4)) == 1


def test_a_run_from_a_checkpoint_with_the_other_connector_names_the_setting(tmp_path, caption_manifest):
    stage1 = tiny_system("stage1", MLP)
    captions = CaptionDataModule(manifest=str(caption_manifest), processor=stage1.processor, batch_size=4, num_workers=0)
    fit(stage1, captions, tmp_path / "stage1", steps=1).save_checkpoint(tmp_path / "mlp.ckpt")
    stage2 = tiny_system("stage2", init_from=str(tmp_path / "mlp.ckpt"))
    with pytest.raises(
        ValueError, match=r"trained with connector 'mlp', this run's model config has 'abstractor': set --model.config.connector mlp"
    ):
        stage2.configure_model()
