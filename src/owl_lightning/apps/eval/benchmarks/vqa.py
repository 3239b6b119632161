"""Open-ended VQA: VQAv2 and TextVQA (soft accuracy over 10 human answers), GQA (exact match)."""

from __future__ import annotations

from collections.abc import Iterator

from owl_lightning.apps.eval.benchmarks._task import Answered, Question, Task, each_record
from owl_lightning.apps.eval.benchmarks.answers import vqa_soft_accuracy
from owl_lightning.apps.eval.benchmarks.metrics import accuracy_by
from owl_lightning.data.health import MALFORMED_RECORD, SkipLog, SkipSample
from owl_lightning.data.images import resolve_under_root

# LLaVA's prompt for short-answer VQA: the references are a word or two.
SHORT_ANSWER = "Answer the question using a single word or phrase."


def short_answer_prompt(question: str) -> str:
    if not isinstance(question, str) or not question.strip():
        raise SkipSample(MALFORMED_RECORD, f"question is {question!r}, not a text")
    return f"{question}\n{SHORT_ANSWER}"


def human_answers(answers: list) -> list[str]:
    """The 10 human answers of a record (strings, or VQAv2's ``{"answer": ...}`` dicts)."""
    texts = [answer["answer"] if isinstance(answer, dict) else answer for answer in answers]
    if len(texts) != 10 or not all(isinstance(text, str) for text in texts):
        raise SkipSample(MALFORMED_RECORD, f"{len(texts)} answers where the soft accuracy needs 10 texts")
    return texts


def soft_accuracy_scores(answered: list[Answered]) -> dict:
    """Mean :func:`vqa_soft_accuracy` against the human answers (``truth``), overall and by answer type (``group``)."""
    return accuracy_by(((a.question.group, vqa_soft_accuracy(a.answer, a.question.truth)) for a in answered), "answer_type")


class VQAv2(Task):
    """VQAv2 val2014: the official questions and annotations JSON, COCO val2014 images."""

    name = "vqav2"
    source = "https://visualqa.org/download.html"
    QUESTIONS, ANNOTATIONS = "v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json"

    def questions(self, skips: SkipLog) -> Iterator[Question]:
        annotations = self.files.read_json(self.ANNOTATIONS, list, "annotations")
        by_question = {a["question_id"]: a for a in annotations if isinstance(a, dict) and "question_id" in a}

        def build(record: dict) -> Question:
            annotation = by_question.get(record["question_id"])
            if annotation is None:
                raise SkipSample(MALFORMED_RECORD, f"question_id {record['question_id']} has no record in {self.ANNOTATIONS}")
            image = self.root / "val2014" / f"COCO_val2014_{int(record['image_id']):012d}.jpg"
            prompt = short_answer_prompt(record["question"])
            return Question(
                str(record["question_id"]),
                prompt,
                image,
                truth=human_answers(annotation["answers"]),
                group=annotation.get("answer_type", "all"),
            )

        yield from each_record(self.files.read_json(self.QUESTIONS, list, "questions"), str(self.root / self.QUESTIONS), skips, build)

    def score(self, answered: list[Answered]) -> dict:
        return soft_accuracy_scores(answered)


class TextVQA(Task):
    """TextVQA 0.5.1 val: one JSON of questions with their 10 answers, images in train_images/."""

    name = "textvqa"
    source = "https://textvqa.org/dataset/"
    QUESTIONS = "TextVQA_0.5.1_val.json"

    def questions(self, skips: SkipLog) -> Iterator[Question]:
        def build(record: dict) -> Question:
            image = resolve_under_root(f"{record['image_id']}.jpg", self.root / "train_images")
            return Question(
                str(record["question_id"]), short_answer_prompt(record["question"]), image, truth=human_answers(record["answers"])
            )

        yield from each_record(self.files.read_json(self.QUESTIONS, list, "data"), str(self.root / self.QUESTIONS), skips, build)

    def score(self, answered: list[Answered]) -> dict:
        return soft_accuracy_scores(answered)


def gqa_normalise(answer: str) -> str:
    """GQA's answers are lower-case words without a final period: ``"Left."`` → ``"left"``."""
    return answer.strip().rstrip(".").strip().lower()


class GQA(Task):
    """GQA test-dev balanced: ``{question id: record}`` JSON, images in images/; exact match."""

    name = "gqa"
    source = "https://cs.stanford.edu/people/dorarad/gqa/download.html"
    QUESTIONS = "testdev_balanced_questions.json"

    def questions(self, skips: SkipLog) -> Iterator[Question]:
        def build(item: tuple[str, dict]) -> Question:
            key, record = item
            if not isinstance(record.get("answer"), str):
                raise SkipSample(MALFORMED_RECORD, f"question {key}: answer is {record.get('answer')!r}, not a text")
            structural = record.get("types", {}).get("structural", "all")
            image = resolve_under_root(f"{record['imageId']}.jpg", self.root / "images")
            return Question(key, short_answer_prompt(record["question"]), image, truth=record["answer"], group=structural)

        yield from each_record(self.files.read_json(self.QUESTIONS, dict).items(), str(self.root / self.QUESTIONS), skips, build)

    def score(self, answered: list[Answered]) -> dict:
        return accuracy_by(
            ((a.question.group, float(gqa_normalise(a.answer) == gqa_normalise(a.question.truth))) for a in answered),
            "structural_type",
        )
