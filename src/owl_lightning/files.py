"""Writing files and folders so that a kill, a power cut or a full disk never leaves a half-written one,
and reading JSON lines so that one bad line costs only itself.

Two primitives serve every writer in the project (checkpoints, sharded checkpoints, exports, the
converted SmolLM2 folder, the embedded data build, answer files):

- :func:`atomic_write`: a file is written to a hidden temporary file beside its target, flushed
  and fsync'd, then renamed over the target; the rename is fsync'd too. The target is always
  either the previous file or the new one, whole.
- :func:`publish_folder`: a folder is written in full under a hidden sibling name, then made
  visible at its target in one atomic step. The target is a symbolic link to the hidden folder,
  replaced with ``os.replace``, so every reader sees either the previous folder or the new one,
  whole, on any POSIX file system. A plain folder (or file) left at the target by an older
  version is moved aside first: only that first publication has a moment without a target.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def fsync_folder(folder: Path) -> None:
    """Make a rename or a new entry in ``folder`` durable (the entry lives in the folder, not the file)."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(folder: Path) -> None:
    """fsync every file under ``folder`` and every folder in it, deepest first."""
    for root, _, names in os.walk(folder, topdown=False):
        for name in names:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                with open(path, "rb") as file:
                    os.fsync(file.fileno())
        fsync_folder(Path(root))


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None] | bytes | str) -> Path:
    """Write ``path`` whole or not at all. ``write``: the bytes or text (UTF-8), or a function that writes
    into the open binary file. A killed write leaves a hidden ``.<name>.partial-<pid>`` that the next
    write to the same path removes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.partial-*"):
        stale.unlink(missing_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with open(partial, "wb") as file:
            if callable(write):
                write(file)
            else:
                file.write(write.encode("utf-8") if isinstance(write, str) else write)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)
    return path


def staging_folder(path: str | os.PathLike) -> Path:
    """A new, empty hidden folder beside ``path`` to write a folder into before :func:`publish_folder`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}-{uuid.uuid4().hex[:12]}")
    staging.mkdir()
    return staging


def publish_folder(staging: Path, path: str | os.PathLike) -> Path:
    """Make ``path`` show the finished folder ``staging`` (from :func:`staging_folder`) in one atomic step,
    and delete what ``path`` showed before. Every file in ``staging`` is fsync'd first."""
    path, staging = Path(path), Path(staging)
    if staging.parent.resolve() != path.parent.resolve():
        raise ValueError(f"{staging} must be beside {path} (made by staging_folder)")
    fsync_tree(staging)
    link = staging.with_name(staging.name + ".link")
    link.unlink(missing_ok=True)
    os.symlink(staging.name, link)  # relative: the pair can be moved together
    previous = _previous_target(path)
    if path.exists() and not path.is_symlink():
        # A plain folder or file from an older layout: it cannot be replaced by a link in one step.
        aside = path.with_name(f".{path.name}-replaced-{uuid.uuid4().hex[:12]}")
        os.rename(path, aside)
        previous = aside
    os.replace(link, path)
    fsync_folder(path.parent)
    if previous is not None:
        remove(previous)
    remove_unpublished(path)
    return path


def _previous_target(path: Path) -> Path | None:
    """The hidden folder ``path`` links to now, if it is one of ours."""
    if not path.is_symlink():
        return None
    target = path.parent / os.readlink(path)
    return target if target.parent.resolve() == path.parent.resolve() and target.name.startswith(f".{path.name}-") else None


def remove_unpublished(path: str | os.PathLike) -> None:
    """Delete hidden siblings of ``path`` that it does not show: folders of saves killed midway."""
    path = Path(path)
    shown = (path.parent / os.readlink(path)).name if path.is_symlink() else None
    for sibling in path.parent.glob(f".{path.name}-*"):
        if sibling.name != shown:
            remove(sibling)


def remove(path: Path) -> None:
    """Delete a folder, file or link if there is one; a link to one of our hidden folders takes it along."""
    path = Path(path)
    target = _previous_target(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    if target is not None:
        remove(target)


@contextmanager
def writing_folder(path: str | os.PathLike) -> Iterator[Path]:
    """``with writing_folder(out) as folder: ...``: write into ``folder``; on success it is published at
    ``out`` (:func:`publish_folder`), on an error it is deleted and ``out`` is left as it was."""
    staging = staging_folder(path)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish_folder(staging, path)


def jsonl_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """``(line number, raw line)`` for every non-blank line of a JSON-lines file, each line with its
    ``\n`` ending when it has one (a last line without it was cut short by a crash mid-write). Bytes,
    not text, so bytes torn mid-character cost only their own line. Every JSONL reader uses this."""
    with path.open("rb") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                yield number, line


def loads_strict(text: str | bytes) -> object:
    """JSON as RFC 8259 has it: ``NaN`` and ``Infinity`` (which Python's parser accepts) are refused, and so
    is nesting too deep to parse; every failure is a :class:`ValueError` (``UnicodeDecodeError`` for bytes
    that are not UTF-8, ``json.JSONDecodeError`` for bad JSON)."""

    def refuse(constant: str) -> object:
        raise ValueError(f"{constant} is not a JSON number")

    try:
        return json.loads(text, parse_constant=refuse)
    except RecursionError:
        raise ValueError("nested too deeply to parse") from None
