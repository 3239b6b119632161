"""Generation, chat and evaluation on owl-tiny (random weights: only the mechanics are checked)."""

import json

import pytest
import torch
from PIL import Image
from tests.helpers import COLOURS, tiny_system

from owl_lightning.apps.eval.vqa import easy_vqa_accuracy, normalise
from owl_lightning.data.template import Turn
from owl_lightning.inference import ChatSession, OwlAssistant, Request
from owl_lightning.train.callbacks import CaptionSamples


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


def test_normalise_matches_answers_loosely():
    assert normalise("Blue.") == normalise(" blue ") == "blue"
    assert normalise("Yes, it is") == "yes"
    assert normalise("") == ""


class ScriptedAssistant:
    """Returns fixed answers, so the metric is checked against hand-computed values."""

    def __init__(self, answers):
        self.answers = iter(answers)

    def answer(self, requests, max_new_tokens):
        return [next(self.answers) for _ in requests]


def test_easy_vqa_accuracy_by_type(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "0.png")
    records = [
        {"image": "0.png", "question": "what shape?", "answer": "circle", "type": "shape"},
        {"image": "0.png", "question": "what color?", "answer": "red", "type": "color"},
        {"image": "0.png", "question": "is it red?", "answer": "yes", "type": "yes_no"},
        {"image": "0.png", "question": "is it blue?", "answer": "no", "type": "yes_no"},
    ]
    result = easy_vqa_accuracy(ScriptedAssistant(["Circle.", "blue", "yes", "yes"]), records, tmp_path, batch_size=3, progress=False)
    assert result["accuracy"] == 0.5
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
