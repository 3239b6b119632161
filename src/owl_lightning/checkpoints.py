"""Checkpoints that leave out the frozen base LLM, and loading them back into a full model.

A 7B LLM is 13 GB per save and never changes in either stage, so a checkpoint keeps every
parameter except the LLM's base weights (LoRA adapters are kept), plus the model config; the
base weights come back from ``llm.source`` when the checkpoint is loaded.

An exported folder (:mod:`owl_lightning.export`) reads as such a checkpoint whose base LLM is the
export's own ``llm/`` folder, so everything that takes a checkpoint takes an export too.
"""
from __future__ import annotations

from pathlib import Path

import torch

from owl_lightning.config import OwlConfig
from owl_lightning.models.owl import OwlModel, build_owl
from owl_lightning.parallel import is_sharded_checkpoint, read_sharded_checkpoint

PREFIX = "model."  # the systems hold the OwlModel as ``self.model``


def is_base_llm_weight(key: str) -> bool:
    """``model.llm.*`` tensors other than LoRA adapters: restored from ``llm.source``, not saved."""
    return key.startswith(PREFIX + "llm.") and "lora_" not in key


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint dict from a ``.ckpt`` file, a sharded checkpoint folder (FSDP runs), a run folder (its
    ``checkpoints/last.ckpt``) or an exported folder."""
    from owl_lightning import export  # imported here: export.py builds on this module

    path = Path(path)
    if export.is_export(path):
        return export.read_export(path)
    if path.is_dir() and not is_sharded_checkpoint(path):  # a run folder: its last checkpoint
        path = path / "checkpoints" / "last.ckpt"
    if is_sharded_checkpoint(path):
        return read_sharded_checkpoint(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found; pass a .ckpt file or a run folder holding checkpoints/last.ckpt")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_model_weights(model: OwlModel, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load a checkpoint's tensors (``model.``-prefixed) into ``model``; every tensor must find its place."""
    own = {k[len(PREFIX):]: v for k, v in state_dict.items() if k.startswith(PREFIX)}
    # Missing keys are expected (the base LLM is not saved); tensors that fit nowhere are not.
    unexpected = model.load_state_dict(own, strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"{source}: {len(unexpected)} tensors do not fit this model, e.g. {unexpected[:3]}")


def model_from_checkpoint(checkpoint: dict, source: str) -> OwlModel:
    """A full model (base weights + what the checkpoint trained) from a checkpoint dict read from ``source``."""
    model = build_owl(OwlConfig.from_dict(checkpoint["owl_config"]))
    state = checkpoint["state_dict"]
    if any("lora_" in k for k in state):
        model.add_lora(model.config.lora)
    load_model_weights(model, state, source)
    return model.eval()


def load_owl(path: str | Path) -> OwlModel:
    """A full model from a stage-1 or stage-2 checkpoint, a run folder or an exported folder."""
    return model_from_checkpoint(read_checkpoint(path), str(path))


def template_settings(checkpoint: dict) -> dict:
    """The run's conversation-template settings as its data module had them: ``template`` and the
    unresolved ``system_prompt`` setting (see ``data.template.resolve_system_prompt``)."""
    data = checkpoint.get("datamodule_hyper_parameters", {})
    return {"template": data.get("template", "owl"), "system_prompt": data.get("system_prompt")}
