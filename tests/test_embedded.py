"""The embedded-data builder's parts, on the installed easy-VQA package and standard library.

The whole build (~5 s, 43 MB) is not run here; its marker/resume logic is, with a stub build.
"""

from __future__ import annotations

import json
from collections import defaultdict

import easy_vqa
import pytest
from PIL import Image, ImageDraw

from owl_lightning.apps import embedded
from owl_lightning.apps.embedded import caption_for_image, question_type, shape_in_pixels, stdlib_text_pairs


@pytest.fixture(scope="module")
def train_questions() -> dict[int, list[tuple[str, str]]]:
    questions, answers, image_ids = easy_vqa.get_train_questions()
    by_image = defaultdict(list)
    for question, answer, image_id in zip(questions, answers, image_ids):
        by_image[image_id].append((question, answer))
    return by_image


def train_image(image_id: int) -> Image.Image:
    return Image.open(easy_vqa.get_train_image_paths()[image_id])


@pytest.mark.parametrize(
    "image_id, caption",
    [
        (0, "a blue rectangle"),  # "what is the blue shape?" → "rectangle"
        (1, "a blue triangle"),  # "what color is the triangle?" → "blue"
        (2, "a red triangle"),  # "what shape is in the image?" → "triangle"
        (49, "a blue circle"),  # "is no circle present?" → "no"; no question settles the colour: the pixels do
    ],
)
def test_caption_of_known_images(train_questions, image_id, caption):
    assert caption_for_image(train_questions[image_id], train_image(image_id)) == caption


def test_caption_refuses_pixels_the_answers_rule_out(train_questions):
    with pytest.raises(ValueError, match="rule out"):
        caption_for_image(train_questions[2], train_image(0))  # a blue rectangle, asked about a red triangle


def test_shape_in_pixels_on_drawn_shapes():
    corners = (12, 14, 50, 44)
    drawn = {}
    for shape in embedded.SHAPES:
        image = Image.new("RGB", (64, 64), (240, 236, 230))  # a pale background, as easy-VQA's
        draw = ImageDraw.Draw(image)
        if shape == "triangle":
            draw.polygon([(12, 44), (31, 14), (50, 44)], fill=(0, 128, 128))
        else:
            (draw.ellipse if shape == "circle" else draw.rectangle)(corners, fill=(0, 128, 128))
        drawn[shape] = shape_in_pixels(image)
    assert drawn == {shape: ("teal", shape) for shape in embedded.SHAPES}


def test_question_type():
    assert [question_type(a) for a in ("circle", "gray", "no")] == ["shape", "color", "yes_no"]
    with pytest.raises(ValueError, match="unknown easy-VQA answer"):
        question_type("maybe")


def test_stdlib_text_pairs_are_real_deterministic_and_unique():
    pairs = stdlib_text_pairs()
    assert len(pairs) > 500
    assert pairs == stdlib_text_pairs()
    assert len({p["instruction"] for p in pairs}) == len({p["output"] for p in pairs}) == len(pairs)
    assert all(p["input"] == "" and embedded.DOC_MIN_CHARS <= len(p["output"]) <= embedded.DOC_MAX_CHARS for p in pairs)
    by_instruction = {p["instruction"]: p["output"] for p in pairs}
    assert by_instruction["What does `json.dumps` do in Python?"].startswith("Serialize ``obj`` to a JSON formatted ``str``")
    heldout = sum(map(embedded._is_heldout, pairs)) / len(pairs)
    assert 0.05 < heldout < 0.15


def test_build_is_skipped_when_done_and_redone_when_killed_or_outdated(tmp_path, monkeypatch):
    builds = []

    def stub_build(root):
        builds.append(root)
        (root / "data.txt").write_text("built")
        return {"files": 1}

    out = tmp_path / "embedded"
    monkeypatch.setattr(embedded, "_build_into", stub_build)
    assert embedded.build_embedded(out) == {"files": 1}
    assert embedded.build_embedded(out) == {"files": 1} and len(builds) == 1  # done: skipped

    monkeypatch.setattr(embedded, "BUILD_VERSION", embedded.BUILD_VERSION + 1)
    embedded.build_embedded(out)
    assert len(builds) == 2 and json.loads((out / embedded.MARKER).read_text())["version"] == embedded.BUILD_VERSION

    def killed_build(root):
        (root / "half.txt").write_text("half")
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded, "BUILD_VERSION", embedded.BUILD_VERSION + 1)
    monkeypatch.setattr(embedded, "_build_into", killed_build)
    with pytest.raises(KeyboardInterrupt):
        embedded.build_embedded(out)
    assert (out / "data.txt").is_file()  # the previous build stays whole until the new one is complete
    monkeypatch.setattr(embedded, "_build_into", stub_build)
    embedded.build_embedded(out)
    assert len(builds) == 3 and not (out / "half.txt").exists()


def test_build_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an embedded-data build"):
        embedded.build_embedded(tmp_path)
