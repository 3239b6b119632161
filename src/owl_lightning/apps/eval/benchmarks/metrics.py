"""Scores of many answers: accuracy (overall and by group) and the yes/no detection figures."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable


def accuracy_by(scores: Iterable[tuple[str, float]], group: str) -> dict:
    """``(group, score in [0, 1])`` per question → ``{"accuracy": mean, "by_<group>": {name: mean}}``
    (groups sorted by name). No questions: accuracy 0."""
    by_name: dict[str, list[float]] = defaultdict(list)
    for name, score in scores:
        by_name[name].append(score)
    every = [score for values in by_name.values() for score in values]
    return {
        "accuracy": sum(every) / len(every) if every else 0.0,
        f"by_{group}": {name: sum(values) / len(values) for name, values in sorted(by_name.items())},
    }


def yes_no_metrics(pairs: Iterable[tuple[str, str]]) -> dict:
    """``(predicted, truth)`` pairs of ``"yes"``/``"no"`` → accuracy, and precision, recall and F1 of
    "yes" (the object is there), and ``yes_ratio`` (the share of "yes" answers: 0.5 for an unbiased
    model on POPE's balanced questions). A ratio with a zero denominator is 0."""
    counts = defaultdict(int)
    for predicted, truth in pairs:
        counts[predicted == "yes", truth == "yes"] += 1
    true_yes, false_yes, false_no = counts[True, True], counts[True, False], counts[False, True]
    total = sum(counts.values())
    precision = true_yes / (true_yes + false_yes) if true_yes + false_yes else 0.0
    recall = true_yes / (true_yes + false_no) if true_yes + false_no else 0.0
    return {
        "accuracy": (true_yes + counts[False, False]) / total if total else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": (true_yes + false_yes) / total if total else 0.0,
    }
