"""The self-distilled general text data (owl_lightning.apps.general_text)."""

import json

from owl_lightning.apps import general_text
from owl_lightning.apps.eval.instructions import read_text_prompts, words
from owl_lightning.data.health import SkipLog
from owl_lightning.data.instruct import read_conversations
from owl_lightning.data.manifest import InstructionSource


def test_prompts_cover_every_template_and_stay_off_the_held_out_topics():
    prompts = general_text.general_prompts()
    assert len(prompts) == len(general_text.TOPICS) * len(general_text.TEMPLATES)
    assert len({p["instruction"] for p in prompts}) == len(prompts)
    assert {p["kind"] for p in prompts} == {kind for kind, _ in general_text.TEMPLATES}
    held_out_words = {w for p in read_text_prompts() for w in words(p["prompt"])}
    for topic in general_text.TOPICS:  # no topic word of eval's prompts (template words like "write" may repeat)
        assert not set(words(topic)) & held_out_words - {"the", "a", "of"}, topic


def test_looping_and_empty_answers_are_dropped_and_a_tenth_held_out(tmp_path, monkeypatch):
    answers = iter(["A calm answer about hills.", "", "loop " * 40, "Another answer, in words."] * 10)
    monkeypatch.setattr(general_text, "answer_texts", lambda assistant, prompts, *args, **kwargs: [next(answers) for _ in prompts])
    monkeypatch.setattr(general_text, "general_prompts", lambda: [{"kind": "poem", "instruction": f"Prompt {i}."} for i in range(40)])
    out = tmp_path / "general_text"
    general_text.main(["--out", str(out), "--config", "owl-tiny"])
    train, heldout = json.loads((out / "train.json").read_text()), json.loads((out / "heldout.json").read_text())
    kept = train + heldout
    assert len(kept) == 20 and len(heldout) == 2
    assert {r["output"] for r in kept} == {"A calm answer about hills.", "Another answer, in words."}
    # prompts i % 4 in (0, 3) are kept: 0, 3, 4, 7, ..., 19, 20; every 10th kept record is held out
    assert [r["instruction"] for r in heldout] == ["Prompt 0.", "Prompt 20."]
    skips = SkipLog()  # a stage-2 manifest reads it as Alpaca
    conversations = read_conversations(InstructionSource("general_text", "alpaca", str(out / "train.json")), skips)
    assert len(conversations) == 18 and not skips.pending


def test_a_built_folder_is_kept_unless_its_settings_change(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(general_text, "answer_prompts", lambda prompts, *args, **kwargs: calls.append(args) or [])
    monkeypatch.setattr(general_text, "general_prompts", lambda: [])
    out = tmp_path / "general_text"
    general_text.build_general_text(out, config_name="owl-tiny")
    general_text.build_general_text(out, config_name="owl-tiny")
    assert len(calls) == 1
    general_text.build_general_text(out, max_new_tokens=64, config_name="owl-tiny")
    assert len(calls) == 2
