"""Every shipped experiment config parses against the code's signatures (litgpt's check)."""

from dataclasses import asdict
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.demos.boring_classes import BoringModel

from owl_lightning import config as owl_config
from owl_lightning.cli import main, model_yaml
from owl_lightning.config import STAGE1, STAGE2, OwlConfig, get_config, list_configs
from owl_lightning.data.manifest import load_manifest
from owl_lightning.train.callbacks import StepProgressBar

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((ROOT / "experiments").glob("stage*.yaml"))
BASE = ROOT / "experiments" / "base.yaml"
MANIFESTS = sorted((ROOT / "data_manifests").glob("*.yaml"))


@pytest.mark.parametrize("config", EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_config_parses(config, capsys):
    stage = config.name.split("_")[0]
    with pytest.raises(SystemExit) as exit_:
        main([stage, "fit", "--config", str(BASE), "--config", str(config), "--print_config"])
    assert exit_.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["config"]["name"] in list_configs() and printed["data"]["manifest"]
    assert printed["model"]["recipe"] == {"stage1": asdict(STAGE1), "stage2": asdict(STAGE2)}[stage]


@pytest.mark.parametrize(
    "stage, recipe, expected",
    [
        ("stage2", "stage2_full.yaml", {"llm": "full", "llm_lr": 2e-5}),
        ("stage2", "stage2_qlora.yaml", {"llm": "lora", "quantization": "nf4"}),
        ("stage2", "stage2_general_text.yaml", {"llm": "lora", "llm_lr": 5e-4}),
        ("stage1", "connector_mlp.yaml", {"connector": "mlp", "llm": "frozen"}),
        ("stage2", "connector_mlp.yaml", {"connector": "mlp", "llm": "lora"}),
    ],
)
def test_recipe_configs_stack_on_a_stage(stage, recipe, expected, capsys):
    stage_config = ROOT / "experiments" / f"{stage}_smol.yaml"
    with pytest.raises(SystemExit):
        main(
            [
                stage,
                "fit",
                "--config",
                str(BASE),
                "--config",
                str(stage_config),
                "--config",
                str(ROOT / "experiments" / "recipes" / recipe),
                "--print_config",
            ]
        )
    printed = yaml.safe_load(capsys.readouterr().out)
    model = printed["model"]
    got = {
        "llm": model["recipe"]["llm"],
        "llm_lr": model["optimizer"]["llm_lr"],
        "quantization": model["config"]["llm"]["quantization"],
        "connector": model["config"]["connector"],
    }
    assert {key: got[key] for key in expected} == expected
    assert model["config"]["name"] == "owl-smol" and printed["trainer"]["default_root_dir"].startswith(f"runs/{stage}_")


@pytest.mark.parametrize("name", list_configs())
def test_model_yamls_are_the_registered_configs(name):
    """experiments/models/*.yaml are what ``describe NAME --yaml`` writes: regenerate them when a config changes."""
    assert (ROOT / "experiments" / "models" / f"{name}.yaml").read_text() == model_yaml(name)
    assert OwlConfig.from_dict(yaml.safe_load(model_yaml(name))) == get_config(name)


def test_one_setting_moves_a_run_and_fields_are_typed(capsys):
    argv = ["stage1", "fit", "--config", str(BASE), "--config", str(ROOT / "experiments" / "stage1_smol.yaml")]
    with pytest.raises(SystemExit):
        main([*argv, "--trainer.default_root_dir", "elsewhere/run", "--model.config.abstractor.num_queries", "32", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["config"]["abstractor"]["num_queries"] == 32
    assert printed["trainer"]["default_root_dir"] == "elsewhere/run"
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--model.config.abstractor.num_queries", "many"])
    assert exit_.value.code == 2 and "model.config.abstractor.num_queries" in capsys.readouterr().err


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_data_manifest_parses(manifest):
    parsed = load_manifest(manifest)
    assert parsed.train


def test_there_are_configs_for_both_stages_and_both_models():
    assert {p.name for p in EXPERIMENTS} >= {"stage1_smol.yaml", "stage2_smol.yaml", "stage1_llama7b.yaml", "stage2_llama7b.yaml"}


def test_the_stage_clis_default_precision_follows_the_device_and_a_flag_overrides_it(monkeypatch, capsys):
    monkeypatch.setattr(owl_config, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    stage1 = ["stage1", "fit", "--config", str(BASE), "--config", str(ROOT / "experiments" / "stage1_smol.yaml"), "--print_config"]
    for extra, expected in (([], "32-true"), (["--trainer.precision", "bf16-mixed"], "bf16-mixed")):
        with pytest.raises(SystemExit):
            main([*stage1, *extra])
        assert yaml.safe_load(capsys.readouterr().out)["trainer"]["precision"] == expected


def test_the_base_configs_progress_bar_counts_optimizer_steps_out_of_max_steps(tmp_path):
    callbacks = [c["class_path"] for c in yaml.safe_load(BASE.read_text())["trainer"]["callbacks"]]
    assert "owl_lightning.train.callbacks.StepProgressBar" in callbacks  # replaces whichever bar Lightning would pick
    bar = StepProgressBar()
    trainer = L.Trainer(
        max_steps=3, callbacks=[bar], logger=False, enable_checkpointing=False, limit_val_batches=0, default_root_dir=tmp_path
    )
    trainer.fit(BoringModel())
    assert trainer.progress_bar_callback is bar
    assert (bar.train_progress_bar.total, bar.train_progress_bar.n) == (3, 3)
