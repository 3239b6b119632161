"""What several test files share: owl-tiny's training system, a short fit, tiny data written on the spot.

Fixtures stay in conftest.py; plain functions and constants live here and are imported by name.
"""

import io
import json
from dataclasses import fields, replace
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from PIL import Image
from torch.distributed.tensor import DTensor

from owl_lightning.config import IGNORE_INDEX, STAGE1, STAGE2, TrainRecipe, get_config
from owl_lightning.train.optim import OptimizerConfig
from owl_lightning.train.system import STAGE1_OPTIMIZER, STAGE2_OPTIMIZER, OwlSystem

# owl-tiny as the CLI takes it (--model.config).
TINY_YAML = Path(__file__).parents[1] / "experiments" / "models" / "owl-tiny.yaml"


def tiny_system(
    stage: str = "stage1", config_overrides: dict | None = None, recipe: TrainRecipe | None = None, config: str = "owl-tiny", **kwargs
):
    """owl-tiny's (or another tiny ``config``'s) training system with a stage's recipe and optimizer;
    optimizer fields (``lr``, ``warmup_steps``, ...) and the system's own arguments by keyword."""
    names = {field.name for field in fields(OptimizerConfig)}
    optimizer = replace(
        STAGE1_OPTIMIZER if stage == "stage1" else STAGE2_OPTIMIZER, **{k: kwargs.pop(k) for k in list(kwargs) if k in names}
    )
    recipe = recipe or (STAGE1 if stage == "stage1" else STAGE2)
    return OwlSystem(config=get_config(config, config_overrides), recipe=recipe, optimizer=optimizer, **kwargs)


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def png_bytes(colour, size=32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), COLOURS[colour]).save(buffer, format="PNG")
    return buffer.getvalue()


def fit(system, datamodule, tmp_path, steps=2, ckpt_path=None, **trainer_kwargs):
    """``steps`` training steps on the CPU, quietly: no validation, logger or checkpoints unless asked for
    (a ``ModelCheckpoint`` in ``callbacks`` turns checkpointing on)."""
    callbacks = trainer_kwargs.get("callbacks", [])
    settings = {
        "limit_val_batches": 0,
        "logger": False,
        "enable_checkpointing": any(isinstance(c, ModelCheckpoint) for c in callbacks),
        "enable_progress_bar": False,
        "check_val_every_n_epoch": None if "val_check_interval" in trainer_kwargs else 1,
    }
    trainer = L.Trainer(max_steps=steps, default_root_dir=tmp_path, accelerator="cpu", **{**settings, **trainer_kwargs})
    trainer.fit(system, datamodule, ckpt_path=ckpt_path)
    return trainer


def caption_batch(tokenizer, text_lengths=(20,), padded_to=None, images=True):
    """``BOS <image> text`` samples (``BOS text`` when ``images`` is False), right-padded; the text is supervised."""
    image = [tokenizer.convert_tokens_to_ids("<image>")] if images else []
    rows = [[tokenizer.bos_token_id, *image, *range(97, 97 + n)] for n in text_lengths]
    width = max(padded_to or 0, *(len(r) for r in rows))
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    labels = torch.where(mask.bool() & (input_ids >= 97) & (input_ids < 256), input_ids, IGNORE_INDEX)
    counts = torch.full((len(rows),), len(image))
    pixels = torch.randint(0, 255, (int(counts.sum()), 3, 32, 32), dtype=torch.uint8) if images else None
    return {"input_ids": input_ids, "sample_ids": mask, "labels": labels, "images": pixels, "image_counts": counts}


def write_owleval(root: Path, questions: list[dict]) -> Path:
    """An OwlEval folder: questions.jsonl and a solid-colour PNG per image in cases/."""
    (root / "cases").mkdir(parents=True)
    for question in questions:
        (root / "cases" / question["image"]).write_bytes(png_bytes(question["image"].split(".")[0]))
    (root / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    return root


SUBSET = [  # one single-turn question, and a two-turn conversation about another image
    {"image": "red.png", "question_id": 1, "question": "What colour is this?", "ability": "b", "category": ["single_turn"]},
    {"image": "blue.png", "question_id": 2, "question": "Describe the image.", "ability": "b", "category": ["single_turn", "multi_turn"]},
    {"image": "blue.png", "question_id": 3, "question": "Are you sure?", "ability": "f", "category": ["multi_turn"]},
]


class Interrupted(Exception):
    pass


class InterruptAt(Callback):
    """Dies before step ``step`` begins — after the checkpoint of the step before was written."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise Interrupted


class OptimizerStepReport(Callback):
    """What each micro-batch's training sent between the ranks, and the weights after each optimizer step.

    Per rank: the gradient collectives each micro-batch ran (reduce-scatters under FSDP2, counted at
    ``torch.distributed.reduce_scatter_single``; bucket all-reduces under DDP, counted by a comm hook),
    and whether it ended with an optimizer step; after every optimizer step, the trainable weights whole
    (gathered from their shards); each micro-batch's supervised tokens. Written at the end of training
    to ``<out>/rank<N>.pt``.
    """

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.collectives = 0
        self.micro_batches: list[dict] = []  # {"collectives": int, "stepped": bool, "supervised": tokens}
        self.weights: list[dict[str, torch.Tensor]] = []  # after optimizer steps 1, 2, ...
        self._collectives_before = 0
        self._steps_before = 0
        self._unpatched = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._unpatched = torch.distributed.reduce_scatter_single

        def counted_reduce_scatter(*args, **kwargs):
            self.collectives += 1
            return self._unpatched(*args, **kwargs)

        torch.distributed.reduce_scatter_single = counted_reduce_scatter
        if isinstance(trainer.strategy.model, torch.nn.parallel.DistributedDataParallel):
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

            def counted_all_reduce(state, bucket):
                self.collectives += 1
                return allreduce_hook(state, bucket)

            trainer.strategy.model.register_comm_hook(None, counted_all_reduce)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._collectives_before, self._steps_before = self.collectives, trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stepped = trainer.global_step > self._steps_before
        collectives = self.collectives - self._collectives_before
        self.micro_batches.append({"collectives": collectives, "stepped": stepped, "supervised": batch["layout"].num_supervised})
        if stepped:  # full_tensor is a collective: every rank gathers, in the same order
            trained = {name: p for name, p in pl_module.model.named_parameters() if p.requires_grad}
            self.weights.append({name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for name, p in trained.items()})

    def on_train_end(self, trainer, pl_module) -> None:
        torch.distributed.reduce_scatter_single = self._unpatched
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save({"micro_batches": self.micro_batches, "weights": self.weights}, self.out / f"rank{trainer.global_rank}.pt")


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest absolute difference between same-named tensors (which must name the same tensors)."""
    assert a.keys() == b.keys()
    return max(float((a[name] - b[name]).abs().max()) for name in a)


def reply_log_probability(assistant, request, reply: str) -> float:
    """``reply``'s tokens (and the end of the answer) as the assistant's answer to ``request``, summed
    log-probability by the training loss's own path: the mean loss of a batch of one times its tokens."""
    from owl_lightning.data.collate import EncodedSample, collate
    from owl_lightning.data.template import Conversation, Turn

    conversation = Conversation([*request.turns, Turn("assistant", reply)], images=[f"image {i}" for i in range(len(request.images))])
    input_ids, labels, _ = assistant.template.encode(conversation)
    batch = collate([EncodedSample(input_ids, labels, assistant.encode(request).images)], assistant.tokenizer.pad_token_id)
    with torch.no_grad():
        out = assistant.model(batch["input_ids"], batch["sample_ids"], batch["labels"], batch["images"], batch["image_counts"])
    return -float(out.loss) * out.num_supervised


class AllGatherReport(Callback):
    """The bytes FSDP2 all-gathers during each micro-batch's training, per rank, by what they gather; each
    micro-batch's loss; the trainable weights whole at the end. Written to ``<out>/rank<N>.json`` and
    ``<out>/rank<N>.pt`` (the weights).

    Counted at ``torch.distributed.all_gather_single``, FSDP2's all-gather, and attributed to the
    parameters of the FSDP unit that issued it (``FSDPParamGroup.unshard``), in proportion to their sizes.
    Received bytes: the output less this rank's own input; ``_across_nodes``: the part sent by ranks on
    other nodes, nodes being ``node_size`` consecutive global ranks. Kinds: ``frozen_llm``
    (``llm.*`` without gradients), ``frozen_other``, ``trainable``.
    """

    def __init__(self, out: str, node_size: int) -> None:
        self.out = Path(out)
        self.node_size = node_size
        self.micro_batches: list[dict] = []  # {"loss": float, "bytes": {kind: int}, "bytes_across_nodes": {kind: int}}
        self._counting = False
        self._gathering = None  # the FSDPParamGroup whose unshard is running
        self._unpatched: tuple = ()

    def on_train_start(self, trainer, pl_module) -> None:
        from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

        all_gather, unshard = torch.distributed.all_gather_single, FSDPParamGroup.unshard
        self._unpatched = (all_gather, unshard)

        def unshard_of(group, *args, **kwargs):
            self._gathering = group
            try:
                return unshard(group, *args, **kwargs)
            finally:
                self._gathering = None

        def counted_all_gather(output, input, group=None, **kwargs):
            if self._counting and self._gathering is not None:
                self._count(output, input, group)
            return all_gather(output, input, group=group, **kwargs)

        FSDPParamGroup.unshard = unshard_of
        torch.distributed.all_gather_single = counted_all_gather

    def _count(self, output: torch.Tensor, input: torch.Tensor, group) -> None:
        me = torch.distributed.get_rank()
        peers = torch.distributed.get_process_group_ranks(group)
        received = output.numel() * output.element_size() - input.numel() * input.element_size()
        across = input.numel() * input.element_size() * sum(p // self.node_size != me // self.node_size for p in peers)
        params = self._gathering.fsdp_params
        total = sum(p.sharded_param.numel() for p in params)
        counts = self.micro_batches[-1]
        for param in params:
            trainable, llm = param.sharded_param.requires_grad, param._param_fqn.startswith("llm.")
            kind = "trainable" if trainable else "frozen_llm" if llm else "frozen_other"
            share = param.sharded_param.numel() / total
            counts["bytes"][kind] = counts["bytes"].get(kind, 0) + received * share
            counts["bytes_across_nodes"][kind] = counts["bytes_across_nodes"].get(kind, 0) + across * share

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.micro_batches.append({"bytes": {}, "bytes_across_nodes": {}})
        self._counting = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._counting = False
        self.micro_batches[-1]["loss"] = float(outputs["loss"])

    def on_train_end(self, trainer, pl_module) -> None:
        from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

        torch.distributed.all_gather_single, FSDPParamGroup.unshard = self._unpatched
        trained = {name: p for name, p in pl_module.model.named_parameters() if p.requires_grad}
        weights = {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for name, p in trained.items()}
        self.out.mkdir(parents=True, exist_ok=True)
        rank = trainer.global_rank
        torch.save(weights, self.out / f"rank{rank}.pt")
        (self.out / f"rank{rank}.json").write_text(json.dumps({"micro_batches": self.micro_batches, "world_size": trainer.world_size}))
