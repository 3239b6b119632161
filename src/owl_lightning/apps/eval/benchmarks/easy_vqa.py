"""easy-VQA, the embedded data's test split (``make data``): exact match of the first word, by question type."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from owl_lightning.apps.eval.benchmarks._task import Answered, Question, Task, each_record
from owl_lightning.apps.eval.benchmarks.metrics import accuracy_by
from owl_lightning.config import IMAGE_TOKEN
from owl_lightning.data.health import SkipLog
from owl_lightning.data.images import resolve_under_root

MISTAKES_KEPT = 10


def first_word(answer: str) -> str:
    """Lower case, first word, no punctuation: "Blue." and "blue" are the same answer."""
    words = re.findall(r"[a-z]+", answer.lower())
    return words[0] if words else ""


class EasyVQA(Task):
    """Single-turn LLaVA records with a ``question_type`` (``stage2/easyvqa_test.json``), images in ``images/``."""

    name = "easy_vqa"
    source = "`owl-lightning data` (the embedded data builder)"
    QUESTION_FILES: tuple[str, ...] = ("stage2/easyvqa_test.json",)

    @classmethod
    def default_root(cls) -> Path:
        return Path("data/embedded")

    def questions(self, skips: SkipLog) -> Iterator[Question]:
        for name in self.QUESTION_FILES:
            yield from each_record(self.files.read_json(name), str(self.root / name), skips, self.question)

    def question(self, record: dict) -> Question:
        """A record as a question: its ``image`` a path, or a list of paths for a question about several."""
        question, answer = record["conversations"][0]["value"], record["conversations"][1]["value"]
        paths = record["image"] if isinstance(record["image"], list) else [record["image"]]
        images = tuple(resolve_under_root(path, self.root / "images") for path in paths)
        return Question(
            record.get("id", str(record["image"])),
            question.replace(IMAGE_TOKEN, "").strip(),
            images if len(images) > 1 else images[0],
            truth=answer,
            group=record.get("question_type", "all"),
            max_new_tokens=5,
        )

    def score(self, answered: list[Answered]) -> dict:
        right = [first_word(a.answer) == first_word(a.question.truth) for a in answered]
        mistakes = [
            {"question": a.question.text, "answer": a.question.truth, "type": a.question.group, "predicted": a.answer}
            for a, correct in zip(answered, right)
            if not correct
        ]
        return {
            **accuracy_by(((a.question.group, float(c)) for a, c in zip(answered, right)), "type"),
            "mistakes": mistakes[:MISTAKES_KEPT],
        }


class Scenes(EasyVQA):
    """The harder embedded task (``owl-lightning data scenes``, docs/scenes.md): counting, spatial relations,
    colour–shape binding and OCR on one image, comparisons over two; scored as easy-VQA (first word), by
    question type, and on the questions about compositions held out of training (``held_out``)."""

    name = "scenes"
    source = "`owl-lightning data scenes` (the scenes builder)"
    QUESTION_FILES = ("stage2/scenes_test.json", "stage2/scenes_test_two_image.json")

    def __init__(self, root: str | Path | None = None) -> None:
        super().__init__(root)
        self.held_out: set[str] = set()  # keys of the questions on a held-out composition

    @classmethod
    def default_root(cls) -> Path:
        return Path("data/scenes")

    def question(self, record: dict) -> Question:
        question = super().question(record)
        if record.get("held_out"):
            self.held_out.add(question.key)
        return question

    def score(self, answered: list[Answered]) -> dict:
        held_out = [a for a in answered if a.question.key in self.held_out]
        right = [first_word(a.answer) == first_word(a.question.truth) for a in held_out]
        return {**super().score(answered), "held_out": {"accuracy": sum(right) / max(len(right), 1), "count": len(right)}}
