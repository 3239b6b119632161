"""OwlEval, the mPLUG-Owl paper's visual instruction benchmark: its questions, our answers, answer files.

The folder is the one published in X-PLUG/mPLUG-Owl (``mPLUG-Owl/OwlEval``)::

    questions.jsonl   image, question_id, question, ability, category (["single_turn"], ["multi_turn"] or both)
    cases/            the images
    answer/*.jsonl    one system's answers a file: image, question_id, question, answer, model_id

How the questions are asked: the multi-turn questions about one image form one conversation, in
``question_id`` order, each answered with the earlier questions and the model's own earlier answers
as history; every other question is asked alone. A question can be in both categories (it opens a
conversation, so it has no history either way); the paper's table therefore counts 50 single-turn
and 52 multi-turn answers out of 82 questions.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from owl_lightning.apps.eval.processes import SINGLE, Processes
from owl_lightning.checkpoints import run_folder
from owl_lightning.config import IMAGE_TOKEN
from owl_lightning.data.health import TOO_LONG, SkipSample
from owl_lightning.data.images import decode_image, resolve_under_root
from owl_lightning.data.template import Conversation, ConversationTemplate, Turn
from owl_lightning.files import atomic_write, jsonl_lines, loads_strict
from owl_lightning.inference import LoadOptions, OwlAssistant, Request

log = logging.getLogger(__name__)

DEFAULT_DATA = "../shared/owleval"
CATEGORIES = ("single_turn", "multi_turn")
ANSWER_KEYS = ("image", "question_id", "question", "answer", "model_id")  # the published files' keys, in their order


class OwlEvalError(ValueError):
    """An OwlEval file that cannot be used; the message names the file (and line) and what to fix."""


@dataclass(frozen=True)
class Question:
    question_id: int
    image: str
    question: str
    category: tuple[str, ...]
    ability: str = ""


@dataclass
class AnswerFile:
    """One system's answers, keyed by question id (a file may answer only some questions)."""

    path: Path
    model_id: str
    answers: dict[int, str]


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """``(line number, record)`` for every non-blank line; a line that is not a JSON object is an error."""
    for number, line in jsonl_lines(path):
        try:
            record = loads_strict(line)
        except ValueError as err:
            raise OwlEvalError(f"{path}:{number}: not JSON ({err}); each line must be one JSON object") from None
        if not isinstance(record, dict):
            raise OwlEvalError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        yield number, record


def _field(record: dict, key: str, kind: type, where: str):
    if key not in record:
        raise OwlEvalError(f"{where}: missing {key!r}")
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise OwlEvalError(f"{where}: {key!r} must be {kind.__name__}, got {value!r}")
    return value


def read_questions(data: str | Path) -> list[Question]:
    """The questions of an OwlEval folder, in ``question_id`` order."""
    path = Path(data) / "questions.jsonl"
    if not path.is_file():
        raise OwlEvalError(
            f"{path} not found: pass --data pointing at the OwlEval folder "
            "(questions.jsonl, cases/, answer/ from X-PLUG/mPLUG-Owl, mPLUG-Owl/OwlEval)"
        )
    questions: dict[int, Question] = {}
    for number, record in read_jsonl(path):
        where = f"{path}:{number}"
        question_id = _field(record, "question_id", int, where)
        category = _field(record, "category", list, where)
        if not category or any(c not in CATEGORIES for c in category):
            raise OwlEvalError(f"{where}: 'category' must list some of {CATEGORIES}, got {category!r}")
        if question_id in questions:
            raise OwlEvalError(f"{where}: question_id {question_id} appears twice")
        questions[question_id] = Question(
            question_id,
            _field(record, "image", str, where),
            _field(record, "question", str, where),
            tuple(category),
            str(record.get("ability", "")),
        )
    if not questions:
        raise OwlEvalError(f"{path} holds no questions")
    return [questions[k] for k in sorted(questions)]


def conversations(questions: list[Question]) -> list[list[Question]]:
    """How the questions are asked: one conversation per image for the multi-turn questions (in id
    order), every other question alone; conversations in the order of their first question."""
    asked: list[list[Question]] = []
    by_image: dict[str, list[Question]] = {}
    for question in sorted(questions, key=lambda q: q.question_id):
        if "multi_turn" not in question.category:
            asked.append([question])
        elif question.image in by_image:
            by_image[question.image].append(question)
        else:
            by_image[question.image] = [question]
            asked.append(by_image[question.image])
    return asked


def load_images(questions: list[Question], cases: Path) -> dict[str, Image.Image]:
    """Every question's image, RGB; all missing or unreadable images are named at once, before any generation."""
    images, problems = {}, []
    for name in sorted({q.image for q in questions}):
        try:
            path = resolve_under_root(name, cases)
        except SkipSample:
            problems.append(f"{name}: outside {cases}, not read")
            continue
        if not path.is_file():
            problems.append(f"{path}: not found")
            continue
        try:
            images[name] = decode_image(path)
        except SkipSample as err:
            problems.append(f"{path}: not a readable image ({err})")
    if problems:
        raise OwlEvalError(
            f"{len(problems)} OwlEval image(s) cannot be read (is --data the OwlEval folder, with cases/?):\n  " + "\n  ".join(problems)
        )
    return images


def fit_request(
    template: ConversationTemplate,
    history: list[tuple[str, str]],
    question: str,
    image: Image.Image,
    max_new_tokens: int,
    image_tokens: int | None = None,
) -> tuple[Request, int]:
    """The request for ``question`` after the ``(question, answer)`` pairs of ``history``, keeping the most
    recent pairs that leave room for ``max_new_tokens`` within the template's ``max_length``; the image
    opens the first kept turn, counted as ``image_tokens`` visual tokens (None: the template's per-image
    count; AnyRes images take more). Returns the request and how many pairs were dropped."""
    counts = None if image_tokens is None else [image_tokens]
    for dropped in range(len(history) + 1):
        turns = []
        for earlier_question, earlier_answer in history[dropped:]:
            turns += [Turn("user", earlier_question), Turn("assistant", earlier_answer)]
        turns.append(Turn("user", question))
        turns[0] = Turn("user", IMAGE_TOKEN + "\n" + turns[0].content)
        try:
            prompt = template.encode_prompt(Conversation(turns, images=["image"]), counts)
        except SkipSample as skip:
            if skip.reason != TOO_LONG:
                raise
            continue
        if template.expanded_length(prompt, counts) + max_new_tokens <= template.max_length:
            return Request(turns, [image]), dropped
    raise OwlEvalError(
        f"the question {question[:60]!r} with its image does not fit max_length={template.max_length} "
        f"with max_new_tokens={max_new_tokens}; lower --max-new-tokens"
    )


def answer_owleval(
    assistant: OwlAssistant,
    questions: list[Question],
    cases: Path,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    progress: bool = True,
    processes: Processes = SINGLE,
) -> dict[int, str]:
    """Every question's answer, by question id. All conversations advance one turn at a time, each turn
    batched across conversations (a later turn needs the earlier answers of its own conversation).
    ``processes``: each answers its share of the conversations; every process returns every answer."""
    images = load_images(questions, Path(cases))
    asked = processes.share(conversations(questions))
    answers: dict[int, str] = {}
    total = sum(len(conversation) for conversation in asked)
    with tqdm(total=total, desc="OwlEval", unit="question", disable=not (progress and processes.is_main)) as bar:
        for turn in range(max(len(conversation) for conversation in asked)):
            # Each conversation up to and including its question of this turn.
            pending = [conversation[: turn + 1] for conversation in asked if len(conversation) > turn]
            for start in range(0, len(pending), batch_size):
                chunk = pending[start : start + batch_size]
                requests = []
                for conversation in chunk:
                    *earlier, current = conversation
                    history = [(q.question, answers[q.question_id]) for q in earlier]
                    image = images[current.image]
                    request, dropped = fit_request(
                        assistant.template, history, current.question, image, max_new_tokens, assistant.image_tokens(image)
                    )
                    if dropped:
                        log.warning(
                            "question %d: history cut to its last %d exchange(s) to fit max_length=%d",
                            current.question_id,
                            len(history) - dropped,
                            assistant.template.max_length,
                        )
                    requests.append(request)
                replies = assistant.answer(requests, max_new_tokens=max_new_tokens, temperature=temperature)
                for conversation, reply in zip(chunk, replies):
                    answers[conversation[-1].question_id] = reply
                bar.update(len(chunk))
    return {question_id: reply for share in processes.gather([answers]) for question_id, reply in share.items()}


def write_answers(path: str | Path, questions: list[Question], answers: dict[int, str], model_id: str) -> Path:
    """The official answer format, one line per answered question in id order; written whole or not at all."""
    lines = [
        json.dumps(
            {
                "image": q.image,
                "question_id": q.question_id,
                "question": q.question,
                "answer": answers[q.question_id],
                "model_id": model_id,
            },
            ensure_ascii=False,
        )
        for q in questions
        if q.question_id in answers
    ]
    return atomic_write(path, "\n".join(lines) + "\n")


def read_answers(path: str | Path, questions: list[Question]) -> AnswerFile:
    """One answer file, checked against the questions: the official keys on every line, known question
    ids, each at most once, one ``model_id``. The question text may differ (the published files have typos)."""
    path = Path(path)
    known = {q.question_id for q in questions}
    model_id, answers = None, {}
    for number, record in read_jsonl(path):
        where = f"{path}:{number}"
        missing = [key for key in ANSWER_KEYS if key not in record]
        if missing:
            raise OwlEvalError(f"{where}: missing {', '.join(missing)}; the official answer format has {', '.join(ANSWER_KEYS)}")
        for key in ANSWER_KEYS:
            _field(record, key, int if key == "question_id" else str, where)
        question_id = record["question_id"]
        if question_id not in known:
            raise OwlEvalError(f"{where}: question_id {question_id} is not an OwlEval question ({min(known)}-{max(known)})")
        if question_id in answers:
            raise OwlEvalError(f"{where}: question_id {question_id} is answered twice; keep one line per question")
        if model_id is not None and record["model_id"] != model_id:
            raise OwlEvalError(
                f"{where}: model_id {record['model_id']!r} differs from {model_id!r} on the lines above; one system per file"
            )
        model_id = record["model_id"]
        answers[question_id] = record["answer"]
    if model_id is None:
        raise OwlEvalError(f"{path}: no answers in the file")
    return AnswerFile(path, model_id, answers)


def read_answer_files(sources: list[str | Path], questions: list[Question], exclude: Path | None = None) -> list[AnswerFile]:
    """The answer files among ``sources`` (files, or folders of ``*.jsonl``), ``exclude`` left out; model ids must be unique."""
    paths: list[Path] = []
    for source in map(Path, sources):
        if source.is_dir():
            found = sorted(source.glob("*.jsonl"))
            if not found:
                raise OwlEvalError(f"{source}: no *.jsonl answer files in this folder")
            paths += found
        elif source.is_file():
            paths.append(source)
        else:
            raise OwlEvalError(f"{source}: no such answer file or folder")
    if exclude is not None:
        paths = [p for p in paths if p.resolve() != exclude.resolve()]
    files: dict[str, AnswerFile] = {}
    for path in paths:
        answer_file = read_answers(path, questions)
        if answer_file.model_id in files:
            raise OwlEvalError(
                f"{path} and {files[answer_file.model_id].path} both have model_id {answer_file.model_id!r}: "
                "systems are told apart by model_id, so give one of them another"
            )
        files[answer_file.model_id] = answer_file
    return list(files.values())


def run_owleval(
    ckpt: str | Path,
    data: str | Path,
    out: str | Path,
    model_id: str | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    progress: bool = True,
    load: LoadOptions | None = None,
    processes: Processes = SINGLE,
) -> Path:
    """``owl-lightning owleval``: every OwlEval question answered by a checkpoint, into an answer file
    (``model_id`` by default ``owl-lightning:<run folder name>``). ``processes``: the questions split among
    them, rank 0 writing the file."""
    questions = read_questions(data)
    assistant = OwlAssistant.from_checkpoint(ckpt, **asdict(processes.load_options(load or LoadOptions())))
    answers = answer_owleval(assistant, questions, Path(data) / "cases", batch_size, max_new_tokens, temperature, progress, processes)
    if not processes.is_main:
        return Path(out)
    return write_answers(out, questions, answers, model_id or f"owl-lightning:{run_folder(ckpt).name}")
