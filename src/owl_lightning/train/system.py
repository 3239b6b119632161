"""OwlSystem, the training system of both stages: builds the model in ``configure_model``, next-token
loss, steps whose loss or gradients are not finite skipped, AdamW with a per-module learning rate and
a warm-up/cosine schedule, checkpoints without the frozen base LLM.

A stage is a recipe (which parts train) and its optimizer settings, not a class: ``owl-lightning
stage1`` and ``stage2`` set those defaults (``cli.py``). What a run does beside training — throughput,
data health, output checks, the RNG in checkpoints, sample captions — are callbacks (``callbacks.py``).
"""

from __future__ import annotations

import copy
import logging
import math
from collections import Counter
from dataclasses import asdict, replace

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from torch.distributed.tensor import DTensor
from torchmetrics import MeanMetric
from transformers import GenerationConfig

from owl_lightning.checkpoints import is_base_llm_weight, load_model_weights, read_checkpoint
from owl_lightning.config import STAGE1, OwlConfig, TrainRecipe, compute_dtype, get_config
from owl_lightning.data.processor import OwlProcessor
from owl_lightning.models.owl import OwlModel, build_owl
from owl_lightning.train.callbacks import DataHealthMonitor, OutputPreflight, RNGState, StepProgressBar, StepThroughput
from owl_lightning.train.flops import StepFlops
from owl_lightning.train.optim import OptimizerConfig, build_optimizer
from owl_lightning.train.parallel import AtomicModelParallelStrategy, checkpoint_activations, compile_blocks, is_sharded, shard_owl

log = logging.getLogger(__name__)

OWL_SMOL = get_config("owl-smol")
STAGE1_OPTIMIZER = OptimizerConfig()  # the paper's stage 1: lr 1e-4, (0.9, 0.98), eps 1e-6, decay 0.1, 2k warm-up
STAGE2_OPTIMIZER = OptimizerConfig(lr=2e-5, weight_decay=1e-4, betas=(0.9, 0.999), eps=1e-8, warmup_steps=50)


class OwlSystem(L.LightningModule):
    """Args:
        config: the model (``--model.config experiments/models/owl-llama7b.yaml``, or any field:
            ``--model.config.abstractor.num_queries 32``).
        recipe: which parts train (``--model.recipe.llm lora``); see :class:`~owl_lightning.config.TrainRecipe`.
        optimizer: AdamW and its schedule; see :class:`~owl_lightning.train.optim.OptimizerConfig`.
        init_from: a checkpoint, run folder or export whose trained weights start this run (into the
            model ``config`` describes: the checkpoint's own config is not used).
        max_nonfinite_steps: an optimizer step whose loss or gradient is not finite is skipped and
            counted; this many in a row stop the run.
        activation_checkpointing: keep only each block's input in forward and recompute the block
            in backward (vision blocks, abstractor layers, LLM decoder blocks): less memory, ~1/3 more compute.
        compile: ``torch.compile`` each of those blocks (fuses the elementwise work between the matrix
            products; the first steps take a minute or more longer while it compiles). For GPUs; generation
            (validation captions, chat) always runs eagerly.

    Under Lightning's ``ModelParallelStrategy`` the model is sharded with FSDP2 (``owl_lightning.train.parallel``);
    use its subclass ``owl_lightning.train.parallel.AtomicModelParallelStrategy``, whose saves a kill cannot corrupt.
    """

    def __init__(
        self,
        config: OwlConfig = OWL_SMOL,
        recipe: TrainRecipe = STAGE1,
        optimizer: OptimizerConfig = STAGE1_OPTIMIZER,
        init_from: str | None = None,
        max_nonfinite_steps: int = 5,
        activation_checkpointing: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.owl_config, self.recipe, self.optimizer_config = copy.deepcopy(config), copy.deepcopy(recipe), copy.deepcopy(optimizer)
        # As plain values: checkpoints load with weights_only=True, which admits no dataclasses.
        self.save_hyperparameters(
            {
                "config": self.owl_config.to_dict(),
                "recipe": asdict(self.recipe),
                "optimizer": asdict(self.optimizer_config),
                "init_from": init_from,
                "max_nonfinite_steps": max_nonfinite_steps,
                "activation_checkpointing": activation_checkpointing,
                "compile": compile,
            }
        )
        self.processor = OwlProcessor(self.owl_config)  # the CLI hands this one to the data module
        self.model: OwlModel | None = None
        if self.recipe.llm != "full":
            # Checkpoints leave out the frozen base LLM (see checkpoints.py). The state dict itself does:
            # sharded checkpoints load exactly the keys the state dict names.
            self.register_state_dict_post_hook(_without_base_llm)
        self.strict_loading = False
        self.flops: StepFlops | None = None
        self.val_loss = MeanMetric()
        self.empty_batches = 0
        self.nonfinite_steps = 0  # skipped for a non-finite loss or gradient, in all
        self._nonfinite_in_a_row = 0
        self._step_loss_sums: list[torch.Tensor] = []  # loss x supervised tokens, per micro-batch of the coming optimizer step
        self._tokens_per_loss_unit: float | None = None  # see training_step
        self._step_samples = 0
        self._step_supervised = 0
        self._step_sources: list[str] = []

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def configure_callbacks(self) -> list[Callback]:
        """What every run needs, unless the trainer already has one of its kind (configured in the YAML)."""
        needed: list[Callback] = [RNGState(), OutputPreflight(), DataHealthMonitor(), StepThroughput()]
        if type(self.trainer.progress_bar_callback) is TQDMProgressBar:  # Lightning's default bar, not one of the user's
            needed.append(StepProgressBar())
        present = tuple(type(callback) for callback in self.trainer.callbacks if not isinstance(callback, StepProgressBar))
        return [callback for callback in needed if isinstance(callback, StepProgressBar) or not isinstance(callback, present)]

    # -- model -------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        if self.model is None:
            self.model = self._build_model() if self.device_mesh is None else self._build_model_on_every_rank()
        if self.device_mesh is not None and not is_sharded(self.model):
            # ModelParallelStrategy: FSDP2. shard_owl asserts every parameter ended up sharded (or, frozen, replicated).
            param_dtype = torch.bfloat16 if self._compute_dtype() == torch.bfloat16 else None
            strategy = self.trainer.strategy
            # Lightning's own ModelParallelStrategy shards the frozen weights too, as it always did.
            atomic = isinstance(strategy, AtomicModelParallelStrategy)
            placement = shard_owl(
                self.model,
                self.device_mesh,
                param_dtype,
                frozen_placement=strategy.frozen_placement if atomic else "shard",
                processes_per_node=strategy.processes_per_node if atomic else None,
            )
            if self.global_rank == 0:
                log.info(
                    "FSDP2 over %d processes, frozen weights: %s. Rank 0 read the weights and sent every rank "
                    "its part (the others built the model on the meta device)",
                    self.device_mesh.size(),
                    placement,
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
        pretrained = rank0_llm is None
        config = self.owl_config if pretrained else replace(self.owl_config, llm=replace(self.owl_config.llm, architecture=rank0_llm[0]))
        model = build_owl(config, pretrained=pretrained, tokenizer=self.tokenizer)
        if not pretrained:  # before LoRA wraps the LLM: generation reads the base model's
            model.llm.generation_config = GenerationConfig.from_dict(rank0_llm[1])
        if self.hparams.init_from and pretrained:
            checkpoint = read_checkpoint(self.hparams.init_from)
            _check_same_connector(checkpoint, self.owl_config, self.hparams.init_from)
            load_model_weights(model, checkpoint["state_dict"], self.hparams.init_from)
            log.info("initialised from %s", self.hparams.init_from)
        model.apply_recipe(self.recipe)
        self.flops = StepFlops.of(model)  # before compiling: it runs the model on fake tensors
        if self.hparams.activation_checkpointing:
            checkpoint_activations(model)
        if self.hparams.compile:
            compile_blocks(model)
        return model

    # -- training ----------------------------------------------------------------------------------

    def forward(self, batch: dict):
        return self.model(
            batch["input_ids"], batch["sample_ids"], batch["labels"], batch["images"], batch["image_counts"], layout=batch["layout"]
        )

    def transfer_batch_to_device(self, batch: dict, device: torch.device, dataloader_idx: int) -> dict:
        """A batch's token layout (``OwlModel.layout``) and FLOPs are worked out on the host before it
        moves: the step on an accelerator then reads nothing back from it (each ``nonzero`` or
        ``.item()`` would stall the host until the accelerator had done all the work queued so far)."""
        layout = self.model.layout(
            batch["input_ids"],
            batch["sample_ids"],
            batch["images"],
            batch["labels"],
            batch["image_counts"],
            image_grids=batch.get("image_grids"),
            image_frames=batch.get("image_frames"),
        )
        batch = {**batch, "layout": layout, "flops": self.flops.step(batch, layout.num_supervised)}
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def log_number(self, name: str, value: float, **kwargs) -> None:
        """``self.log`` of a number the host already has, as a CPU tensor: Lightning would copy a plain
        number to the accelerator, and that copy waits for all the work queued there."""
        self.log(name, torch.tensor(float(value)), **kwargs)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """The micro-batch's loss summed over its supervised tokens (in units of ``_tokens_per_loss_unit``
        tokens); ``on_before_optimizer_step`` divides the gradients by the tokens supervised in the whole
        optimizer step, over every micro-batch and rank.

        So an optimizer step's gradient is that of the mean loss over its supervised tokens however its
        batch is split into ranks and accumulated micro-batches: N micro-batches of b samples train exactly
        as one batch of N x b. (A mean per micro-batch, which Lightning would then average, would give a
        micro-batch with few supervised tokens the weight of one with many; and DDP/FSDP average the ranks.)
        """
        out = self(batch)
        if self._tokens_per_loss_unit is None:
            self._tokens_per_loss_unit = self._agree_on_tokens_per_loss_unit(out.num_supervised)
        batch_size = len(batch["source"])  # samples; a packed batch has fewer rows
        self._step_sources = list(batch["source"])
        self._step_samples += batch_size
        self._step_supervised += out.num_supervised
        if out.num_supervised == 0:
            # Every answer truncated away: the loss is a zero with a graph, so DDP/FSDP ranks stay in
            # step; if no rank had anything supervised, on_before_optimizer_step makes no update.
            self.empty_batches += 1
            self.log_number("train/empty_batches", self.empty_batches, batch_size=batch_size)
        else:
            self._step_loss_sums.append(out.loss.detach() * out.num_supervised)  # checked with the gradients, before the update
            self.log_number("train/supervised_tokens", out.num_supervised, batch_size=batch_size)
        return out.loss * (out.num_supervised / self._tokens_per_loss_unit)

    def _agree_on_tokens_per_loss_unit(self, num_supervised: int) -> float:
        """The power of two nearest the most tokens any rank supervises in its first micro-batch.

        The summed loss is divided by it so that the backward carries the magnitudes of a mean loss (a
        sum over thousands of tokens overflows float16), and the same on every rank: gradients are
        reduced across ranks before ``on_before_optimizer_step`` can undo it. A power of two changes no
        bit of the resulting gradient, so recomputing it after a resume changes nothing.
        """
        most = float(num_supervised)
        if self.trainer.world_size > 1:  # the run's one read back from the accelerator outside the optimizer-step hook
            most = float(self.trainer.strategy.reduce(torch.tensor(most, device=self.device), reduce_op="max"))
        return 2.0 ** round(math.log2(max(most, 1.0)))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Turn the accumulated gradients into those of the mean loss over the step's supervised tokens
        (see ``training_step``); drop the update of a step whose loss or gradients are not finite on any
        rank, or that had nothing supervised on every rank: AdamW leaves parameters without a gradient alone."""
        strategy = self.trainer.strategy
        finite = gradients_finite(self.model).to(self.device)
        loss_sum = torch.zeros((), device=self.device)
        if self._step_loss_sums:
            loss_sums = torch.stack(self._step_loss_sums)
            finite, loss_sum = finite & torch.isfinite(loss_sums).all(), loss_sums.sum()
        # Ranks whose losses and gradients are finite, tokens supervised on all ranks: one all-reduce, and
        # the step's one read back from the accelerator (with this rank's loss for the log).
        counts = strategy.reduce(
            torch.stack([finite.long(), torch.full_like(finite, self._step_supervised, dtype=torch.long)]), reduce_op="sum"
        )
        finite_ranks, supervised_tokens, loss_sum = torch.cat([counts.double(), loss_sum.double()[None]]).tolist()
        finite, supervised = finite_ranks == strategy.world_size, supervised_tokens > 0
        if self._step_loss_sums and math.isfinite(loss_sum):
            self.log_number("train/loss", loss_sum / self._step_supervised, prog_bar=True, batch_size=self._step_samples)
        self._step_loss_sums, self._step_samples, self._step_supervised = [], 0, 0
        if finite and supervised:
            # Lightning divided each micro-batch's loss by accumulate_grad_batches, DDP/FSDP averaged the ranks.
            scale = self.trainer.accumulate_grad_batches * self.trainer.world_size * self._tokens_per_loss_unit / supervised_tokens
            for gradient in local_gradients(self.model):
                gradient.mul_(scale)
        else:
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

    # -- optimizers --------------------------------------------------------------------------------

    def configure_optimizers(self) -> dict:
        return build_optimizer(self.model, self.optimizer_config, int(self.trainer.estimated_stepping_batches))

    # -- checkpoints -------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["owl_config"] = self.owl_config.to_dict()
        # The run's totals go on after a resume (and the in-a-row count: a resume does not reset it).
        checkpoint["step_counts"] = {
            "nonfinite_steps": self.nonfinite_steps,
            "nonfinite_in_a_row": self._nonfinite_in_a_row,
            "empty_batches": self.empty_batches,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        counts = checkpoint.get("step_counts", {})
        self.nonfinite_steps = counts.get("nonfinite_steps", 0)
        self._nonfinite_in_a_row = counts.get("nonfinite_in_a_row", 0)
        self.empty_batches = counts.get("empty_batches", 0)

    # -- sizes -------------------------------------------------------------------------------------------

    def _compute_dtype(self) -> torch.dtype:
        """The dtype matrix products run in under the trainer's precision."""
        return compute_dtype(self.trainer.precision)

    def checkpoint_bytes(self) -> int:
        """Size of one checkpoint: the saved tensors (no base LLM) and AdamW's two fp32 moments per trained parameter."""
        weights = sum(t.numel() * t.element_size() for t in self.state_dict().values())  # base LLM left out by the hook
        moments = 2 * 4 * sum(p.numel() for p in self.parameters() if p.requires_grad)
        return weights + moments


def _check_same_connector(checkpoint: dict, config: OwlConfig, path: str) -> None:
    """A run starting from a checkpoint whose connector differs from its own config's cannot take its weights."""
    saved = (checkpoint.get("owl_config") or {}).get("connector", "abstractor")
    if saved != config.connector:
        raise ValueError(
            f"--model.init_from {path} was trained with connector {saved!r}, this run's model config has {config.connector!r}: "
            f"set --model.config.connector {saved} (for mlp: stack experiments/recipes/connector_mlp.yaml)"
        )


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
    return torch.isfinite(torch.nn.utils.get_total_norm(local_gradients(model)))


def local_gradients(model: torch.nn.Module) -> list[torch.Tensor]:
    """The gradients this process holds (its local shards of sharded ones): changing them in place changes the model's."""
    return [g.to_local() if isinstance(g, DTensor) else g for g in (p.grad for p in model.parameters()) if g is not None]
