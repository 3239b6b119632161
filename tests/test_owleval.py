"""OwlEval: the runner on owl-tiny (random weights: the mechanics), answer files, the published data."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from owl_lightning.apps.owleval import (
    ANSWER_KEYS,
    CATEGORIES,
    OwlEvalError,
    answer_owleval,
    conversations,
    fit_request,
    read_answer_files,
    read_answers,
    read_questions,
    write_answers,
)
from owl_lightning.data.template import Conversation, Turn
from owl_lightning.inference import OwlAssistant
from tests.helpers import SUBSET, write_owleval

PUBLISHED = Path(__file__).resolve().parents[1] / ".." / "shared" / "owleval"


@pytest.fixture
def owleval_folder(tmp_path):
    return write_owleval(tmp_path / "owleval", SUBSET)


@pytest.fixture
def assistant(tiny_model, tiny_tokenizer):
    return OwlAssistant(tiny_model, tiny_tokenizer, precision="fp32")


def test_runner_writes_the_official_format_and_asks_multi_turn_with_history(owleval_folder, assistant, tmp_path, monkeypatch):
    prompts, batches = [], []
    encode, answer = assistant.template.encode_prompt, assistant.answer
    monkeypatch.setattr(assistant.template, "encode_prompt", lambda conv, *counts: prompts.append(conv) or encode(conv, *counts))

    def answer_and_tag(requests, **settings):
        # The model's replies, tagged: a random model's reply may be empty, and the history must carry these.
        batches.append(len(requests))
        return [f"{reply}[reply {len(batches)}.{k}]" for k, reply in enumerate(answer(requests, **settings))]

    monkeypatch.setattr(assistant, "answer", answer_and_tag)
    questions = read_questions(owleval_folder)

    answers = answer_owleval(assistant, questions, owleval_folder / "cases", max_new_tokens=6, progress=False)
    path = write_answers(tmp_path / "out" / "answers.jsonl", questions, answers, "owl-tiny")

    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [tuple(line) for line in lines] == [ANSWER_KEYS] * 3  # the published files' keys, in their order
    assert [(line["question_id"], line["image"], line["model_id"]) for line in lines] == [
        (1, "red.png", "owl-tiny"),
        (2, "blue.png", "owl-tiny"),
        (3, "blue.png", "owl-tiny"),
    ]
    assert read_answers(path, questions).answers == answers
    assert answers[2].endswith("[reply 1.1]") and answers[3].endswith("[reply 2.0]")
    # Turn 1 of both conversations in one batch, then the second turn.
    assert batches == [2, 1]
    second_turn = [conv for conv in prompts if len(conv.turns) > 1][-1]
    assert second_turn.turns == [Turn("user", "<image>\nDescribe the image."), Turn("assistant", answers[2]), Turn("user", "Are you sure?")]
    single = [conv for conv in prompts if "What colour" in conv.turns[0].content]
    assert single and all(len(conv.turns) == 1 for conv in single)


def test_the_runner_names_every_missing_image_before_generating(owleval_folder, assistant, monkeypatch):
    (owleval_folder / "cases" / "blue.png").unlink()
    monkeypatch.setattr(assistant, "answer", lambda *a, **kw: pytest.fail("generated despite a missing image"))
    with pytest.raises(OwlEvalError, match=r"(?s)1 OwlEval image.*blue\.png: not found"):
        answer_owleval(assistant, read_questions(owleval_folder), owleval_folder / "cases", progress=False)


def test_the_runner_reads_no_image_outside_the_cases_folder(owleval_folder, assistant, monkeypatch):
    (owleval_folder / "secret.png").write_bytes((owleval_folder / "cases" / "red.png").read_bytes())
    questions = read_questions(owleval_folder)
    questions[0] = replace(questions[0], image="../secret.png")
    monkeypatch.setattr(assistant, "answer", lambda *a, **kw: pytest.fail("generated despite an image outside cases/"))
    with pytest.raises(OwlEvalError, match=r"\.\./secret\.png: outside .*cases, not read"):
        answer_owleval(assistant, questions, owleval_folder / "cases", progress=False)


def test_history_is_cut_from_the_oldest_turn_to_leave_room_for_the_answer(assistant):
    template, image = assistant.template, Image.new("RGB", (32, 32))
    history = [("first question", "a long first answer " * 5), ("second question", "second answer")]
    request, dropped = fit_request(template, history, "third question", image, max_new_tokens=10)
    assert dropped == 0 and len(request.turns) == 5 and request.turns[0].content.startswith("<image>")

    whole = template.expanded_length(template.encode_prompt(Conversation(request.turns, images=["image"])))
    template.max_length = whole + 10 - 1  # one token short of the whole history plus 10 new tokens
    request, dropped = fit_request(template, history, "third question", image, max_new_tokens=10)
    assert dropped == 1
    assert [t.content for t in request.turns] == ["<image>\nsecond question", "second answer", "third question"]
    assert request.images == [image]

    template.max_length = 20
    with pytest.raises(OwlEvalError, match="lower --max-new-tokens"):
        fit_request(template, history, "third question", image, max_new_tokens=10)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"image": "red.png", "question_id": 1', r"answers\.jsonl:2: not JSON"),
        ('{"image": "red.png", "question_id": 1, "question": "q", "model_id": "m"}', r"answers\.jsonl:2: missing answer; the official"),
        ('{"image": "red.png", "question_id": "1", "question": "q", "answer": "a", "model_id": "m"}', r":2: 'question_id' must be int"),
        (
            '{"image": "x.png", "question_id": 99, "question": "q", "answer": "a", "model_id": "m"}',
            r":2: question_id 99 is not an OwlEval question \(1-3\)",
        ),
        ('{"image": "red.png", "question_id": 1, "question": "q", "answer": "a", "model_id": "m"}', r":2: question_id 1 is answered twice"),
        ('{"image": "blue.png", "question_id": 2, "question": "q", "answer": "a", "model_id": "other"}', r":2: model_id 'other' differs"),
    ],
)
def test_malformed_answer_files_are_refused_naming_file_and_line(owleval_folder, tmp_path, line, message):
    first = {"image": "red.png", "question_id": 1, "question": "What colour is this?", "answer": "red", "model_id": "m"}
    path = tmp_path / "answers.jsonl"
    path.write_text(json.dumps(first) + "\n" + line + "\n")
    with pytest.raises(OwlEvalError, match=message):
        read_answers(path, read_questions(owleval_folder))


def test_answer_folders_need_distinct_model_ids(owleval_folder, tmp_path):
    questions = read_questions(owleval_folder)
    folder = tmp_path / "answers"
    folder.mkdir()
    for name in ("a", "b"):
        write_answers(folder / f"{name}.jsonl", questions, {1: "red"}, "same")
    with pytest.raises(OwlEvalError, match="both have model_id 'same'"):
        read_answer_files([folder], questions)
    with pytest.raises(OwlEvalError, match="no such answer file or folder"):
        read_answer_files([tmp_path / "nowhere"], questions)


@pytest.mark.skipif(not (PUBLISHED / "questions.jsonl").is_file(), reason=f"the published OwlEval data is not at {PUBLISHED}")
def test_the_published_data_gives_the_papers_denominators():
    questions = read_questions(PUBLISHED)
    assert len(questions) == 82
    assert {c: sum(c in q.category for q in questions) for c in CATEGORIES} == {"single_turn": 50, "multi_turn": 52}
    asked = conversations(questions)
    assert len(asked) == 50 and sum(len(c) for c in asked) == 82
    floorplan = next(c for c in asked if c[0].image == "10.jpg")
    assert [q.question_id for q in floorplan] == list(range(15, 23))
    files = read_answer_files([PUBLISHED / "answer"], questions)
    assert len(files) == 6 and all(len(f.answers) == 82 for f in files)
