"""Multiple-choice benchmarks: ScienceQA-IMG, SEED-Bench (image questions), MMBench (circular evaluation).

Each question's options are lettered A, B, … in the order given; the harness answers with a letter
(by generation or likelihood ranking, see :mod:`~owl_lightning.apps.eval.benchmarks.harness`).
"""

from __future__ import annotations

import base64
import binascii
import csv
import sys
from collections import defaultdict
from collections.abc import Iterator
from functools import partial

from owl_lightning.apps.eval.benchmarks._task import Answered, Question, Task, each_record
from owl_lightning.apps.eval.benchmarks.answers import LETTERS
from owl_lightning.apps.eval.benchmarks.metrics import accuracy_by
from owl_lightning.data.health import CORRUPT_IMAGE, MALFORMED_RECORD, SkipLog, SkipSample
from owl_lightning.data.images import resolve_under_root

# MMBench's TSV stores each image once; a later row with the same image holds that row's index instead,
# a cell far shorter than any base64 image.
IMAGE_REFERENCE_CHARACTERS = 64


def options_of(values: list) -> tuple[str, ...]:
    """The option texts: the values up to the first empty one (``""``, None or pandas' ``"nan"``), at least
    two, and none after the gap."""
    texts = ["" if value is None or str(value).strip() == "nan" else str(value).strip() for value in values]
    count = next((i for i, text in enumerate(texts) if not text), len(texts))
    if count < 2 or any(texts[count:]):
        raise SkipSample(MALFORMED_RECORD, f"options {values!r}: need two or more texts, with no gap")
    return tuple(texts[:count])


def letter_of(index: int, options: tuple[str, ...]) -> str:
    """The letter of option ``index`` (ScienceQA's answers are indices)."""
    if not isinstance(index, int) or not 0 <= index < len(options):
        raise SkipSample(MALFORMED_RECORD, f"answer {index!r} is not one of the {len(options)} options")
    return LETTERS[index]


def checked_letter(letter: str, options: tuple[str, ...]) -> str:
    """``letter`` if it names one of the options (SEED-Bench's and MMBench's answers are letters)."""
    if letter not in LETTERS[: len(options)]:
        raise SkipSample(MALFORMED_RECORD, f"answer {letter!r} is not one of the letters of the {len(options)} options")
    return letter


def choice_accuracy(answered: list[Answered], group: str) -> dict:
    """Accuracy of the chosen letters against the right ones (``truth``), overall and by ``group``."""
    return accuracy_by(((a.question.group, float(a.answer == a.question.truth)) for a in answered), group)


class ScienceQA(Task):
    """ScienceQA test split, questions with an image: ``problems.json`` (``{pid: problem}``, ``answer``
    an index into ``choices``), images at ``test/<pid>/image.png``. Accuracy by subject."""

    name = "scienceqa_img"
    source = "https://scienceqa.github.io/ (the data/scienceqa folder of github.com/lupantech/ScienceQA)"
    PROBLEMS = "problems.json"

    def questions(self, skips: SkipLog) -> Iterator[Question]:
        def build(item: tuple[str, dict]) -> Question | None:
            pid, problem = item
            if problem.get("split") != "test" or not problem.get("image"):
                return None  # another split, or a text-only question: not part of ScienceQA-IMG
            options = options_of(problem["choices"])
            hint = problem.get("hint") or ""
            text = f"Context: {hint}\n{problem['question']}" if hint.strip() else problem["question"]
            image = resolve_under_root(f"{pid}/{problem['image']}", self.root / "test")
            truth = letter_of(problem["answer"], options)
            return Question(pid, text, image, options, truth, problem.get("subject", "all"), max_new_tokens=4)

        yield from each_record(self.files.read_json(self.PROBLEMS, dict).items(), str(self.root / self.PROBLEMS), skips, build)

    def score(self, answered: list[Answered]) -> dict:
        return choice_accuracy(answered, "subject")


class SEEDBench(Task):
    """SEED-Bench v1 image questions: ``SEED-Bench.json`` (``questions`` with ``choice_a``..``choice_d`` and
    an answer letter; ``question_type`` names the type ids), images in ``SEED-Bench-image/``. Accuracy by type."""

    name = "seed_bench"
    source = "https://huggingface.co/datasets/AILab-CVC/SEED-Bench"
    QUESTIONS = "SEED-Bench.json"

    def questions(self, skips: SkipLog) -> Iterator[Question]:
        # The file is read twice, once a part: it is some 20 MB, and each part's schema is checked on the way.
        type_ids = self.files.read_json(self.QUESTIONS, dict, "question_type")
        type_names = {number: name for name, number in type_ids.items()}

        def build(record: dict) -> Question | None:
            if record.get("data_type") != "image":
                return None  # video questions: not part of the image benchmark
            options = options_of([record[f"choice_{letter}"] for letter in "abcd"])
            answer = checked_letter(record["answer"], options)
            question_type = type_names.get(record.get("question_type_id"), str(record.get("question_type_id")))
            image = resolve_under_root(record["data_id"], self.root / "SEED-Bench-image")
            return Question(str(record["question_id"]), record["question"], image, options, answer, question_type, max_new_tokens=4)

        yield from each_record(self.files.read_json(self.QUESTIONS, list, "questions"), str(self.root / self.QUESTIONS), skips, build)

    def score(self, answered: list[Answered]) -> dict:
        return choice_accuracy(answered, "question_type")


class MMBench(Task):
    """MMBench dev (English) TSV: ``index``, ``question``, ``hint``, options ``A``–``D``, ``answer``,
    ``category``, ``image`` (base64, or the index of the row that holds it).

    Circular evaluation: a question with k options is asked k times, its options rotated one place
    each time; it counts as right only when every rotation is."""

    name = "mmbench"
    source = "https://github.com/open-compass/MMBench (MMBench_DEV_EN.tsv)"
    TABLE = "MMBench_DEV_EN.tsv"

    def questions(self, skips: SkipLog) -> Iterator[Question]:
        path = self.files.path(self.TABLE)
        csv.field_size_limit(sys.maxsize)  # base64 images are cells far past csv's 128 KiB default
        with path.open(newline="") as table:
            reader = csv.DictReader(table, delimiter="\t")
            rows = list(reader)
        letters = [letter for letter in LETTERS if letter in (reader.fieldnames or [])]
        images = {row.get("index"): row.get("image") or "" for row in rows}
        for rotations in each_record(rows, str(path), skips, partial(self._rotations, letters, images)):
            yield from rotations

    @staticmethod
    def _rotations(letters: list[str], images: dict[str, str], row: dict) -> list[Question]:
        """A row's question once per rotation of its options (keys ``"<index>/<shift>"``)."""
        options = options_of([row[letter] for letter in letters])
        answer = LETTERS.index(checked_letter(row["answer"], options))
        encoded = row["image"] if len(row["image"]) > IMAGE_REFERENCE_CHARACTERS else images.get(row["image"], "")
        try:
            image = base64.b64decode(encoded, validate=True)
        except binascii.Error as err:
            raise SkipSample(CORRUPT_IMAGE, f"index {row['index']}: the image cell is not base64 ({err})") from None
        hint = row.get("hint") or ""
        text = f"{hint}\n{row['question']}" if hint.strip() and hint != "nan" else row["question"]
        return [
            Question(
                f"{row['index']}/{shift}",
                text,
                image,
                options[shift:] + options[:shift],
                LETTERS[(answer - shift) % len(options)],
                row.get("category", "all"),
                max_new_tokens=4,
            )
            for shift in range(len(options))
        ]

    def score(self, answered: list[Answered]) -> dict:
        """``accuracy``: circular, by category too; ``single_pass``: the unrotated questions alone. A question
        some of whose rotations were not asked (``--limit`` cut them off) is left out of both."""
        rotations: dict[str, dict[str, Answered]] = defaultdict(dict)
        for a in answered:
            index, _, shift = a.question.key.rpartition("/")  # keys are "<index>/<shift>"
            rotations[index][shift] = a
        complete = [asked for asked in rotations.values() if len(asked) == len(asked["0"].question.options)]
        circular = ((asked["0"].question.group, float(all(a.answer == a.question.truth for a in asked.values()))) for asked in complete)
        unrotated = [asked["0"].answer == asked["0"].question.truth for asked in complete]
        return {**accuracy_by(circular, "category"), "single_pass": sum(unrotated) / max(len(unrotated), 1), "questions": len(complete)}
