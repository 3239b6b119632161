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
    QUESTIONS = "stage2/easyvqa_test.json"

    @classmethod
    def default_root(cls) -> Path:
        return Path("data/embedded")

    def questions(self, skips: SkipLog) -> Iterator[Question]:
        def build(record: dict) -> Question:
            question, answer = record["conversations"][0]["value"], record["conversations"][1]["value"]
            text = question.replace(IMAGE_TOKEN, "").strip()
            return Question(
                record.get("id", record["image"]),
                text,
                resolve_under_root(record["image"], self.root / "images"),
                truth=answer,
                group=record.get("question_type", "all"),
                max_new_tokens=5,
            )

        yield from each_record(self.files.read_json(self.QUESTIONS), str(self.root / self.QUESTIONS), skips, build)

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
