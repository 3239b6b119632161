"""Evaluation: easy-VQA accuracy, caption BLEU, text retention, and a qualitative sheet."""
