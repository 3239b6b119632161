"""Batched generation throughput of an owl, as `eval`, `chat` and `serve` generate (issue 22; run by bench/gpu.sh).

The models are gpu_stage1.py's (random weights, byte tokenizer: nothing downloaded) plus the paper's 7B:
``1b`` (CLIP ViT-L/14, abstractor, a 1.1B LLaMA), ``7b`` (owl-llama7b: the same vision side on LLaMA-7B's
shape), ``tiny`` (owl-tiny, a smoke test on the CPU). Each request is one 224 px image and a short question;
``--batch-size`` of them go through :meth:`OwlAssistant.generate` at once (one left-padded batch, KV cache,
bf16 autocast), each answer up to ``--new-tokens`` long (a random LLM rarely ends early; the tokens actually
generated are counted). Timing: wall clock around whole batches (CUDA synchronised), after one warm-up batch;
the median over ``--repeats`` batches. Reported: generated tokens/s and images (answers)/s.

    python bench/generation.py --model 7b --batch-size 32
    python bench/generation.py --model tiny --device cpu --batch-size 4 --new-tokens 8    # smoke test
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from PIL import Image

from common import record, synchronize
from gpu_stage1 import MODELS
from owl_lightning.config import get_config
from owl_lightning.inference import OwlAssistant, Request, Sampling
from owl_lightning.models.llm import load_tokenizer
from owl_lightning.models.owl import build_owl

GENERATION_MODELS = {
    **MODELS,
    "7b": ("owl-llama7b", {"vision.weights": None, "llm.source": "random", "llm.tokenizer": "bytes", "llm.dtype": "bfloat16"}),
}


def requests(count: int, size: int, seed: int = 0) -> list[Request]:
    """``count`` one-image questions, each image random noise of ``size`` px (the encoder's work is the same)."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (count, size, size, 3), dtype=torch.uint8, generator=generator).numpy()
    return [Request.single("Describe the image in detail.", [Image.fromarray(image)]) for image in pixels]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(GENERATION_MODELS), default="1b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--record-as", default=None, help="bench/results.json key (default: generation_<model>_b<batch>)")
    args = parser.parse_args()

    name, overrides = GENERATION_MODELS[args.model]
    config = get_config(name, overrides)
    tokenizer = load_tokenizer(config.llm)
    device = torch.device(args.device)
    with device:
        model = build_owl(config, pretrained=False, tokenizer=tokenizer)
    assistant = OwlAssistant(model, tokenizer, precision="bf16")
    size = model.vision.input_size[-1]
    samples = [assistant.encode(request) for request in requests(args.batch_size, size)]
    samplings = [Sampling(max_new_tokens=args.new_tokens)] * len(samples)

    seconds, tokens = [], []
    for repeat in range(1 + args.repeats):  # the first batch warms up kernels and the allocator
        synchronize(device)
        start = time.perf_counter()
        generations = assistant.generate(samples, samplings)
        synchronize(device)
        if repeat:
            seconds.append(time.perf_counter() - start)
            tokens.append(sum(len(generation.tokens) for generation in generations))
    median = statistics.median(seconds)
    record(
        args.record_as or f"generation_{args.model}_b{args.batch_size}",
        {
            "tokens_per_s": round(statistics.median(tokens) / median, 1),
            "images_per_s": round(args.batch_size / median, 2),
            "batch_seconds": [round(s, 3) for s in seconds],
            "batch_size": args.batch_size,
            "new_tokens": args.new_tokens,
            "prompt_tokens": assistant.prompt_tokens(samples[0]),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "how": "OwlAssistant.generate on one left-padded batch of one-image requests (KV cache, bf16 autocast), "
            "random weights; generated tokens and answers per second of whole batches, median after a warm-up batch",
        },
    )


if __name__ == "__main__":
    main()
