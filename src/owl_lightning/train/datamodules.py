"""The LightningDataModules: stage 1 streams image–caption shards, stage 2 mixes instruction files.

Both read a data manifest (``data_manifests/*.yaml``), preprocess images exactly as timm
evaluates the vision encoder, tokenise with the LLM's tokenizer (``<image>`` added), and yield
ready, padded batches from their workers. Skipped samples travel inside the batches and are
added up here (:class:`DataHealth`), records refused while reading a source at setup too: the run
stops with a clear message past ``max_skip_fraction``. Validation data has a DataHealth of its own
(``val_health``): logged under ``val/data/``, counted afresh each validation pass, never stopping a run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import Strategy
from torch.utils.data import DataLoader

from owl_lightning.data.documents import DOCUMENT_FORMATS
from owl_lightning.data.health import EMPTY_SOURCE, DataHealth, SkipLog, SkipSample
from owl_lightning.data.highres import visual_tokens_of
from owl_lightning.data.images import decode_image, resolve_under_root
from owl_lightning.data.instruct import read_conversations
from owl_lightning.data.manifest import VIDEO_INSTRUCTION_FORMATS, load_manifest
from owl_lightning.data.mixture import InstructionMixture
from owl_lightning.data.processor import OwlProcessor
from owl_lightning.data.resume import worker_count_changed, world_size_changed
from owl_lightning.data.shards import build_shard_pipeline
from owl_lightning.data.template import Conversation, ConversationTemplate
from owl_lightning.data.transfer import send_batches_by_value

log = logging.getLogger(__name__)


def _loader_settings(num_workers: int) -> dict:
    """What every loader here is built with: ready batches from the dataset (``batch_size=None``),
    worker seeds from a generator of its own (our datasets seed themselves, so creating a loader
    leaves the global RNG — and with it dropout after a resume — untouched), and batches sent by
    value (:mod:`~owl_lightning.data.transfer`)."""
    return {"batch_size": None, "num_workers": num_workers, "generator": torch.Generator(), "worker_init_fn": send_batches_by_value}


class EndTogether:
    """A validation loader's batches until any rank runs out of them (one all-reduced flag a batch).

    Ranks may hold different numbers of validation batches (shards of unequal sizes). Under FSDP
    every forward gathers weights from all ranks, so a rank going on alone would wait forever;
    the batches the other ranks still held are left out.
    """

    def __init__(self, loader: DataLoader, strategy: Strategy, on_pass_start: Callable[[], None] = lambda: None) -> None:
        self.loader, self.strategy, self.on_pass_start = loader, strategy, on_pass_start

    def __iter__(self) -> Iterator[dict]:
        self.on_pass_start()
        batches = iter(self.loader)
        while True:
            batch = next(batches, None)
            if not self.strategy.reduce_boolean_decision(batch is not None, all=True):
                return
            yield batch


class ResumableLoader(DataLoader):
    """The training DataLoader, with the state Lightning saves in every checkpoint (it calls
    ``state_dict`` when saving and ``load_state_dict`` before iterating a resumed run): the epoch, how
    many of its batches training has taken, the world size and worker count, and for a dataset that
    reads a stream per worker (stage 1) the stream cursor of the last batch training took from each
    worker role, for every rank. The dataset (``resume_at``) then continues right after them with the
    very batches the interrupted run would have seen next.

    Batches are counted as training takes them (:meth:`took_batch`, called by the data module just
    before a batch moves to the device), not as workers produce them: Lightning prefetches one ahead.

    Args:
        allow_new_layout: a streamed state saved with another world size or worker count cannot be continued
            exactly; refused unless this is set, which drops its cursors: the rest of the epoch is read from
            fresh streams.
    """

    def __init__(self, dataset, num_workers: int, trainer: L.Trainer, allow_new_layout: bool = False) -> None:
        super().__init__(dataset, **_loader_settings(num_workers))
        self.trainer = trainer
        self.allow_new_layout = allow_new_layout
        self.epoch, self.batches_taken = 0, 0
        self.stream_cursors = self._no_cursors()
        self._resumed_at: tuple[int, int, list[dict | None] | None] | None = None

    def _no_cursors(self) -> list[dict | None]:
        """One empty slot per worker role (the main process, with no workers, reads one stream)."""
        return [None] * max(1, self.num_workers)

    def __iter__(self) -> Iterator[dict]:
        # The one place the epoch is set: streams reshuffle per epoch, and each epoch's iterator pickles
        # the dataset afresh for its workers. A resumed run's first iterator is made before Lightning moves
        # its epoch on from the checkpoint's (and before on_train_epoch_start): it takes the resumed epoch.
        resumed, self._resumed_at = self._resumed_at, None
        self.epoch = resumed[0] if resumed else self.trainer.current_epoch
        self.batches_taken = resumed[1] if resumed else 0
        # A role that delivers nothing before the next save still stands where the resume put it.
        self.stream_cursors = list(resumed[2]) if resumed and resumed[2] is not None else self._no_cursors()
        self.dataset.set_epoch(self.epoch)
        return super().__iter__()

    def took_batch(self, stream_cursor: dict | None) -> None:
        """Count a batch training took; ``stream_cursor``: where its worker's stream stood after it (stage 1)."""
        self.batches_taken += 1
        if stream_cursor is not None:
            self.stream_cursors[stream_cursor["role"]] = stream_cursor

    def state_dict(self) -> dict:
        # Saved after a training step: the batch of that step is counted, the prefetched next one is not.
        return {
            "epoch": self.epoch,
            "batches_done": self.batches_taken,
            "world_size": self.trainer.world_size,
            "num_workers": self.num_workers,
            "stream_cursors": _from_every_rank(list(self.stream_cursors)),  # as they are now, not as later batches move them
        }

    def load_state_dict(self, state: dict) -> None:
        epoch, batches_done = state["epoch"], state["batches_done"]
        if batches_done >= self._batches_per_epoch():
            # Saved on the epoch's last batch: Lightning goes on with the next epoch, whose streams start afresh.
            epoch, batches_done = epoch + 1, 0
            self.dataset.resume_at(epoch, 0)
            cursors = None
        elif getattr(self.dataset, "streams_per_worker", False):
            cursors = self._cursors_to_resume(state)
            self.dataset.resume_at(epoch, batches_done, cursors)
        else:  # batches that are a function of their index (stage 2) need no cursor
            cursors = None
            self.dataset.resume_at(epoch, batches_done)
        self._resumed_at = (epoch, batches_done, cursors)
        log.info("resuming the training data at epoch %d, after batch %d", epoch, batches_done)

    def _batches_per_epoch(self) -> float:
        """This rank's batches per epoch; infinite for an endless stream."""
        try:
            return len(self.dataset)
        except TypeError:
            return math.inf

    def _cursors_to_resume(self, state: dict) -> list[dict | None] | None:
        """This rank's saved cursors, one per worker role, when the state fits this run's world size and
        worker count; None: none were saved (a checkpoint from an older version)."""
        if "stream_cursors" not in state:
            return None
        world_size, saved_world_size = self.trainer.world_size, state["world_size"]
        saved_workers = state["num_workers"]
        changes = []
        if saved_world_size != world_size:
            changes.append(world_size_changed(saved_world_size, world_size))
        if max(1, saved_workers) != max(1, self.num_workers):  # 0 workers and 1 read the same single stream
            changes.append(worker_count_changed(saved_workers, self.num_workers))
        if not changes:
            return state["stream_cursors"][self.trainer.global_rank]
        if not self.allow_new_layout:
            raise ValueError("\n".join(changes))
        log.warning(
            "the training data state was saved with world size %d and num_workers=%d, this run has %d and %d "
            "(allow_new_layout): the rest of epoch %d is read from fresh streams",
            saved_world_size,
            saved_workers,
            world_size,
            self.num_workers,
            state["epoch"],
        )
        return self._no_cursors()


def _from_every_rank(item: object) -> list:
    """``item`` of every rank, in rank order (``[item]`` without a process group). Lightning builds a
    checkpoint on every rank and writes rank 0's, so a rank's own state must travel to rank 0 to be saved.
    A collective: every rank calls it."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [item]
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, item)
    return gathered


class _OwlDataModule(L.LightningDataModule):
    """Shared set-up: the model's processor (the CLI hands over the training system's), the manifest."""

    def __init__(
        self,
        manifest: str,
        processor: OwlProcessor | None,
        batch_size: int,
        num_workers: int,
        max_length: int,
        seed: int,
        max_skip_fraction: float,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["processor"])
        self.processor = processor
        self.health = DataHealth(max_skip_fraction=max_skip_fraction)
        # Validation data never stops a run (and its skips never count against training's limit).
        self.val_health = DataHealth(max_skip_fraction=1.0)
        self.manifest = None
        self._train_loader: ResumableLoader | None = None

    def setup(self, stage: str) -> None:
        if self.processor is None:
            raise ValueError(
                f"{type(self).__name__} has no processor: pass processor=system.processor (the training system's), "
                "or run it through `owl-lightning stage1/stage2`, which does"
            )
        if self.manifest is None:
            self.manifest = load_manifest(self.hparams.manifest)

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader(self, dataset, workers: int | None = None, train: bool = False, allow_new_layout: bool = False) -> DataLoader:
        """Batches are built in the workers (not persistent ones: each epoch's iterator pickles the dataset
        afresh, so the epoch :class:`ResumableLoader` sets reaches them)."""
        workers = self.hparams.num_workers if workers is None else workers
        if train and self.trainer is not None:
            self._train_loader = ResumableLoader(dataset, workers, self.trainer, allow_new_layout=allow_new_layout)
            return self._train_loader
        return DataLoader(dataset, **_loader_settings(workers))

    def _val_loader(self, dataset) -> Iterable[dict] | DataLoader:
        loader = self._loader(dataset, workers=min(self.hparams.num_workers, 1))
        if self.trainer is None:
            return loader
        # Each pass reads the same records again: its counts say what one pass skipped.
        return EndTogether(loader, self.trainer.strategy, on_pass_start=self.val_health.clear_stream_counts)

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        stream_cursor = batch.pop("stream_cursor", None)  # the loader's to keep, not the model's
        if self.trainer is not None:
            health = self.health if self.trainer.training else self.val_health  # sanity check included
            health.update(
                batch["source"],
                batch["skipped"],
                dropped_images=batch.pop("dropped_images", ()),
                supervised_tokens=batch.pop("supervised_tokens", ()),
            )
            if self.trainer.training and self._train_loader is not None:
                self._train_loader.took_batch(stream_cursor)
        return batch

    def state_dict(self) -> dict:
        return {"health": self.health.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.health.load_state_dict(state["health"])


class CaptionDataModule(_OwlDataModule):
    """Stage 1: image–caption WebDataset shards (img2dataset layout) and interleaved documents (MMC4, OBELICS;
    a source's ``format`` in the manifest), sources mixed by weight.

    Args:
        manifest: the data manifest (train/val lists of shard sources).
        processor: the model's tokenizer and image transform (the CLI hands over the system's).
        batch_size: samples per batch per process. num_workers: DataLoader workers per process.
        max_length: token limit of a sample, visual tokens included (longer captions and documents are cut; documents need hundreds).
        shuffle_buffer: samples held for shuffling in each worker.
        batches_per_epoch: per process; default: the manifest's ``num_samples`` over the global batch.
        val_batches: limit validation to this many batches (None: the whole val split).
        seed: shard and sample order. max_skip_fraction: stop when more of the data is bad.
        allow_new_layout: resume a checkpoint saved with another world size or ``num_workers`` (refused
            otherwise: each process and worker reads a stream of its own); the rest of the interrupted
            epoch is then read from fresh streams, not the batches the interrupted run would have seen.
    """

    def __init__(
        self,
        manifest: str = "data_manifests/embedded_stage1.yaml",
        processor: OwlProcessor | None = None,
        batch_size: int = 32,
        num_workers: int = 2,
        max_length: int = 128,
        shuffle_buffer: int = 1000,
        batches_per_epoch: int | None = None,
        seed: int = 0,
        max_skip_fraction: float = 0.1,
        allow_new_layout: bool = False,
    ) -> None:
        super().__init__(manifest, processor, batch_size, num_workers, max_length, seed, max_skip_fraction)

    def _pipeline(self, sources: list, train: bool):
        template = self.processor.template(self.hparams.max_length)
        return build_shard_pipeline(
            sources,
            image_transform=self.processor.image_transform,
            encode_caption=template.encode_caption,
            encode_document=template.encode_document,
            image_tokens=self.processor.image_tokens,
            video_reader=self.processor.video_reader,
            pad_token_id=self.tokenizer.pad_token_id,
            batch_size=self.hparams.batch_size,
            train=train,
            seed=self.hparams.seed,
            shuffle_buffer=self.hparams.shuffle_buffer,
            batches_per_epoch=self._batches_per_epoch() if train else None,
            skips=SkipLog(),
        )

    def _batches_per_epoch(self) -> int:
        if self.hparams.batches_per_epoch:
            return self.hparams.batches_per_epoch
        samples = sum(s.num_samples or 0 for s in self.manifest.train)
        if not samples:
            raise ValueError(f"{self.manifest.path}: give train sources num_samples, or set --data.batches_per_epoch")
        _, world = self._rank_and_world
        return max(1, math.ceil(samples / (self.hparams.batch_size * world)))

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._pipeline(self.manifest.train, train=True), train=True, allow_new_layout=self.hparams.allow_new_layout)

    def val_dataloader(self) -> DataLoader | list:
        if not self.manifest.val:
            return []
        return self._val_loader(self._pipeline(self.manifest.val, train=False))


class InstructionDataModule(_OwlDataModule):
    """Stage 2: instruction files (LLaVA, Alpaca, ShareGPT, mPLUG-Owl JSONL) mixed per batch by weight.

    Args:
        manifest: the data manifest (train/val lists of instruction sources).
        processor: the model's tokenizer and image transform (the CLI hands over the system's).
        batch_size: samples per batch per process; each batch holds every source in proportion to its weight.
        template: ``owl`` (the mPLUG-Owl template) or ``chat_template`` (the tokenizer's own).
        system_prompt: the system line; ``null``: the style's default (owl: the paper's line;
            chat_template: whatever the tokenizer's template adds); ``""``: none.
        max_length: tokens per sample, visual tokens included; samples are cut, and skipped if no answer is left.
        batches_per_epoch: global batches per epoch (default: the largest source seen once).
        pack: several samples per row, kept apart by the model (block-diagonal attention): the same
            loss as one sample a row, without most of the padding (short VQA turns beside long texts).
    """

    def __init__(
        self,
        manifest: str = "data_manifests/embedded_stage2.yaml",
        processor: OwlProcessor | None = None,
        batch_size: int = 16,
        num_workers: int = 2,
        max_length: int = 1024,
        template: str = "owl",
        system_prompt: str | None = None,
        batches_per_epoch: int | None = None,
        seed: int = 0,
        max_skip_fraction: float = 0.1,
        pack: bool = True,
    ) -> None:
        super().__init__(manifest, processor, batch_size, num_workers, max_length, seed, max_skip_fraction)

    def template(self) -> ConversationTemplate:
        """The conversation template this run trains with."""
        return self.processor.template(self.hparams.max_length, self.hparams.template, self.hparams.system_prompt)

    def validation_examples(self, count: int) -> list[tuple[Conversation, list[torch.Tensor], str]]:
        """The first ``count`` validation conversations, taken in turn from each validation source, as
        ``(conversation up to its last user turn, its images as uint8 [3, H, W], the reference answer)``.
        Records that cannot be read are passed over (training's skip accounting already counts them)."""
        template = self.template()
        sources = [
            (source, read_conversations(source, SkipLog(warnings_left=0)))
            for source in self.manifest.val
            if source.format not in DOCUMENT_FORMATS  # a document has no question to answer
        ]
        examples: list[tuple[Conversation, list[torch.Tensor], str]] = []
        for index in range(max((len(conversations) for _, conversations in sources), default=0)):
            for source, conversations in sources:
                if len(examples) == count:
                    return examples
                if index >= len(conversations) or conversations[index].turns[-1].role != "assistant":
                    continue
                conversation = conversations[index]
                prompt = replace(conversation, turns=conversation.turns[:-1])
                try:
                    root = Path(source.media_root or ".")
                    if source.format in VIDEO_INSTRUCTION_FORMATS:
                        images = [self.processor.video_reader(resolve_under_root(path, root)) for path in conversation.images]
                    else:
                        images = [
                            self.processor.image_transform(decode_image(resolve_under_root(path, root))) for path in conversation.images
                        ]
                    # too long for the model: the next one
                    template.encode_prompt(prompt, [visual_tokens_of(image, template.visual_tokens_per_image) for image in images])
                except SkipSample:
                    continue
                examples.append((prompt, images, conversation.turns[-1].content))
        return examples

    def _mixture(self, sources: list, health: DataHealth) -> InstructionMixture:
        rank, world = self._rank_and_world
        template = self.template()
        skips = SkipLog()
        read = []
        for source in sources:
            conversations = read_conversations(source, skips)
            if conversations:
                read.append((source, conversations))
            else:  # e.g. a 0-byte file: the other sources are mixed by their weights
                skips.record(EMPTY_SOURCE, source.path, f"source {source.name!r} has no usable conversation; left out of the mixture")
            # Against the records read; a source read again (a second setup, a resume) replaces its counts.
            health.record_read(source.name, source.path, len(conversations), skips.drain())
        health.check_read()
        if not read:
            raise ValueError(
                f"{self.manifest.path}: none of the instruction sources {[s.name for s in sources]} has a usable "
                "conversation; see the skip warnings above"
            )
        return InstructionMixture(
            read,
            template,
            self.processor.image_transform,
            batch_size=self.hparams.batch_size,
            pad_token_id=self.tokenizer.pad_token_id,
            seed=self.hparams.seed,
            batches_per_epoch=self.hparams.batches_per_epoch,
            rank=rank,
            world_size=world,
            pack=self.hparams.pack,
            image_tokens=self.processor.image_tokens,
            video_reader=self.processor.video_reader,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._mixture(self.manifest.train, self.health), train=True)

    def val_dataloader(self) -> DataLoader | list:
        if not self.manifest.val:
            return []
        return self._val_loader(self._mixture(self.manifest.val, self.val_health))
