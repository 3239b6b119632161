"""Generation, chat and evaluation on owl-tiny (random weights: only the mechanics are checked)."""

import json

import pytest
import torch
from PIL import Image

from owl_lightning.apps.eval.benchmarks.easy_vqa import EasyVQA, first_word
from owl_lightning.apps.eval.benchmarks.harness import read_questions, run_task
from owl_lightning.data.template import Turn
from owl_lightning.inference import ChatSession, Generation, OwlAssistant, Request
from owl_lightning.train.callbacks import CaptionSamples
from tests.helpers import COLOURS, tiny_system


@pytest.fixture
def assistant(tiny_model, tiny_tokenizer):
    return OwlAssistant(tiny_model, tiny_tokenizer, precision="fp32")


def square(colour):
    return Image.new("RGB", (32, 32), COLOURS[colour])


def test_batched_greedy_answers_equal_one_at_a_time(assistant):
    requests = [
        Request.single("What colour is it?", [square("red")]),
        Request.single("Say something long about nothing at all, please."),
        Request.single("Compare these.", [square("blue"), square("green")]),
        Request([Turn("user", "Hi"), Turn("assistant", "Hello"), Turn("user", "<image>\nAnd this?")], [square("red")]),
    ]
    together = assistant.answer(requests, max_new_tokens=8)
    alone = [assistant.answer([request], max_new_tokens=8)[0] for request in requests]
    assert together == alone
    assert all(isinstance(a, str) for a in together)


def test_images_are_converted_to_rgb_as_training_converts_them(assistant, monkeypatch):
    seen = []
    transform = assistant.transform
    monkeypatch.setattr(assistant, "transform", lambda image: seen.append(image) or transform(image))
    transparent = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    assistant.caption([transparent], max_new_tokens=1)
    assistant.answer([Request.single("What colour is it?", [transparent])], max_new_tokens=1)
    assert [image.getpixel((0, 0)) for image in seen] == [(255, 255, 255)] * 2  # on white, as data.images.to_rgb


def test_answers_depend_on_the_image(assistant):
    # A random model still routes the image into the prompt: different pixels, different logits.
    model = assistant.model
    red, blue = (assistant.transform(square(c))[None] for c in ("red", "blue"))
    prompt = torch.tensor([[assistant.template.caption_prompt()[0], model.image_token_id, 65]])
    mask = torch.ones_like(prompt)
    with torch.no_grad():
        logits_red = model.llm(inputs_embeds=model.embed(prompt, mask, red)[0]).logits[0, -1]
        logits_blue = model.llm(inputs_embeds=model.embed(prompt, mask, blue)[0]).logits[0, -1]
    assert not torch.allclose(logits_red, logits_blue)


def test_chat_keeps_the_history(assistant, monkeypatch):
    prompts = []
    original = assistant.template.encode_prompt
    monkeypatch.setattr(assistant.template, "encode_prompt", lambda conv, *counts: prompts.append(conv) or original(conv, *counts))
    session = ChatSession(assistant, [square("red")], max_new_tokens=4)
    first = session.ask("What colour is the square?")
    session.ask("Are you sure?")
    second = prompts[-1]
    assert [t.role for t in second.turns] == ["user", "assistant", "user"]
    assert second.turns[0].content.startswith("<image>") and "What colour" in second.turns[0].content
    assert second.turns[1].content == first and second.turns[2].content == "Are you sure?"
    session.reset()
    session.ask("Again?")
    assert len(prompts[-1].turns) == 1 and prompts[-1].turns[0].content.startswith("<image>")


def test_easy_vqa_matches_answers_by_their_first_word():
    assert first_word("Blue.") == first_word(" blue ") == "blue"
    assert first_word("Yes, it is") == "yes"
    assert first_word("") == ""


class ScriptedAssistant:
    """Returns fixed answers in order (its tokens are the answers' texts), so the metric is checked
    against hand-computed values."""

    def __init__(self, answers):
        self.answers = iter(answers)

    def encode(self, request):
        return request

    def generate(self, samples, samplings):
        return [Generation(tokens=next(self.answers)) for _ in samples]

    def decode(self, tokens):
        return tokens


def test_easy_vqa_accuracy_by_type(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "0.png")
    asked = [
        ("what shape?", "circle", "shape"),
        ("what color?", "red", "color"),
        ("is it red?", "yes", "yes_no"),
        ("is it blue?", "no", "yes_no"),
    ]
    records = [
        {"image": "0.png", "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}], "question_type": t}
        for q, a, t in asked
    ]
    (tmp_path / "stage2").mkdir()
    (tmp_path / "stage2" / "easyvqa_test.json").write_text(json.dumps(records))
    task = EasyVQA(tmp_path)
    result = run_task(ScriptedAssistant(["Circle.", "blue", "yes", "yes"]), task, *read_questions(task), batch_size=3, progress=False)
    assert result["accuracy"] == 0.5 and result["count"] == 4
    assert result["by_type"] == {"color": 0.0, "shape": 1.0, "yes_no": 0.5}
    assert [m["predicted"] for m in result["mistakes"]] == ["blue", "yes"]
    json.dumps(result)  # eval.json must be able to hold it


def test_stage1_caption_logging_and_the_assistant_caption_alike(tiny_config, tiny_tokenizer):
    system = tiny_system("stage1")
    system.configure_model()
    assistant = OwlAssistant(system.model, tiny_tokenizer, precision="fp32")
    images = [square("red"), square("blue")]
    pixels = torch.stack([assistant.transform(image) for image in images])
    assert CaptionSamples(max_new_tokens=6).captions(system, pixels) == assistant.caption(images, max_new_tokens=6)
