"""easy-VQA exact-match accuracy, overall and by answer type (shape, color, yes/no)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from PIL import Image
from torchmetrics import MeanMetric
from tqdm import tqdm

from owl_lightning.config import IMAGE_TOKEN
from owl_lightning.inference import OwlAssistant, Request


def normalise(answer: str) -> str:
    """Lower case, first word, no punctuation: "Blue." and "blue" are the same answer."""
    words = re.findall(r"[a-z]+", answer.lower())
    return words[0] if words else ""


def read_vqa_records(path: Path, limit: int | None = None) -> list[dict]:
    """Single-turn LLaVA records with an extra ``question_type`` (as ``make data`` writes them)."""
    records = json.loads(path.read_text())
    out = []
    for record in records[:limit]:
        question, answer = record["conversations"][0]["value"], record["conversations"][1]["value"]
        out.append(
            {
                "image": record["image"],
                "question": question.replace(IMAGE_TOKEN, "").strip(),
                "answer": answer,
                "type": record.get("question_type", "all"),
            }
        )
    return out


def easy_vqa_accuracy(assistant: OwlAssistant, records: list[dict], image_root: Path, batch_size: int = 64, progress: bool = True) -> dict:
    """Greedy answers to every record; accuracy = exact match after :func:`normalise`."""
    overall, by_type = MeanMetric(), {}
    mistakes = []
    for start in tqdm(range(0, len(records), batch_size), desc="easy-VQA", disable=not progress, unit="batch"):
        chunk = records[start : start + batch_size]
        requests = [Request.single(r["question"], [Image.open(image_root / r["image"])]) for r in chunk]
        for record, answer in zip(chunk, assistant.answer(requests, max_new_tokens=5)):
            correct = float(normalise(answer) == normalise(record["answer"]))
            overall.update(correct)
            by_type.setdefault(record["type"], MeanMetric()).update(correct)
            if not correct and len(mistakes) < 10:
                mistakes.append({**record, "predicted": answer})
    return {
        "accuracy": float(overall.compute()),
        "by_type": {t: float(m.compute()) for t, m in sorted(by_type.items())},
        "count": len(records),
        "mistakes": mistakes,
    }
