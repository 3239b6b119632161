import logging

import pytest
import torch

from owl_lightning.config import get_config
from owl_lightning.models.llm import load_tokenizer
from owl_lightning.models.owl import build_owl


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_config():
    return get_config("owl-tiny")


@pytest.fixture
def tiny_tokenizer(tiny_config):
    return load_tokenizer(tiny_config.llm)


@pytest.fixture
def tiny_model(tiny_config, tiny_tokenizer):
    return build_owl(tiny_config, tokenizer=tiny_tokenizer)


def pytest_configure(config):
    logging.getLogger("owl_lightning").setLevel(logging.INFO)
