"""Every shipped experiment config parses against the code's signatures (litgpt's check)."""

from pathlib import Path

import pytest

from owl_lightning.cli import main
from owl_lightning.data.manifest import load_manifest

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((ROOT / "experiments").glob("*.yaml"))
MANIFESTS = sorted((ROOT / "data_manifests").glob("*.yaml"))


@pytest.mark.parametrize("config", EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_config_parses(config, capsys):
    stage = config.name.split("_")[0]
    with pytest.raises(SystemExit) as exit_:
        main([stage, "fit", "--config", str(config), "--print_config"])
    assert exit_.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "model_name:" in printed and "manifest:" in printed


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_data_manifest_parses(manifest):
    parsed = load_manifest(manifest)
    assert parsed.train


def test_there_are_configs_for_both_stages_and_both_models():
    assert {p.name for p in EXPERIMENTS} >= {"stage1_smol.yaml", "stage2_smol.yaml", "stage1_llama7b.yaml", "stage2_llama7b.yaml"}
