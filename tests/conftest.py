import logging
import os
from pathlib import Path

import pytest
import torch

from owl_lightning.config import get_config
from owl_lightning.models.llm import load_tokenizer
from owl_lightning.models.owl import build_owl


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def own_process_group():
    """Lightning's ModelParallelStrategy leaves its process group and MASTER_* variables behind in this
    process; later tests start their own (and launch processes that would inherit the port)."""
    environment = dict(os.environ)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(environment)


@pytest.fixture
def tiny_config():
    return get_config("owl-tiny")


@pytest.fixture
def tiny_tokenizer(tiny_config):
    return load_tokenizer(tiny_config.llm)


@pytest.fixture
def tiny_model(tiny_config, tiny_tokenizer):
    return build_owl(tiny_config, tokenizer=tiny_tokenizer)


# owl-tiny as the CLI takes it (--model.config).
TINY_YAML = Path(__file__).parents[1] / "experiments" / "models" / "owl-tiny.yaml"


def tiny_system(stage: str = "stage1", config_overrides: dict | None = None, recipe=None, **kwargs):
    """owl-tiny's training system with a stage's recipe and optimizer; optimizer fields (``lr``,
    ``warmup_steps``, ...) and the system's own arguments by keyword."""
    from dataclasses import fields, replace

    from owl_lightning.config import STAGE1, STAGE2
    from owl_lightning.train.optim import OptimizerConfig
    from owl_lightning.train.system import STAGE1_OPTIMIZER, STAGE2_OPTIMIZER, OwlSystem

    names = {field.name for field in fields(OptimizerConfig)}
    optimizer = replace(
        STAGE1_OPTIMIZER if stage == "stage1" else STAGE2_OPTIMIZER, **{k: kwargs.pop(k) for k in list(kwargs) if k in names}
    )
    recipe = recipe or (STAGE1 if stage == "stage1" else STAGE2)
    return OwlSystem(config=get_config("owl-tiny", config_overrides), recipe=recipe, optimizer=optimizer, **kwargs)


def pytest_configure(config):
    logging.getLogger("owl_lightning").setLevel(logging.INFO)


# -- tiny datasets written by the tests themselves ----------------------------------------------------

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def png_bytes(colour, size=32) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), COLOURS[colour]).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def caption_manifest(tmp_path):
    """4 train shards + 1 val shard of solid-colour PNGs captioned with their colour (img2dataset layout)."""
    import json

    import webdataset as wds
    import yaml

    root = tmp_path / "shards"
    root.mkdir()
    names = list(COLOURS)
    key = 0
    for shard, split in [(0, "train"), (1, "train"), (2, "train"), (3, "train"), (0, "val")]:
        with wds.TarWriter(str(root / f"{split}-{shard:06d}.tar")) as sink:
            for _ in range(12):
                colour = names[key % 3]
                sink.write(
                    {
                        "__key__": f"{key:09d}",
                        "png": png_bytes(colour),
                        "txt": f"a {colour} square",
                        "json": json.dumps({"key": f"{key:09d}", "caption": f"a {colour} square"}),
                    }
                )
                key += 1
    manifest = tmp_path / "captions.yaml"
    manifest.write_text(
        yaml.safe_dump(
            {
                "train": [{"name": "squares", "shards": "shards/train-{000000..000003}.tar", "num_samples": 48, "image_key": "png"}],
                "val": [{"name": "squares_val", "shards": "shards/val-000000.tar", "image_key": "png"}],
            }
        )
    )
    return manifest


@pytest.fixture
def instruction_manifest(tmp_path):
    """A LLaVA file (multi-turn, one image each) and an Alpaca file, mixed 1:1."""
    import json

    import yaml

    images = tmp_path / "images"
    images.mkdir()
    llava = []
    for i, colour in enumerate(list(COLOURS) * 4):
        (images / f"{i}.png").write_bytes(png_bytes(colour))
        llava.append(
            {
                "id": str(i),
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat colour is the square?"},
                    {"from": "gpt", "value": colour},
                    {"from": "human", "value": "Is it a square?"},
                    {"from": "gpt", "value": "yes"},
                ],
            }
        )
    alpaca = [{"instruction": f"Say the number {i}.", "input": "", "output": str(i)} for i in range(12)]
    (tmp_path / "llava.json").write_text(json.dumps(llava))
    (tmp_path / "alpaca.json").write_text(json.dumps(alpaca))
    manifest = tmp_path / "instructions.yaml"
    manifest.write_text(
        yaml.safe_dump(
            {
                "train": [
                    {"name": "vqa", "format": "llava", "path": "llava.json", "image_root": "images", "weight": 1},
                    {"name": "text", "format": "alpaca", "path": "alpaca.json", "weight": 1},
                ],
                "val": [{"name": "vqa_val", "format": "llava", "path": "llava.json", "image_root": "images"}],
            }
        )
    )
    return manifest
