"""Exactly the right parameters train in each recipe."""

from owl_lightning.config import TrainRecipe
from tests.helpers import tiny_system


def trainable(system):
    system.configure_model()
    return {n for n, p in system.model.named_parameters() if p.requires_grad}


def all_params(system, prefix):
    return {n for n, _ in system.model.named_parameters() if n.startswith(prefix)}


def test_stage1_trains_vision_and_abstractor_only():
    system = tiny_system("stage1")
    names = trainable(system)
    assert names == all_params(system, "vision.") | all_params(system, "abstractor.")
    assert not any(n.startswith("llm.") for n in names)


def test_stage1_can_keep_the_vision_encoder_frozen():
    system = tiny_system("stage1", recipe=TrainRecipe(vision="frozen"))
    assert trainable(system) == all_params(system, "abstractor.")


def test_stage2_trains_lora_and_abstractor_only():
    system = tiny_system("stage2")
    names = trainable(system)
    lora = {n for n in names if n.startswith("llm.")}
    assert lora and all("lora_A" in n or "lora_B" in n for n in lora)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora} == {"q_proj", "v_proj"}
    assert names - lora == all_params(system, "abstractor.")


def test_stage2_official_release_freezes_the_abstractor():
    system = tiny_system("stage2", recipe=TrainRecipe(vision="frozen", abstractor="frozen", llm="lora"))
    names = trainable(system)
    assert names and all(n.startswith("llm.") and "lora_" in n for n in names)


def test_frozen_modules_stay_in_eval_mode_during_training():
    system = tiny_system("stage1")
    system.configure_model()
    system.train()
    assert system.model.vision.training and system.model.abstractor.training
    assert not system.model.llm.training


def test_full_fine_tuning_trains_the_whole_llm_and_saves_it():
    system = tiny_system("stage2", recipe=TrainRecipe(vision="frozen", abstractor="train", llm="full"))
    assert trainable(system) == all_params(system, "llm.") | all_params(system, "abstractor.")
    assert all_params(system, "llm.") <= {k.removeprefix("model.") for k in system.state_dict()}


def test_frozen_base_llm_is_left_out_of_checkpoints():
    system = tiny_system("stage2")
    system.configure_model()
    saved = system.state_dict()
    assert any("lora_" in k for k in saved) and not any(k.startswith("model.llm.") and "lora_" not in k for k in saved)
