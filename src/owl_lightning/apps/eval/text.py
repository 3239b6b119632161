"""Text-only retention: perplexity of held-out instruction answers, base LLM versus tuned model.

Both score the same token sequences (the training template); the base is the same model with its
LoRA adapters switched off, so only the tuning differs.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from tqdm import tqdm

from owl_lightning.data.collate import EncodedSample, collate
from owl_lightning.data.health import SkipLog
from owl_lightning.data.instruct import read_conversations
from owl_lightning.data.manifest import InstructionSource
from owl_lightning.inference import OwlAssistant


@torch.no_grad()
def answer_perplexity(assistant: OwlAssistant, samples: list[EncodedSample], batch_size: int = 16, base: bool = False) -> float:
    """exp(mean negative log-likelihood per answer token) over ``samples``."""
    model = assistant.model
    adapters_off = getattr(model.llm, "disable_adapter", None)
    total_loss, total_tokens = 0.0, 0
    with adapters_off() if base and adapters_off else nullcontext(), assistant.autocast():
        for start in range(0, len(samples), batch_size):
            batch = collate(samples[start : start + batch_size], assistant.tokenizer.pad_token_id)
            out = model(batch["input_ids"], batch["sample_ids"], batch["labels"])
            total_loss += float(out.loss) * out.num_supervised
            total_tokens += out.num_supervised
    return math.exp(total_loss / total_tokens)


def text_retention(assistant: OwlAssistant, path: str, limit: int | None = None, progress: bool = True) -> dict:
    """Perplexity of the held-out Alpaca file under the base LLM and the tuned model."""
    skips = SkipLog()
    conversations = read_conversations(InstructionSource(name="heldout", format="alpaca", path=path), skips)[:limit]
    samples = []
    for conversation in tqdm(conversations, desc="text retention", disable=not progress, unit="sample"):
        ids, labels, _ = assistant.template.encode(conversation)
        samples.append(EncodedSample(ids, labels))
    base = answer_perplexity(assistant, samples, base=True)
    tuned = answer_perplexity(assistant, samples)
    return {"base_perplexity": base, "tuned_perplexity": tuned, "ratio": tuned / base, "count": len(samples)}
