"""Exactly the right parameters train in each stage."""

from owl_lightning.train.stage1 import Stage1Module
from owl_lightning.train.stage2 import Stage2Module


def trainable(system):
    system.configure_model()
    return {n for n, p in system.model.named_parameters() if p.requires_grad}


def all_params(system, prefix):
    return {n for n, _ in system.model.named_parameters() if n.startswith(prefix)}


def test_stage1_trains_vision_and_abstractor_only():
    system = Stage1Module(model_name="owl-tiny")
    names = trainable(system)
    assert names == all_params(system, "vision.") | all_params(system, "abstractor.")
    assert not any(n.startswith("llm.") for n in names)


def test_stage1_can_keep_the_vision_encoder_frozen():
    system = Stage1Module(model_name="owl-tiny", train_vision=False)
    assert trainable(system) == all_params(system, "abstractor.")


def test_stage2_trains_lora_and_abstractor_only():
    system = Stage2Module(model_name="owl-tiny")
    names = trainable(system)
    lora = {n for n in names if n.startswith("llm.")}
    assert lora and all("lora_A" in n or "lora_B" in n for n in lora)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora} == {"q_proj", "v_proj"}
    assert names - lora == all_params(system, "abstractor.")


def test_stage2_official_release_freezes_the_abstractor():
    system = Stage2Module(model_name="owl-tiny", train_abstractor=False)
    names = trainable(system)
    assert names and all(n.startswith("llm.") and "lora_" in n for n in names)


def test_frozen_modules_stay_in_eval_mode_during_training():
    system = Stage1Module(model_name="owl-tiny")
    system.configure_model()
    system.train()
    assert system.model.vision.training and system.model.abstractor.training
    assert not system.model.llm.training
