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

import torch
from tqdm import tqdm

from owl_lightning.apps.eval.benchmarks._task import Answered, Question, Task
from owl_lightning.apps.eval.benchmarks.answers import LETTERS, chosen_letter
from owl_lightning.data.collate import EncodedSample, collate
from owl_lightning.data.health import SkipLog
from owl_lightning.data.images import decode_image
from owl_lightning.data.template import Conversation, Turn
from owl_lightning.inference import OwlAssistant, Request

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
) -> dict:
    """The task's metrics (:meth:`Task.score`) over the answers to ``questions`` (:func:`read_questions`), plus
    ``count`` (questions answered) and ``skipped`` (records left out, by reason: unreadable records and images)."""
    if choice not in CHOICE_MODES:
        raise ValueError(f"choice must be one of {CHOICE_MODES}, got {choice!r}")
    answered: list[Answered] = []
    for start in tqdm(range(0, len(questions), batch_size), desc=task.name, disable=not progress, unit="batch"):
        pairs = list(_requests(questions[start : start + batch_size], choice, skips, task.name))
        if choice == "likelihood":
            answered += [Answered(q, _most_likely_option(assistant, r, q.options)) for q, r in pairs if q.options]
            pairs = [(q, r) for q, r in pairs if not q.options]
        if pairs:
            texts = assistant.answer([r for _, r in pairs], max_new_tokens=max(q.max_new_tokens for q, _ in pairs))
            answered += [Answered(q, chosen_letter(t, q.options) if q.options else t) for (q, _), t in zip(pairs, texts)]
    return {**task.score(answered), "count": len(answered), "skipped": dict(Counter(reason for reason, _ in skips.drain()))}


def prompt(question: Question, choice: str) -> str:
    """What the model is asked (see the module's docstring)."""
    if not question.options or choice == "likelihood":
        return question.text
    listed = "\n".join(f"{LETTERS[i]}. {option}" for i, option in enumerate(question.options))
    return f"{question.text}\n{listed}\n{LETTER_INSTRUCTION}"


def _requests(questions: list[Question], choice: str, skips: SkipLog, task: str) -> Iterator[tuple[Question, Request]]:
    """Each question with its image decoded; one whose image cannot be read is a counted skip."""
    for question in questions:
        with skips.catch(f"{task}:{question.key}"):
            yield question, Request.single(prompt(question, choice), [decode_image(question.image)])


@torch.no_grad()
def _most_likely_option(assistant: OwlAssistant, request: Request, options: tuple[str, ...]) -> str:
    """The letter of the option whose text, as the assistant's reply, has the highest log-probability.

    One forward per option: the model's loss is a mean over the batch, and a sum per option is needed."""
    pixels = assistant.encode(request).images
    placeholders = [f"image {i}" for i in range(len(request.images))]
    device = assistant.device
    scores = []
    with assistant.autocast():
        for option in options:
            conversation = Conversation([*request.turns, Turn("assistant", option)], images=placeholders, system=request.system)
            input_ids, labels, _ = assistant.template.encode(conversation)
            batch = collate([EncodedSample(input_ids, labels, pixels)], assistant.tokenizer.pad_token_id)
            out = assistant.model(
                batch["input_ids"].to(device),
                batch["sample_ids"].to(device),
                batch["labels"].to(device),
                batch["images"].to(device),
                batch["image_counts"].to(device),
            )
            scores.append(-float(out.loss) * out.num_supervised)
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
