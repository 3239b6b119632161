"""Build the embedded dataset once, from packages already installed (no downloads).

``python -m owl_lightning.apps.embedded [--out DIR]`` (default ``data/embedded`` under the current
directory) writes, from easy-VQA's 4,000 train / 1,000 test images and their questions::

    stage1/train-{000000..000007}.tar   4,000 image–caption pairs in img2dataset's layout
    stage1/val-{000000..000003}.tar     1,000 (the easy-VQA test images)
    images/{train,test}/N.png           the images, as the image root of stage 2
    stage2/easyvqa_train.json           LLaVA: each train image's questions as multi-turn conversations of up to 3
    stage2/easyvqa_val.json             the same for the last 200 train images, held out
    stage2/easyvqa_test.json            LLaVA: every test question alone, with its question_type
    stage2/text_train.json              Alpaca: questions on Python standard-library docstrings
    stage2/text_heldout.json            ~10% of them, held out to measure text ability

``data_manifests/embedded_stage{1,2}.yaml`` point at these files. The build happens in a sibling
folder that replaces ``DIR`` only when complete, with a marker naming the build version: a killed
build is redone on the next call, a finished one is kept until :data:`BUILD_VERSION` changes.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import io
import json
import logging
import random
import re
import shutil
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from owl_lightning.config import IMAGE_TOKEN
from owl_lightning.extras import require
from owl_lightning.files import writing_folder

log = logging.getLogger(__name__)

BUILD_VERSION = 2  # bump when the output changes, so existing builds are redone
MARKER = "BUILD.json"
SEED = 0

SHAPES = ("circle", "rectangle", "triangle")
COLOURS = ("red", "green", "blue", "yellow", "teal", "brown", "black", "gray")
YES_NO = ("yes", "no")
VAL_IMAGES = 200  # the last train images, held out of stage 2 as easyvqa_val
# An image's ~10 questions are split into conversations of at most this many. Longer ones let the
# model answer late questions from earlier answers ("what color?" "blue" ... "is it blue?") instead
# of from the image, while evaluation asks each question alone; shorter ones also pad less.
QUESTIONS_PER_CONVERSATION = 3
# Samples per shard. Validation reads whole shards, one reader (rank × DataLoader worker) each:
# 4 validation shards serve the 2-rank × 2-worker CPU setup; training resamples, 8 shards is plenty.
SHARD_SIZE = {"train": 500, "val": 250}
HELDOUT_PERCENT = 10

# Common standard-library modules whose docstrings become text-only instructions. Fixed and
# sorted, so the pairs change only with the Python version.
STDLIB_MODULES = (
    "argparse",
    "base64",
    "bisect",
    "calendar",
    "collections",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "enum",
    "fractions",
    "functools",
    "glob",
    "gzip",
    "hashlib",
    "heapq",
    "html",
    "inspect",
    "io",
    "itertools",
    "json",
    "logging",
    "math",
    "operator",
    "os",
    "pathlib",
    "pickle",
    "random",
    "re",
    "shutil",
    "statistics",
    "string",
    "subprocess",
    "tempfile",
    "textwrap",
    "threading",
    "time",
    "typing",
    "urllib.parse",
    "uuid",
    "zipfile",
)
DOC_MIN_CHARS, DOC_MAX_CHARS = 40, 600
# Old-style builtin docstrings open with a signature paragraph, not prose:
# "deque([iterable[, maxlen]]) --> deque object".
_SIGNATURE = re.compile(r"^[\w.]+\(.*\)(\s*-+>.*)?$")


# ---------------------------------------------------------------------------------------------
# easy-VQA: captions and question types


# The colours easy-VQA draws its shapes in, exactly (its edges are anti-aliased, its background a
# random pale colour). Checked against the questions on every image of the build.
PALETTE = {
    (255, 0, 0): "red",
    (0, 255, 0): "green",
    (0, 0, 255): "blue",
    (255, 255, 0): "yellow",
    (0, 128, 128): "teal",
    (165, 42, 42): "brown",
    (0, 0, 0): "black",
    (128, 128, 128): "gray",
}
# Fraction of its bounding box a shape fills: ~1/2 triangle, ~π/4 circle, ~1 rectangle. Over all
# 5,000 images: triangles 0.50–0.66, circles 0.74–0.91, rectangles 0.96–1.
TRIANGLE_BELOW, RECTANGLE_ABOVE = 0.70, 0.93


def caption_for_image(qa_pairs: Iterable[tuple[str, str]], image: Image.Image) -> str:
    """One easy-VQA image and its ``(question, answer)`` pairs → ``"a blue rectangle"``.

    The questions alone leave the colour or the shape open for about one image in ten (only
    "is there a yellow shape?" → "no" and the like), so the caption is read from the pixels
    (:func:`shape_in_pixels`) and checked against every answer: a reading an answer rules out
    raises ``ValueError``.
    """
    pairs = list(qa_pairs)
    seen = dict(zip((COLOURS, SHAPES), shape_in_pixels(image)))
    for vocabulary, (present, absent) in _answer_evidence(pairs).items():
        if len(present) > 1 or present & absent:
            raise ValueError(f"the answers contradict each other ({sorted(present)} there, {sorted(absent)} not): {pairs}")
        if seen[vocabulary] not in (present or set(vocabulary)) - absent:
            raise ValueError(f"the pixels show {seen[vocabulary]!r}, which the answers rule out: {pairs}")
    return f"a {seen[COLOURS]} {seen[SHAPES]}"


def _answer_evidence(pairs: list[tuple[str, str]]) -> dict[tuple[str, ...], tuple[set[str], set[str]]]:
    """For colours and for shapes: the values the answers say are there, and those they say are not.

    A colour or shape answer names what is there; a question naming a colour or shape ("what is
    the blue shape?") says it is there; a yes/no question says whether the named one is there,
    negated by "not"/"no" ("is no circle present?" → "no" means there is a circle).
    """
    evidence = {vocabulary: (set(), set()) for vocabulary in (COLOURS, SHAPES)}
    for question, answer in pairs:
        words = set(re.findall(r"[a-z]+", question.lower()))
        negated = bool(words & {"not", "no"})
        for vocabulary, (present, absent) in evidence.items():
            if answer in vocabulary:
                present.add(answer)
            for word in words.intersection(vocabulary):
                denied = answer in YES_NO and (answer == "yes") == negated
                (absent if denied else present).add(word)
    return evidence


def shape_in_pixels(image: Image.Image) -> tuple[str, str]:
    """``(colour, shape)`` of the one shape in an easy-VQA image.

    The colour is the palette colour covering most pixels; the shape follows from the fraction of
    its bounding box that the pixels nearer to that colour than to the background fill.
    """
    pixels = np.asarray(image.convert("RGB"), dtype=np.int64)  # [H, W, 3]
    packed, counts = np.unique(pixels @ np.array([1 << 16, 1 << 8, 1]), return_counts=True)  # one int per colour
    by_count = sorted(
        ((count, (rgb >> 16, (rgb >> 8) & 255, rgb & 255)) for rgb, count in zip(packed.tolist(), counts.tolist())),
        reverse=True,
    )
    shape_rgb = next((rgb for _, rgb in by_count if rgb in PALETTE), None)
    if shape_rgb is None:
        raise ValueError(f"no easy-VQA palette colour in the image; expected one of {sorted(PALETTE.values())}")
    background = next(rgb for _, rgb in by_count if rgb != shape_rgb)
    mask = ((pixels - shape_rgb) ** 2).sum(axis=-1) < ((pixels - background) ** 2).sum(axis=-1)  # [H, W]
    rows, cols = np.nonzero(mask)
    fill = mask.sum() / ((rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1))
    shape = "triangle" if fill < TRIANGLE_BELOW else "rectangle" if fill > RECTANGLE_ABOVE else "circle"
    return PALETTE[shape_rgb], shape


def question_type(answer: str) -> str:
    """``"shape"``, ``"color"`` or ``"yes_no"``: the easy-VQA question kind, known from its answer."""
    if answer in SHAPES:
        return "shape"
    if answer in COLOURS:
        return "color"
    if answer in YES_NO:
        return "yes_no"
    raise ValueError(f"unknown easy-VQA answer {answer!r}; expected one of {SHAPES + COLOURS + YES_NO}")


def _easyvqa_split(split: str) -> tuple[dict[int, list[tuple[str, str]]], dict[int, Path]]:
    """``"train"``/``"test"`` → (questions per image id, in the package's order; image path per id)."""
    easy_vqa = require("easy_vqa", "embedded")
    questions, answers, image_ids = getattr(easy_vqa, f"get_{split}_questions")()
    by_image: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for question, answer, image_id in zip(questions, answers, image_ids):
        by_image[image_id].append((question, answer))
    paths = {image_id: Path(path) for image_id, path in getattr(easy_vqa, f"get_{split}_image_paths")().items()}
    if set(by_image) != set(paths):
        raise ValueError(
            f"easy-VQA {split}: questions name {len(by_image)} images, the package has {len(paths)}; "
            "reinstall easy-vqa==1.0 (pip install --force-reinstall easy-vqa==1.0)"
        )
    return dict(sorted(by_image.items())), paths


def _captions(split: str, by_image: dict[int, list[tuple[str, str]]], paths: dict[int, Path]) -> dict[int, str]:
    captions = {}
    for image_id, pairs in by_image.items():
        try:
            with Image.open(paths[image_id]) as image:
                captions[image_id] = caption_for_image(pairs, image)
        except ValueError as err:
            raise ValueError(f"easy-VQA {split} image {paths[image_id]}: {err}. Reinstall easy-vqa==1.0.") from None
    return captions


# ---------------------------------------------------------------------------------------------
# Stage 1: image–caption shards in img2dataset's layout


@dataclass(frozen=True)
class ShardSample:
    """One image–caption pair for :func:`write_shards`: ``metadata`` adds fields to its ``.json``."""

    key: str
    png: bytes
    caption: str
    metadata: dict = field(default_factory=dict)


def write_shards(pattern: str, per_shard: int, samples: Iterable[ShardSample]) -> list[str]:
    """Write samples in img2dataset's layout (PNG bytes as they are, ``.txt``, ``.json``); returns the shard files."""
    written: list[str] = []
    # A fixed mtime makes the tars byte-identical from build to build.
    with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0, post=written.append, mtime=0) as writer:
        for sample in samples:
            with Image.open(io.BytesIO(sample.png)) as image:  # reads the header only
                width, height = image.size
            metadata = {"key": sample.key, "caption": sample.caption, "width": width, "height": height, "status": "success"}
            metadata.update(sample.metadata)
            writer.write({"__key__": sample.key, "png": sample.png, "txt": sample.caption, "json": json.dumps(metadata)})
    return written


def _easyvqa_samples(paths: dict[int, Path], captions: dict[int, str]) -> Iterator[ShardSample]:
    for image_id, caption in captions.items():
        # Lossless as it is: the colours are the labels.
        yield ShardSample(f"{image_id:09d}", paths[image_id].read_bytes(), caption, {"easyvqa_image_id": image_id})


# ---------------------------------------------------------------------------------------------
# Stage 2: LLaVA conversations and Alpaca text


def llava_turns(pairs: list[tuple[str, str]], images: int = 1) -> list[dict[str, str]]:
    """Question–answer pairs → LLaVA turns; one image placeholder per image opens the first question."""
    turns = []
    for index, (question, answer) in enumerate(pairs):
        turns.append({"from": "human", "value": f"{IMAGE_TOKEN}\n" * images + question if index == 0 else question})
        turns.append({"from": "gpt", "value": answer})
    return turns


def llava_record(record_id: str, image: str | list[str], pairs: list[tuple[str, str]], **fields: object) -> dict:
    """One LLaVA record about ``image`` (a path, or a list of paths in placeholder order), plus ``fields``."""
    images = 1 if isinstance(image, str) else len(image)
    return {"id": record_id, "image": image, "conversations": llava_turns(pairs, images), **fields}


def multi_turn_records(items: Iterable[tuple[str, str | list[str], list[tuple[str, str]]]], rng: random.Random) -> list[dict]:
    """``(record id, image(s), question–answer pairs)`` → conversations of up to
    :data:`QUESTIONS_PER_CONVERSATION` shuffled pairs each, with ids ``<record id>-<part>``."""
    records = []
    for record_id, image, pairs in items:
        shuffled = rng.sample(pairs, len(pairs))  # no fixed question order for the model to learn
        for part, start in enumerate(range(0, len(shuffled), QUESTIONS_PER_CONVERSATION)):
            records.append(llava_record(f"{record_id}-{part}", image, shuffled[start : start + QUESTIONS_PER_CONVERSATION]))
    return records


def _easyvqa_multi_turn_records(by_image: dict[int, list[tuple[str, str]]], rng: random.Random) -> list[dict]:
    return multi_turn_records(((f"easyvqa-train-{image_id}", f"train/{image_id}.png", pairs) for image_id, pairs in by_image.items()), rng)


def _easyvqa_single_turn_records(by_image: dict[int, list[tuple[str, str]]]) -> list[dict]:
    return [
        llava_record(f"easyvqa-test-{image_id}-{index}", f"test/{image_id}.png", [(question, answer)], question_type=question_type(answer))
        for image_id, pairs in by_image.items()
        for index, (question, answer) in enumerate(pairs)
    ]


def stdlib_text_pairs(modules: Iterable[str] = STDLIB_MODULES) -> list[dict[str, str]]:
    """Alpaca records ``{"instruction", "input": "", "output"}`` from standard-library docstrings.

    For every public function, class and method defined in ``modules`` (not re-exported, not
    deprecated) whose docstring's first prose paragraph, whitespace-normalised, has 40–600
    characters: "What does `json.dumps` do in Python?" (a class: "What is `collections.Counter`
    in Python?") → that paragraph. Sorted by name; of repeated answers the first is kept.
    Deterministic for a given Python version.
    """
    records: list[dict[str, str]] = []
    seen_outputs: set[str] = set()
    for name, is_class, doc in _docstrings(modules):
        answer = _first_paragraph(doc)
        if answer is None or answer in seen_outputs:
            continue
        seen_outputs.add(answer)
        question = f"What is `{name}` in Python?" if is_class else f"What does `{name}` do in Python?"
        records.append({"instruction": question, "input": "", "output": answer})
    return records


def _docstrings(modules: Iterable[str]) -> list[tuple[str, bool, str | None]]:
    """``(qualified name, is a class, docstring)`` of every public routine and class defined in
    ``modules`` and of the public methods those classes define themselves; sorted by name."""
    found = []
    for module_name in sorted(modules):
        module = importlib.import_module(module_name)
        homes = {module_name, f"_{module_name}"}  # C accelerators count: functools.reduce is from _functools
        for attr, obj in list(vars(module).items()):  # a snapshot: reading attributes may import into it
            if attr.startswith("_"):
                continue
            # Deprecated objects (typing.io, ...) warn when touched: not worth teaching, skipped.
            with warnings.catch_warnings():
                warnings.simplefilter("error", DeprecationWarning)
                try:
                    found += _documented(f"{module_name}.{attr}", obj, homes)
                except DeprecationWarning:
                    continue
    return sorted(found, key=lambda item: item[0])


def _documented(name: str, obj: object, homes: set[str]) -> list[tuple[str, bool, str | None]]:
    if getattr(obj, "__module__", None) not in homes:
        return []
    if inspect.isroutine(obj):
        return [(name, False, obj.__doc__)]
    if not inspect.isclass(obj):
        return []
    methods = [(method, getattr(obj, method, None)) for method in vars(obj) if not method.startswith("_")]
    return [(name, True, obj.__doc__)] + [
        (f"{name}.{method}", False, function.__doc__) for method, function in methods if inspect.isroutine(function)
    ]


def _first_paragraph(doc: str | None) -> str | None:
    """The first prose paragraph of a docstring, whitespace-normalised, if 40–600 characters."""
    if not doc:
        return None
    for paragraph in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
        text = " ".join(paragraph.split())
        if _SIGNATURE.match(text):
            continue
        return text if DOC_MIN_CHARS <= len(text) <= DOC_MAX_CHARS and ">>>" not in text else None
    return None


def _is_heldout(record: dict[str, str]) -> bool:
    """A stable ~10% split: the same instruction lands on the same side in every build."""
    digest = hashlib.sha256(record["instruction"].encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % 100 < HELDOUT_PERCENT


# ---------------------------------------------------------------------------------------------
# The build


def build_embedded(out: str | Path = "data/embedded") -> dict[str, int]:
    """Build the embedded dataset into ``out`` unless a build of this version is there; returns its counts."""
    return build_once(out, BUILD_VERSION, _build_into)


def build_once(out: str | Path, version: int | dict[str, int], build_into: Callable[[Path], dict[str, int]]) -> dict[str, int]:
    """Run ``build_into(staging folder)`` and publish the folder at ``out`` with a :data:`MARKER` naming
    ``version`` and the counts it returned; skipped when ``out`` holds a build of this version. A
    ``version`` dict also names the build's parameters: a build with other parameters is redone."""
    out = Path(out)
    marker = out / MARKER
    if marker.is_file():
        built = json.loads(marker.read_text())
        if built.get("version") == version:
            return built["counts"]
    elif out.exists() and any(out.iterdir()):
        raise FileExistsError(
            f"{out} is not empty and holds no {MARKER}: not an embedded-data build. Choose another --out, or remove that folder."
        )
    with writing_folder(out) as staging:
        counts = build_into(staging)
        (staging / MARKER).write_text(json.dumps({"version": version, "counts": counts}, indent=1))
    return counts


def _build_into(root: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    splits = {split: _easyvqa_split(split) for split in ("train", "test")}
    for split, (by_image, paths) in splits.items():
        image_dir = root / "images" / split
        image_dir.mkdir(parents=True)
        for image_id in by_image:
            shutil.copyfile(paths[image_id], image_dir / f"{image_id}.png")
        counts[f"images_{split}"] = len(by_image)

    stage1 = root / "stage1"
    stage1.mkdir()
    for split, shard_prefix in (("train", "train"), ("test", "val")):
        by_image, paths = splits[split]
        pattern = str(stage1 / f"{shard_prefix}-%06d.tar")
        shards = write_shards(pattern, SHARD_SIZE[shard_prefix], _easyvqa_samples(paths, _captions(split, by_image, paths)))
        counts[f"stage1_{shard_prefix}_shards"] = len(shards)
        counts[f"stage1_{shard_prefix}_samples"] = len(by_image)

    stage2 = root / "stage2"
    stage2.mkdir()
    train_by_image, _ = splits["train"]
    image_ids = list(train_by_image)
    held_out = {image_id: train_by_image[image_id] for image_id in image_ids[-VAL_IMAGES:]}
    kept = {image_id: train_by_image[image_id] for image_id in image_ids[:-VAL_IMAGES]}
    rng = random.Random(SEED)
    test_records = _easyvqa_single_turn_records(splits["test"][0])
    text = stdlib_text_pairs()
    outputs = {
        "easyvqa_train": _easyvqa_multi_turn_records(kept, rng),
        "easyvqa_val": _easyvqa_multi_turn_records(held_out, rng),
        "easyvqa_test": test_records,
        "text_train": [record for record in text if not _is_heldout(record)],
        "text_heldout": [record for record in text if _is_heldout(record)],
    }
    for name, records in outputs.items():
        (stage2 / f"{name}.json").write_text(json.dumps(records, indent=1, ensure_ascii=False))
        counts[f"{name}_records"] = len(records)
    counts["easyvqa_train_turns"] = sum(len(r["conversations"]) // 2 for r in outputs["easyvqa_train"])
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog="The harder scenes task: owl-lightning data scenes --help (docs/scenes.md)."
    )
    parser.add_argument("--out", default="data/embedded", help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    build_and_report("embedded data", args.out, lambda: build_embedded(args.out))


def build_and_report(what: str, out: str | Path, build: Callable[[], dict[str, int]]) -> None:
    """Run a ``data`` command's ``build`` and log what it made: ``what`` in ``out``, the seconds, each count."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    counts = build()
    log.info("%s in %s (%.1f s):", what, out, time.perf_counter() - start)
    for name, count in counts.items():
        log.info("  %-30s %d", name, count)


if __name__ == "__main__":
    main()
