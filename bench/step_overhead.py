"""Training-step cost of owl-smol against its floor, CPU MFU, and stage-1 memory (issue 6, items 1–4).

1. ``stage1_step``: a stage-1 step as training runs it (Lightning Trainer, Stage1Module: LLM frozen,
   vision encoder + abstractor trained; forward, backward, gradient clipping, AdamW, logging) against
   its floor: the bare Hugging Face LLM forward + backward on the very input embeddings the step
   spliced (text and visual tokens), with the same attention mask, the same logits kept and the same
   loss, weights frozen, the gradient going to the input embeddings only. Target: ≤ 1.15 × floor.
2. ``stage2_step``: the same for stage 2 (LoRA on q/v + abstractor trained, vision frozen); the floor
   runs the same LoRA-wrapped LLM (gradients to LoRA and to the input embeddings).
3. ``stage1_mfu_cpu``: the stage-1 step's model FLOPs (``owl_lightning.train.flops``) per second, over the
   CPU's matrix-product rate in the training dtype, measured here with a large product.
4. ``stage1_memory``: peak memory (RSS) of stage-1 steps against the same model with everything
   trainable, each in a fresh process; the optimizer holds state for trainable parameters only.

Both sides run in the embedded configs' precision (bench/common.py: TRAIN_PRECISION), on real batches of the embedded data
(``make data``), in one process: each side's warm-up steps first, then the median of the timed ones.

    python bench/step_overhead.py [--steps 10] [--warmup 3]     (from the repository root)
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from common import TRAIN_DTYPE, TRAIN_PRECISION, record, rss_kib, train_autocast
from owl_lightning.config import IGNORE_INDEX, STAGE1, STAGE2, TrainRecipe, get_config
from owl_lightning.data.processor import OwlProcessor
from owl_lightning.models.owl import OwlModel
from owl_lightning.train.datamodules import CaptionDataModule, InstructionDataModule
from owl_lightning.train.flops import measure_matmul_flops, num_views, sequence_lengths
from owl_lightning.train.system import STAGE2_OPTIMIZER, OwlSystem

TARGET_RATIO = 1.15


SMOL = OwlProcessor(get_config("owl-smol"))  # the embedded default's tokenizer and image transform


# -- batches ---------------------------------------------------------------------------------------


def stage1_batches(batch_size: int, count: int) -> list[dict]:
    """Caption batches as ``make stage1`` trains on (experiments/stage1_smol.yaml: max_length 64)."""
    data = CaptionDataModule(
        manifest="data_manifests/embedded_stage1.yaml", processor=SMOL, batch_size=batch_size, num_workers=0, max_length=64
    )
    return _first_batches(data, count)


def stage2_batches(batch_size: int, count: int) -> list[dict]:
    """Instruction batches as ``make stage2`` trains on (experiments/stage2_smol.yaml: max_length 512, owl template)."""
    data = InstructionDataModule(
        manifest="data_manifests/embedded_stage2.yaml", processor=SMOL, batch_size=batch_size, num_workers=0, max_length=512, template="owl"
    )
    return _first_batches(data, count)


def _first_batches(data: L.LightningDataModule, count: int) -> list[dict]:
    data.setup("fit")
    batches = iter(data.train_dataloader())
    return [next(batches) for _ in range(count)]


# -- our step, through the Trainer ------------------------------------------------------------------


class StepTimer(L.Callback):
    """Wall time of each training step: forward, backward, clipping, optimizer step and logging."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def fit(system: OwlSystem, batches: list[dict], callbacks: list[L.Callback] = ()) -> L.Trainer:
    """Train one step per batch, in order, as the embedded configs do (the configs' precision, clipping at 1.0)."""
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision=TRAIN_PRECISION,
        max_steps=len(batches),
        gradient_clip_val=1.0,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )
    trainer.fit(system, DataLoader(batches, batch_size=None))
    return trainer


def our_steps(system: OwlSystem, batches: list[dict], warmup: int) -> list[float]:
    timer = StepTimer()
    fit(system, batches, [timer])
    return timer.seconds[warmup:]


# -- the floor -------------------------------------------------------------------------------------


def floor_inputs(model: OwlModel, batch: dict) -> dict:
    """What the LLM receives in our step: spliced embeddings ``[B, L, D]`` and the batch's layout (mask,
    positions, the kept logits' positions and targets)."""
    layout = model.layout(batch["input_ids"], batch["sample_ids"], batch["images"], batch["labels"], batch["image_counts"])
    with torch.no_grad(), train_autocast():
        embeds = model.input_embeddings(batch["input_ids"], batch["images"], layout)
    return {
        "embeds": embeds,
        "mask": layout.llm_mask,
        "position_ids": layout.position_ids,
        "keep": layout.keep,
        "targets": layout.targets,
        "num_supervised": layout.num_supervised,
    }


def floor_step(llm: torch.nn.Module, inputs: dict) -> None:
    """The bare LLM forward + backward of one batch; the gradient reaches the input embeddings (and LoRA)."""
    embeds = inputs["embeds"].detach().requires_grad_()
    with train_autocast():
        logits = llm(
            inputs_embeds=embeds,
            attention_mask=inputs["mask"],
            position_ids=inputs["position_ids"],
            logits_to_keep=inputs["keep"],
            use_cache=False,
        ).logits
    loss = F.cross_entropy(logits.float().flatten(0, 1), inputs["targets"].flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    (loss / inputs["num_supervised"]).backward()


def floor_steps(model: OwlModel, batches: list[dict], warmup: int) -> list[float]:
    model.train()  # as in our steps: LoRA dropout on, frozen modules in eval mode
    inputs = [floor_inputs(model, batch) for batch in batches]
    seconds = []
    for step in inputs:
        start = time.perf_counter()
        floor_step(model.llm, step)
        seconds.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return seconds[warmup:]


def vision_steps(model: OwlModel, batches: list[dict], warmup: int) -> list[float]:
    """What stage 1 trains on top of the floor, alone: the vision encoder + abstractor forward and
    backward (train mode, the configs' precision, weight gradients), from the sum of the visual tokens."""
    model.train()
    seconds = []
    for batch in batches:
        start = time.perf_counter()
        with train_autocast():
            visual = model.encode_images(batch["images"])
        visual.float().sum().backward()
        seconds.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return seconds[warmup:]


# -- 1–3: step time against the floor, MFU ------------------------------------------------------------


def compare(system: OwlSystem, batches: list[dict], warmup: int, with_vision: bool = False) -> dict:
    ours = our_steps(system, batches, warmup)
    floor = floor_steps(system.model, batches, warmup)
    vision = vision_steps(system.model, batches, warmup) if with_vision else None
    timed = batches[warmup:]
    supervised = [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in timed]
    flops = [system.flops.step(b, s) for b, s in zip(timed, supervised)]
    llm_flops = [f - num_views(b) * system.flops.per_view for f, b in zip(flops, timed)]
    f = system.flops
    tokens = sum(float(sequence_lengths(b, f.visual_tokens_per_image, f.image_token_id).sum()) for b in timed) / len(timed)
    return {
        "ours": ours,
        "floor": floor,
        "vision": vision,
        "flops": flops,
        "llm_flops": llm_flops,
        "tokens_per_batch": tokens,
        "batch_size": batches[0]["input_ids"].shape[0],
    }


def step_entry(result: dict, how: str) -> dict:
    ours, floor = statistics.median(result["ours"]), statistics.median(result["floor"])
    return {
        "ours_step_s": round(ours, 4),
        "floor_step_s": round(floor, 4),
        "ratio": round(ours / floor, 3),
        "target_ratio": TARGET_RATIO,
        "batch_size": result["batch_size"],
        "real_tokens_per_batch": round(result["tokens_per_batch"], 1),
        "timed_steps": len(result["ours"]),
        "ours_steps_s": [round(s, 4) for s in result["ours"]],
        "floor_steps_s": [round(s, 4) for s in result["floor"]],
        "how": how,
        **(vision_split(ours, floor, result["vision"]) if result["vision"] else {}),
    }


def vision_split(ours: float, floor: float, vision_seconds: list[float]) -> dict:
    """How much of the step is the vision encoder's own training, and what is left for our overhead."""
    vision = statistics.median(vision_seconds)
    return {
        "vision_step_s": round(vision, 4),
        "ratio_to_floor_plus_vision": round(ours / (floor + vision), 3),
        "vision_how": "vision encoder + abstractor forward + backward alone (train mode, the configs' precision, weight "
        "gradients) on the same images, same process; median",
    }


def mfu_entry(result: dict, peak: float) -> dict:
    ours_rate = sum(result["flops"]) / sum(result["ours"])
    floor_rate = sum(result["llm_flops"]) / sum(result["floor"])
    return {
        "mfu": round(ours_rate / peak, 4),
        "achieved_gflops_per_s": round(ours_rate / 1e9, 1),
        "matmul_peak_gflops_per_s": round(peak / 1e9, 1),
        "floor_mfu": round(floor_rate / peak, 4),
        "step_gflops": round(statistics.mean(result["flops"]) / 1e9, 2),
        "how": "model FLOPs of the stage-1 step (owl_lightning.train.flops: real tokens, frozen LLM backward without weight "
        "gradients) per second of step, over the best 2048x2048 matmul rate in the training dtype measured in the same process; "
        "floor_mfu: the floor's LLM FLOPs over the floor's time",
    }


# -- 4: memory -------------------------------------------------------------------------------------


def memory_probe(everything_trainable: bool, batch_size: int, steps: int, results: multiprocessing.Queue) -> None:
    """In a fresh process: peak RSS over ``steps`` training steps, and which parameters AdamW keeps state for."""
    # The memory reference: stage 1 with the LLM trained too.
    recipe = TrainRecipe(vision="train", abstractor="train", llm="full") if everything_trainable else STAGE1
    system = OwlSystem(config=SMOL.config, recipe=recipe)
    system.configure_model()
    batches = stage1_batches(batch_size, steps)
    before = rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # restart the peak (VmHWM) from here: model loading is not a step
    trainer = fit(system, batches)
    optimizer = trainer.optimizers[0]
    trainable = {p for p in system.model.parameters() if p.requires_grad}
    with_state = {p for p in system.model.parameters() if optimizer.state.get(p)}
    state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    results.put(
        {
            "rss_before_steps_mb": round(before / 1024),
            "peak_rss_mb": round(rss_kib("VmHWM") / 1024),
            "trainable_params": sum(p.numel() for p in trainable),
            "params": sum(p.numel() for p in system.model.parameters()),
            "optimizer_state_mb": round(state_bytes / 2**20, 1),
            "optimizer_state_only_for_trainable": with_state == trainable,
        }
    )


def memory_entry(batch_size: int, steps: int) -> dict:
    spawn = multiprocessing.get_context("spawn")
    runs = {}
    for name, everything in (("stage1", False), ("everything_trainable", True)):
        results = spawn.Queue()
        process = spawn.Process(target=memory_probe, args=(everything, batch_size, steps, results))
        process.start()
        runs[name] = results.get()
        process.join()
    stage1, everything = runs["stage1"], runs["everything_trainable"]
    return {
        **{f"{name}_{key}": value for name, run in runs.items() for key, value in run.items()},
        "step_memory_ratio": round(
            (stage1["peak_rss_mb"] - stage1["rss_before_steps_mb"]) / (everything["peak_rss_mb"] - everything["rss_before_steps_mb"]), 3
        ),
        "batch_size": batch_size,
        "steps": steps,
        "how": "each variant in a fresh process: model built, batches loaded, then the peak RSS (VmHWM, reset before the "
        "first step) over the steps; step memory = peak - RSS before the steps",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first, per side")
    parser.add_argument("--stage1-batch-size", type=int, default=32)
    parser.add_argument("--stage2-batch-size", type=int, default=8)
    parser.add_argument("--memory-steps", type=int, default=3)
    args = parser.parse_args()
    count = args.warmup + args.steps
    peak = measure_matmul_flops("cpu", TRAIN_DTYPE)

    torch.manual_seed(0)
    stage1 = compare(
        OwlSystem(config=SMOL.config, recipe=STAGE1), stage1_batches(args.stage1_batch_size, count), args.warmup, with_vision=True
    )
    record(
        "stage1_step",
        step_entry(
            stage1,
            "OwlSystem stage-1 step through the Lightning Trainer (the configs' precision, clip 1.0, AdamW) "
            "vs the frozen LLM's forward + backward to its input embeddings on the same spliced "
            "embeddings, mask and kept logits; medians",
        ),
    )
    record("stage1_mfu_cpu", mfu_entry(stage1, peak))

    torch.manual_seed(0)
    stage2 = OwlSystem(config=SMOL.config, recipe=STAGE2, optimizer=STAGE2_OPTIMIZER)
    stage2 = compare(stage2, stage2_batches(args.stage2_batch_size, count), args.warmup)
    record(
        "stage2_step",
        step_entry(
            stage2,
            "OwlSystem stage-2 step (LoRA q/v r=8 + abstractor) through the Lightning Trainer vs the "
            "same LoRA-wrapped LLM's forward + backward (LoRA and input-embedding gradients) on "
            "the same spliced embeddings; medians",
        ),
    )

    record("stage1_memory", memory_entry(args.stage1_batch_size, args.memory_steps))


if __name__ == "__main__":
    main()
