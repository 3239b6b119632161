"""The scenes task: a harder embedded task than easy-VQA, generated offline and deterministically.

Each 128×128 scene holds 2–5 coloured shapes (distinct colour–shape pairs, two sizes, no overlap) and
one short rendered word. From each scene's specification come its stage-1 caption and its stage-2
questions: counting, spatial relations, colour–shape binding, reading the word (OCR), and questions
over two scenes at once. ``owl-lightning data scenes [--out data/scenes]`` writes::

    stage1/train-{000000..000007}.tar   8,000 scene–caption pairs in img2dataset's layout
    stage1/val-{000000..000003}.tar     500 (the validation scenes)
    images/{train,val,test}/N.png       the scenes, as the image root of stage 2
    specs/{train,val,test}.json         every scene's objects, sizes, centres and word: the ground truth
    stage2/scenes_train.json            LLaVA: up to 3 questions per conversation, and two-image questions
    stage2/scenes_val.json              the same over the validation scenes
    stage2/scenes_test.json             LLaVA: single one-image questions with question_type and held_out
    stage2/scenes_test_heldout.json     those on compositions never seen in training
    stage2/scenes_test_two_image.json   LLaVA: single two-image questions, with question_type and held_out

The split is by scene, and some compositions exist only in the test scenes and questions
(:data:`HELDOUT_PAIRS`, :data:`HELDOUT_VERTICAL`; docs/scenes.md has the rule and the counts). The build
is published atomically like the easy-VQA one (:func:`~owl_lightning.apps.embedded.build_once`).
"""

from __future__ import annotations

import argparse
import io
import json
import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from owl_lightning.apps.embedded import ShardSample, build_and_report, build_once, llava_record, multi_turn_records, write_shards

BUILD_VERSION = 1  # bump when the output changes, so existing builds are redone
IMAGE_SIZE = 128  # owl-smol's input size: the scenes reach the encoder unresized
BACKGROUND = (245, 245, 245)
INK = (20, 20, 20)  # the word's colour: no shape's, so the word never counts as a shape

# Saturated and far apart, so that no two are confused after the encoder's resize and normalisation.
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 195, 0),
    "purple": (140, 50, 170),
}
SHAPES = ("circle", "square", "triangle", "diamond")
# Half the side of a shape's bounding box, in pixels: small shapes still cover several encoder
# pixels per feature cell (owl-smol sees 128×128 as 4×4 cells of 32 pixels).
SIZES = {"small": 9, "large": 15}
MIN_OBJECTS, MAX_OBJECTS = 2, 5
PLACEMENT_TRIES = 50  # places tried for one shape before the whole scene is redrawn
GAP = 4  # the least distance between two bounding boxes' edges (3 free pixels), so shapes never touch
# Nouns of 2–5 letters that are neither a colour, a shape nor an answer word of another question type.
WORDS = (
    "GO", "HI", "OX", "UP",
    "BOX", "BUS", "CAT", "CUP", "DOG", "HAT", "KEY", "MAP", "PEN", "SUN",
    "BIRD", "BOOK", "CAKE", "DOOR", "FISH", "LAMP", "MOON", "SHIP", "TREE",
    "APPLE", "CLOCK", "HOUSE", "PLANT", "TRAIN",
)  # fmt: skip
WORD_FONT_SIZE = 20  # Pillow's built-in font (no font files needed) at ~14-pixel capitals
NUMBERS = ("zero", "one", "two", "three", "four", "five")  # words: the VQA scorer keeps letters only

# Held-out compositions. No train or validation scene holds an object with one of these
# colour–shape pairs; test scenes draw from all 20. Each colour but purple and each shape loses one
# partner, so every colour and shape is still seen in training, only never together.
HELDOUT_PAIRS = frozenset({("red", "triangle"), ("green", "diamond"), ("blue", "circle"), ("yellow", "square")})
# Above/below between these shapes is never asked in training (their left/right is, and so is
# above/below between every other pair): test questions ask it.
HELDOUT_VERTICAL = frozenset({frozenset({"circle", "square"}), frozenset({"triangle", "diamond"})})
# A spatial question is asked only about centres at least this far apart on its axis: nearer, "left
# of" is a matter of opinion.
RELATION_MARGIN = 10
RELATIONS = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}  # (axis, sign)
VERTICAL = ("above", "below")

# Questions sampled per train/validation scene, by type, among those its scene can answer.
QUESTIONS_PER_SCENE = {"count": 2, "binding": 2, "spatial": 2, "ocr": 1}
QUESTION_TYPES = (*QUESTIONS_PER_SCENE, "two_image")
# Share of test questions drawn, where the scene allows, among those on a held-out composition.
HELDOUT_SHARE = 0.5
PARTNER_TRIES = 400  # scenes tried as the second image before falling back to any answerable pair
# Stage-1 shards per split, whatever its size (the manifests name them). Validation reads whole shards,
# one reader each: 4 serve the 2-rank × 2-worker CPU setup; training resamples, 8 is plenty.
SHARDS = {"train": 8, "val": 4}


@dataclass(frozen=True)
class SceneSizes:
    """How many scenes each split holds, and the seed they are drawn from.

    The defaults fit the default recipe's ~30 CPU minutes: its stage 1 reads 300 × 32 = 9,600 captions,
    each of 8,000 training scenes about once (nothing to memorise, nothing unread), and 1,000 test scenes
    give 1,000 questions per type (a 95% interval of about ±2 points). docs/scenes.md has the reasoning.
    """

    train: int = 8000
    val: int = 500
    test: int = 1000
    seed: int = 0


@dataclass(frozen=True)
class SceneObject:
    """One shape: its colour, kind, size name and the centre of its bounding box, in pixels."""

    colour: str
    shape: str
    size: str
    x: int
    y: int

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def box(self) -> tuple[int, int, int, int]:
        half = SIZES[self.size]
        return (self.x - half, self.y - half, self.x + half, self.y + half)


@dataclass(frozen=True)
class Scene:
    """A scene's full specification: its objects (distinct colour–shape pairs) and its word, whose
    rendered bounding box is ``word_box``. Everything a caption or an answer says comes from here."""

    objects: tuple[SceneObject, ...]
    word: str
    word_box: tuple[int, int, int, int]

    def to_json(self) -> dict:
        return {"objects": [asdict(obj) for obj in self.objects], "word": self.word, "word_box": list(self.word_box)}

    @classmethod
    def from_json(cls, spec: dict) -> Scene:
        return cls(tuple(SceneObject(**obj) for obj in spec["objects"]), spec["word"], tuple(spec["word_box"]))


@dataclass(frozen=True)
class Question:
    """A question with its one-word answer, its ``question_type`` and whether it is on a held-out composition."""

    text: str
    answer: str
    kind: str
    held_out: bool = False


# ---------------------------------------------------------------------------------------------
# Scenes: sampling and rendering


@cache
def _font() -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=WORD_FONT_SIZE)


def _word_extent(word: str) -> tuple[int, int, int, int]:
    """The word's ink box relative to where it is drawn (the font's bearing and ascent included)."""
    return ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), word, font=_font())


def _apart(box: tuple[int, int, int, int], others: list[tuple[int, int, int, int]]) -> bool:
    return all(box[2] + GAP <= o[0] or o[2] + GAP <= box[0] or box[3] + GAP <= o[1] or o[3] + GAP <= box[1] for o in others)


def sample_scene(rng: random.Random, pairs: list[tuple[str, str]]) -> Scene:
    """A scene of 2–5 objects with distinct colour–shape ``pairs`` and one word, nothing overlapping."""
    while True:  # a crowded draw that leaves no room is redrawn whole: rare, and keeps the layout uniform
        word = rng.choice(WORDS)
        left, top, right, bottom = _word_extent(word)
        x = rng.randint(GAP - left, IMAGE_SIZE - GAP - right)
        y = rng.randint(GAP - top, IMAGE_SIZE - GAP - bottom)
        word_box = (x + left, y + top, x + right, y + bottom)
        boxes = [word_box]
        objects = []
        for colour, shape in rng.sample(pairs, rng.randint(MIN_OBJECTS, MAX_OBJECTS)):
            size = rng.choice(list(SIZES))
            half = SIZES[size]
            for _ in range(PLACEMENT_TRIES):
                obj = SceneObject(
                    colour, shape, size, rng.randint(GAP + half, IMAGE_SIZE - GAP - half), rng.randint(GAP + half, IMAGE_SIZE - GAP - half)
                )
                if _apart(obj.box, boxes):
                    boxes.append(obj.box)
                    objects.append(obj)
                    break
            else:
                break
        else:
            return Scene(tuple(objects), word, word_box)


def render(scene: Scene) -> bytes:
    """The scene as PNG bytes: lossless, shapes without anti-aliasing (their colours exact), the word in
    Pillow's built-in font."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        left, top, right, bottom = obj.box
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse(obj.box, fill=fill)
        elif obj.shape == "square":
            draw.rectangle(obj.box, fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([(obj.x, top), (right, bottom), (left, bottom)], fill=fill)
        else:
            draw.polygon([(obj.x, top), (right, obj.y), (obj.x, bottom), (left, obj.y)], fill=fill)
    left, top = _word_extent(scene.word)[:2]
    draw.text((scene.word_box[0] - left, scene.word_box[1] - top), scene.word, font=_font(), fill=INK)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _place(x: float, y: float) -> str:
    """Where a centre lies, by thirds of the image: "at the top left", "in the middle", ..."""
    row = ("top", "middle", "bottom")[min(int(3 * y / IMAGE_SIZE), 2)]
    column = ("left", "centre", "right")[min(int(3 * x / IMAGE_SIZE), 2)]
    if (row, column) == ("middle", "centre"):
        return "in the middle"
    if row == "middle":
        return f"on the {column}"
    return f"at the {row}" if column == "centre" else f"at the {row} {column}"


def caption(scene: Scene) -> str:
    """Every object left to right, then the word: "a large red circle at the top left, a small blue square
    on the right and ...; the word CAT at the bottom"."""
    described = [f"a {obj.size} {obj.name} {_place(obj.x, obj.y)}" for obj in sorted(scene.objects, key=lambda o: (o.x, o.y))]
    listed = ", ".join(described[:-1]) + f" and {described[-1]}"
    left, top, right, bottom = scene.word_box
    return f"{listed}; the word {scene.word} {_place((left + right) / 2, (top + bottom) / 2)}"


# ---------------------------------------------------------------------------------------------
# Questions on one scene


def _plural(shape: str) -> str:
    return f"{shape}s"


def _is_held_out(objects: Iterable[SceneObject]) -> bool:
    return any((obj.colour, obj.shape) in HELDOUT_PAIRS for obj in objects)


def _holds(a: SceneObject, relation: str, b: SceneObject) -> bool | None:
    """Whether ``a`` is ``relation`` ``b``; None when their centres are too close on that axis to say."""
    axis, sign = RELATIONS[relation]
    offset = sign * ((a.x, a.y)[axis] - (b.x, b.y)[axis])
    return True if offset >= RELATION_MARGIN else False if offset <= -RELATION_MARGIN else None


def _vertical_held_out(relation: str, a: SceneObject, b: SceneObject) -> bool:
    return relation in VERTICAL and frozenset({a.shape, b.shape}) in HELDOUT_VERTICAL


def count_questions(scene: Scene) -> list[Question]:
    """How many shapes of each colour and kind there are (present ones, and one absent of each), and in all."""
    objects = scene.objects
    questions = [Question("How many shapes are there?", NUMBERS[len(objects)], "count", _is_held_out(objects))]
    for vocabulary, attribute, noun in ((tuple(COLOURS), "colour", "{} shapes"), (SHAPES, "shape", None)):
        present = sorted({getattr(obj, attribute) for obj in objects}, key=vocabulary.index)
        absent = [value for value in vocabulary if value not in present]
        for value in present + absent[:1]:
            counted = [obj for obj in objects if getattr(obj, attribute) == value]
            what = noun.format(value) if noun else _plural(value)
            questions.append(Question(f"How many {what} are there?", NUMBERS[len(counted)], "count", _is_held_out(counted)))
    return questions


def binding_questions(scene: Scene) -> list[Question]:
    """Colour–shape binding: the colour of a shape that is alone of its kind, the shape of a colour that is
    alone, and "is there a red circle?" — yes for each object, no for a colour and a shape that are
    both in the scene but not together."""
    questions = []
    by_shape = Counter(obj.shape for obj in scene.objects)
    by_colour = Counter(obj.colour for obj in scene.objects)
    present = {(obj.colour, obj.shape) for obj in scene.objects}
    for obj in scene.objects:
        held_out = _is_held_out([obj])
        if by_shape[obj.shape] == 1:
            questions.append(Question(f"What colour is the {obj.shape}?", obj.colour, "binding", held_out))
        if by_colour[obj.colour] == 1:
            questions.append(Question(f"What shape is {obj.colour}?", obj.shape, "binding", held_out))
        questions.append(Question(f"Is there a {obj.name}?", "yes", "binding", held_out))
    for colour in sorted(by_colour, key=list(COLOURS).index):
        for shape in sorted(by_shape, key=SHAPES.index):
            if (colour, shape) not in present:
                questions.append(Question(f"Is there a {colour} {shape}?", "no", "binding", (colour, shape) in HELDOUT_PAIRS))
    return questions


def spatial_questions(scene: Scene) -> list[Question]:
    """ "Is the red circle left of the blue square?" for every ordered pair whose centres are clearly
    apart on that axis, and "What shape is above the green triangle?" where exactly one object is
    clearly above it and none is level with it."""
    questions = []
    for a in scene.objects:
        for b in scene.objects:
            if a is b:
                continue
            for relation in RELATIONS:
                holds = _holds(a, relation, b)
                if holds is not None:
                    held_out = _is_held_out([a, b]) or _vertical_held_out(relation, a, b)
                    text = f"Is the {a.name} {relation} the {b.name}?"
                    questions.append(Question(text, "yes" if holds else "no", "spatial", held_out))
    for b in scene.objects:
        for relation in RELATIONS:
            others = [a for a in scene.objects if a is not b]
            related = [a for a in others if _holds(a, relation, b)]
            if len(related) == 1 and all(_holds(a, relation, b) is not None for a in others):
                (a,) = related
                held_out = _is_held_out([a, b]) or _vertical_held_out(relation, a, b)
                questions.append(Question(f"What shape is {relation} the {b.name}?", a.shape, "spatial", held_out))
    return questions


def scene_questions(scene: Scene) -> dict[str, list[Question]]:
    """Every question the scene answers unambiguously, by ``question_type`` (two-image ones apart)."""
    return {
        "count": count_questions(scene),
        "binding": binding_questions(scene),
        "spatial": spatial_questions(scene),
        "ocr": [Question("What word is written in the image?", scene.word.lower(), "ocr")],
    }


# ---------------------------------------------------------------------------------------------
# Questions on two scenes


def _more(first: Scene, second: Scene) -> list[Question]:
    """ "Which image has more red shapes / circles / shapes?" wherever the two counts differ."""
    questions = []
    filters = [("shapes", lambda obj: True)]
    filters += [(f"{colour} shapes", lambda obj, c=colour: obj.colour == c) for colour in COLOURS]
    filters += [(_plural(shape), lambda obj, s=shape: obj.shape == s) for shape in SHAPES]
    for what, keep in filters:
        counted = [[obj for obj in scene.objects if keep(obj)] for scene in (first, second)]
        if len(counted[0]) != len(counted[1]):
            answer = "first" if len(counted[0]) > len(counted[1]) else "second"
            text = f"Which image has more {what}, the first or the second?"
            questions.append(Question(text, answer, "two_image", _is_held_out(counted[0] + counted[1])))
    return questions


def _which_has(first: Scene, second: Scene) -> list[Question]:
    """ "Which image has a red circle?" for every colour–shape pair in exactly one of them."""
    names = [{(obj.colour, obj.shape) for obj in scene.objects} for scene in (first, second)]
    return [
        Question(
            f"Which image has a {colour} {shape}, the first or the second?",
            "first" if (colour, shape) in names[0] else "second",
            "two_image",
            (colour, shape) in HELDOUT_PAIRS,
        )
        for colour, shape in sorted(names[0] ^ names[1])
    ]


def _same_word(first: Scene, second: Scene) -> list[Question]:
    return [Question("Is the same word written in both images?", "yes" if first.word == second.word else "no", "two_image")]


def _same_colour(first: Scene, second: Scene) -> list[Question]:
    """ "Are the circles in the two images the same colour?" for every shape alone of its kind in each."""
    questions = []
    for shape in SHAPES:
        alone = [[obj for obj in scene.objects if obj.shape == shape] for scene in (first, second)]
        if all(len(objects) == 1 for objects in alone):
            (a,), (b,) = alone
            text = f"Are the {_plural(shape)} in the two images the same colour?"
            questions.append(Question(text, "yes" if a.colour == b.colour else "no", "two_image", _is_held_out([a, b])))
    return questions


# The forms of two-image question, and the answers each can have.
PAIR_FORMS = {
    _more: ("first", "second"),
    _which_has: ("first", "second"),
    _same_word: ("yes", "no"),
    _same_colour: ("yes", "no"),
}


def _pair_question(first: int, scenes: list[Scene], rng: random.Random, allow_held_out: bool) -> tuple[int, Question]:
    """A second scene and a question on the two: the form and the answer are drawn first, then scenes
    are tried until one gives that answer, so yes/no and first/second come out balanced."""
    form = rng.choice(list(PAIR_FORMS))
    answer = rng.choice(PAIR_FORMS[form])
    fallback = None
    for _ in range(PARTNER_TRIES):
        second = rng.randrange(len(scenes))
        if second == first:
            continue
        usable = [q for q in form(scenes[first], scenes[second]) if allow_held_out or not q.held_out]
        matching = [q for q in usable if q.answer == answer]
        if matching:
            return second, rng.choice(matching)
        if fallback is None:  # a scene may rule the form out (no shape alone of its kind): any question will do
            fallback = (second, rng.choice(usable or _same_word(scenes[first], scenes[second])))
    if fallback is None:
        raise ValueError(f"the split has no scene besides scene {first} to pair it with: build it with more scenes")
    return fallback


# ---------------------------------------------------------------------------------------------
# Splits and the build


def _allowed_pairs(split: str) -> list[tuple[str, str]]:
    pairs = [(colour, shape) for colour in COLOURS for shape in SHAPES]
    return pairs if split == "test" else [pair for pair in pairs if pair not in HELDOUT_PAIRS]


def _scene_rng(seed: int, split: str, index: int) -> random.Random:
    """One generator per scene (string seeds hash stably): scene N is the same whatever the split's size."""
    return random.Random(f"scenes/{seed}/{split}/{index}")


def split_scenes(split: str, count: int, seed: int = 0) -> list[Scene]:
    """The ``count`` scenes of ``split`` (``"train"``, ``"val"`` or ``"test"``); only test holds :data:`HELDOUT_PAIRS`."""
    pairs = _allowed_pairs(split)
    return [sample_scene(_scene_rng(seed, split, index), pairs) for index in range(count)]


def _training_records(split: str, scenes: list[Scene], rng: random.Random) -> list[dict]:
    """Multi-turn conversations of each scene's sampled questions, then one two-image question per scene."""
    items = []
    for index, scene in enumerate(scenes):
        by_type = scene_questions(scene)
        chosen = []
        for kind, count in QUESTIONS_PER_SCENE.items():
            seen = [q for q in by_type[kind] if not q.held_out]  # held-out relations stay out of training
            chosen += rng.sample(seen, min(count, len(seen)))
        items.append((f"scenes-{split}-{index}", f"{split}/{index}.png", [(q.text, q.answer) for q in chosen]))
    records = multi_turn_records(items, rng)
    for index in range(len(scenes)):
        second, question = _pair_question(index, scenes, rng, allow_held_out=False)
        records.append(
            llava_record(
                f"scenes-{split}-{index}-pair", [f"{split}/{index}.png", f"{split}/{second}.png"], [(question.text, question.answer)]
            )
        )
    return records


def _test_records(scenes: list[Scene], rng: random.Random) -> list[dict]:
    """One question of each type per test scene, on a held-out composition :data:`HELDOUT_SHARE` of the
    time where the scene has one; the two-image question pairs the scene with another test scene."""
    records = []
    for index, scene in enumerate(scenes):
        image = f"test/{index}.png"
        for kind, candidates in scene_questions(scene).items():
            # Never both empty: every scene has a count, a binding and an OCR question, and two shapes kept
            # apart differ by 2 × 9 + GAP pixels on some axis, more than RELATION_MARGIN: a spatial one.
            held_out = [q for q in candidates if q.held_out]
            seen = [q for q in candidates if not q.held_out]
            prefer_held_out = held_out and (not seen or rng.random() < HELDOUT_SHARE)
            question = rng.choice(held_out if prefer_held_out else seen)
            records.append(_test_record(f"scenes-test-{index}-{kind}", image, question))
        second, question = _pair_question(index, scenes, rng, allow_held_out=True)
        records.append(_test_record(f"scenes-test-{index}-pair", [image, f"test/{second}.png"], question))
    return records


def _test_record(record_id: str, image: str | list[str], question: Question) -> dict:
    return llava_record(record_id, image, [(question.text, question.answer)], question_type=question.kind, held_out=question.held_out)


def build_scenes(out: str | Path = "data/scenes", sizes: SceneSizes = SceneSizes()) -> dict[str, int]:
    """Build the scenes task into ``out`` unless a build of this version and these sizes is there; returns its counts."""
    return build_once(out, {"version": BUILD_VERSION, **asdict(sizes)}, lambda root: _build_into(root, sizes))


def _build_into(root: Path, sizes: SceneSizes) -> dict[str, int]:
    counts: dict[str, int] = {}
    splits = {split: split_scenes(split, getattr(sizes, split), sizes.seed) for split in ("train", "val", "test")}
    (root / "stage1").mkdir()
    (root / "specs").mkdir()
    for split, scenes in splits.items():
        image_dir = root / "images" / split
        image_dir.mkdir(parents=True)
        samples = []
        for index, scene in enumerate(scenes):
            png = render(scene)
            (image_dir / f"{index}.png").write_bytes(png)
            samples.append(ShardSample(f"{index:09d}", png, caption(scene), {"scene": scene.to_json()}))
        specs = [{"image": f"{split}/{index}.png", **scene.to_json()} for index, scene in enumerate(scenes)]
        (root / "specs" / f"{split}.json").write_text(json.dumps(specs, indent=1))
        counts[f"images_{split}"] = len(scenes)
        if split in SHARDS:
            per_shard = -(-len(scenes) // SHARDS[split])  # rounded up: never one shard too many
            shards = write_shards(str(root / "stage1" / f"{split}-%06d.tar"), per_shard, samples)
            counts[f"stage1_{split}_shards"] = len(shards)
            counts[f"stage1_{split}_samples"] = len(samples)

    stage2 = root / "stage2"
    stage2.mkdir()
    rng = random.Random(f"scenes/{sizes.seed}/questions")
    test = _test_records(splits["test"], rng)
    one_image = [record for record in test if record["question_type"] != "two_image"]
    outputs = {
        "scenes_train": _training_records("train", splits["train"], rng),
        "scenes_val": _training_records("val", splits["val"], rng),
        # The two-image questions apart: a scorer that opens one image per question (owl-lightning eval's
        # easy-VQA task) reads the others as they are.
        "scenes_test": one_image,
        "scenes_test_heldout": [record for record in one_image if record["held_out"]],
        "scenes_test_two_image": [record for record in test if record["question_type"] == "two_image"],
    }
    for name, records in outputs.items():
        (stage2 / f"{name}.json").write_text(json.dumps(records, indent=1))
        counts[f"{name}_records"] = len(records)
    for kind in QUESTION_TYPES:
        counts[f"test_{kind}"] = sum(record["question_type"] == kind for record in test)
        counts[f"test_{kind}_held_out"] = sum(record["question_type"] == kind and record["held_out"] for record in test)
    counts["train_turns"] = sum(len(record["conversations"]) // 2 for record in outputs["scenes_train"])
    return counts


def main(argv: list[str] | None = None) -> None:
    """``owl-lightning data scenes``: build the scenes task (skipped when built)."""
    defaults = SceneSizes()
    parser = argparse.ArgumentParser(prog="owl-lightning data scenes", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/scenes", help="output folder (default: %(default)s)")
    for split in ("train", "val", "test"):
        parser.add_argument(f"--{split}-scenes", type=int, default=getattr(defaults, split), help=f"{split} scenes (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="draws every scene and question (default: %(default)s)")
    args = parser.parse_args(argv)
    sizes = SceneSizes(args.train_scenes, args.val_scenes, args.test_scenes, args.seed)
    build_and_report("scenes", args.out, lambda: build_scenes(args.out, sizes))


if __name__ == "__main__":
    main()
