"""Evaluation: easy-VQA accuracy, caption BLEU, text-only ability against the base LLM (same-task and
unseen-prose perplexity, answers to held-out text prompts), and a qualitative sheet."""
