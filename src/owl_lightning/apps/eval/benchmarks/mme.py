"""MME: two yes/no questions an image over 14 subtasks; scored as the official eval tool scores them."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from functools import partial
from pathlib import Path

from owl_lightning.apps.eval.benchmarks._task import Answered, Question, Task, each_record
from owl_lightning.apps.eval.benchmarks.answers import yes_or_no
from owl_lightning.data.health import MALFORMED_RECORD, MISSING_IMAGE, SkipLog, SkipSample

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg")


class MME(Task):
    """``MME_Benchmark_release_version`` as released: one folder per subtask, each image with a ``.txt``
    of ``question<TAB>Yes|No`` lines, either beside it or (artwork, celebrity, landmark, posters, scene)
    in ``questions_answers_YN/`` with the images in ``images/``. Subtasks whose folder is absent are left out."""

    name = "mme"
    source = "https://github.com/BradyFU/Awesome-Multimodal-Large-Language-Models/tree/Evaluation"

    def subtask_folders(self) -> dict[str, tuple[Path, Path]]:
        """Subtask → (folder of its .txt files, folder of its images)."""
        folders = {}
        for subtask in PERCEPTION + COGNITION:
            folder = self.root / subtask
            if (folder / "questions_answers_YN").is_dir():
                folders[subtask] = (folder / "questions_answers_YN", folder / "images")
            elif folder.is_dir():
                folders[subtask] = (folder, folder)
        if not folders:
            self.files.path(PERCEPTION[0])  # raises, naming the folder and where to get it
        return folders

    def questions(self, skips: SkipLog) -> Iterator[Question]:
        for subtask, (texts, images) in self.subtask_folders().items():
            for text_file in sorted(texts.glob("*.txt")):
                found = [
                    images / f"{text_file.stem}{suffix}" for suffix in IMAGE_SUFFIXES if (images / f"{text_file.stem}{suffix}").is_file()
                ]
                build = partial(self._question, subtask, found[0] if found else images / f"{text_file.stem}{IMAGE_SUFFIXES}")
                yield from each_record(text_file.read_text().splitlines(), str(text_file), skips, build)

    @staticmethod
    def _question(subtask: str, image: Path, line: str) -> Question | None:
        """One ``question<TAB>Yes|No`` line about ``image`` (a path that is not a file: none was found)."""
        if not line.strip():
            return None
        if not image.is_file():
            raise SkipSample(MISSING_IMAGE, f"no image {image}")
        question, _, truth = line.rstrip("\n").rpartition("\t")
        if truth.strip().lower() not in ("yes", "no") or not question:
            raise SkipSample(MALFORMED_RECORD, f"expected 'question<TAB>Yes|No', got {line[:80]!r}")
        return Question(f"{subtask}/{image.name}/{question}", question, image, truth=truth.strip().lower(), group=subtask, max_new_tokens=8)

    def score(self, answered: list[Answered]) -> dict:
        """Per subtask: ``acc`` (questions right, %), ``acc_plus`` (images with both questions right, %),
        ``score`` = acc + acc_plus (at most 200); ``perception`` and ``cognition``: the sum of their
        subtasks' scores (at most 2000 and 800 with every subtask present). An answer that is neither yes
        nor no is wrong."""
        by_image: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
        for a in answered:
            by_image[a.question.group][str(a.question.image)].append(yes_or_no(a.answer) == a.question.truth)
        subtasks = {}
        for subtask, images in sorted(by_image.items()):
            questions = [right for answers in images.values() for right in answers]
            acc = 100 * sum(questions) / len(questions)
            acc_plus = 100 * sum(all(answers) for answers in images.values()) / len(images)
            subtasks[subtask] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}
        return {
            "perception": sum(s["score"] for name, s in subtasks.items() if name in PERCEPTION),
            "cognition": sum(s["score"] for name, s in subtasks.items() if name in COGNITION),
            "subtasks": subtasks,
        }
