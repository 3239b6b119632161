"""General text instructions answered by the base LLM itself: the embedded default's general text data.

The embedded build has no general instruction data (Alpaca and the like are downloads), and stage 2 on
easy-VQA's one-word answers plus one-line docstring summaries teaches the LLM to answer everything in
a line (docs/embedded.md). This module writes prompts from fixed templates over fixed topics —
poems, explanations, lists, advice, stories, descriptions, comparisons, notes — and has the *base*
LLM answer them greedily under its own chat template, as its makers tuned it. Stage 2 trains on these
answers under the run's template, so that the tuned model keeps answering general requests as the
base model did (self-distillation).

The topics avoid those of the held-out prompts that ``eval`` scores (``apps/eval/text_prompts.json``):
no sea, sky, moon, seasons, camping, sleep, tea, gardens, pets, markets or the like, so that the
instruction-following figures stay measured on unseen requests. Answers that loop (3-gram repetition
above ``eval``'s degenerate threshold) or are empty are dropped.

``owl-lightning data general-text [--out data/general_text] [--max-new-tokens N]`` writes ``train.json``
and ``heldout.json`` (every 10th answer) in Alpaca format (instruction, input, output, kind); skipped when
the folder holds a build with the same settings. Deterministic for given package versions: greedy decoding
in float32 on the CPU, fixed batches (about 6 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
from pathlib import Path

import torch

from owl_lightning.apps.embedded import build_and_report, build_once
from owl_lightning.apps.eval.instructions import DEGENERATE_REPETITION, answer_texts, read_text_prompts, repetition
from owl_lightning.config import get_config
from owl_lightning.inference import OwlAssistant
from owl_lightning.models.llm import load_tokenizer
from owl_lightning.models.owl import build_owl

log = logging.getLogger(__name__)

BUILD_VERSION = 1  # bump when the prompts or the decoding change, so existing builds are redone

# (kind, template): each template takes a topic.
TEMPLATES = (
    ("poem", "Write a short poem about {topic}."),
    ("explain", "Explain {topic} in a few sentences."),
    ("list", "Give three interesting facts about {topic}."),
    ("describe", "Describe {topic} to someone who has never seen it."),
    ("story", "Write a short story that involves {topic}."),
    ("advise", "What should a beginner know about {topic}?"),
    ("compare", "How has {topic} changed over the last hundred years?"),
    ("letter", "Write a short note to a friend recommending {topic}."),
)
TOPICS = (
    "mountains", "bicycles", "bread baking", "rivers", "owls", "castles", "trains", "volcanoes",
    "honey", "chess", "lighthouses", "deserts", "museums", "bridges", "kites", "penguins", "waterfalls",
    "maps", "the piano", "glaciers", "windmills", "fireworks", "elephants", "pottery", "jazz music",
)  # fmt: skip
HELDOUT_EVERY = 10  # every 10th prompt goes to the validation file


def general_prompts() -> list[dict[str, str]]:
    """Every template over every topic, in a fixed order: ``{"kind", "instruction"}``."""
    eval_prompts = {p["prompt"] for p in read_text_prompts()}
    prompts = [
        {"kind": kind, "instruction": template.format(topic=topic)} for topic, (kind, template) in itertools.product(TOPICS, TEMPLATES)
    ]
    assert not eval_prompts & {p["instruction"] for p in prompts}, "a training prompt is one of eval's held-out prompts"
    return prompts


def answer_prompts(
    prompts: list[dict[str, str]], max_new_tokens: int = 128, batch_size: int = 16, config_name: str = "owl-smol"
) -> list[dict[str, str]]:
    """The base LLM's greedy answers to ``prompts``, as Alpaca records (``instruction``, ``input``,
    ``output``, ``kind``); looping or empty answers are dropped. ``config_name``: the registry config
    whose LLM answers (the embedded default's)."""
    torch.manual_seed(0)
    config = get_config(config_name)
    tokenizer = load_tokenizer(config.llm)
    assistant = OwlAssistant(build_owl(config, tokenizer=tokenizer), tokenizer, precision="fp32")
    records = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        answers = answer_texts(assistant, [p["instruction"] for p in batch], max_new_tokens, batch_size, base=True)
        for prompt, answer in zip(batch, answers):
            if answer.strip() and repetition(answer) <= DEGENERATE_REPETITION:
                records.append({"instruction": prompt["instruction"], "input": "", "output": answer.strip(), "kind": prompt["kind"]})
        log.info("answered %d / %d prompts", start + len(batch), len(prompts))
    return records


def build_general_text(out: str | Path = "data/general_text", max_new_tokens: int = 128, config_name: str = "owl-smol") -> dict[str, int]:
    """Answer the prompts into ``out`` (``train.json``, ``heldout.json``) unless built with these settings; returns the counts."""
    settings = {"version": BUILD_VERSION, "max_new_tokens": max_new_tokens, "config": config_name}

    def build_into(root: Path) -> dict[str, int]:
        prompts = general_prompts()
        records = answer_prompts(prompts, max_new_tokens, config_name=config_name)
        parts = {"train": [r for i, r in enumerate(records) if i % HELDOUT_EVERY], "heldout": records[::HELDOUT_EVERY]}
        for name, part in parts.items():
            (root / f"{name}.json").write_text(json.dumps(part, indent=1, ensure_ascii=False))
        return {"prompts": len(prompts), **{f"{name}_records": len(part) for name, part in parts.items()}}

    return build_once(out, settings, build_into)


def main(argv: list[str] | None = None) -> None:
    """``owl-lightning data general-text``: the base LLM's answers to the general prompts (skipped when built)."""
    parser = argparse.ArgumentParser(prog="owl-lightning data general-text", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/general_text", help="output folder (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="longest answer (default: %(default)s)")
    parser.add_argument("--config", default="owl-smol", help="the registry config whose base LLM answers (default: %(default)s)")
    args = parser.parse_args(argv)
    build_and_report(
        "general text answered by the base LLM", args.out, lambda: build_general_text(args.out, args.max_new_tokens, args.config)
    )


if __name__ == "__main__":
    main()
