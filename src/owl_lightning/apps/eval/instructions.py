"""Instruction following on held-out general text prompts: the tuned model against its own base LLM.

The base LLM (LoRA adapters off) answers under its own chat template, as its makers tuned it; the
tuned model answers as users call it, under the run's template. Both decode greedily with the same
``max_new_tokens``. The prompts (``text_prompts.json``: poems, explanations, lists, summaries,
advice, ...) ask for nothing the embedded training teaches (shapes, colours, Python).

Per answer, with *words* = lower-cased ``\\w+`` runs (so that the measures do not depend on the
tokenizer):

- ``tokens``: length in the LLM's tokens (the decoded answer, re-tokenised; at most ``max_new_tokens``).
- ``repetition``: the fraction of the answer's word 3-grams that repeat an earlier 3-gram of the same
  answer — 0 for ordinary prose, → 1 for a loop ("Sea, sea, sea, …", "AI: AI: AI: …"); 0 for an
  answer of fewer than 3 words.
- ``degenerate``: ``repetition > DEGENERATE_REPETITION`` (0.5): more than half of the answer repeats
  itself. A sentence said twice in a row scores just under 0.5; said three times, about 0.65.
- ``rouge_l``: ROUGE-L F1 of the tuned answer's words against the base answer's (longest common
  subsequence; 1: the same words in the same order, 0: no word in common; two empty answers: 1).
  Closeness to what the base model says, not a quality score.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

from owl_lightning.apps.eval.text import base_llm
from owl_lightning.data.template import ConversationTemplate, Turn
from owl_lightning.inference import OwlAssistant, Request

DEFAULT_PROMPTS = resources.files(__package__) / "text_prompts.json"
DEGENERATE_REPETITION = 0.5
_WORD = re.compile(r"\w+")


def read_text_prompts(path: str | Path | None = None) -> list[dict]:
    """A prompt file: a JSON list of ``{"id", "kind", "prompt"}`` (default: the 24 shipped prompts)."""
    source = Path(path) if path is not None else DEFAULT_PROMPTS
    prompts = json.loads(source.read_text(encoding="utf-8"))
    if not isinstance(prompts, list) or not all(isinstance(p, dict) and isinstance(p.get("prompt"), str) for p in prompts):
        raise ValueError(f'{source}: expected a JSON list of {{"id", "kind", "prompt"}} objects')
    return prompts


def words(text: str) -> list[str]:
    """Lower-cased ``\\w+`` runs of ``text``."""
    return _WORD.findall(text.lower())


def repetition(text: str) -> float:
    """Fraction of the word 3-grams of ``text`` that repeat an earlier one (0 with fewer than 3 words)."""
    tokens = words(text)
    trigrams = list(zip(tokens, tokens[1:], tokens[2:]))
    return 1 - len(set(trigrams)) / len(trigrams) if trigrams else 0.0


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 of ``candidate``'s words against ``reference``'s: 2PR / (P + R) with P, R = LCS length
    over each one's word count. Two empty texts agree (1); one empty text agrees with nothing (0)."""
    a, b = words(candidate), words(reference)
    if not a or not b:
        return float(a == b)
    previous = [0] * (len(b) + 1)  # LCS lengths of a[:i] against every prefix of b, one row at a time
    for token in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    common = previous[-1]
    return 0.0 if common == 0 else 2 * common / (len(a) + len(b))


def base_template(assistant: OwlAssistant) -> ConversationTemplate:
    """The base LLM's own chat template, with no system line of ours (the template adds its default, if
    it has one); the run's template when the tokenizer has no chat template (a base, not chat, LLM)."""
    if not assistant.tokenizer.chat_template:
        return assistant.template
    run = assistant.template
    return ConversationTemplate(
        assistant.tokenizer,
        "chat_template",
        system_prompt=None,
        max_length=run.max_length,
        visual_tokens_per_image=run.visual_tokens_per_image,
    )


def answer_stats(answers: list[str], tokenizer) -> dict:
    """``mean_tokens``, ``mean_repetition``, ``degenerate`` (count) and ``degenerate_rate`` of ``answers``."""
    repetitions = [repetition(answer) for answer in answers]
    degenerate = sum(r > DEGENERATE_REPETITION for r in repetitions)
    lengths = [len(tokenizer(answer, add_special_tokens=False)["input_ids"]) for answer in answers]
    return {
        "mean_tokens": sum(lengths) / len(answers),
        "mean_repetition": sum(repetitions) / len(answers),
        "degenerate": degenerate,
        "degenerate_rate": degenerate / len(answers),
    }


def answer_texts(assistant: OwlAssistant, prompts: list[str], max_new_tokens: int, batch_size: int, base: bool) -> list[str]:
    """Greedy answers to text-only ``prompts``: by the base LLM under its own chat template (``base``),
    or by the tuned model under the run's template."""
    template = base_template(assistant) if base else assistant.template
    answers: list[str] = []
    with base_llm(assistant.model, base):
        for start in range(0, len(prompts), batch_size):
            requests = [Request([Turn("user", prompt)]) for prompt in prompts[start : start + batch_size]]
            answers += assistant.answer(requests, max_new_tokens, template=template)
    return answers


def instruction_following(
    assistant: OwlAssistant, prompts: list[dict] | None = None, max_new_tokens: int = 128, batch_size: int = 32
) -> dict:
    """Answer ``prompts`` (default: the shipped ones) with the base LLM and the tuned model and compare.

    Keys: ``prompts`` (count), ``max_new_tokens``, ``base_template`` / ``tuned_template`` (styles),
    ``base`` / ``tuned`` (:func:`answer_stats`), ``length_ratio`` (tuned / base mean tokens; None when
    every base answer is empty),
    ``agreement_rouge_l`` (mean :func:`rouge_l`), ``answers`` (per prompt: ``id``, ``kind``,
    ``prompt``, ``base``, ``tuned``, ``base_repetition``, ``tuned_repetition``, ``rouge_l``)."""
    prompts = prompts if prompts is not None else read_text_prompts()
    texts = [p["prompt"] for p in prompts]
    base = answer_texts(assistant, texts, max_new_tokens, batch_size, base=True)
    tuned = answer_texts(assistant, texts, max_new_tokens, batch_size, base=False)
    answers = [
        {
            "id": p.get("id", i),
            "kind": p.get("kind", ""),
            "prompt": p["prompt"],
            "base": b,
            "tuned": t,
            "base_repetition": repetition(b),
            "tuned_repetition": repetition(t),
            "rouge_l": rouge_l(t, b),
        }
        for i, (p, b, t) in enumerate(zip(prompts, base, tuned))
    ]
    base_stats, tuned_stats = answer_stats(base, assistant.tokenizer), answer_stats(tuned, assistant.tokenizer)
    return {
        "prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "base_template": base_template(assistant).style,
        "tuned_template": assistant.template.style,
        "base": base_stats,
        "tuned": tuned_stats,
        "length_ratio": tuned_stats["mean_tokens"] / base_stats["mean_tokens"] if base_stats["mean_tokens"] else None,
        "agreement_rouge_l": sum(a["rouge_l"] for a in answers) / len(answers),
        "answers": answers,
    }
