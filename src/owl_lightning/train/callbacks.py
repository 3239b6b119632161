"""Lightning Callbacks: what a run does beside training the model (Lightning's style guide: the
LightningModule is the system; cross-cutting concerns are callbacks)."""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy

from owl_lightning.config import IGNORE_INDEX, compute_dtype
from owl_lightning.data.collate import EncodedSample
from owl_lightning.data.highres import image_views, visual_tokens_of
from owl_lightning.inference import generate, generate_captions
from owl_lightning.train.checkpoint_io import SafeCheckpointIO
from owl_lightning.train.flops import measure_matmul_flops
from owl_lightning.train.parallel import AtomicModelParallelStrategy
from owl_lightning.train.preflight import check_outputs

log = logging.getLogger(__name__)


class ModelCheckpoint(LightningModelCheckpoint):
    """Lightning's ``ModelCheckpoint``, except that every run that finishes ends with its final state in
    ``last.ckpt``.

    Lightning writes ``last.ckpt`` at the end of training only when it saved none during the run, so
    with ``max_steps`` not a multiple of ``every_n_train_steps`` the run's last steps would be missing
    from it (``max_steps: 200`` saving every 7 steps: ``last.ckpt`` at step 196), and stage 2's
    ``init_from``, ``eval``, ``export`` and ``chat`` would use a model short of the steps asked for.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._last_checkpoint_saved = ""  # Lightning's "nothing saved yet": it then saves last.ckpt now
        super().on_train_end(trainer, pl_module)


def _measured_peak(trainer: L.Trainer, pl_module: L.LightningModule) -> float:
    """FLOP/s of a large matrix product on the module's device, in the training dtype."""
    return measure_matmul_flops(pl_module.device, compute_dtype(trainer.precision))


class StepThroughput(Callback):
    """samples/s, tokens/s (real tokens, visual included), achieved FLOP/s and MFU (``perf/*``) of each step.

    A step's time runs from its batch's start to the next one's: its forward, backward, optimizer
    step and the loading of the next batch. The counts come from the host-side token layout
    (``OwlSystem.transfer_batch_to_device``), so nothing is read back from the accelerator.

    Args:
        peak_flops: the device's peak FLOP/s for ``perf/mfu`` (per process; e.g. 989e12 for an H100's
            dense bf16). None: measured at the start with a large matrix product in the training dtype
            (the figure for a CPU). That product is a lower bound (other work on the machine slows it, and a
            CPU's BLAS can run it slower than the model's own products, docs/scaling.md): the first step that
            beats it measures again, and from then on the peak is at least the fastest step's rate, so MFU
            never reads above 1.
    """

    def __init__(self, peak_flops: float | None = None) -> None:
        self.peak_flops = peak_flops
        self._measures_peak = peak_flops is None
        self._remeasured = False  # once, when a step first beats the measured peak
        self._started: float | None = None
        self._work: tuple[int, int, float] | None = None  # samples, tokens, FLOPs of the running step

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.peak_flops is None:
            self.peak_flops = _measured_peak(trainer, pl_module)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._started is not None and self._work is not None:
            seconds = now - self._started
            samples, tokens, flops = self._work
            achieved = flops / seconds
            if self._measures_peak and achieved > self.peak_flops:
                if self._remeasured:
                    self.peak_flops = achieved
                else:
                    self._remeasured = True
                    measured = _measured_peak(trainer, pl_module)
                    log.info(
                        "a step reached %.1f GFLOP/s, above the measured peak of %.1f (other work ran during the "
                        "measurement, or the product is slower than the model's); measured again: %.1f",
                        achieved / 1e9,
                        self.peak_flops / 1e9,
                        measured / 1e9,
                    )
                    self.peak_flops = max(measured, achieved)
                    now = time.perf_counter()  # the measurement is not the next step's time
            for name, value, on_bar in (
                ("perf/samples_per_s", samples / seconds, False),
                ("perf/tokens_per_s", tokens / seconds, True),
                ("perf/tflops_per_s", achieved / 1e12, False),
                ("perf/mfu", achieved / self.peak_flops, True),
            ):
                pl_module.log_number(name, value, prog_bar=on_bar, batch_size=samples)
        self._started = now
        self._work = (len(batch["source"]), batch["layout"].num_tokens, batch["flops"])

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = None  # validation time is not training throughput


class DataHealthMonitor(Callback):
    """Logs the data module's skip counts by reason, skip fractions and realised source shares: training's
    (``data/*``) every step, validation's (``val/data/*``, one validation pass) at the end of each validation."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: dict, batch_idx: int) -> None:
        health = getattr(trainer.datamodule, "health", None)
        if health is not None:
            for name, value in health.metrics().items():
                pl_module.log_number(name, value, on_step=True, on_epoch=False, batch_size=len(batch["source"]))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        health = getattr(trainer.datamodule, "val_health", None)
        if health is not None and not trainer.sanity_checking:
            for name, value in health.metrics(prefix="val/data").items():
                pl_module.log_number(name, value, on_step=False, on_epoch=True)


class OutputPreflight(Callback):
    """Before the first step: every output folder writable, room for a checkpoint, and saves that a kill
    cannot corrupt (a run that would lose an hour at its first save stops now instead)."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        check_outputs(trainer, pl_module.checkpoint_bytes())
        strategy = trainer.strategy
        if isinstance(strategy, ModelParallelStrategy):
            if not isinstance(strategy, AtomicModelParallelStrategy):
                accumulation = (
                    f", and with accumulate_grad_batches {trainer.accumulate_grad_batches} it reduce-scatters the gradients "
                    "of every micro-batch instead of once per optimizer step"
                    if trainer.accumulate_grad_batches > 1
                    else ""
                )
                log.warning(
                    "%s writes each sharded checkpoint over the previous one: a run killed while saving leaves a mix of "
                    "two saves%s. Use strategy class_path owl_lightning.train.parallel.AtomicModelParallelStrategy (same arguments)",
                    type(strategy).__name__,
                    accumulation,
                )
        elif not isinstance(strategy.checkpoint_io, SafeCheckpointIO):
            log.warning(
                "checkpoints are saved with %s, which a kill during a save can leave half-written. Name "
                "owl_lightning.train.checkpoint_io.SafeCheckpointIO in trainer.plugins (experiments/base.yaml does).",
                type(strategy.checkpoint_io).__name__,
            )


class RNGState(Callback):
    """The global torch RNG in every checkpoint: dropout (LoRA's, the abstractor's) draws from it, so a
    resumed run draws the masks the uninterrupted one would have. Restored when training starts, after
    the sanity-check validation and the loaders' start-up, which come in between."""

    def __init__(self) -> None:
        self._to_restore: dict | None = None

    def state_dict(self) -> dict:
        state = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self._to_restore = state_dict

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._to_restore is not None:
            torch.set_rng_state(self._to_restore["cpu"])
            if "cuda" in self._to_restore and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(self._to_restore["cuda"])
            self._to_restore = None


class StepProgressBar(TQDMProgressBar):
    """The progress bar in optimizer steps out of ``max_steps``: a stream has no fixed number of epochs
    (Lightning's own bar would print ``Epoch 2/-2``)."""

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        if trainer.max_steps <= 0:
            return super().on_train_epoch_start(trainer)
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps)
        bar.initial = 0
        bar.n = trainer.global_step
        bar.set_description(f"step (epoch {trainer.current_epoch})")
        bar.refresh()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.max_steps <= 0:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar = self.train_progress_bar
        if trainer.global_step != bar.n and self._should_update(trainer.global_step, trainer.max_steps):
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module))
            bar.refresh()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.max_steps <= 0:
            return super().on_train_epoch_end(trainer, pl_module)
        self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))


class CaptionSamples(Callback):
    """At each validation, caption the first validation images (greedy, from ``BOS <image>``, the stage-1
    prompt) and log them with the images to TensorBoard and the console: what stage 1 has learnt, read.

    Args:
        num_images: images captioned per validation. max_new_tokens: caption length limit.
    """

    def __init__(self, num_images: int = 5, max_new_tokens: int = 20) -> None:
        self.num_images, self.max_new_tokens = num_images, max_new_tokens
        self._images: torch.Tensor | None = None

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: dict, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if batch_idx == 0 and batch["images"] is not None:
            self._images = batch["images"][: self.num_images]

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        images, self._images = self._images, None
        if images is None or not self.num_images or trainer.sanity_checking:
            return
        captions = self.captions(pl_module, images)
        for i, caption in enumerate(captions):
            pl_module.print(f"step {trainer.global_step} caption {i}: {caption!r}")
        writer = getattr(pl_module.logger, "experiment", None)
        if writer is not None and hasattr(writer, "add_text"):
            for i, caption in enumerate(captions):
                writer.add_image(f"captions/{i}", images[i], trainer.global_step)  # uint8 [3, H, W]
                writer.add_text(f"captions/{i}", caption, trainer.global_step)

    def captions(self, pl_module: L.LightningModule, images: torch.Tensor) -> list[str]:
        """Greedy captions of ``[M, 3, H, W]`` uint8 images by the system's model."""
        processor = pl_module.processor
        return generate_captions(pl_module.model, processor.tokenizer, processor.template(), list(images), self.max_new_tokens)


class ConversationSamples(Callback):
    """At each validation of stage 2, answer the first validation conversations (greedy) and log the
    image, the question, the answer and the reference to TensorBoard and the console: what joint
    instruction tuning has taught, read. Needs a data module with ``validation_examples`` (stage 2's).

    Args:
        num_conversations: conversations answered per validation, taken in turn from each validation
            source (so text-only sources show too). max_new_tokens: answer length limit.
    """

    def __init__(self, num_conversations: int = 4, max_new_tokens: int = 48) -> None:
        self.num_conversations, self.max_new_tokens = num_conversations, max_new_tokens
        self._examples: list | None = None

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        if trainer.sanity_checking or not self.num_conversations or not hasattr(datamodule, "validation_examples"):
            return
        if self._examples is None:  # the same conversations at every validation, read once
            self._examples = datamodule.validation_examples(self.num_conversations)
        rows = self.answers(pl_module, datamodule.template(), self._examples)
        writer = getattr(pl_module.logger, "experiment", None)
        for i, ((conversation, images, _), (question, answer, reference)) in enumerate(zip(self._examples, rows)):
            pl_module.print(f"step {trainer.global_step} conversation {i}: {question!r} -> {answer!r} (reference {reference!r})")
            if writer is not None and hasattr(writer, "add_text"):
                text = f"**{conversation.source}**: {question}\n\n**model**: {answer}\n\n**reference**: {reference}"
                writer.add_text(f"conversations/{i}", text, trainer.global_step)
                if images:
                    # uint8 [3, H, W]: the image's (global) view, a clip's first frame
                    writer.add_image(f"conversations/{i}", image_views(images[0])[0], trainer.global_step)

    def answers(self, pl_module: L.LightningModule, template, examples: list) -> list[tuple[str, str, str]]:
        """``(last question, generated answer, reference)`` for each example, one batched generation."""
        samples = []
        for conversation, images, _ in examples:
            prompt = template.encode_prompt(conversation, [visual_tokens_of(image, template.visual_tokens_per_image) for image in images])
            samples.append(EncodedSample(prompt, [IGNORE_INDEX] * len(prompt), images))
        answers = generate(pl_module.model, pl_module.processor.tokenizer, samples, self.max_new_tokens) if samples else []
        return [(conversation.turns[-1].content, answer, reference) for (conversation, _, reference), answer in zip(examples, answers)]
