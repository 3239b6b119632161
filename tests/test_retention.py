"""Text-only ability against the base LLM (owl_lightning.apps.eval.text / .instructions) on owl-tiny.

A random owl-tiny repeats its prompt's last token (its layers add little to the residual stream), so
:func:`varied_assistant` scales its LLM's matrices until greedy answers differ from prompt to prompt:
then "same answers" means something.
"""

import pytest
import torch

from owl_lightning import inference
from owl_lightning.apps.eval import run
from owl_lightning.apps.eval.instructions import (
    DEGENERATE_REPETITION,
    instruction_following,
    read_text_prompts,
    repetition,
    rouge_l,
    words,
)
from owl_lightning.apps.eval.run import summary_table
from owl_lightning.apps.eval.text import prose_perplexity, prose_windows, read_prose
from owl_lightning.inference import OwlAssistant


def varied_assistant(model, tokenizer, template="chat_template"):
    """owl-tiny with LoRA adapters (B = 0: tuned equals base), answering varied bytes under ``template``."""
    with torch.no_grad():
        for name, weight in model.llm.named_parameters():
            if weight.ndim == 2 and "embed" not in name:
                weight.mul_(10)
    model.add_lora(model.config.lora)
    system = None if template == "chat_template" else "You are a helpful assistant."
    return OwlAssistant(model, tokenizer, template=template, system_prompt=system, precision="fp32")


def perturb_adapters(model) -> None:
    with torch.no_grad():
        for name, weight in model.llm.named_parameters():
            if "lora_B" in name:
                weight.normal_(std=0.5)


PROMPTS = read_text_prompts()[:4]


def test_the_shipped_prompts_are_general_text_tasks():
    prompts = read_text_prompts()
    assert len(prompts) == 24 and len({p["id"] for p in prompts}) == 24
    assert {"poem", "explain", "list", "summarize", "advise"} <= {p["kind"] for p in prompts}
    text = " ".join(p["prompt"] for p in prompts).lower()
    assert not any(term in text for term in ("python", "docstring", "function", "shape", "colour", "color", "image"))


def test_prose_windows_are_english_text_of_the_requested_size(tiny_tokenizer):
    windows = prose_windows(tiny_tokenizer, window_tokens=128, max_windows=5)
    assert [len(window) for window in windows] == [128] * 5
    text = tiny_tokenizer.decode([token for window in windows for token in window])
    assert text == read_prose()[0][: len(text)]  # consecutive windows from the first article on
    vocabulary = words(text)
    assert len(vocabulary) > 80 and sum(w in ("the", "of", "to", "and", "in", "a") for w in vocabulary) > 10
    assert sum(c.isascii() for c in text) == len(text)
    with pytest.raises(ValueError, match="positive"):
        prose_windows(tiny_tokenizer, window_tokens=0)


def test_unchanged_adapters_give_ratio_one_and_full_agreement(tiny_model, tiny_tokenizer):
    assistant = varied_assistant(tiny_model, tiny_tokenizer)  # base and tuned share weights and template
    prose = prose_perplexity(assistant, windows=2, window_tokens=64, progress=False)
    assert prose["ratio"] == 1.0 and prose["within_target"] and prose["windows"] == 2
    result = instruction_following(assistant, PROMPTS, max_new_tokens=12)
    answers = [a["base"] for a in result["answers"]]
    assert len(set(answers)) == len(PROMPTS) and all(words(a) for a in answers)  # varied, with words: agreement can fail
    assert result["agreement_rouge_l"] == 1.0 and result["length_ratio"] == 1.0
    assert result["base"] == result["tuned"]


def test_tuned_adapters_show_against_the_base(tiny_model, tiny_tokenizer):
    assistant = varied_assistant(tiny_model, tiny_tokenizer)
    perturb_adapters(assistant.model)
    prose = prose_perplexity(assistant, windows=2, window_tokens=64, progress=False)
    assert prose["ratio"] != pytest.approx(1.0, abs=1e-3)
    result = instruction_following(assistant, PROMPTS, max_new_tokens=12)
    assert result["agreement_rouge_l"] < 1.0
    assert any(a["base"] != a["tuned"] for a in result["answers"])


def test_base_answers_under_its_chat_template_and_tuned_under_the_runs(tiny_model, tiny_tokenizer, monkeypatch):
    assistant = varied_assistant(tiny_model, tiny_tokenizer, template="owl")
    prompts = []
    original = inference.generate

    def recording_generate(model, tokenizer, samples, *args, **kwargs):
        prompts.extend(tokenizer.decode(sample.input_ids) for sample in samples)
        return original(model, tokenizer, samples, *args, **kwargs)

    monkeypatch.setattr(inference, "generate", recording_generate)
    result = instruction_following(assistant, PROMPTS[:1], max_new_tokens=4)
    base, tuned = prompts
    assert base.startswith("<|im_start|>user\nWrite a short poem") and base.endswith("<|im_start|>assistant\n")
    assert tuned.startswith("<|im_start|>You are a helpful assistant.\nHuman: Write a short poem") and tuned.endswith("\nAI: ")
    assert (result["base_template"], result["tuned_template"]) == ("chat_template", "owl")


BASE_ANSWER = "The sea is wide and grey, and the waves roll in slowly under a low sky."
LOOP = "Sea, sea, sea, sea, sea, sea, sea, sea, sea, sea, sea, sea."


@pytest.fixture
def looping_results(tiny_model, tiny_tokenizer, monkeypatch):
    """eval's results with the text checks of an owl-tiny whose tuned answers loop (scripted) and whose
    base answers are a plain sentence; the image metrics filled in by hand."""
    assistant = varied_assistant(tiny_model, tiny_tokenizer, template="owl")

    def scripted_answer(requests, max_new_tokens, template=None):
        return [LOOP if template is assistant.template else BASE_ANSWER for _ in requests]

    monkeypatch.setattr(assistant, "answer", scripted_answer)
    return {
        "checkpoint": "runs/x/checkpoints/last.ckpt",
        "easy_vqa": {"accuracy": 1.0, "count": 1, "by_type": {"shape": 1.0}},
        "captions": {"bleu4": 0.0, "exact_match": 1.0, "count": 1},
        "text_same_task": {"base_perplexity": 50.0, "tuned_perplexity": 15.0, "ratio": 0.3, "count": 93},
        "text_unseen_prose": prose_perplexity(assistant, windows=1, window_tokens=32, progress=False),
        "text_instructions": instruction_following(assistant, PROMPTS, max_new_tokens=32),
        "qualitative": [],
    }


def test_a_looping_tuned_model_is_flagged_degenerate(looping_results):
    result = looping_results["text_instructions"]
    assert result["tuned"]["degenerate"] == len(PROMPTS) and result["tuned"]["degenerate_rate"] == 1.0
    assert result["base"]["degenerate"] == 0 and result["base"]["mean_repetition"] == 0.0
    assert result["agreement_rouge_l"] < 0.2
    assert [(a["base"], a["tuned"]) for a in result["answers"]] == [(BASE_ANSWER, LOOP)] * len(PROMPTS)
    table = summary_table(looping_results)
    assert "degenerate, base / tuned" in table and "0 / 4 of 4" in table
    assert "unseen prose perplexity" in table and "within the +3% target" in table
    assert "tuned: Sea, sea, sea" in table and "base:  The sea is wide" in table


def test_text_checks_reach_tensorboard(looping_results, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setattr(run, "read_checkpoint", lambda path: {"global_step": 7})
    run._log_to_tensorboard(tmp_path, looping_results)
    events = EventAccumulator(str(tmp_path)).Reload()
    scalars = {tag: events.Scalars(tag)[-1] for tag in events.Tags()["scalars"]}
    assert scalars["eval/prompts_tuned_degenerate_rate"].value == 1.0 and scalars["eval/prompts_tuned_degenerate_rate"].step == 7
    assert scalars["eval/prose_perplexity_ratio"].value == 1.0
    assert {"eval/text_same_task_perplexity_ratio", "eval/prompts_agreement_rouge_l", "eval/prose_base_perplexity"} <= set(scalars)


def test_repetition_and_rouge_l_as_documented():
    sentence = "the waves roll in slowly under a low grey sky"  # 10 distinct words
    assert repetition(sentence) == 0.0 and repetition("no") == 0.0
    assert repetition(" ".join([sentence] * 2)) == pytest.approx(1 - 10 / 18)  # said twice: not degenerate
    thrice = repetition(" ".join([sentence] * 3))
    assert thrice == pytest.approx(1 - 10 / 28) and thrice > DEGENERATE_REPETITION
    assert repetition("AI: AI: AI: AI: AI: AI:") == pytest.approx(0.75)
    assert rouge_l("a c d", "a b c d") == pytest.approx(2 * 3 / 7)  # LCS 3: P = 1, R = 3/4
    assert rouge_l("Same words.", "same WORDS") == 1.0 and rouge_l("", "") == 1.0
    assert rouge_l("", "something") == 0.0 and rouge_l("x y", "z") == 0.0
