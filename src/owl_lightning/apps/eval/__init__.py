"""Evaluation: easy-VQA accuracy, caption BLEU, text-only ability against the base LLM (same-task and
unseen-prose perplexity, answers to held-out text prompts), a qualitative sheet, and the public benchmarks
(:mod:`owl_lightning.apps.eval.benchmarks`)."""
