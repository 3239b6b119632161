"""Data manifests: what a run reads, with mixing weights (``data_manifests/*.yaml``).

A manifest has a ``train`` and an optional ``val`` list of sources. Relative paths resolve
against the folder holding the manifest, so a manifest works from any working directory::

    train:
      - name: laion                      # shown in logs and TensorBoard (data/share/laion)
        shards: /data/laion/{00000..41407}.tar   # stage 1: anything webdataset accepts
        weight: 0.5
        num_samples: 400000000           # optional, for epoch length and logging
        image_key: jpg;png;webp          # img2dataset's layout
        caption_key: txt                 # or json:caption (a field of the .json member)
      - name: mmc4                       # stage 1: interleaved image-text documents (docs/interleaved.md)
        shards: /data/mmc4/{00000..23098}.tar
        format: mmc4                     # captions (default) | mmc4 | obelics
        max_images: 6                    # image slots kept per document, in document order
        weight: 0.5
      - name: webvid                     # stage 1: video clips with captions (docs/video.md)
        shards: /data/webvid/{00000..09999}.tar
        format: video                    # KEY.mp4 (or webm, mkv, mov, gif) + KEY.txt
      - name: llava                      # stage 2: an instruction file
        format: llava                    # llava | alpaca | sharegpt | owl_jsonl | video_chatgpt
        path: /data/llava/llava_instruct_150k.json
        image_root: /data/coco/train2017
        weight: 0.5
      - name: videochatgpt               # stage 2: conversations about clips (docs/video.md)
        format: video_chatgpt
        path: /data/videochatgpt/videochatgpt_instruct.json
        video_root: /data/activitynet/videos
      - name: obelics                    # stage 2: interleaved documents, one per line (docs/interleaved.md)
        format: obelics                  # or mmc4
        path: /data/obelics/docs.jsonl
        image_root: /data/obelics/images
        max_images: 6
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import yaml

# The last two: interleaved image–text documents, one per line (docs/interleaved.md).
INSTRUCTION_FORMATS = ("llava", "alpaca", "sharegpt", "owl_jsonl", "video_chatgpt", "mmc4", "obelics")
# Instruction formats whose media are video clips (read from the source's video_root).
VIDEO_INSTRUCTION_FORMATS = ("video_chatgpt",)
# What one sample of a shard source is: an image and its caption, an interleaved document (its .json
# member in MMC4's or OBELICS's schema, its images as members KEY.0.jpg, KEY.1.png, ...), or a video clip
# and its caption.
SHARD_FORMATS = ("captions", "mmc4", "obelics", "video")


@dataclass
class ShardSource:
    """WebDataset shards of image–caption pairs, interleaved documents or video clips with captions (stage 1).

    ``image_key``: the image extensions tried, in order (a document's k-th image: ``k.jpg``, ``k.png``, ...);
    ``video_key``: ``format: video`` only, the clip's extensions tried, in order;
    ``caption_key``: captions and clips; ``max_images``: documents only, image slots kept per document (the
    first ones in document order; later ones are dropped and counted as ``over_max_images``).
    """

    name: str
    shards: str
    weight: float = 1.0
    num_samples: int | None = None
    image_key: str = "jpg;png;webp"
    caption_key: str = "txt"
    format: str = "captions"
    max_images: int = 6
    video_key: str = "mp4;webm;mkv;mov;gif"


@dataclass
class InstructionSource:
    """An instruction file in one of the formats users already have (stage 2). Its records' image paths are
    relative to ``image_root``, its clips' (``format: video_chatgpt``) to ``video_root``. ``max_images``: the
    document formats only, as for a :class:`ShardSource`."""

    name: str
    format: str
    path: str
    weight: float = 1.0
    image_root: str | None = None
    num_samples: int | None = None  # read at most this many records (None: all)
    video_root: str | None = None
    max_images: int = 6

    @property
    def media_root(self) -> str | None:
        """Where the records' media are: ``video_root`` for a video format, else ``image_root``."""
        return self.video_root if self.format in VIDEO_INSTRUCTION_FORMATS else self.image_root


@dataclass
class Manifest:
    path: Path
    train: list
    val: list


def _resolve_path(value: str, base: Path) -> str:
    if "://" in value or value.startswith("pipe:") or Path(value).is_absolute():
        return value
    return str((base / value).resolve())


def _parse_source(raw: dict, base: Path, where: str) -> ShardSource | InstructionSource:
    if not isinstance(raw, dict) or "name" not in raw:
        raise ValueError(f"{where}: each source must be a mapping with at least 'name', got {raw!r}")
    kind = ShardSource if "shards" in raw else InstructionSource
    known = {f.name for f in fields(kind)}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"{where}: source {raw['name']!r} has unknown keys {sorted(unknown)}; known: {sorted(known)}")
    try:
        source = kind(**raw)
    except TypeError as err:
        raise ValueError(f"{where}: source {raw['name']!r}: {err}") from None
    if source.weight <= 0:
        raise ValueError(f"{where}: source {source.name!r} needs a positive weight, got {source.weight}")
    if isinstance(source.max_images, bool) or not isinstance(source.max_images, int) or source.max_images < 1:
        raise ValueError(f"{where}: source {source.name!r} needs max_images of at least 1, got {source.max_images!r}")
    if isinstance(source, ShardSource):
        if source.format not in SHARD_FORMATS:
            raise ValueError(f"{where}: shard source {source.name!r} has format {source.format!r}; use one of {SHARD_FORMATS}")
        source.shards = _resolve_path(source.shards, base)
    else:
        if source.format not in INSTRUCTION_FORMATS:
            raise ValueError(f"{where}: source {source.name!r} has format {source.format!r}; use one of {INSTRUCTION_FORMATS}")
        source.path = _resolve_path(source.path, base)
        if source.image_root is not None:
            source.image_root = _resolve_path(source.image_root, base)
        if source.video_root is not None:
            source.video_root = _resolve_path(source.video_root, base)
    return source


def load_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data manifest {path} not found (see data_manifests/ for examples)")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict) or not raw.get("train"):
        raise ValueError(f"{path}: a manifest needs a non-empty 'train' list of sources")
    base = path.parent
    splits = {}
    for split in ("train", "val"):
        splits[split] = [_parse_source(s, base, f"{path} [{split}][{i}]") for i, s in enumerate(raw.get(split) or [])]
    return Manifest(path=path, train=splits["train"], val=splits["val"])
