"""Benchmarks in their official release formats, read from local copies: ``owl-lightning eval --tasks``.

One module a family; :data:`TASKS` names every task. docs/evaluation.md says where to get each one,
the file layout expected under its root folder, and its metric.
"""

from __future__ import annotations

from owl_lightning.apps.eval.benchmarks._task import Answered, BenchmarkFileError, Question, Task
from owl_lightning.apps.eval.benchmarks.choice import MMBench, ScienceQA, SEEDBench
from owl_lightning.apps.eval.benchmarks.coco import COCOCaptions
from owl_lightning.apps.eval.benchmarks.easy_vqa import EasyVQA, Scenes
from owl_lightning.apps.eval.benchmarks.mme import MME
from owl_lightning.apps.eval.benchmarks.pope import POPE
from owl_lightning.apps.eval.benchmarks.vqa import GQA, TextVQA, VQAv2

TASKS: dict[str, type[Task]] = {
    task.name: task for task in (VQAv2, TextVQA, GQA, POPE, ScienceQA, MME, MMBench, SEEDBench, COCOCaptions, EasyVQA, Scenes)
}

__all__ = ["TASKS", "Answered", "BenchmarkFileError", "Question", "Task"]
