import logging
import os

import pytest
import torch

from owl_lightning.config import get_config
from owl_lightning.models.llm import load_tokenizer
from owl_lightning.models.owl import build_owl
from tests.helpers import COLOURS, png_bytes


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


def pytest_collection_modifyitems(items):
    # Browser tests start Chromium: part of the slow tier wherever they live.
    for item in items:
        if "browser" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


def pytest_configure(config):
    logging.getLogger("owl_lightning").setLevel(logging.INFO)


# -- tiny datasets written by the tests themselves ----------------------------------------------------


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
