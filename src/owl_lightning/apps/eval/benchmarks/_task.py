"""What every benchmark task is: its questions read from local files, and a score of the answers."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from owl_lightning.data.health import SkipLog
from owl_lightning.files import loads_strict

Built = TypeVar("Built")


@dataclass(frozen=True)
class Question:
    """One request to the model.

    ``key``: the record it comes from, as its file names it (``"262148000"``, ``"1523/2"`` for MMBench's
    third rotation). ``text``: an open question's whole prompt, or a multiple-choice question (its hint
    first) without its options. ``image``: an image file, or its encoded bytes; a tuple of them for a
    question about several images (in the order the question names them). ``options``: the option
    texts in the order they are lettered A, B, …; empty for an open question. ``truth``: what the answer
    is scored against (a text, the right option's letter, the human answers or reference captions; never
    shown to the model). ``group``: what the task reports accuracy by (answer type, subject, split, subtask)."""

    key: str
    text: str
    image: Path | bytes | tuple[Path | bytes, ...]
    options: tuple[str, ...] = ()
    truth: str | list[str] = ""
    group: str = "all"
    max_new_tokens: int = 16

    @property
    def images(self) -> tuple[Path | bytes, ...]:
        """The question's images, one or several, in order."""
        return self.image if isinstance(self.image, tuple) else (self.image,)


@dataclass(frozen=True)
class Answered:
    """A question and the model's answer: generated text, or for a multiple-choice question the letter
    chosen (``""`` when a generated answer names no option)."""

    question: Question
    answer: str


class Task:
    """A benchmark read from ``root``, its official files laid out as docs/evaluation.md says.

    Subclasses set ``name`` (the ``--tasks`` name), ``source`` (the official download page) and
    ``default_root`` (where ``root`` is when the command line does not say), and define
    :meth:`questions` and :meth:`score`."""

    name: ClassVar[str]
    source: ClassVar[str]

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else self.default_root()
        self.files = TaskFiles(self.name, self.root, self.source)

    @classmethod
    def default_root(cls) -> Path:
        return Path("benchmarks") / cls.name

    def questions(self, skips: SkipLog) -> Iterator[Question]:
        """Every question of the files, in file order; a record that cannot be read is recorded in ``skips``
        (its file and record named) and left out."""
        raise NotImplementedError

    def score(self, answered: list[Answered]) -> dict:
        """The task's metrics as a JSON-able dict: numbers, or dicts of numbers (per split, type, subtask)."""
        raise NotImplementedError


def each_record(records: Iterable[Any], where: str, skips: SkipLog, build: Callable[[Any], Built | None]) -> Iterator[Built]:
    """``build(record)`` for each record; one that raises is a skip recorded as ``where#N`` (N: its
    position). ``build`` returns None for a record the task leaves out by design (not a skip)."""
    for number, record in enumerate(records):
        with skips.catch(f"{where}#{number}"):
            built = build(record)
            if built is not None:
                yield built


class BenchmarkFileError(ValueError):
    """A benchmark file that is not JSON, or not of the benchmark's schema."""


@dataclass
class TaskFiles:
    """Where a task's files are and where users get them, for the errors that name both."""

    task: str
    root: Path
    source: str  # the official download page

    def path(self, name: str) -> Path:
        """``root / name``; raises ``FileNotFoundError`` naming the task, the file and where to get it."""
        path = self.root / name
        if not path.exists():
            raise FileNotFoundError(
                f"{self.task}: {path} not found. Get the benchmark from {self.source} and lay it out as "
                f"docs/evaluation.md shows, or point --root {self.task}=DIR at its folder"
            )
        return path

    def read_json(self, name: str, shape: type = list, field: str | None = None) -> Any:
        """A whole JSON file, or its top-level ``field``, which must be a ``shape`` (``list`` or ``dict``). A file
        that is not JSON, or not of the benchmark's schema, is the user's to fix, not a record to skip."""
        path = self.path(name)
        try:
            data = loads_strict(path.read_bytes())
        except ValueError as err:
            raise BenchmarkFileError(f"{self.task}: {path} is not valid JSON ({err}); download it again from {self.source}") from None
        part = data.get(field) if field is not None and isinstance(data, dict) else data if field is None else None
        if not isinstance(part, shape):
            what = f"a {shape.__name__}" + (f" under {field!r}" if field else "")
            raise BenchmarkFileError(f"{self.task}: {path} does not hold {what}: is it the official {name} from {self.source}?")
        return part
