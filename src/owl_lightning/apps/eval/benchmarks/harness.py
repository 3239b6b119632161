"""Runs tasks: answers every question (batched generation, or likelihood ranking of the options) and scores them.

Multiple-choice questions are answered one of two ways (``--choice``):

- ``generate``: the prompt lists the lettered options and asks for a letter (LLaVA's wording); the letter
  is read from the answer (:func:`~owl_lightning.apps.eval.benchmarks.answers.chosen_letter`).
- ``likelihood``: the prompt is the question alone and each option's text is scored as the reply: the
  option with the highest total log-probability of its tokens (and the end of the answer) is chosen.
  No answer goes unparsed, and a model that cannot follow the letter instruction is still measured.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from itertools import islice

from tqdm import tqdm

from owl_lightning.apps.eval.benchmarks._task import Answered, Question, Task
from owl_lightning.apps.eval.benchmarks.answers import LETTERS, chosen_letter
from owl_lightning.apps.eval.processes import SINGLE, Processes
from owl_lightning.data.collate import EncodedSample
from owl_lightning.data.health import SkipLog
from owl_lightning.data.images import decode_image
from owl_lightning.inference import OwlAssistant, Request, Sampling

CHOICE_MODES = ("generate", "likelihood")
LETTER_INSTRUCTION = "Answer with the option's letter from the given choices directly."


def read_questions(task: Task, limit: int | None = None) -> tuple[list[Question], SkipLog]:
    """The first ``limit`` questions of a task (all: None), and the log of the records skipped reading them.
    Read before a model is loaded: a missing file is reported at once."""
    skips = SkipLog()
    return list(islice(task.questions(skips), limit)), skips


def run_task(
    assistant: OwlAssistant,
    task: Task,
    questions: list[Question],
    skips: SkipLog,
    choice: str = "generate",
    batch_size: int = 16,
    progress: bool = True,
    processes: Processes = SINGLE,
) -> dict:
    """The task's metrics (:meth:`Task.score`) over the answers to ``questions`` (:func:`read_questions`), plus
    ``count`` (questions answered) and ``skipped`` (records left out, by reason: unreadable records, images
    that cannot be decoded, prompts too long for the model).

    ``processes``: each answers its share of the questions; every process returns the same results."""
    if choice not in CHOICE_MODES:
        raise ValueError(f"choice must be one of {CHOICE_MODES}, got {choice!r}")
    read_skips = skips.drain()  # read alike by every process: counted once
    mine = processes.share(questions)
    numbered = list(enumerate(mine))
    answers: dict[int, Answered] = {}  # position in ``mine`` → its answer (none: skipped)
    for start in tqdm(range(0, len(mine), batch_size), desc=task.name, disable=not (progress and processes.is_main), unit="batch"):
        encoded = list(_encoded(assistant, numbered[start : start + batch_size], choice, skips, task.name))
        generated = [(position, sample) for position, request, sample in encoded if not (mine[position].options and choice == "likelihood")]
        for position, request, _ in encoded:
            question = mine[position]
            if question.options and choice == "likelihood":
                with skips.catch(f"{task.name}:{question.key}"):
                    answers[position] = Answered(question, _most_likely_option(assistant, request, question.options))
        if generated:
            samplings = [Sampling(max_new_tokens=mine[position].max_new_tokens) for position, _ in generated]
            for (position, _), generation in zip(generated, assistant.generate([sample for _, sample in generated], samplings)):
                question, text = mine[position], assistant.decode(generation.tokens)
                answers[position] = Answered(question, chosen_letter(text, question.options) if question.options else text)
    answered = [answer for answer in processes.gather([answers.get(position) for position in range(len(mine))]) if answer]
    answer_skips = [skip for share in processes.gather([skips.drain()]) for skip in share]
    reasons = Counter(reason for reason, _ in read_skips + answer_skips)
    return {**task.score(answered), "count": len(answered), "skipped": dict(reasons)}


def prompt(question: Question, choice: str) -> str:
    """What the model is asked (see the module's docstring)."""
    if not question.options or choice == "likelihood":
        return question.text
    listed = "\n".join(f"{LETTERS[i]}. {option}" for i, option in enumerate(question.options))
    return f"{question.text}\n{listed}\n{LETTER_INSTRUCTION}"


def _encoded(
    assistant: OwlAssistant, questions: list[tuple[int, Question]], choice: str, skips: SkipLog, task: str
) -> Iterator[tuple[int, Request, EncodedSample]]:
    """Each ``(position, question)`` as ``(position, request, the request as the model takes it)``; one whose
    image cannot be decoded or whose prompt is too long for the model is a counted skip."""
    for position, question in questions:
        with skips.catch(f"{task}:{question.key}"):
            request = Request.single(prompt(question, choice), [decode_image(image) for image in question.images])
            yield position, request, assistant.encode(request)


def _most_likely_option(assistant: OwlAssistant, request: Request, options: tuple[str, ...]) -> str:
    """The letter of the option whose text, as the assistant's reply to ``request``, is the most likely."""
    scores = [log_likelihood for log_likelihood, _ in assistant.reply_likelihoods(request, list(options))]
    return LETTERS[max(range(len(options)), key=scores.__getitem__)]


def numeric_leaves(results: dict, prefix: str = "") -> Iterator[tuple[str, float]]:
    """``("vqav2/by_answer_type/yes/no", 0.8)``-style pairs of every number in a task's results, for the
    table and TensorBoard (lists, such as examples of mistakes, are left out)."""
    for key, value in results.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from numeric_leaves(value, f"{name}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield name, float(value)
