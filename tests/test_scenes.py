"""The scenes task (apps/scenes.py) on a small build: deterministic, right by construction, held-out
compositions where the docs say, and readable by both stages' real data pipelines.

Answers are re-derived here from the written scene specifications with the test's own rules, and
the specifications are checked against the rendered pixels: the generator is not its own oracle.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
import yaml
from PIL import Image

from owl_lightning.apps import scenes
from owl_lightning.apps.eval.benchmarks import Answered
from owl_lightning.apps.eval.benchmarks.easy_vqa import Scenes
from owl_lightning.apps.eval.benchmarks.harness import read_questions, run_task
from owl_lightning.cli import main as cli_main
from owl_lightning.config import get_config
from owl_lightning.data.health import SkipLog
from owl_lightning.data.instruct import read_conversations
from owl_lightning.data.manifest import load_manifest
from owl_lightning.data.processor import OwlProcessor
from owl_lightning.inference import OwlAssistant
from owl_lightning.train.datamodules import CaptionDataModule, InstructionDataModule

ROOT = Path(__file__).resolve().parents[1]
SMALL = scenes.SceneSizes(train=48, val=8, test=40)
NUMBER = {word: value for value, word in enumerate(("zero", "one", "two", "three", "four", "five"))}
MARGIN = 10  # docs/scenes.md: relations are asked only about centres this far apart on their axis


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scenes") / "scenes"
    scenes.build_scenes(out, SMALL)
    return out


def files_of(folder: Path) -> dict[str, bytes]:
    folder = folder.resolve()  # the build is published as a link to its hidden folder
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def load(build: Path, name: str) -> list[dict]:
    return json.loads((build / name).read_text())


def specs_by_image(build: Path) -> dict[str, dict]:
    return {spec["image"]: spec for split in ("train", "val", "test") for spec in load(build, f"specs/{split}.json")}


TEST_FILES = ("scenes_test", "scenes_test_two_image")


def load_test(build: Path) -> list[dict]:
    """Every test question: the one-image ones, then the two-image ones."""
    return [record for name in TEST_FILES for record in load(build, f"stage2/{name}.json")]


def qa_pairs(record: dict) -> list[tuple[str, str]]:
    turns = record["conversations"]
    return [(turns[i]["value"].replace("<image>\n", ""), turns[i + 1]["value"]) for i in range(0, len(turns), 2)]


# -- the test's own answers, from a specification's plain JSON ---------------------------------------


def offset(a: dict, b: dict, relation: str) -> int:
    """How far ``a`` is in ``relation`` to ``b``, in pixels (negative: the other way)."""
    axis, sign = {"left of": ("x", -1), "right of": ("x", 1), "above": ("y", -1), "below": ("y", 1)}[relation]
    return sign * (a[axis] - b[axis])


def find(objects: list[dict], colour: str | None = None, shape: str | None = None) -> list[dict]:
    return [o for o in objects if colour in (None, o["colour"]) and shape in (None, o["shape"])]


def single_scene_answer(question: str, spec: dict) -> str:
    objects = spec["objects"]
    if question == "How many shapes are there?":
        return str(len(objects))
    if m := re.fullmatch(r"How many (\w+) shapes are there\?", question):
        return str(len(find(objects, colour=m[1])))
    if m := re.fullmatch(r"How many (\w+)s are there\?", question):
        return str(len(find(objects, shape=m[1])))
    if m := re.fullmatch(r"What colour is the (\w+)\?", question):
        (only,) = find(objects, shape=m[1])
        return only["colour"]
    if m := re.fullmatch(r"What shape is (\w+)\?", question):
        (only,) = find(objects, colour=m[1])
        return only["shape"]
    if m := re.fullmatch(r"Is there a (\w+) (\w+)\?", question):
        return "yes" if find(objects, m[1], m[2]) else "no"
    if m := re.fullmatch(r"Is the (\w+) (\w+) (left of|right of|above|below) the (\w+) (\w+)\?", question):
        (a,), (b,) = find(objects, m[1], m[2]), find(objects, m[4], m[5])
        assert abs(offset(a, b, m[3])) >= MARGIN, f"too close to tell: {question}"
        return "yes" if offset(a, b, m[3]) > 0 else "no"
    if m := re.fullmatch(r"What shape is (left of|right of|above|below) the (\w+) (\w+)\?", question):
        (b,) = find(objects, m[2], m[3])
        others = [o for o in objects if o is not b]
        assert all(abs(offset(o, b, m[1])) >= MARGIN for o in others), f"an object is level: {question}"
        (a,) = [o for o in others if offset(o, b, m[1]) > 0]
        return a["shape"]
    if question == "What word is written in the image?":
        return spec["word"].lower()
    raise AssertionError(f"a question the test does not know: {question!r}")


def two_scene_answer(question: str, first: dict, second: dict) -> str:
    pair = (first["objects"], second["objects"])
    if m := re.fullmatch(r"Which image has more (\w+ shapes|shapes|\w+s), the first or the second\?", question):
        what = m[1]
        if what == "shapes":
            counts = [len(objects) for objects in pair]
        elif what.endswith(" shapes"):
            counts = [len(find(objects, colour=what.split()[0])) for objects in pair]
        else:
            counts = [len(find(objects, shape=what[:-1])) for objects in pair]
        assert counts[0] != counts[1]
        return "first" if counts[0] > counts[1] else "second"
    if m := re.fullmatch(r"Which image has a (\w+) (\w+), the first or the second\?", question):
        has = [bool(find(objects, m[1], m[2])) for objects in pair]
        assert has[0] != has[1]
        return "first" if has[0] else "second"
    if question == "Is the same word written in both images?":
        return "yes" if first["word"] == second["word"] else "no"
    if m := re.fullmatch(r"Are the (\w+)s in the two images the same colour\?", question):
        (a,), (b,) = (find(objects, shape=m[1]) for objects in pair)
        return "yes" if a["colour"] == b["colour"] else "no"
    raise AssertionError(f"a two-image question the test does not know: {question!r}")


def expected_answer(record: dict, question: str, specs: dict[str, dict]) -> str:
    images = record["image"] if isinstance(record["image"], list) else [record["image"]]
    if len(images) == 2:
        return two_scene_answer(question, specs[images[0]], specs[images[1]])
    return single_scene_answer(question, specs[images[0]])


def normalised(answer: str) -> str:
    return str(NUMBER[answer]) if answer in NUMBER else answer


# -- the tests ----------------------------------------------------------------------------------------


def test_two_builds_are_byte_identical_and_the_cli_makes_the_same(build, tmp_path):
    again = tmp_path / "again"
    cli_main(["data", "scenes", "--out", str(again), "--train-scenes", "48", "--val-scenes", "8", "--test-scenes", "40"])
    first, second = files_of(build), files_of(again)
    assert first.keys() == second.keys() and len(first) > SMALL.train + SMALL.val + SMALL.test
    assert [name for name in first if first[name] != second[name]] == []


def test_a_build_with_other_sizes_is_redone_not_reused(build, tmp_path):
    out = tmp_path / "scenes"
    small = scenes.build_scenes(out, scenes.SceneSizes(train=12, val=4, test=6))
    larger = scenes.build_scenes(out, scenes.SceneSizes(train=16, val=4, test=6))
    assert (small["images_train"], larger["images_train"]) == (12, 16)
    assert len(list((out / "images" / "train").iterdir())) == 16


def test_every_answer_is_right_by_construction(build):
    specs = specs_by_image(build)
    checked = Counter()
    for name in ("scenes_train", "scenes_val", *TEST_FILES):
        for record in load(build, f"stage2/{name}.json"):
            for question, answer in qa_pairs(record):
                assert normalised(answer) == expected_answer(record, question, specs), (record["id"], question)
                checked[name] += 1
    assert checked["scenes_test"] == 4 * SMALL.test and checked["scenes_test_two_image"] == SMALL.test
    assert checked["scenes_train"] > 6 * SMALL.train


def test_the_specifications_are_what_the_images_show(build):
    for image, spec in specs_by_image(build).items():
        pixels = np.asarray(Image.open(build / "images" / image).convert("RGB"))
        assert pixels.shape == (scenes.IMAGE_SIZE, scenes.IMAGE_SIZE, 3)
        names = [(obj["colour"], obj["shape"]) for obj in spec["objects"]]
        assert 2 <= len(names) <= 5 and len(set(names)) == len(names), f"{image}: objects must be 2-5 and nameable"
        for obj in spec["objects"]:
            assert tuple(pixels[obj["y"], obj["x"]]) == scenes.COLOURS[obj["colour"]], (image, obj)
        left, top, right, bottom = spec["word_box"]
        ink = pixels[top:bottom, left:right].sum(axis=-1) < 3 * 128
        assert ink.mean() > 0.1, f"{image}: no word drawn in {spec['word_box']}"
        painted = pixels.sum(axis=-1) != sum(scenes.BACKGROUND)
        painted[top:bottom, left:right] = False
        boxes = np.zeros_like(painted)
        for obj in spec["objects"]:
            half = scenes.SIZES[obj["size"]]
            boxes[obj["y"] - half : obj["y"] + half + 1, obj["x"] - half : obj["x"] + half + 1] = True
        assert not (painted & ~boxes).any(), f"{image}: paint outside the specified objects and word"


def test_captions_name_every_object_and_the_word(build):
    specs = specs_by_image(build)
    samples = list(wds.WebDataset(str(build / "stage1" / "train-{000000..000007}.tar"), shardshuffle=False))
    assert len(samples) == SMALL.train
    for sample in samples:
        metadata = json.loads(sample["json"])
        spec = specs[f"train/{int(sample['__key__'])}.png"]
        text = sample["txt"].decode()
        assert metadata["scene"]["objects"] == spec["objects"] and metadata["caption"] == text
        assert sample["png"] == (build / "images" / f"train/{int(sample['__key__'])}.png").read_bytes()
        for obj in spec["objects"]:
            assert f"{obj['size']} {obj['colour']} {obj['shape']}" in text
        assert f"the word {spec['word']}" in text
        assert scenes.caption(scenes.Scene.from_json(spec)) == text  # the spec files are all a caption needs


HELD_PAIRS = {("red", "triangle"), ("green", "diamond"), ("blue", "circle"), ("yellow", "square")}  # docs/scenes.md
HELD_VERTICAL = [{"circle", "square"}, {"triangle", "diamond"}]


def vertical_shapes(question: str, answer: str) -> set[str] | None:
    """The two shapes an above/below question relates, or None for any other question."""
    if m := re.fullmatch(r"Is the \w+ (\w+) (?:above|below) the \w+ (\w+)\?", question):
        return {m[1], m[2]}
    if m := re.fullmatch(r"What shape is (?:above|below) the \w+ (\w+)\?", question):
        return {answer, m[1]}
    return None


def test_held_out_compositions_are_absent_from_training_and_present_in_test(build):
    assert set(scenes.HELDOUT_PAIRS) == HELD_PAIRS and set(scenes.HELDOUT_VERTICAL) == {frozenset(s) for s in HELD_VERTICAL}

    def pairs_in(split: str) -> set[tuple[str, str]]:
        return {(o["colour"], o["shape"]) for spec in load(build, f"specs/{split}.json") for o in spec["objects"]}

    assert not pairs_in("train") & HELD_PAIRS and not pairs_in("val") & HELD_PAIRS
    assert pairs_in("test") & HELD_PAIRS
    for name in ("scenes_train", "scenes_val"):
        for record in load(build, f"stage2/{name}.json"):
            for question, answer in qa_pairs(record):
                assert vertical_shapes(question, answer) not in HELD_VERTICAL, question

    specs = specs_by_image(build)
    one_image = load(build, "stage2/scenes_test.json")
    assert load(build, "stage2/scenes_test_heldout.json") == [record for record in one_image if record["held_out"]]
    test = load_test(build)
    for record in test:
        ((question, answer),) = qa_pairs(record)
        images = record["image"] if isinstance(record["image"], list) else [record["image"]]
        in_scene = {(o["colour"], o["shape"]) for image in images for o in specs[image]["objects"]}
        named = set(re.findall(r"(\w+) (circle|square|triangle|diamond)", question))
        held_vertical = vertical_shapes(question, answer) in HELD_VERTICAL
        if named & HELD_PAIRS or held_vertical:
            assert record["held_out"], question
        if record["held_out"]:
            assert in_scene & HELD_PAIRS or named & HELD_PAIRS or held_vertical, question
    kinds = {record["question_type"] for record in test if record["held_out"]}
    assert kinds >= {"binding", "spatial", "count", "two_image"} and "ocr" not in kinds


def test_test_questions_are_one_per_type_per_scene_with_short_answers(build):
    test = load_test(build)
    assert all(isinstance(r["image"], str) for r in load(build, "stage2/scenes_test.json"))
    assert Counter(record["question_type"] for record in test) == {kind: SMALL.test for kind in scenes.QUESTION_TYPES}
    words = set(NUMBER) | {"yes", "no", "first", "second"} | set(scenes.COLOURS) | set(scenes.SHAPES) | {w.lower() for w in scenes.WORDS}
    answers = Counter(answer for record in test for _, answer in qa_pairs(record))
    assert set(answers) <= words
    assert answers["first"] and answers["second"] and answers["yes"] and answers["no"]


def manifest_on(build: Path, shipped: str, tmp_path: Path) -> Path:
    """The shipped manifest with its data folders pointed at the test's build (the rest as shipped)."""
    text = (ROOT / "data_manifests" / shipped).read_text().replace("../data/scenes", str(build))
    text = text.replace("../data/embedded/stage2/text_train.json", str(tmp_path / "text.json"))
    text = text.replace("../data/embedded/stage2/text_heldout.json", str(tmp_path / "text.json"))
    (tmp_path / "text.json").write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "hi"}] * 4))
    (tmp_path / shipped).write_text(text)
    return tmp_path / shipped


def test_the_shards_feed_the_stage1_pipeline_through_the_shipped_manifest(build, tmp_path):
    manifest = manifest_on(build, "scenes_stage1.yaml", tmp_path)
    data = CaptionDataModule(manifest=str(manifest), processor=OwlProcessor(get_config("owl-tiny")), batch_size=4, num_workers=0)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert len(batch["source"]) == batch["images"].shape[0] == 4
    assert sum(len(b["source"]) for b in data.val_dataloader()) == SMALL.val


def test_the_conversations_feed_the_stage2_pipeline_through_the_shipped_manifest(build, tmp_path):
    manifest = manifest_on(build, "scenes_stage2.yaml", tmp_path)
    source = next(s for s in load_manifest(manifest).train if s.name == "scenes")
    skips = SkipLog()
    conversations = read_conversations(source, skips)
    records = load(build, "stage2/scenes_train.json")
    assert len(conversations) == len(records) and not skips.pending
    assert Counter(len(c.images) for c in conversations) == {1: len(records) - SMALL.train, 2: SMALL.train}
    data = InstructionDataModule(
        manifest=str(manifest), processor=OwlProcessor(get_config("owl-tiny")), batch_size=4, num_workers=0, max_length=256
    )
    data.setup("fit")
    next(iter(data.train_dataloader()))
    assert data.health.read_by_source["scenes"].kept == len(records)


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_the_scenes_experiments_swap_only_the_data_and_the_run_folder(stage, capsys):
    configs = [ROOT / "experiments" / "base.yaml", ROOT / "experiments" / f"{stage}_smol.yaml"]

    def printed(extra: list[Path]) -> dict:
        with pytest.raises(SystemExit):
            cli_main([stage, "fit", *(arg for path in configs + extra for arg in ("--config", str(path))), "--print_config"])
        return yaml.safe_load(capsys.readouterr().out)

    smol, on_scenes = printed([]), printed([ROOT / "experiments" / "scenes" / f"{stage}.yaml"])
    assert on_scenes["data"]["manifest"] == f"data_manifests/scenes_{stage}.yaml"
    assert on_scenes["trainer"]["default_root_dir"] == f"runs/{stage}_scenes"
    assert on_scenes["model"] == smol["model"] and on_scenes["trainer"]["max_steps"] == smol["trainer"]["max_steps"]
    assert os.path.isfile(ROOT / on_scenes["data"]["manifest"])


def test_the_scenes_task_reads_and_scores_every_test_question_with_the_held_out_ones(build):
    """Every answer survives easy-VQA's scoring (counts are words: it keeps letters only); two-image questions
    carry both images; the held-out compositions are scored apart."""
    task = Scenes(build)
    questions, skips = read_questions(task)
    assert len(questions) == 5 * SMALL.test and not skips.pending
    pairs = [question for question in questions if question.group == "two_image"]
    assert pairs and all(len(question.images) == 2 for question in pairs)
    assert all(len(question.images) == 1 for question in questions if question.group != "two_image")
    right = task.score([Answered(question, f"{question.truth.capitalize()}.") for question in questions])
    assert right["by_type"] == {"binding": 1.0, "count": 1.0, "ocr": 1.0, "spatial": 1.0, "two_image": 1.0}
    assert right["held_out"]["count"] == len(task.held_out) > 0 and right["held_out"]["accuracy"] == 1.0
    always_one = task.score([Answered(question, "one") for question in questions])
    assert always_one["by_type"]["count"] < 1.0 and always_one["by_type"]["ocr"] == 0.0


def test_a_model_answers_one_and_two_image_questions_through_the_harness(build, tiny_model, tiny_tokenizer):
    task = Scenes(build)
    questions, skips = read_questions(task)
    some = [q for q in questions if q.group != "two_image"][:4] + [q for q in questions if q.group == "two_image"][:4]
    result = run_task(OwlAssistant(tiny_model, tiny_tokenizer, precision="fp32"), task, some, skips, batch_size=4, progress=False)
    assert result["count"] == 8 and result["skipped"] == {}
