"""The moving-shapes video task: a small embedded video set, generated offline and deterministically.

Each clip shows one coloured shape crossing a plain background in one direction. Its caption
("a red circle moving right") trains stage 1; questions about it (which way does it move? what shape?
what colour?) train stage 2. The direction is only visible across frames, and reversing a clip's frames
reverses it: a model that answers it reads the frames' order. ``owl-lightning data video [--out data/video]``
writes::

    stage1/train-{000000..000003}.tar   clip–caption pairs: KEY.mp4 (MPEG-4 Part 2) + KEY.txt + KEY.json
    stage1/val-000000.tar               the validation clips
    clips/{train,val,test}/N.mp4        the clips, as the video root of stage 2
    stage2/video_train.json             Video-ChatGPT: the three questions in a random order per clip
    stage2/video_val.json               the same over the validation clips
    stage2/video_test.json              single questions with question_type (direction, shape, colour)

Every colour × shape × direction appears in every split; clips differ by start position, speed, size
and background tint. The build is published atomically like the easy-VQA one
(:func:`~owl_lightning.apps.embedded.build_once`).
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import asdict, dataclass
from itertools import product
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw

from owl_lightning.apps.embedded import build_and_report, build_once
from owl_lightning.data.video import encode_clip

BUILD_VERSION = 1  # bump when the output changes, so existing builds are redone
FRAME_SIZE = 64  # small clips encode fast; the encoder's preprocessing resizes them
FRAMES = 8  # a second at 8 frames a second: 2× owl-smol's 4 sampled frames
FPS = 8
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (235, 195, 0)}
SHAPES = ("circle", "square", "triangle")
# Direction → unit step (x, y) in image coordinates (y grows downwards).
DIRECTIONS = {"right": (1, 0), "left": (-1, 0), "up": (0, -1), "down": (0, 1)}
QUESTIONS = {
    "direction": "Which way does the shape move?",
    "shape": "What shape is it?",
    "colour": "What colour is it?",
}
SHARDS = {"train": 4, "val": 1}


@dataclass(frozen=True)
class VideoSizes:
    """Clips per colour × shape × direction (48 combinations) in each split, and the seed of every draw."""

    train: int = 10
    val: int = 1
    test: int = 2
    seed: int = 0


@dataclass(frozen=True)
class Clip:
    colour: str
    shape: str
    direction: str
    radius: int
    start: float  # where on the moving axis it starts, as a share of the room
    cross: int  # its place on the other axis, in pixels
    background: tuple[int, int, int]

    def caption(self) -> str:
        return f"a {self.colour} {self.shape} moving {self.direction}"


def draw_clip(clip: Clip) -> list[np.ndarray]:
    """The clip's frames, uint8 ``[FRAME_SIZE, FRAME_SIZE, 3]`` each: the shape moves a fixed step a frame."""
    dx, dy = DIRECTIONS[clip.direction]
    low, high = clip.radius + 1, FRAME_SIZE - clip.radius - 2
    travel = (high - low) * (1 - clip.start)  # the shape starts `start` of the way along and reaches the far side
    frames = []
    for index in range(FRAMES):
        along = low + (high - low) * clip.start + travel * index / (FRAMES - 1)
        forward = along if dx + dy > 0 else FRAME_SIZE - 1 - along  # left and up run from the far side
        x, y = (forward, clip.cross) if dx else (clip.cross, forward)
        image = Image.new("RGB", (FRAME_SIZE, FRAME_SIZE), clip.background)
        _draw_shape(ImageDraw.Draw(image), clip.shape, x, y, clip.radius, COLOURS[clip.colour])
        frames.append(np.asarray(image))
    return frames


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, r: int, fill: tuple[int, int, int]) -> None:
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif shape == "square":
        draw.rectangle((x - r, y - r, x + r, y + r), fill=fill)
    else:
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)


def split_clips(split: str, per_combination: int, seed: int) -> list[Clip]:
    """``per_combination`` clips of every colour × shape × direction, drawn from ``(seed, split)``."""
    rng = random.Random(f"video/{seed}/{split}")
    clips = []
    for colour, shape, direction in product(COLOURS, SHAPES, DIRECTIONS):
        for _ in range(per_combination):
            radius = rng.randint(6, 9)
            tint = tuple(rng.randint(225, 250) for _ in range(3))
            clips.append(
                Clip(colour, shape, direction, radius, rng.uniform(0.0, 0.3), rng.randint(radius + 2, FRAME_SIZE - radius - 3), tint)
            )
    rng.shuffle(clips)
    return clips


def answers(clip: Clip) -> dict[str, str]:
    return {"direction": clip.direction, "shape": clip.shape, "colour": clip.colour}


def video_record(record_id: str, video: str, pairs: list[tuple[str, str]], **fields: object) -> dict:
    """One Video-ChatGPT record: ``<video>`` opens the first question."""
    turns = []
    for index, (question, answer) in enumerate(pairs):
        turns.append({"from": "human", "value": f"<video>\n{question}" if index == 0 else question})
        turns.append({"from": "gpt", "value": answer})
    return {"id": record_id, "video": video, "conversations": turns, **fields}


def build_video(out: str | Path = "data/video", sizes: VideoSizes = VideoSizes()) -> dict[str, int]:
    """Build the moving-shapes set into ``out`` unless a build of this version and these sizes is there; returns its counts."""
    return build_once(out, {"version": BUILD_VERSION, **asdict(sizes)}, lambda root: _build_into(root, sizes))


def _build_into(root: Path, sizes: VideoSizes) -> dict[str, int]:
    counts: dict[str, int] = {}
    rng = random.Random(f"video/{sizes.seed}/questions")
    (root / "stage1").mkdir()
    (root / "stage2").mkdir()
    for split in ("train", "val", "test"):
        clips = split_clips(split, getattr(sizes, split), sizes.seed)
        clip_dir = root / "clips" / split
        clip_dir.mkdir(parents=True)
        encoded = []
        for index, clip in enumerate(clips):
            data = encode_clip(draw_clip(clip), fps=FPS)
            (clip_dir / f"{index}.mp4").write_bytes(data)
            encoded.append(data)
        counts[f"clips_{split}"] = len(clips)
        if split in SHARDS:
            per_shard = -(-len(clips) // SHARDS[split])
            written: list[str] = []
            # A fixed mtime makes the tars byte-identical from build to build.
            with wds.ShardWriter(
                str(root / "stage1" / f"{split}-%06d.tar"), maxcount=per_shard, verbose=0, post=written.append, mtime=0
            ) as writer:
                for index, (clip, data) in enumerate(zip(clips, encoded)):
                    metadata = json.dumps({"caption": clip.caption(), **asdict(clip)})
                    writer.write({"__key__": f"{index:09d}", "mp4": data, "txt": clip.caption(), "json": metadata})
            counts[f"stage1_{split}_shards"] = len(written)
        if split == "test":
            records = [
                video_record(
                    f"video-test-{index}-{kind}", f"{split}/{index}.mp4", [(QUESTIONS[kind], answers(clip)[kind])], question_type=kind
                )
                for index, clip in enumerate(clips)
                for kind in QUESTIONS
            ]
        else:
            records = [
                video_record(f"video-{split}-{index}", f"{split}/{index}.mp4", rng.sample(pairs, len(pairs)))
                for index, clip in enumerate(clips)
                for pairs in [[(QUESTIONS[kind], answer) for kind, answer in answers(clip).items()]]
            ]
        (root / "stage2" / f"video_{split}.json").write_text(json.dumps(records, indent=1))
        counts[f"video_{split}_records"] = len(records)
    return counts


def main(argv: list[str] | None = None) -> None:
    """``owl-lightning data video``: build the moving-shapes video set (skipped when built)."""
    defaults = VideoSizes()
    parser = argparse.ArgumentParser(prog="owl-lightning data video", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/video", help="output folder (default: %(default)s)")
    for split in ("train", "val", "test"):
        parser.add_argument(
            f"--{split}-per-combination",
            type=int,
            default=getattr(defaults, split),
            help=f"{split} clips per colour × shape × direction (default: %(default)s)",
        )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="draws every clip and question order (default: %(default)s)")
    args = parser.parse_args(argv)
    sizes = VideoSizes(args.train_per_combination, args.val_per_combination, args.test_per_combination, args.seed)
    build_and_report("moving-shapes clips", args.out, lambda: build_video(args.out, sizes))


if __name__ == "__main__":
    main()
