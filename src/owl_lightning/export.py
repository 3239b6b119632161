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

import json
from pathlib import Path

from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from owl_lightning.config import CHECKPOINT_PREFIX, IMAGE_TOKEN
from owl_lightning.files import writing_folder
from owl_lightning.models.owl import OwlModel

MANIFEST = "owl.json"
# Weight files of the modules outside the LLM, and the prefix of their tensors in OwlModel.state_dict().
# The vision file holds the timm model's own keys, so timm loads it without owl_lightning.
_PARTS = {"vision.safetensors": "vision.model.", "abstractor.safetensors": "abstractor."}


def is_export(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def write_export(model: OwlModel, tokenizer: PreTrainedTokenizerBase, settings: dict, out: str | Path) -> Path:
    """Write ``model`` as an exported folder; ``settings``: its template settings (``checkpoints.template_settings``).

    A LoRA-wrapped LLM is saved twice: its adapter alone (``lora/``) and merged into the base weights
    (``llm/``); ``model.llm`` is the merged LLM afterwards. ``out`` is replaced in one atomic step
    (:func:`owl_lightning.files.publish_folder`): a kill leaves the previous export or the new one, whole.
    It replaces an earlier export there, never a folder holding anything else.
    """
    from peft import PeftModel

    out = Path(out)
    if out.exists() and not is_export(out) and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not an owl_lightning export; pass a new or empty folder as --out")
    with writing_folder(out) as staging:
        if isinstance(model.llm, PeftModel):
            # Adapters only: the embeddings were never trained (the <image> row is rebuilt from the base).
            model.llm.save_pretrained(staging / "lora", save_embedding_layers=False)
            model.llm = model.llm.merge_and_unload()
        model.llm.save_pretrained(staging / "llm")
        tokenizer.save_pretrained(staging / "llm")
        state = model.state_dict()
        for filename, prefix in _PARTS.items():
            save_file({k[len(prefix) :]: v.contiguous() for k, v in state.items() if k.startswith(prefix)}, staging / filename)
        manifest = {
            "owl_config": model.config.to_dict(),
            "template": settings,
            "image_token": IMAGE_TOKEN,
            "image_token_id": model.image_token_id,
            "visual_tokens_per_image": model.visual_tokens_per_image,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def read_export(folder: str | Path) -> dict:
    """An exported folder as a checkpoint dict: ``owl_config`` as stored, ``export_llm_folder`` (its ``llm/``,
    the base LLM now: LoRA merged, ``<image>`` row included, with its tokenizer), ``state_dict`` (vision
    encoder and abstractor, ``model.``-prefixed) and the template settings.

    Everything read lies inside ``folder``; ``checkpoints.trusted_config`` decides what the stored config may set."""
    folder = Path(folder)
    root = folder.resolve()

    def inside(name: str) -> Path:
        path = (folder / name).resolve()
        if not path.is_relative_to(root):
            raise ValueError(f"{folder / name} leads outside the exported folder {root}; export the checkpoint again")
        if not path.exists():
            raise FileNotFoundError(f"{folder / name} not found: {folder} is an incomplete export; export the checkpoint again")
        return path

    try:
        manifest = json.loads(inside(MANIFEST).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise ValueError(f"{folder / MANIFEST}: not a readable export manifest ({type(err).__name__}: {err})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("owl_config"), dict):
        raise ValueError(f"{folder / MANIFEST}: expected an object with 'owl_config'; export the checkpoint again")
    llm_folder = inside("llm")
    state = {}
    for filename, prefix in _PARTS.items():
        state.update({CHECKPOINT_PREFIX + prefix + k: v for k, v in load_file(inside(filename)).items()})
    return {
        "owl_config": manifest["owl_config"],
        "export_llm_folder": str(llm_folder),
        "state_dict": state,
        "datamodule_hyper_parameters": manifest.get("template") or {},
    }
