"""Instruction readers on small files in the real schemas, good and bad records mixed."""

from __future__ import annotations

import json

import pytest

from owl_lightning.config import IMAGE_TOKEN
from owl_lightning.data.health import IMAGE_COUNT_MISMATCH, MALFORMED_RECORD, MISSING_TEXT, UNEXPECTED, SkipLog
from owl_lightning.data.instruct import read_conversations
from owl_lightning.data.manifest import InstructionSource
from owl_lightning.data.template import OWL_SYSTEM_PROMPT, ConversationTemplate, Turn
from owl_lightning.models.llm import byte_tokenizer


def write_json(tmp_path, name: str, records) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return str(path)


def read(fmt: str, path: str, **source_args):
    skips = SkipLog()
    conversations = read_conversations(InstructionSource(name=fmt + "_src", format=fmt, path=path, **source_args), skips)
    return conversations, skips.drain()


def roles_and_texts(conv) -> list[tuple[str, str]]:
    return [(turn.role, turn.content) for turn in conv.turns]


LLAVA = [
    {  # 0: LLaVA-Instruct-150k's own first record
        "id": "000000033471",
        "image": "000000033471.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
            {"from": "gpt", "value": "The bus in the image is white and red."},
            {"from": "human", "value": "What feature can be seen on the back of the bus?"},
            {"from": "gpt", "value": "The back of the bus features an advertisement."},
        ],
    },
    {"id": "text", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}]},  # 1: text-only
    {"id": "bad-type", "image": "x.jpg", "conversations": "<image>\nWhat?"},  # 2: wrong type
    {"id": "bad-role", "conversations": [{"from": "robot", "value": "beep"}, {"from": "gpt", "value": "?"}]},  # 3
    {"id": "empty", "image": "x.jpg", "conversations": []},  # 4
    {"id": "no-placeholder", "image": "x.jpg", "conversations": [{"from": "human", "value": "What?"}, {"from": "gpt", "value": "A."}]},  # 5
    {  # 6: two images
        "id": "pair",
        "image": ["a.jpg", "b.jpg"],
        "conversations": [{"from": "human", "value": "<image>\n<image>\nSame animal?"}, {"from": "gpt", "value": "Yes."}],
    },
    {  # 7: leading answer, split question, trailing question with its own image
        "id": "messy",
        "image": ["x.jpg", "y.jpg"],
        "conversations": [
            {"from": "gpt", "value": "Welcome."},
            {"from": "human", "value": "<image>"},
            {"from": "human", "value": "Describe it."},
            {"from": "gpt", "value": "A dog."},
            {"from": "human", "value": "<image>\nAnd this?"},
        ],
    },
    {"id": "only-question", "conversations": [{"from": "human", "value": "Hello?"}]},  # 8: nothing to learn
]


def test_llava(tmp_path):
    path = write_json(tmp_path, "llava.json", LLAVA)
    conversations, skipped = read("llava", path)
    assert [c.origin for c in conversations] == [f"{path}#{i}" for i in (0, 1, 6, 7)]
    bus, text, pair, messy = conversations
    assert bus.images == ["000000033471.jpg"] and bus.source == "llava_src"
    assert roles_and_texts(bus) == [
        ("user", "<image>\nWhat are the colors of the bus in the image?"),
        ("assistant", "The bus in the image is white and red."),
        ("user", "What feature can be seen on the back of the bus?"),
        ("assistant", "The back of the bus features an advertisement."),
    ]
    assert text.images == [] and pair.images == ["a.jpg", "b.jpg"]
    assert roles_and_texts(messy) == [("user", "<image>\nDescribe it."), ("assistant", "A dog.")]
    assert messy.images == ["x.jpg"]
    assert skipped == [
        (MALFORMED_RECORD, f"{path}#2"),
        (MALFORMED_RECORD, f"{path}#3"),
        (MALFORMED_RECORD, f"{path}#4"),
        (IMAGE_COUNT_MISMATCH, f"{path}#5"),
        (MALFORMED_RECORD, f"{path}#8"),
    ]


def test_llava_num_samples_caps_records_read(tmp_path):
    conversations, skipped = read("llava", write_json(tmp_path, "llava.json", LLAVA), num_samples=2)
    assert len(conversations) == 2 and skipped == []


def test_alpaca(tmp_path):
    path = write_json(
        tmp_path,
        "alpaca.json",
        [
            {"instruction": "Give three tips for staying healthy.", "input": "", "output": "1. Eat well.\n2. Sleep.\n3. Move."},
            {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
            {"instruction": "Missing output.", "input": ""},
            {"instruction": "Numeric output.", "input": "", "output": 42},
            {"instruction": "Empty output.", "input": "", "output": "  "},
            ["not", "an", "object"],
        ],
    )
    conversations, skipped = read("alpaca", path)
    assert [roles_and_texts(c) for c in conversations] == [
        [("user", "Give three tips for staying healthy."), ("assistant", "1. Eat well.\n2. Sleep.\n3. Move.")],
        [("user", "Translate to French.\n\nGood morning"), ("assistant", "Bonjour")],
    ]
    assert all(c.images == [] for c in conversations)
    assert skipped == [
        (MALFORMED_RECORD, f"{path}#2"),
        (MALFORMED_RECORD, f"{path}#3"),
        (MISSING_TEXT, f"{path}#4"),
        (MALFORMED_RECORD, f"{path}#5"),
    ]


def test_sharegpt(tmp_path):
    path = write_json(
        tmp_path,
        "sharegpt.json",
        [
            {
                "id": "a1",
                "conversations": [
                    {"from": "system", "value": "You are terse."},
                    {"from": "human", "value": "What is 2+2?"},
                    {"from": "chatgpt", "value": "4"},
                    {"from": "user", "value": "And 3+3?"},
                    {"from": "bard", "value": "6"},
                ],
            },
            {"id": "a2", "conversations": [{"from": "narrator", "value": "Once upon a time"}, {"from": "gpt", "value": "..."}]},
            {"id": "a3", "conversations": [{"from": "human", "value": 7}, {"from": "gpt", "value": "seven"}]},
            {"id": "a4", "conversations": [{"from": "gpt", "value": "Unprompted."}]},
            {"id": "a5", "conversations": [{"from": "human", "value": "Hi"}, {"from": "bing", "value": "Hello"}]},
        ],
    )
    conversations, skipped = read("sharegpt", path)
    first, last = conversations
    assert first.system == "You are terse."
    assert roles_and_texts(first) == [("user", "What is 2+2?"), ("assistant", "4"), ("user", "And 3+3?"), ("assistant", "6")]
    assert roles_and_texts(last) == [("user", "Hi"), ("assistant", "Hello")] and last.origin == f"{path}#4"
    assert skipped == [(MALFORMED_RECORD, f"{path}#1"), (MALFORMED_RECORD, f"{path}#2"), (MALFORMED_RECORD, f"{path}#3")]


OWL_TEXT_MULTI = (
    f"{OWL_SYSTEM_PROMPT}\nHuman: <image>\nHuman: <image>\nHuman: Compare the two shapes.\nAI: The first is a red circle."
    "\nHuman: And the second?\nAI: A blue square."
)


def test_owl_jsonl(tmp_path):
    lines = [
        json.dumps(
            {
                "text": f"{OWL_SYSTEM_PROMPT}\nHuman: <image>\nHuman: What is this?\nAI: A cat.",
                "image": ["cat.jpg"],
                "task_type": "llava_sft",
            }
        ),
        json.dumps({"text": OWL_TEXT_MULTI, "image": ["a.png", "b.png"], "task_type": "gpt4instruct_sft"}),
        '{"text": "broken',
        "",
        json.dumps({"text": f"{OWL_SYSTEM_PROMPT}\nHuman: <image>\nHuman: What?\nAI: This.", "image": [], "task_type": "x"}),
        json.dumps({"text": f"{OWL_SYSTEM_PROMPT}\nHuman: Name a colour.\nAI: Green.", "task_type": "sharegpt_sft"}),
        json.dumps({"text": 5, "image": []}),
        json.dumps({"text": "no markers at all", "image": []}),
    ]
    path = tmp_path / "owl.jsonl"
    path.write_text("\n".join(lines) + "\n")
    conversations, skipped = read("owl_jsonl", str(path))
    cat, multi, text = conversations
    assert roles_and_texts(cat) == [("user", "<image>\nWhat is this?"), ("assistant", "A cat.")] and cat.images == ["cat.jpg"]
    assert roles_and_texts(multi) == [
        ("user", "<image>\n<image>\nCompare the two shapes."),
        ("assistant", "The first is a red circle."),
        ("user", "And the second?"),
        ("assistant", "A blue square."),
    ]
    assert multi.images == ["a.png", "b.png"] and multi.origin == f"{path}:2" and multi.system is None
    assert text.images == [] and text.origin == f"{path}:6"
    assert skipped == [
        (MALFORMED_RECORD, f"{path}:3"),
        (IMAGE_COUNT_MISMATCH, f"{path}:5"),
        (MALFORMED_RECORD, f"{path}:7"),
        (MALFORMED_RECORD, f"{path}:8"),
    ]


def test_owl_jsonl_round_trips_through_the_owl_template(tmp_path):
    """Read back and re-encoded, an mPLUG-Owl record is its own text with BOS and an EOS after each answer."""
    path = tmp_path / "owl.jsonl"
    path.write_text(json.dumps({"text": OWL_TEXT_MULTI, "image": ["a.png", "b.png"]}) + "\n")
    (conv,), _ = read("owl_jsonl", str(path))
    tok = byte_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    input_ids, _, num_images = ConversationTemplate(tok, visual_tokens_per_image=4).encode(conv)
    expected = OWL_TEXT_MULTI.replace("\nAI: The first is a red circle.", "\nAI: The first is a red circle.<|im_end|>")
    assert tok.decode(input_ids) == f"<|im_start|>{expected}<|im_end|>"
    assert num_images == 2


def test_unreadable_files_raise_naming_the_file(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[{"id": 1,')
    with pytest.raises(ValueError, match="broken.json"):
        read("llava", str(broken))
    with pytest.raises(ValueError, match="JSON list"):
        read("sharegpt", write_json(tmp_path, "dict.json", {"data": []}))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        read("alpaca", str(tmp_path / "missing.json"))


def test_turn_roles_are_checked():
    with pytest.raises(ValueError, match="role"):
        Turn("gpt", "hi")


def test_deeply_nested_json_line_is_one_skipped_record(tmp_path):
    """100,000 ``[`` overflow the JSON parser's recursion limit: that line is skipped, reading goes on."""
    path = tmp_path / "owl.jsonl"
    good = json.dumps({"text": "\nHuman: Hi\nAI: Hello"})
    path.write_text("\n".join([good, "[" * 100_000, '{"text": ' + "[" * 100_000, good]) + "\n")
    conversations, skipped = read("owl_jsonl", str(path))
    assert [c.origin for c in conversations] == [f"{path}:1", f"{path}:4"]
    assert skipped == [(MALFORMED_RECORD, f"{path}:2"), (MALFORMED_RECORD, f"{path}:3")]


def test_deeply_nested_json_file_raises_naming_the_file(tmp_path):
    """A JSON-list file is parsed whole, so one over-deep record makes the file unreadable: a clear error."""
    path = tmp_path / "deep.json"
    path.write_text('[{"conversations": ' + "[" * 100_000 + "]" * 100_000 + "}]")
    with pytest.raises(ValueError, match=r"deep\.json.*nested"):
        read("llava", str(path))


@pytest.mark.parametrize("speaker", ["system", "System"])
def test_image_placeholder_in_a_system_turn_is_skipped_at_read(tmp_path, speaker):
    path = write_json(
        tmp_path,
        "llava.json",
        [
            {"image": "a.png", "conversations": [{"from": speaker, "value": "<image>"}] + LLAVA[0]["conversations"][2:]},
            {"image": "b.png", "conversations": [{"from": speaker, "value": "<image> rules"}] + LLAVA[0]["conversations"][:2]},
            LLAVA[1],
        ],
    )
    conversations, skipped = read("llava", path)
    assert [c.origin for c in conversations] == [f"{path}#2"]
    assert skipped == [(MALFORMED_RECORD, f"{path}#0"), (IMAGE_COUNT_MISMATCH, f"{path}#1")]


def test_an_unforeseen_failure_is_a_skipped_record_of_reason_unexpected(tmp_path, monkeypatch):
    """Whatever a parser raises for one record — here a bug planted in it — costs that record only."""
    import owl_lightning.data.instruct as instruct

    parse = instruct._PARSERS["alpaca"]

    def parse_with_a_bug(record):
        if record.get("instruction") == "Break.":
            return {}["no such key"]
        return parse(record)

    monkeypatch.setitem(instruct._PARSERS, "alpaca", parse_with_a_bug)
    path = write_json(tmp_path, "alpaca.json", [{"instruction": "Break.", "output": "x"}, {"instruction": "Say hi.", "output": "hi"}])
    skips = SkipLog()
    conversations = read_conversations(InstructionSource(name="a", format="alpaca", path=path), skips)
    assert [c.origin for c in conversations] == [f"{path}#1"]
    assert skips.drain() == [(UNEXPECTED, f"{path}#0")]
    assert "KeyError" in skips.last
