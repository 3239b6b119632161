"""owl_lightning: mPLUG-Owl-style multimodal LLM training with PyTorch Lightning."""

from owl_lightning.config import OwlConfig, get_config, list_configs
from owl_lightning.models.owl import OwlModel, build_owl

__all__ = ["OwlConfig", "OwlModel", "build_owl", "get_config", "list_configs"]
