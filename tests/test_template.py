"""Conversation template: exact token layout and label masking for both styles, truncation, captions."""

from __future__ import annotations

import pytest

from owl_lightning.config import IGNORE_INDEX, IMAGE_TOKEN
from owl_lightning.data.health import BAD_TEXT, IMAGE_COUNT_MISMATCH, MALFORMED_RECORD, MISSING_TEXT, TOO_LONG, SkipSample
from owl_lightning.data.template import OWL_SYSTEM_PROMPT, Conversation, ConversationTemplate, Turn
from owl_lightning.models.llm import byte_tokenizer

BOS, EOS = "<|im_start|>", "<|im_end|>"


@pytest.fixture(scope="module")
def tok():
    tokenizer = byte_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    return tokenizer


def supervised_spans(tok, input_ids: list[int], labels: list[int]) -> list[str]:
    """Decoded runs of supervised tokens; also checks every label is either -100 or its own token."""
    assert len(input_ids) == len(labels)
    spans, current = [], []
    for token, label in zip(input_ids, labels):
        assert label in (IGNORE_INDEX, token)
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            current.append(token)
    if current:
        spans.append(current)
    return [tok.decode(span) for span in spans]


def unsupervised_text(tok, input_ids: list[int], labels: list[int]) -> str:
    return tok.decode([t for t, label in zip(input_ids, labels) if label == IGNORE_INDEX])


SINGLE = Conversation([Turn("user", "<image>\nWhat colour is the circle?"), Turn("assistant", "Red.")], images=["a.png"])
MULTI_TURN = Conversation(
    [Turn("user", "<image>\nWhat shape?"), Turn("assistant", "A circle."), Turn("user", "And its colour?"), Turn("assistant", "Blue.")],
    images=["a.png"],
)
TWO_IMAGES = Conversation([Turn("user", "<image><image>Which is larger?"), Turn("assistant", "The first.")], images=["a.png", "b.png"])
TEXT_ONLY = Conversation([Turn("user", "Name a prime."), Turn("assistant", "Seven.")])

OWL_EXPECTED = {
    "single": (SINGLE, f"{BOS}{OWL_SYSTEM_PROMPT}\nHuman: <image>\nHuman: What colour is the circle?\nAI: Red.{EOS}", ["Red." + EOS]),
    "multi_turn": (
        MULTI_TURN,
        f"{BOS}{OWL_SYSTEM_PROMPT}\nHuman: <image>\nHuman: What shape?\nAI: A circle.{EOS}\nHuman: And its colour?\nAI: Blue.{EOS}",
        ["A circle." + EOS, "Blue." + EOS],
    ),
    "two_images": (
        TWO_IMAGES,
        f"{BOS}{OWL_SYSTEM_PROMPT}\nHuman: <image>\nHuman: <image>\nHuman: Which is larger?\nAI: The first.{EOS}",
        ["The first." + EOS],
    ),
    "text_only": (TEXT_ONLY, f"{BOS}{OWL_SYSTEM_PROMPT}\nHuman: Name a prime.\nAI: Seven.{EOS}", ["Seven." + EOS]),
}

CHAT_EXPECTED = {
    "single": (
        SINGLE,
        f"{BOS}user\n<image>\nWhat colour is the circle?{EOS}\n{BOS}assistant\nRed.{EOS}\n",
        ["Red." + EOS],
    ),
    "multi_turn": (
        MULTI_TURN,
        f"{BOS}user\n<image>\nWhat shape?{EOS}\n{BOS}assistant\nA circle.{EOS}\n"
        f"{BOS}user\nAnd its colour?{EOS}\n{BOS}assistant\nBlue.{EOS}\n",
        ["A circle." + EOS, "Blue." + EOS],
    ),
    "two_images": (
        TWO_IMAGES,
        f"{BOS}user\n<image><image>Which is larger?{EOS}\n{BOS}assistant\nThe first.{EOS}\n",
        ["The first." + EOS],
    ),
    "text_only": (TEXT_ONLY, f"{BOS}user\nName a prime.{EOS}\n{BOS}assistant\nSeven.{EOS}\n", ["Seven." + EOS]),
}


@pytest.mark.parametrize("case", sorted(OWL_EXPECTED))
def test_owl_layout_and_masking(tok, case):
    conv, expected_text, expected_spans = OWL_EXPECTED[case]
    input_ids, labels, num_images = ConversationTemplate(tok, visual_tokens_per_image=4).encode(conv)
    assert tok.decode(input_ids) == expected_text
    assert supervised_spans(tok, input_ids, labels) == expected_spans
    # System line, Human lines and every "\nAI: " prefix are unsupervised.
    unsupervised = unsupervised_text(tok, input_ids, labels)
    assert unsupervised.startswith(BOS + OWL_SYSTEM_PROMPT)
    assert unsupervised.count("\nAI: ") == len(expected_spans)
    # Adjacent placeholders stay separate images.
    assert num_images == len(conv.images) == input_ids.count(tok.convert_tokens_to_ids(IMAGE_TOKEN))


@pytest.mark.parametrize("case", sorted(CHAT_EXPECTED))
def test_chat_template_layout_and_masking(tok, case):
    conv, expected_text, expected_spans = CHAT_EXPECTED[case]
    input_ids, labels, num_images = ConversationTemplate(tok, style="chat_template", system_prompt=None).encode(conv)
    assert tok.decode(input_ids) == expected_text
    assert supervised_spans(tok, input_ids, labels) == expected_spans
    # The newline the template writes after each EOS is not supervised.
    assert labels[-1] == IGNORE_INDEX and tok.decode(input_ids[-1:]) == "\n"
    assert num_images == len(conv.images) == input_ids.count(tok.convert_tokens_to_ids(IMAGE_TOKEN))


def test_chat_template_system_message_is_unsupervised(tok):
    conv = Conversation(TEXT_ONLY.turns, system="Be brief.")
    input_ids, labels, _ = ConversationTemplate(tok, style="chat_template", system_prompt=None).encode(conv)
    assert tok.decode(input_ids).startswith(f"{BOS}system\nBe brief.{EOS}\n{BOS}user\n")
    assert supervised_spans(tok, input_ids, labels) == ["Seven." + EOS]


def test_owl_system_override_and_none(tok):
    override = ConversationTemplate(tok).encode(Conversation(TEXT_ONLY.turns, system="Custom."))[0]
    assert tok.decode(override) == f"{BOS}Custom.\nHuman: Name a prime.\nAI: Seven.{EOS}"
    none = ConversationTemplate(tok, system_prompt=None).encode(TEXT_ONLY)[0]
    assert tok.decode(none) == f"{BOS}\nHuman: Name a prime.\nAI: Seven.{EOS}"


def test_truncation_drops_images_whose_placeholder_was_cut(tok):
    conv = Conversation(
        [Turn("user", "<image>First?"), Turn("assistant", "One."), Turn("user", "<image>Second?"), Turn("assistant", "Two.")],
        images=["a.png", "b.png"],
    )
    template = ConversationTemplate(tok, system_prompt=None, visual_tokens_per_image=10, max_length=10_000)
    full_ids, _, _ = template.encode(conv)
    second_image = [i for i, t in enumerate(full_ids) if t == template.image_token_id][1]
    # Room for everything before the second image plus 5 tokens: the image needs 10, so it goes.
    max_length = template.expanded_length(full_ids[:second_image]) + 5
    cut = ConversationTemplate(tok, system_prompt=None, visual_tokens_per_image=10, max_length=max_length)
    input_ids, labels, num_images = cut.encode(conv)
    assert num_images == 1 and input_ids.count(cut.image_token_id) == 1
    assert input_ids == full_ids[:second_image]
    assert cut.expanded_length(input_ids) <= max_length
    assert supervised_spans(tok, input_ids, labels) == ["One." + EOS]


def test_truncation_cutting_every_answer_skips_too_long(tok):
    template = ConversationTemplate(tok, visual_tokens_per_image=4, max_length=40)  # shorter than the system line
    with pytest.raises(SkipSample) as skip:
        template.encode(SINGLE)
    assert skip.value.reason == TOO_LONG


def test_truncation_inside_the_answer_keeps_its_start(tok):
    template = ConversationTemplate(tok, system_prompt=None, visual_tokens_per_image=4)
    full_ids, _, _ = template.encode(TEXT_ONLY)
    input_ids, labels, _ = ConversationTemplate(tok, system_prompt=None, max_length=len(full_ids) - 3).encode(TEXT_ONLY)
    assert supervised_spans(tok, input_ids, labels) == ["Seve"]


@pytest.mark.parametrize("style", ["owl", "chat_template"])
def test_placeholder_image_count_mismatch_raises(tok, style):
    conv = Conversation(TWO_IMAGES.turns, images=["a.png"])
    with pytest.raises(SkipSample, match="2 <image> placeholders, 1 images") as skip:
        ConversationTemplate(tok, style=style).encode(conv)
    assert skip.value.reason == IMAGE_COUNT_MISMATCH


@pytest.mark.parametrize("style", ["owl", "chat_template"])
def test_image_placeholder_in_the_system_message_is_refused(tok, style):
    """The system text is tokenised too: an ``<image>`` there would be a placeholder with no image
    (or an image spliced into the system line), so it is counted and refused like any other turn."""
    template = ConversationTemplate(tok, style=style)
    stray = Conversation(TEXT_ONLY.turns, system="You see <image> here.")
    with pytest.raises(SkipSample, match="1 <image> placeholders, 0 images") as skip:
        template.encode(stray)
    assert skip.value.reason == IMAGE_COUNT_MISMATCH
    listed = Conversation(SINGLE.turns, images=["a.png", "b.png"], system="<image>")
    with pytest.raises(SkipSample, match="system message") as skip:
        template.encode(listed)
    assert skip.value.reason == MALFORMED_RECORD
    with pytest.raises(ValueError, match="system_prompt"):
        ConversationTemplate(tok, style=style, system_prompt="Look: <image>")


@pytest.mark.parametrize("field", ["system", "user", "assistant"])
def test_a_huge_message_in_any_turn_is_refused_before_tokenising(tok, field, monkeypatch):
    """5 million characters in one message: refused by its length, without a single tokenizer call."""
    template = ConversationTemplate(tok, max_length=1024)
    tokenised = []
    monkeypatch.setattr(template, "_tokens", lambda text: tokenised.append(len(text)) or [])
    huge = "x" * 5_000_000
    turns = [Turn("user", huge if field == "user" else "Hi"), Turn("assistant", huge if field == "assistant" else "Yo")]
    conv = Conversation(turns, system=huge if field == "system" else None)
    prompt = Conversation(turns + [Turn("user", "And?")], system=conv.system)
    for encode, conversation in ((template.encode, conv), (template.encode_prompt, prompt)):
        with pytest.raises(SkipSample, match=r"5,000,0\d\d characters") as skip:
            encode(conversation)
        assert skip.value.reason == TOO_LONG
    assert tokenised == []


@pytest.mark.parametrize("field", ["system", "user", "assistant", "caption"])
def test_a_lone_surrogate_is_bad_text_not_a_tokenizer_crash(tok, field):
    """A JSON ``"\\ud800"`` escape decodes to a str the tokenizer cannot take (TypeError)."""
    template = ConversationTemplate(tok)
    with pytest.raises(SkipSample, match="surrogate") as skip:
        if field == "caption":
            template.encode_caption("a red \ud800 circle")
        else:
            turns = [Turn("user", "Hi \ud800" if field == "user" else "Hi"), Turn("assistant", "\ud800!" if field == "assistant" else "Yo")]
            template.encode(Conversation(turns, system="sys \ud800" if field == "system" else None))
    assert skip.value.reason == BAD_TEXT


def test_owl_prompt_ends_with_ai(tok):
    template = ConversationTemplate(tok, visual_tokens_per_image=4)
    question = Conversation([Turn("user", "<image>What shape?")], images=["a.png"])
    assert tok.decode(template.encode_prompt(question)) == f"{BOS}{OWL_SYSTEM_PROMPT}\nHuman: <image>\nHuman: What shape?\nAI: "
    history = Conversation(MULTI_TURN.turns + [Turn("user", "Sure?")], images=["a.png"])
    text = tok.decode(template.encode_prompt(history))
    assert text.endswith(f"\nAI: Blue.{EOS}\nHuman: Sure?\nAI: ")


def test_chat_template_prompt_ends_with_generation_prompt(tok):
    template = ConversationTemplate(tok, style="chat_template", system_prompt=None)
    text = tok.decode(template.encode_prompt(Conversation([Turn("user", "Hi")])))
    assert text == f"{BOS}user\nHi{EOS}\n{BOS}assistant\n"


def test_prompt_needs_a_final_user_turn_and_fits(tok):
    template = ConversationTemplate(tok, max_length=20)
    with pytest.raises(ValueError, match="ends with a user turn"):
        template.encode_prompt(TEXT_ONLY)
    with pytest.raises(SkipSample) as skip:
        template.encode_prompt(Conversation([Turn("user", "Hi")]))
    assert skip.value.reason == TOO_LONG


def test_caption_supervises_caption_and_eos(tok):
    template = ConversationTemplate(tok, visual_tokens_per_image=4)
    input_ids, labels = template.encode_caption("  a red circle ")
    assert input_ids[:2] == [tok.bos_token_id, template.image_token_id]
    assert labels[:2] == [IGNORE_INDEX, IGNORE_INDEX]
    assert supervised_spans(tok, input_ids, labels) == ["a red circle" + EOS]
    assert template.caption_prompt() == input_ids[:2]


def test_caption_truncated_to_fit_and_empty_skipped(tok):
    template = ConversationTemplate(tok, visual_tokens_per_image=4, max_length=1 + 4 + 3)
    input_ids, labels = template.encode_caption("a red circle")
    assert template.expanded_length(input_ids) == 8
    assert supervised_spans(tok, input_ids, labels) == ["a r"]
    with pytest.raises(SkipSample) as skip:
        template.encode_caption(" \n")
    assert skip.value.reason == MISSING_TEXT
    with pytest.raises(SkipSample) as skip:
        ConversationTemplate(tok, visual_tokens_per_image=4, max_length=5).encode_caption("a red circle")
    assert skip.value.reason == TOO_LONG


def test_tokenizer_without_image_token_refused():
    with pytest.raises(ValueError, match="load_tokenizer"):
        ConversationTemplate(byte_tokenizer())


@pytest.mark.parametrize("which", ["byte", "smollm2"])
def test_backend_tokenising_equals_the_tokenizer_call(tok, which):
    if which == "smollm2":
        from owl_lightning.config import get_config
        from owl_lightning.models.llm import load_tokenizer

        tok = load_tokenizer(get_config("owl-smol").llm)
    template = ConversationTemplate(tok)
    assert template._backend is not None  # the fast path is the one under test
    texts = [
        "a blue rectangle",
        "  leading and trailing  ",
        "<image>\nWhat is this?<|im_end|>",
        "naïve café 東京 🦉",
        "tabs\tand\nnewlines\r\n",
        "x" * 500,
        "<image><image> two",
    ]
    for text in texts:
        assert template._tokens(text) == tok(text, add_special_tokens=False)["input_ids"], text
