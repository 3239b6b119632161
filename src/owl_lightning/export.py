"""Exported folders: a trained model in formats that tools outside owl_lightning load, and back.

Layout of ``owl-lightning export --ckpt RUN_OR_CKPT --out DIR``::

    DIR/owl.json                what owl_lightning rebuilds the model from: its config as trained, the
                                conversation-template settings, the <image> token and visual tokens per image
    DIR/llm/                    the LLM with any LoRA merged, and its tokenizer (with <image>):
                                transformers.AutoModelForCausalLM / AutoTokenizer.from_pretrained(DIR/llm)
    DIR/vision.safetensors      the timm encoder's own state dict: load it into
                                timm.create_model(vision.timm_name, num_classes=0, global_pool="", **vision.timm_kwargs)
    DIR/abstractor.safetensors  the VisualAbstractor's state dict (``models/abstractor.py``)
    DIR/lora/                   stage-2 models only: the LoRA adapter, unmerged:
                                peft.PeftModel.from_pretrained(<the base LLM>, DIR/lora)

Read back (:func:`read_export`), an exported folder is a checkpoint whose base LLM is its own
``llm/``: ``load_owl``, ``OwlAssistant.from_checkpoint`` and stage 2's ``init_from`` take it like a run.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from owl_lightning.checkpoints import PREFIX, model_from_checkpoint, read_checkpoint, template_settings
from owl_lightning.config import OwlConfig
from owl_lightning.models.llm import IMAGE_TOKEN, load_tokenizer
from owl_lightning.models.owl import OwlModel

MANIFEST = "owl.json"
# Weight files of the modules outside the LLM, and the prefix of their tensors in OwlModel.state_dict().
# The vision file holds the timm model's own keys, so timm loads it without owl_lightning.
_PARTS = {"vision.safetensors": "vision.model.", "abstractor.safetensors": "abstractor."}


def is_export(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def export_checkpoint(ckpt: str | Path, out: str | Path) -> Path:
    """Export a stage-1/2 checkpoint (or run folder, or export) to ``out``, keeping its template settings."""
    checkpoint = read_checkpoint(ckpt)
    model = model_from_checkpoint(checkpoint, str(ckpt))
    return write_export(model, load_tokenizer(model.config.llm), template_settings(checkpoint), out)


def write_export(model: OwlModel, tokenizer: PreTrainedTokenizerBase, settings: dict, out: str | Path) -> Path:
    """Write ``model`` as an exported folder; ``settings``: its template settings (``checkpoints.template_settings``).

    A LoRA-wrapped LLM is saved twice: its adapter alone (``lora/``) and merged into the base weights
    (``llm/``); ``model.llm`` is the merged LLM afterwards. ``out`` is written whole or not at all, and
    replaces an earlier export there, never a folder holding anything else.
    """
    from peft import PeftModel

    out = Path(out)
    if out.exists() and not is_export(out) and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not an owl_lightning export; pass a new or empty folder as --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        if isinstance(model.llm, PeftModel):
            # Adapters only: the embeddings were never trained (the <image> row is rebuilt from the base).
            model.llm.save_pretrained(staging / "lora", save_embedding_layers=False)
            model.llm = model.llm.merge_and_unload()
        model.llm.save_pretrained(staging / "llm")
        tokenizer.save_pretrained(staging / "llm")
        state = model.state_dict()
        for filename, prefix in _PARTS.items():
            save_file({k[len(prefix):]: v.contiguous() for k, v in state.items() if k.startswith(prefix)}, staging / filename)
        manifest = {
            "owl_config": model.config.to_dict(),
            "template": settings,
            "image_token": IMAGE_TOKEN,
            "image_token_id": model.image_token_id,
            "visual_tokens_per_image": model.visual_tokens_per_image,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)  # an earlier export, or an empty folder
    os.replace(staging, out)
    return out


def read_export(folder: str | Path) -> dict:
    """An exported folder as a checkpoint dict: ``owl_config`` (whose LLM and tokenizer are ``llm/``),
    ``state_dict`` (vision encoder and abstractor, ``model.``-prefixed) and the template settings."""
    folder = Path(folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    config = OwlConfig.from_dict(manifest["owl_config"])
    llm_dir = str(folder / "llm")
    # llm/ holds the trained LLM (LoRA merged, <image> row included) and its tokenizer: it is the base now.
    config.llm = dataclasses.replace(config.llm, source=llm_dir, tokenizer=llm_dir, architecture=None)
    config.vision.weights = None  # the encoder's weights come with the state dict below
    state = {}
    for filename, prefix in _PARTS.items():
        path = folder / filename
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {folder} is an incomplete export; export the checkpoint again")
        state.update({PREFIX + prefix + k: v for k, v in load_file(path).items()})
    return {"owl_config": config.to_dict(), "state_dict": state, "datamodule_hyper_parameters": manifest["template"]}
