"""Stage-1 throughput and MFU of a ~1.5B owl on one GPU, bf16, FSDP2 (issue 6, item 6; run by bench/gpu.sh).

The model: the paper's vision side (CLIP ViT-L/14 at 224 px, 6-layer abstractor, 65 visual tokens
per image) on a 1.1B LLaMA (TinyLlama's shape: 22 layers, width 2048, GQA 32/4 heads), all with
random weights and the built-in byte tokenizer, so nothing is downloaded. Stage 1 as the paper
trains it: LLM frozen, vision encoder and abstractor trained. Lightning's ModelParallelStrategy
shards it with FSDP2 (owl_lightning.train.parallel) even on one GPU, the path the 8-GPU configs take;
``--strategy single`` runs the same model unsharded, to see what FSDP2 costs on one device.

Batches are synthetic and all alike (``BOS <image> caption EOS``, no padding), made once on the host.
Timing: from the first timed step's start to the last one's end (CUDA synchronised at both ends).
MFU: model FLOPs of those steps (owl_lightning.train.flops) over that time and ``--peak-flops``.

    python bench/gpu_stage1.py [--steps 30] [--batch-size 128] [--no-compile] [--activation-checkpointing] [--record-as NAME]
    python bench/gpu_stage1.py --profile kernels.txt    # then 3 steps more under torch.profiler: where the time goes
    python bench/gpu_stage1.py --model tiny --accelerator cpu --steps 2    # a smoke test of the script
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from common import record, synchronize
from owl_lightning.config import IGNORE_INDEX, IMAGE_TOKEN, STAGE1, get_config
from owl_lightning.models.llm import load_tokenizer
from owl_lightning.models.vision import vision_data_config
from owl_lightning.train.callbacks import StepThroughput
from owl_lightning.train.parallel import AtomicModelParallelStrategy
from owl_lightning.train.system import OwlSystem

TINYLLAMA_1B = {
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
MODELS = {
    # owl-llama7b's vision encoder and abstractor, random; the LLM swapped for a random 1.1B LLaMA.
    "1b": (
        "owl-llama7b",
        {
            "vision.weights": None,
            "llm.source": "random",
            "llm.tokenizer": "bytes",
            "llm.architecture": TINYLLAMA_1B,
            "abstractor.attention_dropout": 0.0,
        },
    ),
    # The same layers and tensors at tiny widths (28-px images: 5 visual tokens per image before the
    # abstractor): the device's work all but vanishes, so its step time is the host's share (Python,
    # hooks, kernel launches) that the 1b model's step cannot go below.
    "1b-narrow": (
        "owl-llama7b",
        {
            "vision.weights": None,
            "vision.image_size": 28,
            "vision.timm_kwargs": {"img_size": 28, "embed_dim": 32, "num_heads": 2},
            "abstractor.hidden_size": 32,
            "abstractor.num_heads": 2,
            "abstractor.intermediate_size": 64,
            "abstractor.attention_dropout": 0.0,
            "llm.source": "random",
            "llm.tokenizer": "bytes",
            "llm.architecture": {
                **TINYLLAMA_1B,
                "vocab_size": 512,
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
            },
        },
    ),
    "tiny": ("owl-tiny", {}),
}
H100_BF16_DENSE = 989e12
STRATEGIES = {"fsdp2": lambda: AtomicModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1), "single": lambda: "auto"}


def synthetic_batches(model: str, overrides: dict, batch_size: int, caption_tokens: int, count: int) -> list[dict]:
    """``count`` identical-shape caption batches: ``BOS <image> caption EOS``, the caption and EOS supervised."""
    config = get_config(model, overrides)
    tokenizer = load_tokenizer(config.llm)
    size = vision_data_config(config.vision)["input_size"]
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        caption = torch.randint(ord("a"), ord("z") + 1, (batch_size, caption_tokens), generator=generator)
        bos = torch.full((batch_size, 1), tokenizer.bos_token_id)
        image = torch.full((batch_size, 1), tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
        eos = torch.full((batch_size, 1), tokenizer.eos_token_id)
        input_ids = torch.cat([bos, image, caption, eos], dim=1)
        labels = torch.cat([torch.full((batch_size, 2), IGNORE_INDEX), caption, eos], dim=1)
        batches.append(
            {
                "input_ids": input_ids,
                "sample_ids": torch.ones_like(input_ids),
                "labels": labels,
                "images": torch.randint(0, 256, (batch_size, *size), dtype=torch.uint8, generator=generator),
                "image_counts": torch.ones(batch_size, dtype=torch.long),
                "source": ["synthetic"] * batch_size,
                "skipped": [],
            }
        )
    return batches


class TimedWindow(L.Callback):
    """Wall time and model FLOPs / real tokens / samples of steps ``first`` to ``first + count - 1``.

    The figures come from what the host worked out before each batch moved (its ``layout`` and
    ``flops``): reading them from the device would stall every step, as a training step must not."""

    def __init__(self, first: int, count: int) -> None:
        self.first, self.last = first, first + count - 1
        self.flops = self.tokens = self.samples = 0.0
        self.start = self.end = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.first:
            synchronize(pl_module.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.first <= batch_idx <= self.last:
            return
        self.flops += batch["flops"]
        self.tokens += batch["layout"].num_tokens
        self.samples += batch["input_ids"].shape[0]
        if batch_idx == self.last:
            synchronize(pl_module.device)
            self.end = time.perf_counter()


class ProfiledWindow(L.Callback):
    """torch.profiler over steps ``first`` to the end; writes the operators by device and by host time
    to ``path`` and keeps the device's busy time a step (kernels and copies, summed)."""

    def __init__(self, first: int, path: Path) -> None:
        self.first, self.path = first, path
        self.steps = 0
        self.device_busy_s_per_step: float | None = None
        self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.first:
            self.profiler.start()
        self.steps += batch_idx >= self.first

    def on_train_end(self, trainer, pl_module) -> None:
        synchronize(pl_module.device)
        self.profiler.stop()
        table = self.profiler.key_averages()
        # As the table's "Self CUDA time total": the device's own events (kernels, copies), each once.
        busy_us = sum(
            event.self_device_time_total
            for event in table
            if event.device_type == torch.autograd.DeviceType.CUDA and not event.is_user_annotation
        )
        self.device_busy_s_per_step = busy_us / 1e6 / max(self.steps, 1)
        self.path.write_text(
            "\n\n".join(
                [
                    f"{self.steps} steps; device busy {self.device_busy_s_per_step * 1e3:.1f} ms a step (kernels and copies, summed)",
                    "by device time:\n" + table.table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=90),
                    "by host time:\n" + table.table(sort_by="cpu_time_total", row_limit=40, max_name_column_width=90),
                ]
            )
        )
        print(f"profile written to {self.path}: device busy {self.device_busy_s_per_step * 1e3:.1f} ms a step", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="1b")
    parser.add_argument("--accelerator", default="gpu")
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (allocator, kernel selection)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step")
    parser.add_argument("--caption-tokens", type=int, default=32)
    parser.add_argument("--peak-flops", type=float, default=H100_BF16_DENSE, help="the device's dense bf16 FLOP/s (H100/H200 SXM: 989e12)")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="torch.compile each block (the warm-up steps include compiling)",
    )
    parser.add_argument(
        "--strategy",
        choices=("fsdp2", "single"),
        default="fsdp2",
        help="fsdp2: ModelParallelStrategy, as the multi-GPU configs; single: Lightning's plain one-device strategy",
    )
    parser.add_argument("--no-record", action="store_true", help="print only; do not write bench/results.json")
    parser.add_argument("--record-as", default="gpu_stage1", help="the entry's name in bench/results.json")
    parser.add_argument(
        "--profile", type=Path, help="after the timed steps, profile --profile-steps more and write the operator tables here"
    )
    parser.add_argument("--profile-steps", type=int, default=3)
    args = parser.parse_args()

    name, overrides = MODELS[args.model]
    torch.manual_seed(0)
    system = OwlSystem(
        config=get_config(name, overrides),
        recipe=STAGE1,
        activation_checkpointing=args.activation_checkpointing,
        compile=args.compile,
    )
    profiled = args.profile_steps if args.profile else 0
    batches = synthetic_batches(name, overrides, args.batch_size, args.caption_tokens, args.warmup + args.steps + profiled)
    window = TimedWindow(args.warmup, args.steps)
    profiler = ProfiledWindow(args.warmup + args.steps, args.profile) if args.profile else None
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=1,
        precision="bf16-mixed",
        max_steps=len(batches),
        strategy=STRATEGIES[args.strategy](),
        gradient_clip_val=1.0,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[window, StepThroughput(args.peak_flops), *([profiler] if profiler else [])],
    )
    trainer.fit(system, DataLoader(batches, batch_size=None, pin_memory=args.accelerator == "gpu"))

    seconds = window.end - window.start
    params = {part: sum(p.numel() for p in getattr(system.model, part).parameters()) for part in ("vision", "abstractor", "llm")}
    entry = {
        "device": torch.cuda.get_device_name() if args.accelerator == "gpu" else args.accelerator,
        "model": args.model,
        "params": params,
        "batch_size": args.batch_size,
        "caption_tokens": args.caption_tokens,
        "timed_steps": args.steps,
        "step_s": round(seconds / args.steps, 4),
        "tokens_per_s": round(window.tokens / seconds),
        "samples_per_s": round(window.samples / seconds, 1),
        "achieved_tflops_per_s": round(window.flops / seconds / 1e12, 1),
        "peak_tflops_per_s": args.peak_flops / 1e12,
        "mfu": round(window.flops / seconds / args.peak_flops, 4),
        "target_mfu": 0.40,
        "activation_checkpointing": args.activation_checkpointing,
        "compile": args.compile,
        "strategy": args.strategy,
        "device_busy_s_per_step": round(profiler.device_busy_s_per_step, 4) if profiler else None,
        "max_memory_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if args.accelerator == "gpu" else None,
        "how": "OwlSystem (stage-1 recipe) through the Lightning Trainer, "
        + (
            "ModelParallelStrategy (FSDP2, 1 process), bf16-mixed with bf16 FSDP all-gathers"
            if args.strategy == "fsdp2"
            else "one device unsharded, bf16-mixed"
        )
        + ", AdamW, clip 1.0; synthetic uniform batches; model FLOPs from owl_lightning.train.flops",
    }
    print(
        f"{entry['device']}: {entry['tokens_per_s']:,} tokens/s, {entry['samples_per_s']} images/s, "
        f"{entry['achieved_tflops_per_s']} TFLOP/s, MFU {entry['mfu']:.1%} (target 40%)",
        flush=True,
    )
    if not args.no_record:
        record(args.record_as, entry)


if __name__ == "__main__":
    main()
