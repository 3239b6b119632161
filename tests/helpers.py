"""What several test files share: owl-tiny's training system, a short fit, tiny data written on the spot.

Fixtures stay in conftest.py; plain functions and constants live here and are imported by name.
"""

import io
import json
from dataclasses import fields, replace
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from PIL import Image

from owl_lightning.config import IGNORE_INDEX, STAGE1, STAGE2, TrainRecipe, get_config
from owl_lightning.train.optim import OptimizerConfig
from owl_lightning.train.system import STAGE1_OPTIMIZER, STAGE2_OPTIMIZER, OwlSystem

# owl-tiny as the CLI takes it (--model.config).
TINY_YAML = Path(__file__).parents[1] / "experiments" / "models" / "owl-tiny.yaml"


def tiny_system(stage: str = "stage1", config_overrides: dict | None = None, recipe: TrainRecipe | None = None, **kwargs):
    """owl-tiny's training system with a stage's recipe and optimizer; optimizer fields (``lr``,
    ``warmup_steps``, ...) and the system's own arguments by keyword."""
    names = {field.name for field in fields(OptimizerConfig)}
    optimizer = replace(
        STAGE1_OPTIMIZER if stage == "stage1" else STAGE2_OPTIMIZER, **{k: kwargs.pop(k) for k in list(kwargs) if k in names}
    )
    recipe = recipe or (STAGE1 if stage == "stage1" else STAGE2)
    return OwlSystem(config=get_config("owl-tiny", config_overrides), recipe=recipe, optimizer=optimizer, **kwargs)


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def png_bytes(colour, size=32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), COLOURS[colour]).save(buffer, format="PNG")
    return buffer.getvalue()


def fit(system, datamodule, tmp_path, steps=2, **trainer_kwargs):
    settings = {"limit_val_batches": 0, "logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
    trainer = L.Trainer(max_steps=steps, default_root_dir=tmp_path, accelerator="cpu", **{**settings, **trainer_kwargs})
    trainer.fit(system, datamodule)
    return trainer


def caption_batch(tokenizer, text_lengths=(20,), padded_to=None, images=True):
    """``BOS <image> text`` samples (``BOS text`` when ``images`` is False), right-padded; the text is supervised."""
    image = [tokenizer.convert_tokens_to_ids("<image>")] if images else []
    rows = [[tokenizer.bos_token_id, *image, *range(97, 97 + n)] for n in text_lengths]
    width = max(padded_to or 0, *(len(r) for r in rows))
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    labels = torch.where(mask.bool() & (input_ids >= 97) & (input_ids < 256), input_ids, IGNORE_INDEX)
    counts = torch.full((len(rows),), len(image))
    pixels = torch.randint(0, 255, (int(counts.sum()), 3, 32, 32), dtype=torch.uint8) if images else None
    return {"input_ids": input_ids, "sample_ids": mask, "labels": labels, "images": pixels, "image_counts": counts}


def write_owleval(root: Path, questions: list[dict]) -> Path:
    """An OwlEval folder: questions.jsonl and a solid-colour PNG per image in cases/."""
    (root / "cases").mkdir(parents=True)
    for question in questions:
        (root / "cases" / question["image"]).write_bytes(png_bytes(question["image"].split(".")[0]))
    (root / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    return root


SUBSET = [  # one single-turn question, and a two-turn conversation about another image
    {"image": "red.png", "question_id": 1, "question": "What colour is this?", "ability": "b", "category": ["single_turn"]},
    {"image": "blue.png", "question_id": 2, "question": "Describe the image.", "ability": "b", "category": ["single_turn", "multi_turn"]},
    {"image": "blue.png", "question_id": 3, "question": "Are you sure?", "ability": "f", "category": ["multi_turn"]},
]


class Interrupted(Exception):
    pass


class InterruptAt(Callback):
    """Dies before step ``step`` begins — after the checkpoint of the step before was written."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise Interrupted
