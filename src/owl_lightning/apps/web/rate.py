"""``owl-lightning rate``: blind rating of OwlEval answers in a browser, and the paper's table from the ratings.

The page shows one question at a time: its image, the earlier turns of its conversation, and every
system's answer under an anonymous slot ("Answer 1", "Answer 2", ...). The slot order is shuffled
per question from a random seed of the ratings file's own (stored in it with the first rating), so
it is the same after a reload or a restart, and differs between raters; which system is behind a
slot never leaves the server. In blind mode (the default) the per-system summary stays hidden until
the rater asks for it at the end. Each A/B/C/D click is appended to the ratings file and fsync'd
before the page shows it as saved, so a reload, a closed tab or a killed server loses nothing; the
last rating of a (question, system) wins.
"""

from __future__ import annotations

import json
import logging
import os
import random
import secrets
import threading
from collections import Counter
from datetime import datetime
from pathlib import Path
from urllib.parse import quote, unquote

from owl_lightning.apps.owleval import CATEGORIES, AnswerFile, Question, conversations, read_answer_files, read_questions
from owl_lightning.apps.web import Binary, HttpError, WebApp
from owl_lightning.files import jsonl_lines, loads_strict

log = logging.getLogger(__name__)

# The paper's scale (taken from Self-Instruct), as shown on the page.
SCALE = {
    "A": "Correct and satisfying response.",
    "B": "Acceptable response with minor imperfections.",
    "C": "Responds to the instruction but has significant errors.",
    "D": "Irrelevant or invalid response.",
}
IMAGE_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".gif": "image/gif", ".webp": "image/webp"}


def is_integer(value: object) -> bool:
    """An ``int`` from JSON, and not ``true``/``false`` (Python's ``bool`` is an ``int``)."""
    return isinstance(value, int) and not isinstance(value, bool)


def read_rating(record: object) -> tuple[tuple[int, str], str]:
    """A ratings-file record → ``((question_id, model_id), rating)``; ValueError naming what is wrong."""
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    question_id, model_id, rating = record.get("question_id"), record.get("model_id"), record.get("rating")
    if not is_integer(question_id):
        raise ValueError(f"question_id {question_id!r} is not an integer")
    if not isinstance(model_id, str):
        raise ValueError(f"model_id {model_id!r} is not a string")
    if not isinstance(rating, str) or rating not in SCALE:
        raise ValueError(f"rating {rating!r} is not one of {'/'.join(SCALE)}")
    return (question_id, model_id), rating


class RatingsFile:
    """Ratings by ``(question_id, model_id)``: read back at start, one fsync'd JSON line appended per rating.

    The file also keeps its ``slot_seed`` (a line ``{"slot_seed": ...}``), drawn at random for a new file
    and written with its first rating. Lines that cannot be read (a write torn by a crash, an edit by
    hand) are skipped with a warning each, counted in ``unreadable_lines``; every other rating is kept."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.ratings: dict[tuple[int, str], str] = {}
        self.unreadable_lines: list[int] = []
        self._lock = threading.Lock()
        stored_seed = self._read() if self.path.exists() else None
        # A new file (or one from before files kept a seed) draws its own; it is saved with the next rating.
        self.slot_seed: str = stored_seed or secrets.token_hex(16)
        self._seed_saved = stored_seed is not None

    def _read(self) -> str | None:
        """Reads the ratings in; returns the file's slot seed, if it has one."""
        seed, last_line = None, b"\n"
        for number, line in jsonl_lines(self.path):
            last_line = line
            try:  # line by line, so bytes torn mid-character cost only their own line
                record = loads_strict(line)
                if isinstance(record, dict) and "slot_seed" in record:
                    if not isinstance(record["slot_seed"], str):
                        raise ValueError(f"slot_seed {record['slot_seed']!r} is not a string")
                    seed = seed or record["slot_seed"]
                    continue
                key, rating = read_rating(record)
            except ValueError as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
                torn = not line.endswith(b"\n")  # the last line, not ended by a newline
                reason = f"cut short, a write interrupted by a crash? ({err})" if torn else f"not a rating ({err})"
                log.warning("%s:%d: skipped, %s", self.path, number, reason)
                self.unreadable_lines.append(number)
                continue
            self.ratings[key] = rating
        if self.unreadable_lines:
            log.warning("%s: %d unreadable line(s) skipped, %d rating(s) read", self.path, len(self.unreadable_lines), len(self.ratings))
        if not last_line.endswith(b"\n"):
            with open(self.path, "ab") as file:
                file.write(b"\n")  # so the next rating starts on its own line
        return seed

    def add(self, question_id: int, model_id: str, rating: str) -> None:
        line = json.dumps(
            {"question_id": question_id, "model_id": model_id, "rating": rating, "time": datetime.now().isoformat(timespec="seconds")},
            ensure_ascii=False,
        )
        with self._lock:
            if not self._seed_saved:  # with the first rating: orders seen before it bind no one
                line = json.dumps({"slot_seed": self.slot_seed}) + "\n" + line
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as file:
                file.write(line + "\n")
                file.flush()
                os.fsync(file.fileno())
            self._seed_saved = True
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
    """The rating page's server: questions, every system's answers, and the ratings file. ``blind``: the
    summary (each system's counts) is only served once the rater has asked for it (``POST /api/reveal``)."""

    page = "rate.html"

    def __init__(
        self, questions: list[Question], answer_files: list[AnswerFile], ratings: RatingsFile, cases: Path, blind: bool = True
    ) -> None:
        self.questions = {q.question_id: q for q in questions}
        self.files = {f.model_id: f for f in answer_files}
        self.ratings, self.cases = ratings, Path(cases)
        self.summary_shown = not blind
        self.earlier = {q.question_id: conversation[:k] for conversation in conversations(questions) for k, q in enumerate(conversation)}
        problems = sorted(problem for name in {q.image for q in questions} if (problem := self.locate_image(name)[1]))
        if problems:
            log.warning(
                "%d image(s) cannot be shown (%s): their questions can be rated, but without the picture",
                len(problems),
                "; ".join(problems[:5]) + ("; ..." if len(problems) > 5 else ""),
            )

    def slots(self, question_id: int) -> list[str]:
        """The systems that answered the question, in this question's anonymous order (slot 1 first)."""
        model_ids = sorted(m for m, f in self.files.items() if question_id in f.answers)
        random.Random(f"{self.ratings.slot_seed}:{question_id}").shuffle(model_ids)
        return model_ids

    def summary(self) -> dict:
        summary = summarise(list(self.questions.values()), sorted(self.files), self.ratings.ratings)
        return {**summary, "markdown": summary_markdown(summary)}

    def locate_image(self, name: str) -> tuple[Path | None, str | None]:
        """``(file, None)`` for a question's image inside the cases folder, else ``(None, why not)``, the reason
        said as the console and the page show it. Names that lead out of the folder (``..``, an absolute
        path, a symbolic link) are refused whatever questions.jsonl says."""
        root = self.cases.resolve()
        try:
            path = (root / name).resolve()
        except (OSError, ValueError) as err:  # a NUL byte, a link loop
            return None, f"Image {name!r} cannot be opened ({err})"
        if not path.is_relative_to(root):
            return None, f"Image {name} lies outside {self.cases}, so it is not shown"
        if not path.is_file():
            return None, f"Image {name} is missing from {self.cases}"
        return path, None

    # ---------------------------------------------------------------------------------- routes

    def get(self, path: str, query: dict[str, str]) -> object:
        if path == "/api/overview":
            return {
                "scale": SCALE,
                "systems": len(self.files),
                "summary_shown": self.summary_shown,
                "questions": [self._progress(q) for q in self.questions.values()],
            }
        if path == "/api/question":
            raw = query.get("id", "")
            if not (raw.isascii() and raw.isdigit()):
                raise HttpError(400, f"a question id is a whole number, not {raw!r}")
            return self._question_view(self._known_question(int(raw)))
        if path == "/api/summary":
            if not self.summary_shown:
                raise HttpError(
                    403, "blind rating: the summary shows each system's counts, so it stays hidden until you reveal it at the end"
                )
            return self.summary()
        if path.startswith("/image/"):
            return self._image(unquote(path.removeprefix("/image/")))
        return super().get(path, query)

    def post(self, path: str, body: dict) -> object:
        if path == "/api/reveal":
            _expect_fields(body, {})
            self.summary_shown = True
            return self.summary()
        if path != "/api/rate":
            return super().post(path, body)
        _expect_fields(body, {"question_id": "an integer", "slot": "an integer", "rating": "a string"})
        question_id, slot, rating = body["question_id"], body["slot"], body["rating"]
        if not is_integer(question_id):
            raise HttpError(400, f"question_id must be an integer, not {question_id!r}")
        slots = self.slots(self._known_question(question_id))
        if not is_integer(slot) or not 1 <= slot <= len(slots):
            raise HttpError(400, f"question {question_id} has answers 1-{len(slots)}, not {slot!r}: reload the page")
        if not isinstance(rating, str) or rating not in SCALE:
            raise HttpError(400, f"a rating is one of {', '.join(SCALE)}, not {rating!r}")
        self.ratings.add(question_id, slots[slot - 1], rating)
        return {"question_id": question_id, "slot": slot, "rating": rating, **self._progress(self.questions[question_id])}

    def _known_question(self, question_id: int) -> int:
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
        _, image_error = self.locate_image(question.image)
        if image_error:
            image_error += "; rate from the text, or restart with the right --data."
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
            "image": "/image/" + quote(question.image),
            "image_error": image_error,
            "earlier_questions": [q.question for q in earlier],
            "answers": answers,
        }

    def _image(self, name: str) -> Binary:
        # Only the questions' own images, and only from inside the cases folder: nothing else on disk is reachable.
        path, _ = self.locate_image(name) if name in {q.image for q in self.questions.values()} else (None, None)
        if path is None:
            raise HttpError(404, f"image {name} is not in {self.cases}")
        return Binary(path.read_bytes(), IMAGE_TYPES.get(path.suffix.lower(), "application/octet-stream"))


def _expect_fields(body: dict, fields: dict[str, str]) -> None:
    """Refuse a body whose keys are not exactly ``fields`` (name → what it holds, for the message)."""
    if set(body) != set(fields):
        wanted = ", ".join(f"{name} ({kind})" for name, kind in fields.items()) or "no fields"
        raise HttpError(400, f"send {wanted}; got {', '.join(sorted(body)) or 'none'}")


def open_rating(data: str | Path, answers: list[str | Path], ratings: str | Path, blind: bool = True) -> RatingApp:
    """The rating app for an OwlEval folder, answer files or folders of them, and a ratings file (created on
    the first click). Raises :class:`~owl_lightning.apps.owleval.OwlEvalError` naming a bad file and line."""
    questions = read_questions(data)
    ratings_file = RatingsFile(ratings)
    answer_files = read_answer_files(answers, questions, exclude=ratings_file.path)
    return RatingApp(questions, answer_files, ratings_file, Path(data) / "cases", blind)
