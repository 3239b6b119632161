"""``owl-lightning rate``: blind rating of OwlEval answers in a browser, and the paper's table from the ratings.

The page shows one question at a time: its image, the earlier turns of its conversation, and every
system's answer under an anonymous slot ("Answer 1", "Answer 2", ...). The slot order is shuffled
per question with a fixed seed, so it is the same after a reload; which system is behind a slot
never leaves the server. Each A/B/C/D click is appended to the ratings file and fsync'd before the
page shows it as saved, so a reload, a closed tab or a killed server loses nothing; the last rating
of a (question, system) wins.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
from collections import Counter
from datetime import datetime
from pathlib import Path

from owl_lightning.apps.owleval import CATEGORIES, AnswerFile, Question, conversations, read_answer_files, read_questions
from owl_lightning.apps.web import Binary, HttpError, WebApp

log = logging.getLogger(__name__)

# The paper's scale (taken from Self-Instruct), as shown on the page.
SCALE = {
    "A": "Correct and satisfying response.",
    "B": "Acceptable response with minor imperfections.",
    "C": "Responds to the instruction but has significant errors.",
    "D": "Irrelevant or invalid response.",
}
IMAGE_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".gif": "image/gif", ".webp": "image/webp"}


class RatingsFile:
    """Ratings by ``(question_id, model_id)``: read back at start, one fsync'd JSON line appended per rating."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.ratings: dict[tuple[int, str], str] = {}
        self._lock = threading.Lock()
        if self.path.exists():
            self._read()

    def _read(self) -> None:
        text = self.path.read_text(encoding="utf-8")
        for number, line in enumerate(text.splitlines(), start=1):
            try:
                record = json.loads(line)
                key, rating = (int(record["question_id"]), str(record["model_id"])), record["rating"]
                if rating not in SCALE:
                    raise ValueError(f"rating {rating!r} is not one of {'/'.join(SCALE)}")
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                # A line torn by a crash mid-write costs that one click, never the others.
                log.warning("%s:%d: skipped, not a rating (%s)", self.path, number, err)
                continue
            self.ratings[key] = rating
        if text and not text.endswith("\n"):
            with open(self.path, "a", encoding="utf-8") as file:
                file.write("\n")  # so the next rating starts on its own line

    def add(self, question_id: int, model_id: str, rating: str) -> None:
        line = json.dumps(
            {"question_id": question_id, "model_id": model_id, "rating": rating, "time": datetime.now().isoformat(timespec="seconds")},
            ensure_ascii=False,
        )
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as file:
                file.write(line + "\n")
                file.flush()
                os.fsync(file.fileno())
            self.ratings[(question_id, model_id)] = rating


def summarise(questions: list[Question], model_ids: list[str], ratings: dict[tuple[int, str], str]) -> dict:
    """The paper's table: per system and category, how many answers were rated A, B, C, D, and how many not
    (yet). A question in both categories counts in both, as in the paper (50 single-turn, 52 multi-turn)."""
    denominators = {category: sum(category in q.category for q in questions) for category in CATEGORIES}
    rows = []
    for model_id in model_ids:
        row: dict = {"model_id": model_id}
        for category in CATEGORIES:
            counts = Counter(ratings.get((q.question_id, model_id)) for q in questions if category in q.category)
            row[category] = {**{letter: counts[letter] for letter in SCALE}, "unrated": counts[None]}
        rows.append(row)
    return {"denominators": denominators, "rows": rows}


def summary_markdown(summary: dict) -> str:
    """The summary as a Markdown table, counts written A/B/C/D as in the paper."""
    names = {"single_turn": "single-turn", "multi_turn": "multi-turn"}
    header = ["system"] + [f"{names[c]} ({summary['denominators'][c]}) A/B/C/D | unrated" for c in CATEGORIES]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:|---:" * len(CATEGORIES) + "|"]
    for row in summary["rows"]:
        cells = [row["model_id"]]
        for category in CATEGORIES:
            counts = row[category]
            cells += ["/".join(str(counts[letter]) for letter in SCALE), str(counts["unrated"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


class RatingApp(WebApp):
    """The rating page's server: questions, every system's answers, and the ratings file."""

    page = "rate.html"

    def __init__(self, questions: list[Question], answer_files: list[AnswerFile], ratings: RatingsFile, cases: Path, seed: int = 0) -> None:
        self.questions = {q.question_id: q for q in questions}
        self.files = {f.model_id: f for f in answer_files}
        self.ratings, self.cases, self.seed = ratings, Path(cases), seed
        self.earlier = {q.question_id: conversation[:k] for conversation in conversations(questions) for k, q in enumerate(conversation)}
        missing = sorted(name for name in {q.image for q in questions} if not (self.cases / name).is_file())
        if missing:
            log.warning(
                "%d image(s) missing from %s (%s): their questions can be rated, but without the picture",
                len(missing),
                self.cases,
                ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else ""),
            )

    def slots(self, question_id: int) -> list[str]:
        """The systems that answered the question, in this question's anonymous order (slot 1 first)."""
        model_ids = sorted(m for m, f in self.files.items() if question_id in f.answers)
        random.Random(f"{self.seed}:{question_id}").shuffle(model_ids)
        return model_ids

    def summary(self) -> dict:
        summary = summarise(list(self.questions.values()), sorted(self.files), self.ratings.ratings)
        return {**summary, "markdown": summary_markdown(summary)}

    # ---------------------------------------------------------------------------------- routes

    def get(self, path: str, query: dict[str, str]) -> object:
        if path == "/api/overview":
            return {"scale": SCALE, "systems": len(self.files), "questions": [self._progress(q) for q in self.questions.values()]}
        if path == "/api/question":
            return self._question_view(self._question_id(query.get("id")))
        if path == "/api/summary":
            return self.summary()
        if path.startswith("/image/"):
            return self._image(path.removeprefix("/image/"))
        return super().get(path, query)

    def post(self, path: str, body: dict) -> object:
        if path != "/api/rate":
            return super().post(path, body)
        question_id = self._question_id(body.get("question_id"))
        slots = self.slots(question_id)
        slot, rating = body.get("slot"), body.get("rating")
        if not isinstance(slot, int) or not 1 <= slot <= len(slots):
            raise HttpError(400, f"question {question_id} has answers 1-{len(slots)}, not {slot!r}: reload the page")
        if rating not in SCALE:
            raise HttpError(400, f"a rating is one of {', '.join(SCALE)}, not {rating!r}")
        self.ratings.add(question_id, slots[slot - 1], rating)
        return {"question_id": question_id, "slot": slot, "rating": rating, **self._progress(self.questions[question_id])}

    def _question_id(self, raw: object) -> int:
        try:
            question_id = int(raw)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise HttpError(400, f"a question id is a number, not {raw!r}") from None
        if question_id not in self.questions:
            raise HttpError(
                404, f"there is no OwlEval question {question_id} (ids {min(self.questions)}-{max(self.questions)}); nothing was saved"
            )
        return question_id

    def _progress(self, question: Question) -> dict:
        slots = self.slots(question.question_id)
        rated = sum((question.question_id, m) in self.ratings.ratings for m in slots)
        return {"question_id": question.question_id, "category": list(question.category), "rated": rated, "answers": len(slots)}

    def _question_view(self, question_id: int) -> dict:
        question = self.questions[question_id]
        earlier = self.earlier[question_id]
        image_error = None
        if not (self.cases / question.image).is_file():
            image_error = f"Image {question.image} is missing from {self.cases}; rate from the text, or restart with the right --data."
        answers = []
        for slot, model_id in enumerate(self.slots(question_id), start=1):
            answers.append(
                {
                    "slot": slot,
                    "answer": self.files[model_id].answers[question_id],
                    # Its own earlier answers: a multi-turn answer is judged in the conversation it continues.
                    "earlier_answers": [self.files[model_id].answers.get(q.question_id, "(no answer)") for q in earlier],
                    "rating": self.ratings.ratings.get((question_id, model_id)),
                }
            )
        return {
            "question_id": question_id,
            "question": question.question,
            "category": list(question.category),
            "ability": question.ability,
            "image": f"/image/{question.image}",
            "image_error": image_error,
            "earlier_questions": [q.question for q in earlier],
            "answers": answers,
        }

    def _image(self, name: str) -> Binary:
        # Only the questions' own images, by name: nothing else on disk is reachable.
        path = self.cases / name
        if name not in {q.image for q in self.questions.values()} or not path.is_file():
            raise HttpError(404, f"image {name} is not in {self.cases}")
        return Binary(path.read_bytes(), IMAGE_TYPES.get(path.suffix.lower(), "application/octet-stream"))


def open_rating(data: str | Path, answers: list[str | Path], ratings: str | Path, seed: int = 0) -> RatingApp:
    """The rating app for an OwlEval folder, answer files or folders of them, and a ratings file (created on
    the first click). Raises :class:`~owl_lightning.apps.owleval.OwlEvalError` naming a bad file and line."""
    questions = read_questions(data)
    ratings_file = RatingsFile(ratings)
    answer_files = read_answer_files(answers, questions, exclude=ratings_file.path)
    return RatingApp(questions, answer_files, ratings_file, Path(data) / "cases", seed)
