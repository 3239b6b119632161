"""Text-only ability against the base LLM (owl_lightning.apps.eval.text) on owl-tiny."""

import pytest
import torch

from owl_lightning.apps.eval.text import prose_perplexity, prose_windows, read_prose
from owl_lightning.inference import OwlAssistant


def tiny_assistant_with_adapters(model, tokenizer):
    """owl-tiny with LoRA adapters (B = 0: tuned equals base)."""
    model.add_lora(model.config.lora)
    return OwlAssistant(model, tokenizer, precision="fp32")


def perturb_adapters(model) -> None:
    with torch.no_grad():
        for name, weight in model.llm.named_parameters():
            if "lora_B" in name:
                weight.normal_(std=0.5)


def test_prose_windows_are_english_text_of_the_requested_size(tiny_tokenizer):
    windows = prose_windows(tiny_tokenizer, window_tokens=128, max_windows=5)
    assert [len(window) for window in windows] == [128] * 5
    text = tiny_tokenizer.decode([token for window in windows for token in window])
    assert text == read_prose()[0][: len(text)]  # consecutive windows from the first article on
    vocabulary = text.lower().split()
    assert len(vocabulary) > 80 and sum(w in ("the", "of", "to", "and", "in", "a") for w in vocabulary) > 10
    assert sum(c.isascii() for c in text) == len(text)
    with pytest.raises(ValueError, match="positive"):
        prose_windows(tiny_tokenizer, window_tokens=0)


def test_unchanged_adapters_give_prose_ratio_one(tiny_model, tiny_tokenizer):
    assistant = tiny_assistant_with_adapters(tiny_model, tiny_tokenizer)
    prose = prose_perplexity(assistant, windows=2, window_tokens=64, progress=False)
    assert prose["ratio"] == 1.0 and prose["within_target"] and prose["windows"] == 2


def test_tuned_adapters_show_against_the_base_on_prose(tiny_model, tiny_tokenizer):
    assistant = tiny_assistant_with_adapters(tiny_model, tiny_tokenizer)
    perturb_adapters(assistant.model)
    prose = prose_perplexity(assistant, windows=2, window_tokens=64, progress=False)
    assert prose["ratio"] != pytest.approx(1.0, abs=1e-3)
