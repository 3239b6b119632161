"""Both training stages end to end on owl-tiny (and one owl-smol checkpoint), on data the tests write."""

import torch
from PIL import Image

from owl_lightning.checkpoints import load_owl, read_checkpoint
from owl_lightning.cli import main
from owl_lightning.config import get_config
from owl_lightning.train.datamodules import CaptionDataModule, InstructionDataModule
from owl_lightning.train.system import OwlSystem
from tests.helpers import TINY_YAML, fit, tiny_system


def snapshot(system):
    return {n: p.detach().clone() for n, p in system.model.named_parameters()}


def changed(before, system):
    return {n for n, p in system.model.named_parameters() if not torch.equal(before[n], p.detach())}


def test_stage1_step_changes_only_vision_and_abstractor(tmp_path, caption_manifest):
    system = tiny_system("stage1", lr=1e-2, warmup_steps=0)
    data = CaptionDataModule(manifest=str(caption_manifest), processor=system.processor, batch_size=4, num_workers=0)
    system.configure_model()
    before = snapshot(system)
    fit(system, data, tmp_path)
    moved = changed(before, system)
    assert any(n.startswith("vision.") for n in moved) and any(n.startswith("abstractor.") for n in moved)
    assert not any(n.startswith("llm.") for n in moved)
    assert data.health.used == 8 and data.health.used_by_source["squares"] == 8


def test_stage2_step_changes_only_lora_and_abstractor(tmp_path, instruction_manifest):
    system = tiny_system("stage2", lr=1e-2, warmup_steps=0)
    data = InstructionDataModule(
        manifest=str(instruction_manifest), processor=system.processor, batch_size=4, num_workers=0, max_length=256
    )
    system.configure_model()
    # LoRA B starts at zero; a step must move it (and A gets gradient after B is non-zero).
    before = snapshot(system)
    fit(system, data, tmp_path)
    moved = changed(before, system)
    llm_moved = {n for n in moved if n.startswith("llm.")}
    assert llm_moved and all("lora_" in n for n in llm_moved)
    assert any(n.startswith("abstractor.") for n in moved)
    assert not any(n.startswith("vision.") for n in moved)
    assert data.health.used_by_source == {"vqa": 4, "text": 4}


def run_cli(stage, tmp_path, manifest, *extra):
    main(
        [
            stage,
            "fit",
            "--model.config",
            str(TINY_YAML),
            "--data.manifest",
            str(manifest),
            "--data.num_workers",
            "0",
            "--data.batch_size",
            "4",
            "--trainer.accelerator",
            "cpu",
            "--trainer.default_root_dir",
            str(tmp_path / stage),
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.limit_val_batches",
            "1",
            "--model.optimizer.warmup_steps",
            "0",
            "--trainer.callbacks+=owl_lightning.train.callbacks.ModelCheckpoint",
            f"--trainer.callbacks.dirpath={tmp_path / stage / 'checkpoints'}",
            "--trainer.callbacks.save_last=true",
            "--trainer.callbacks.every_n_train_steps=2",
            "--ckpt_path",
            "last",
            *extra,
        ]
    )


def test_stage1_then_stage2_through_the_cli_with_resume(tmp_path, caption_manifest, instruction_manifest, monkeypatch):
    steps_run = []
    original = OwlSystem.training_step
    monkeypatch.setattr(OwlSystem, "training_step", lambda self, *a: steps_run.append(self.global_step) or original(self, *a))
    run_cli("stage1", tmp_path, caption_manifest, "--trainer.max_steps=2")
    last = tmp_path / "stage1" / "checkpoints" / "last.ckpt"
    assert read_checkpoint(last)["global_step"] == 2
    # The same command with a larger budget resumes at step 2 instead of starting again.
    run_cli("stage1", tmp_path, caption_manifest, "--trainer.max_steps=4")
    assert steps_run == [0, 1, 2, 3]
    resumed = read_checkpoint(last)
    assert resumed["global_step"] == 4

    run_cli("stage2", tmp_path, instruction_manifest, "--trainer.max_steps=2", "--model.init_from", str(last), "--data.max_length", "256")
    stage2 = read_checkpoint(tmp_path / "stage2" / "checkpoints" / "last.ckpt")
    assert any("lora_" in k for k in stage2["state_dict"])
    # Stage 2 started from stage 1's vision encoder (frozen since): identical tensors.
    for key, value in resumed["state_dict"].items():
        if key.startswith("model.vision."):
            torch.testing.assert_close(stage2["state_dict"][key], value)
    model = load_owl(tmp_path / "stage2")  # a run folder works as well as a file
    assert model.llm.peft_config  # LoRA came back


def test_owl_smol_checkpoint_leaves_out_the_llm(tmp_path, caption_manifest):
    system = OwlSystem(config=get_config("owl-smol"))
    data = CaptionDataModule(manifest=str(caption_manifest), processor=system.processor, batch_size=2, num_workers=0)
    trainer = fit(system, data, tmp_path, steps=1)
    path = tmp_path / "smol.ckpt"
    trainer.save_checkpoint(path)
    state = read_checkpoint(path)["state_dict"]
    assert state and not any(k.startswith("model.llm.") for k in state)
    vision_and_abstractor = sum(p.numel() for n, p in system.model.named_parameters() if not n.startswith("llm."))
    # weights + two AdamW moments for ~11M trainable parameters; the 135M LLM alone would be 540 MB
    assert path.stat().st_size < (vision_and_abstractor * 4 * 3) * 1.1 + 5e6
    reloaded = load_owl(path)
    for name, param in system.model.named_parameters():
        torch.testing.assert_close(reloaded.get_parameter(name), param.detach(), msg=name)


def test_batch_without_supervised_tokens_makes_no_update_and_is_counted(tmp_path, caption_manifest):
    system = tiny_system("stage1", lr=1e-2, warmup_steps=0)
    data = CaptionDataModule(manifest=str(caption_manifest), processor=system.processor, batch_size=4, num_workers=0)
    original = data.on_before_batch_transfer

    def unsupervised(batch, dataloader_idx):
        batch = original(batch, dataloader_idx)
        batch["labels"].fill_(-100)  # as if truncation had cut every answer
        return batch

    data.on_before_batch_transfer = unsupervised
    system.configure_model()
    before = snapshot(system)
    fit(system, data, tmp_path, steps=2, max_epochs=1, limit_train_batches=2)
    assert system.empty_batches == 2
    assert not changed(before, system)


def test_stage2_validation_logs_conversations_with_their_reference(tmp_path, instruction_manifest, capsys):
    """ConversationSamples answers the first validation conversations and logs question, answer and
    reference (and the image) to TensorBoard; the answers are the model's own greedy ones."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from owl_lightning.inference import OwlAssistant, Request
    from owl_lightning.train.callbacks import ConversationSamples

    system = tiny_system("stage2", warmup_steps=0)
    data = InstructionDataModule(manifest=str(instruction_manifest), processor=system.processor, batch_size=4, num_workers=0)
    samples = ConversationSamples(num_conversations=2, max_new_tokens=5)
    logger = TensorBoardLogger(tmp_path, name="", version="")
    fit(
        system,
        data,
        tmp_path,
        steps=2,
        limit_val_batches=1,
        val_check_interval=2,
        num_sanity_val_steps=0,
        logger=logger,
        callbacks=[samples],
    )

    (first, images, reference), second = samples._examples[0], samples._examples[1]
    assert [turn.content for turn in first.turns] == ["<image>\nWhat colour is the square?", "red", "Is it a square?"]
    assert reference == "yes" and len(images) == 1 and second[0].turns[1].content == "green"
    expected = OwlAssistant(system.model, system.processor.tokenizer, precision="fp32").answer(
        [Request(first.turns, [Image.fromarray(images[0].permute(1, 2, 0).numpy())])], max_new_tokens=5
    )[0]
    assert f"'Is it a square?' -> {expected!r} (reference 'yes')" in capsys.readouterr().out
    events = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0, "images": 0}).Reload()
    assert {"conversations/0/text_summary", "conversations/1/text_summary"} <= set(events.Tags()["tensors"])
    assert "conversations/0" in events.Tags()["images"]
