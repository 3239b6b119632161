"""A small interleaved image–text document set for both stages, generated offline from the embedded data.

Each document is three times: a paragraph of real text (the opening of a Python standard-library module's
docstring), an easy-VQA image, and the sentence that names what the image shows ("A red circle."), in
OBELICS's schema (``{"texts": [...], "images": [...]}``, one of the two null at each position). The text
after each image can only be written by looking at it. ``owl-lightning data interleaved [--out
data/interleaved]`` (after ``owl-lightning data``, whose easy-VQA captions it reads) writes::

    stage1/train-000000.tar, ...        OBELICS documents in WebDataset shards: KEY.json + KEY.{0,1,2}.png
    stage1/val-000000.tar               documents over the easy-VQA test images
    images/{train,val}/N.png            the images once more, as the image root of stage 2's documents
    stage2/documents_train.jsonl        one OBELICS document per line, its images paths under images/
    stage2/documents_val.jsonl

``data_manifests/interleaved_stage{1,2}.yaml`` train on them (docs/interleaved.md). Every image belongs to
one document; documents are drawn with a fixed seed, so the build is the same every time.
"""

from __future__ import annotations

import argparse
import json
import pydoc
import random
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds

from owl_lightning.apps.embedded import build_and_report, build_once

BUILD_VERSION = 1  # bump when the output changes, so existing builds are redone
IMAGES_PER_DOCUMENT = 3
PARAGRAPH_WORDS = 40
# Modules whose docstrings open with at least PARAGRAPH_WORDS words of prose; each document takes three.
PARAGRAPH_MODULES = (
    "json", "statistics", "argparse", "tempfile", "heapq", "csv", "random", "sqlite3", "difflib", "calendar",
    "unittest", "string", "socket", "pickle", "inspect", "re", "subprocess", "copy", "pprint", "doctest",
)  # fmt: skip
SEED = 0


@dataclass(frozen=True)
class CaptionedImage:
    """An easy-VQA image of the embedded stage-1 shards: its shard key, PNG bytes and caption."""

    key: str
    png: bytes
    caption: str


def paragraphs(modules: tuple[str, ...] = PARAGRAPH_MODULES) -> list[str]:
    """Real human-written text on every machine: the first ``PARAGRAPH_WORDS`` words of each module's docstring."""
    return [" ".join(pydoc.getdoc(__import__(name)).split()[:PARAGRAPH_WORDS]) for name in modules]


def captioned_images(shards: list[Path]) -> list[CaptionedImage]:
    """Every ``KEY.png`` + ``KEY.txt`` pair of the embedded stage-1 ``shards``, in shard order."""
    images = []
    for shard in shards:
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as tar:
            for member in tar:
                key, _, extension = member.name.partition(".")
                members.setdefault(key, {})[extension] = tar.extractfile(member).read()
        images += [CaptionedImage(key, sample["png"], sample["txt"].decode()) for key, sample in members.items()]
    return images


def documents(images: list[CaptionedImage], seed: int = SEED) -> list[list[str | CaptionedImage]]:
    """The images, shuffled by ``seed``, three to a document: ``[paragraph, image, "Its caption.", ...]``."""
    rng = random.Random(seed)
    order = images[:]
    rng.shuffle(order)
    texts = paragraphs()
    layouts = []
    for start in range(0, len(order) - IMAGES_PER_DOCUMENT + 1, IMAGES_PER_DOCUMENT):
        layout: list[str | CaptionedImage] = []
        for image in order[start : start + IMAGES_PER_DOCUMENT]:
            layout += [rng.choice(texts), image, f"{image.caption[:1].upper()}{image.caption[1:]}."]
        layouts.append(layout)
    return layouts


def obelics_record(layout: list[str | CaptionedImage], image_name: Callable[[CaptionedImage], str]) -> dict:
    """OBELICS's schema of one document; ``image_name(image)`` fills the ``images`` entries."""
    return {
        "texts": [piece if isinstance(piece, str) else None for piece in layout],
        "images": [None if isinstance(piece, str) else image_name(piece) for piece in layout],
    }


def write_document_shards(pattern: str, layouts: list[list[str | CaptionedImage]], per_shard: int) -> list[str]:
    """OBELICS documents as WebDataset shards (``KEY.json`` + ``KEY.k.png``); returns the shards written."""
    written: list[str] = []
    with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0, post=written.append, mtime=0) as writer:
        for index, layout in enumerate(layouts):
            images = [piece for piece in layout if not isinstance(piece, str)]
            record = obelics_record(layout, lambda image: f"https://example.invalid/easyvqa/{image.key}.png")
            writer.write(
                {"__key__": f"{index:09d}", "json": json.dumps(record), **{f"{k}.png": image.png for k, image in enumerate(images)}}
            )
    return written


def build_interleaved(out: str | Path = "data/interleaved", embedded: str | Path = "data/embedded") -> dict[str, int]:
    """Build the document set into ``out`` from the embedded build at ``embedded`` unless it is there; returns its counts."""
    stage1 = Path(embedded) / "stage1"
    splits = {"train": sorted(stage1.glob("train-*.tar")), "val": sorted(stage1.glob("val-*.tar"))}
    if not all(splits.values()):
        raise FileNotFoundError(f"no embedded stage-1 shards in {stage1}: build them first (owl-lightning data --out {embedded})")
    return build_once(out, {"version": BUILD_VERSION, "seed": SEED}, lambda root: _build_into(root, splits))


def _build_into(root: Path, splits: dict[str, list[Path]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    (root / "stage1").mkdir()
    (root / "stage2").mkdir()
    for split, shards in splits.items():
        layouts = documents(captioned_images(shards))
        written = write_document_shards(str(root / "stage1" / f"{split}-%06d.tar"), layouts, per_shard=500)
        image_dir = root / "images" / split
        image_dir.mkdir(parents=True)
        lines = []
        for layout in layouts:
            for piece in layout:
                if not isinstance(piece, str):
                    (image_dir / f"{piece.key}.png").write_bytes(piece.png)
            lines.append(json.dumps(obelics_record(layout, lambda image, folder=split: f"{folder}/{image.key}.png")))
        (root / "stage2" / f"documents_{split}.jsonl").write_text("\n".join(lines) + "\n")
        counts[f"{split}_documents"] = len(layouts)
        counts[f"stage1_{split}_shards"] = len(written)
    return counts


def main(argv: list[str] | None = None) -> None:
    """``owl-lightning data interleaved``: build the interleaved document set (skipped when built)."""
    parser = argparse.ArgumentParser(prog="owl-lightning data interleaved", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/interleaved", help="output folder (default: %(default)s)")
    parser.add_argument("--embedded", default="data/embedded", help="the embedded build it reads (default: %(default)s)")
    args = parser.parse_args(argv)
    build_and_report("interleaved documents", args.out, lambda: build_interleaved(args.out, args.embedded))


if __name__ == "__main__":
    main()
