import json

import pytest
import torch

from owl_lightning import config
from owl_lightning.cli import describe, main
from owl_lightning.config import OwlConfig, get_config, list_configs
from owl_lightning.models.owl import build_owl, visual_tokens_per_image


def test_registry_lists_the_three_configs():
    assert {"owl-tiny", "owl-smol", "owl-llama7b"} <= set(list_configs())


def test_unknown_config_lists_known_ones():
    with pytest.raises(KeyError, match="owl-tiny"):
        get_config("owl-huge")


def test_overrides_apply_and_unknown_keys_fail():
    cfg = get_config("owl-smol", {"abstractor.num_queries": 32, "lora.r": 16})
    assert visual_tokens_per_image(cfg) == 33 and cfg.lora.r == 16
    assert get_config("owl-smol").abstractor.num_queries == 16  # the registry is not mutated
    with pytest.raises(KeyError, match="abstractor.nope"):
        get_config("owl-smol", {"abstractor.nope": 1})


def test_config_round_trips_through_a_dict():
    cfg = get_config("owl-llama7b")
    assert OwlConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_owl_llama7b_builds_on_meta_with_the_papers_shapes():
    with torch.device("meta"):
        model = build_owl(get_config("owl-llama7b"), pretrained=False)
    assert model.vision.num_features == 1024
    assert model.abstractor.queries.shape == (1, 64, 1024)
    assert len(model.abstractor.layers) == 6 and model.abstractor.layers[0].num_heads == 16
    assert model.abstractor.proj.weight.shape == (4096, 1024)
    assert model.visual_tokens_per_image == 65
    assert model.llm.config.hidden_size == 4096 and model.llm.config.num_hidden_layers == 32
    assert model.vision(torch.empty(1, 3, 224, 224, dtype=torch.uint8, device="meta")).shape == (1, 257, 1024)


def test_describe_owl_llama7b_counts():
    info = describe("owl-llama7b")
    assert info["visual_tokens_per_image"] == 65
    assert 7.0e9 < info["total_params"] < 7.3e9  # the paper: ≈7.2B
    assert info["params"]["vision"] == 303_179_776  # CLIP ViT-L/14 without its projection head
    assert 6.73e9 < info["params"]["llm"] < 6.75e9  # LLaMA-7B plus the <image> row
    lora = 32 * 2 * 8 * (4096 + 4096)  # r=8 on q_proj and v_proj of 32 layers
    assert info["trainable_params"]["stage2"] == info["params"]["abstractor"] + lora
    assert info["trainable_params"]["stage1"] == info["params"]["vision"] + info["params"]["abstractor"]


def test_the_mlp_connector_at_the_papers_scale_keeps_every_encoder_token():
    """LLaVA-1.5's connector on the paper's ViT-L/14: 257 visual tokens per image (256 patches + CLS)
    against the abstractor's 65, and two matrices (1024 → 4096 → 4096) against six layers."""
    config = get_config("owl-llama7b", {"connector": "mlp"})
    with torch.device("meta"):
        model = build_owl(config, pretrained=False)
    assert visual_tokens_per_image(config) == model.visual_tokens_per_image == 257
    assert model.abstractor.fc1.weight.shape == (4096, 1024) and model.abstractor.fc2.weight.shape == (4096, 4096)
    info = describe("owl-llama7b")
    mlp_params = sum(p.numel() for p in model.abstractor.parameters())
    # The connector's slot also holds the video frames' temporal embedding: num_frames × the encoder's width.
    temporal = config.video.num_frames * 1024
    assert mlp_params == 1024 * 4096 + 4096 + 4096 * 4096 + 4096 + temporal < info["params"]["abstractor"]


def test_an_unknown_connector_fails_by_name():
    with pytest.raises(ValueError, match=r"owl_config.connector must be one of \['abstractor', 'mlp'\]"):
        OwlConfig.from_dict({**get_config("owl-tiny").to_dict(), "connector": "qformer"})


def test_describe_cli_prints_json(capsys):
    main(["describe", "owl-tiny", "--json"])
    info = json.loads(capsys.readouterr().out)
    assert set(info) >= {"total_params", "params", "trainable_params", "visual_tokens_per_image"}
    assert set(info["params"]) == {"vision", "abstractor", "llm"}


@pytest.mark.parametrize("native_bf16, inference, trainer", [(True, "bf16", "bf16-mixed"), (False, "fp32", "32-true")])
def test_auto_precision_is_bf16_only_where_the_cpu_computes_it_natively(monkeypatch, native_bf16, inference, trainer):
    monkeypatch.setattr(config, "cpu_has_native_bf16", lambda: native_bf16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert config.resolve_precision("auto", "cpu") == inference
    assert config.resolve_precision("fp16", "cpu") == "fp16"  # an explicit choice stands
    assert config.auto_trainer_precision() == trainer
    assert config.compute_dtype(config.resolve_precision("auto", "cpu")) == (torch.bfloat16 if native_bf16 else torch.float32)
