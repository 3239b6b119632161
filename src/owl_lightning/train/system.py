"""What both training stages share: build the model in ``configure_model``, next-token loss,
throughput and data-health logging, AdamW + warm-up/cosine, checkpoints without the base LLM.

Each stage is a small subclass that says which parameters train (its ``freeze_policy``).
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import replace
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.distributed.tensor import DTensor
from torchmetrics import MeanMetric
from transformers import GenerationConfig

from owl_lightning.checkpoints import is_base_llm_weight, load_model_weights, read_checkpoint
from owl_lightning.config import OwlConfig, compute_dtype, get_config
from owl_lightning.models.llm import load_tokenizer
from owl_lightning.models.owl import OwlModel, build_owl
from owl_lightning.train.checkpoint_io import SafeCheckpointIO
from owl_lightning.train.flops import StepFlops, measure_matmul_flops
from owl_lightning.train.parallel import AtomicModelParallelStrategy, checkpoint_activations, compile_blocks, is_sharded, shard_owl
from owl_lightning.train.preflight import check_outputs

log = logging.getLogger(__name__)


class OwlSystem(L.LightningModule):
    """Args (shared by both stages):
        model_name: a registered config (``owl-tiny``, ``owl-smol``, ``owl-llama7b``).
        model_overrides: dotted-key changes to it, e.g. ``{"abstractor.num_queries": 32}``.
        init_from: a checkpoint (or run folder) whose trained weights start this run.
        lr, weight_decay, betas, eps: AdamW. warmup_steps, min_lr_ratio: linear warm-up, then
            cosine decay to ``lr * min_lr_ratio`` over the run's optimizer steps.
        max_nonfinite_steps: an optimizer step whose loss or gradient is not finite is skipped and
            counted; this many in a row stop the run.
        activation_checkpointing: keep only each block's input in forward and recompute the block
            in backward (vision blocks, abstractor layers, LLM decoder blocks): less memory, ~1/3 more compute.
        compile: ``torch.compile`` each of those blocks (fuses the elementwise work between the matrix
            products; the first steps take a minute or more longer while it compiles). For GPUs; generation
            (validation captions, chat) always runs eagerly.
        peak_flops: the device's peak FLOP/s for ``perf/mfu`` (per process; e.g. 989e12 for an H100's
            dense bf16). None: measured at the start with a large matrix product in the training dtype
            (the figure for a CPU).

    Under Lightning's ``ModelParallelStrategy`` the model is sharded with FSDP2 (``owl_lightning.train.parallel``);
    use its subclass ``owl_lightning.train.parallel.AtomicModelParallelStrategy``, whose saves a kill cannot corrupt.
    """

    def __init__(
        self,
        model_name: str = "owl-smol",
        model_overrides: dict[str, Any] | None = None,
        init_from: str | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        warmup_steps: int = 2000,
        min_lr_ratio: float = 0.0,
        max_nonfinite_steps: int = 5,
        activation_checkpointing: bool = False,
        peak_flops: float | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.owl_config: OwlConfig = get_config(model_name, model_overrides)
        self.model: OwlModel | None = None
        self.tokenizer = None
        # Checkpoints leave out the frozen base LLM (see checkpoints.py). The state dict itself does:
        # sharded checkpoints load exactly the keys the state dict names.
        self.register_state_dict_post_hook(_without_base_llm)
        self.strict_loading = False
        self.flops: StepFlops | None = None
        self.peak_flops: float | None = None
        self._unlogged_work: tuple[int, int, float] | None = None  # samples, tokens, FLOPs of the running step
        self.val_loss = MeanMetric()
        self._last_batch_end: float | None = None
        self.empty_batches = 0
        self.nonfinite_steps = 0  # skipped for a non-finite loss or gradient, in all
        self._nonfinite_in_a_row = 0
        self._step_losses: list[torch.Tensor] = []  # of the micro-batches of the coming optimizer step
        self._step_samples = 0
        self._step_supervised = 0
        self._step_sources: list[str] = []
        self._rng_to_restore: dict | None = None

    # -- model -------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        if self.model is None:
            self.model = self._build_model() if self.device_mesh is None else self._build_model_on_every_rank()
        if self.device_mesh is not None and not is_sharded(self.model):
            # ModelParallelStrategy: FSDP2. shard_owl asserts every parameter ended up sharded.
            param_dtype = torch.bfloat16 if self._compute_dtype() == torch.bfloat16 else None
            if self.global_rank == 0:
                log.info(
                    "FSDP2 over %d processes: rank 0 read the weights and sends every rank its shards "
                    "(the others built the model on the meta device)",
                    self.device_mesh.size(),
                )
            shard_owl(self.model, self.device_mesh, param_dtype)
            if not isinstance(self.trainer.strategy, AtomicModelParallelStrategy):
                log.warning(
                    "%s writes each sharded checkpoint over the previous one: a run killed while saving leaves "
                    "a mix of two saves. Use strategy class_path owl_lightning.train.parallel.AtomicModelParallelStrategy "
                    "(same arguments)",
                    type(self.trainer.strategy).__name__,
                )

    def _build_model_on_every_rank(self) -> OwlModel:
        """Under FSDP only global rank 0 reads weights. The others build the model on the meta device
        from the LLM config rank 0 read (a folder's own, as ``from_pretrained`` reads it, whatever
        ``llm.architecture`` says) and receive their shards from rank 0 in ``shard_owl``."""
        model = self._build_model() if self.global_rank == 0 else None
        llm = [(model.llm.config.to_dict(), model.llm.generation_config.to_dict()) if model is not None else None]
        torch.distributed.broadcast_object_list(llm, src=0)
        if model is None:
            with torch.device("meta"):
                model = self._build_model(rank0_llm=llm[0])
        return model

    def _build_model(self, rank0_llm: tuple[dict, dict] | None = None) -> OwlModel:
        """The model with its weights; given rank 0's LLM config and generation config (HF dicts),
        random weights and that LLM (under a meta device context: nothing allocated)."""
        self.tokenizer = load_tokenizer(self.owl_config.llm)
        pretrained = rank0_llm is None
        config = self.owl_config if pretrained else replace(self.owl_config, llm=replace(self.owl_config.llm, architecture=rank0_llm[0]))
        model = build_owl(config, pretrained=pretrained, tokenizer=self.tokenizer)
        if not pretrained:  # before LoRA wraps the LLM: generation reads the base model's
            model.llm.generation_config = GenerationConfig.from_dict(rank0_llm[1])
        if self.hparams.init_from and pretrained:
            checkpoint = read_checkpoint(self.hparams.init_from)
            load_model_weights(model, checkpoint["state_dict"], self.hparams.init_from)
            log.info("initialised from %s", self.hparams.init_from)
        self.freeze_policy(model)
        self.flops = StepFlops.of(model)  # before compiling: it runs the model on fake tensors
        if self.hparams.activation_checkpointing:
            checkpoint_activations(model)
        if self.hparams.compile:
            compile_blocks(model)
        return model

    def freeze_policy(self, model: OwlModel) -> None:
        """Set which parameters train (and add adapters). Subclasses define it."""
        raise NotImplementedError

    # -- training ----------------------------------------------------------------------------------

    def forward(self, batch: dict):
        return self.model(
            batch["input_ids"], batch["attention_mask"], batch["labels"], batch["images"], batch["image_counts"], layout=batch["layout"]
        )

    def transfer_batch_to_device(self, batch: dict, device: torch.device, dataloader_idx: int) -> dict:
        """A batch's token layout (``OwlModel.layout``) and FLOPs are worked out on the host before it
        moves: the step on an accelerator then reads nothing back from it (each ``nonzero`` or
        ``.item()`` would stall the host until the accelerator had done all the work queued so far)."""
        layout = self.model.layout(batch["input_ids"], batch["attention_mask"], batch["images"], batch["labels"], batch["image_counts"])
        batch = {**batch, "layout": layout, "flops": self.flops.step(batch, layout.num_supervised)}
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def log_number(self, name: str, value: float, **kwargs) -> None:
        """``self.log`` of a number the host already has, as a CPU tensor: Lightning would copy a plain
        number to the accelerator, and that copy waits for all the work queued there."""
        self.log(name, torch.tensor(float(value)), **kwargs)

    def on_train_epoch_start(self) -> None:
        # Streams reshuffle per epoch; the DataLoader hands this object to fresh workers each epoch.
        dataset = getattr(self.trainer.train_dataloader, "dataset", None)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(self.current_epoch)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self(batch)
        batch_size = len(batch["source"])  # samples; a packed batch has fewer rows
        self._log_throughput(batch_size, out.num_tokens, batch["flops"])
        health = getattr(self.trainer.datamodule, "health", None)
        if health is not None:
            for name, value in health.metrics().items():
                self.log_number(name, value, on_step=True, on_epoch=False, batch_size=batch_size)
        self._step_sources = list(batch["source"])
        self._step_samples += batch_size
        self._step_supervised += out.num_supervised
        if out.num_supervised == 0:
            # Every answer truncated away: the loss is a zero with a graph, so DDP/FSDP ranks stay in
            # step; if no rank had anything supervised, on_before_optimizer_step makes no update.
            self.empty_batches += 1
            self.log_number("train/empty_batches", self.empty_batches, batch_size=batch_size)
        else:
            self._step_losses.append(out.loss.detach())  # checked with the gradients, before the update
            self.log_number("train/supervised_tokens", out.num_supervised, batch_size=batch_size)
        return out.loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Drop the update of a step whose loss or gradients are not finite on any rank, or that
        had nothing supervised on every rank: AdamW leaves parameters without a gradient alone."""
        strategy = self.trainer.strategy
        finite = gradients_finite(self.model).to(self.device)
        loss = torch.zeros((), device=self.device)
        if self._step_losses:
            losses = torch.stack(self._step_losses)
            finite, loss = finite & torch.isfinite(losses).all(), losses.mean()
        # Ranks whose losses and gradients are finite, ranks with something supervised: one all-reduce,
        # and the step's one read back from the accelerator (with this rank's loss for the log).
        flags = strategy.reduce(torch.stack([finite, torch.full_like(finite, self._step_supervised > 0)]).int(), reduce_op="sum")
        finite_ranks, supervised_ranks, loss = torch.cat([flags.float(), loss.float()[None]]).tolist()
        finite, supervised = finite_ranks == strategy.world_size, supervised_ranks > 0
        if self._step_losses and math.isfinite(loss):
            self.log_number("train/loss", loss, prog_bar=True, batch_size=self._step_samples)
        self._step_losses, self._step_samples, self._step_supervised = [], 0, 0
        if not (finite and supervised):
            optimizer.zero_grad(set_to_none=True)
        if finite:
            self._nonfinite_in_a_row = 0
            return
        self.nonfinite_steps += 1
        self._nonfinite_in_a_row += 1
        self.log_number("train/nonfinite_steps", self.nonfinite_steps)
        sources = ", ".join(f"{name} x{count}" for name, count in Counter(self._step_sources).most_common())
        log.warning("step %d: non-finite loss or gradient, update skipped (batch sources: %s)", self.global_step, sources)
        if self._nonfinite_in_a_row >= self.hparams.max_nonfinite_steps:
            raise FloatingPointError(
                f"{self._nonfinite_in_a_row} optimizer steps in a row had a non-finite loss or gradient, the last at step "
                f"{self.global_step} (its batch came from: {sources}). Lower the learning rate (--model.lr), keep gradient "
                "clipping on (--trainer.gradient_clip_val), check those sources for bad records, or resume from an "
                "earlier checkpoint; --model.max_nonfinite_steps sets how many in a row are tolerated."
            )

    def _log_throughput(self, samples: int, tokens: int, flops: float) -> None:
        """samples/s, tokens/s (real tokens, visual included), achieved FLOP/s and MFU of the previous
        step: the wall time from its forward to this one's covers its forward, backward, optimizer step
        and the loading of this batch. Called from the forward of the step whose work it is given."""
        now = time.perf_counter()
        if self._last_batch_end is not None and self._unlogged_work is not None:
            seconds = now - self._last_batch_end
            done_samples, done_tokens, done_flops = self._unlogged_work
            self.log_number("perf/samples_per_s", done_samples / seconds, batch_size=done_samples)
            self.log_number("perf/tokens_per_s", done_tokens / seconds, prog_bar=True, batch_size=done_samples)
            self.log_number("perf/tflops_per_s", done_flops / seconds / 1e12, batch_size=done_samples)
            self.log_number("perf/mfu", done_flops / seconds / self.peak_flops, prog_bar=True, batch_size=done_samples)
        self._last_batch_end = now
        self._unlogged_work = (samples, tokens, flops)

    # -- validation --------------------------------------------------------------------------------

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self(batch)
        if out.num_supervised:
            self.val_loss.update(out.loss, weight=out.num_supervised)

    def on_validation_epoch_end(self) -> None:
        if self.val_loss.update_count:
            loss = self.val_loss.compute()
            if self.trainer.sanity_checking:
                # Lightning discards sanity-check logs; keep this one as the "before" point of the
                # val/loss curve (the same batches when num_sanity_val_steps = limit_val_batches).
                if self.logger is not None:
                    self.logger.log_metrics({"val/loss": float(loss)}, step=self.global_step)
                self.print(f"val/loss at step {self.global_step} (sanity check): {float(loss):.4f}")
            else:
                self.log("val/loss", loss, prog_bar=True)
                self.print(f"val/loss at step {self.global_step}: {float(loss):.4f}")
        self.val_loss.reset()
        self._last_batch_end = None  # validation time is not training throughput

    # -- optimizers --------------------------------------------------------------------------------

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        # No weight decay on biases and norm scales (1-d tensors).
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": self.hparams.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=self.hparams.lr, betas=tuple(self.hparams.betas), eps=self.hparams.eps)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = min(self.hparams.warmup_steps, total)
        floor = self.hparams.min_lr_ratio

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(total - warmup, 1)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoints -------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["owl_config"] = self.owl_config.to_dict()
        # Dropout (LoRA's, the abstractor's) draws from it: a resumed run must draw the same masks.
        checkpoint["rng_state"] = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rng_state"]["cuda"] = torch.cuda.get_rng_state_all()

        # The run's totals go on after a resume (and the in-a-row count: a resume does not reset it).
        checkpoint["step_counts"] = {
            "nonfinite_steps": self.nonfinite_steps,
            "nonfinite_in_a_row": self._nonfinite_in_a_row,
            "empty_batches": self.empty_batches,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._rng_to_restore = checkpoint.get("rng_state")
        counts = checkpoint.get("step_counts", {})
        self.nonfinite_steps = counts.get("nonfinite_steps", 0)
        self._nonfinite_in_a_row = counts.get("nonfinite_in_a_row", 0)
        self.empty_batches = counts.get("empty_batches", 0)

    def on_train_start(self) -> None:
        # Restored here, not on load: sanity-check validation and loader start-up come in between.
        if self._rng_to_restore is not None:
            torch.set_rng_state(self._rng_to_restore["cpu"])
            if "cuda" in self._rng_to_restore and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(self._rng_to_restore["cuda"])
            self._rng_to_restore = None

    # -- before the first step ---------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        strategy = self.trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:  # the default; a user's own plugin is kept
            strategy.checkpoint_io = SafeCheckpointIO()

    def on_fit_start(self) -> None:
        self.peak_flops = self.hparams.peak_flops or measure_matmul_flops(self.device, self._compute_dtype())
        check_outputs(self.trainer, self.checkpoint_bytes())

    def _compute_dtype(self) -> torch.dtype:
        """The dtype matrix products run in under the trainer's precision."""
        return compute_dtype(self.trainer.precision)

    def checkpoint_bytes(self) -> int:
        """Size of one checkpoint: the saved tensors (no base LLM) and AdamW's two fp32 moments per trained parameter."""
        weights = sum(t.numel() * t.element_size() for t in self.state_dict().values())  # base LLM left out by the hook
        moments = 2 * 4 * sum(p.numel() for p in self.parameters() if p.requires_grad)
        return weights + moments


def _without_base_llm(module: torch.nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict post-hook: drop the frozen base LLM's tensors (restored from ``llm.source`` on load)."""
    for key in [k for k in state_dict if k.startswith(prefix) and is_base_llm_weight(k[len(prefix) :])]:
        del state_dict[key]


def gradients_finite(model: torch.nn.Module) -> torch.Tensor:
    """Whether every gradient this process holds is finite (its local shard, for sharded ones): a
    0-dim bool tensor on the gradients' device (the host reads it when it needs it).

    The total norm, computed with the fused per-dtype kernels clipping uses, is finite exactly
    when every element is (and its float32 sum of squares does not overflow, which takes elements
    near 1e19: such a step is dropped as well).
    """
    local = [g.to_local() if isinstance(g, DTensor) else g for g in (p.grad for p in model.parameters()) if g is not None]
    return torch.isfinite(torch.nn.utils.get_total_norm(local))
