"""Stage-1 resume from stream cursors: a resumed stream is the uninterrupted one, nothing consumed is
decoded (or even parsed) again, every rank keeps its own cursors, and a state saved with another worker
count or world size is refused by name."""

from __future__ import annotations

import gzip
import io
import multiprocessing
import os
from itertools import islice
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from owl_lightning.data import shards
from owl_lightning.data.health import CORRUPT_IMAGE
from owl_lightning.data.manifest import ShardSource
from owl_lightning.train.datamodules import ResumableLoader
from tests.test_shards import build, captions_of, img2dataset_sample, rgb_png, write_good_shards, write_shard

ONE_PROCESS = SimpleNamespace(current_epoch=0, world_size=1, global_rank=0)  # what ResumableLoader reads of a Trainer
BATCH = 3


def mixed_sources(folder: Path, suffix: str = "tar") -> list[ShardSource]:
    """Two sources mixed 1:2 in small shards, the second with corrupt images among good ones: a resume
    crosses shard draws, restores shuffle buffers holding samples of several draws, and meets skips.
    ``suffix="tar.gz"``: gzipped shards, which a resume reads through instead of seeking in."""
    write_good_shards(folder / "a", "a", shards=3, per_shard=5)
    write_good_shards(folder / "b", "b", shards=2, per_shard=6)
    samples = [img2dataset_sample(key, f"b 2 {key}", rgb_png(key)) for key in range(4)]
    samples[1:1] = [img2dataset_sample(100 + key, f"b bad {key}", b"\x89PNG not an image") for key in range(2)]
    write_shard(folder / "b" / "b-000002.tar", samples)
    if suffix == "tar.gz":
        for tar in folder.glob("*/*.tar"):
            tar.with_suffix(".tar.gz").write_bytes(gzip.compress(tar.read_bytes()))
            tar.unlink()
    return [
        ShardSource("a", str(folder / "a" / f"a-{{000000..000002}}.{suffix}"), weight=1.0),
        ShardSource("b", str(folder / "b" / f"b-{{000000..000002}}.{suffix}"), weight=2.0),
    ]


def loader_over(sources: list[ShardSource], workers: int, trainer=ONE_PROCESS, allow_new_layout: bool = False, **kw) -> ResumableLoader:
    pipeline = build(sources, **{"batch_size": BATCH, "batches_per_epoch": 24, "shuffle_buffer": 6, **kw})
    return ResumableLoader(pipeline, workers, trainer, allow_new_layout=allow_new_layout)


def take(loader: ResumableLoader, batches: int | None = None) -> list[tuple[list[str], list[tuple[str, str]]]]:
    """``(captions, skips)`` of the first ``batches`` batches, each counted as training takes it (Lightning
    prefetches: the workers have made more than were taken)."""
    taken = []
    for batch in islice(loader, batches):
        loader.took_batch(batch.pop("stream_cursor"))
        taken.append((captions_of(batch), sorted(tuple(skip) for skip in batch["skipped"])))
    return taken


def saved(state: dict) -> dict:
    """``state`` through a checkpoint file, read back as the checkpoint readers read it."""
    file = io.BytesIO()
    torch.save(state, file)
    file.seek(0)
    return torch.load(file, weights_only=True)


@pytest.fixture
def decode_calls(monkeypatch):
    """Calls of the pipeline's image decode, counted in forked DataLoader workers too."""
    calls = multiprocessing.Value("i", 0)
    decode = shards.decode_image

    def counted(data: bytes):
        with calls.get_lock():
            calls.value += 1
        return decode(data)

    monkeypatch.setattr(shards, "decode_image", counted)
    return calls


@pytest.mark.parametrize("suffix", ["tar", "tar.gz"])
@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_stream_goes_on_exactly_and_decodes_nothing_consumed(tmp_path, decode_calls, workers, suffix):
    sources = mixed_sources(tmp_path, suffix)
    straight = take(loader_over(sources, workers))
    assert any(skips for _, skips in straight[10:])  # the resumed part meets corrupt images too

    interrupted = loader_over(sources, workers)
    take(interrupted, 10)
    state = saved(interrupted.state_dict())
    assert (state["world_size"], state["num_workers"], len(state["stream_cursors"][0])) == (1, workers, max(1, workers))

    resumed_loader = loader_over(sources, workers)
    resumed_loader.load_state_dict(state)
    decode_calls.value = 0
    resumed = take(resumed_loader)
    assert resumed == straight[10:]
    # Only the samples of the batches it yields are decoded, and the corrupt images met filling them.
    corrupt = sum(reason == CORRUPT_IMAGE for _, skips in resumed for reason, _ in skips)
    assert decode_calls.value == BATCH * len(resumed) + corrupt


def test_a_second_interruption_resumes_from_the_cursors_of_the_first(tmp_path):
    """A role that delivers no batch between two saves still stands where the first resume put it."""
    sources = mixed_sources(tmp_path)
    straight = take(loader_over(sources, 2))
    first = loader_over(sources, 2)
    take(first, 7)
    second = loader_over(sources, 2)
    second.load_state_dict(saved(first.state_dict()))
    take(second, 1)  # worker role 1 delivers; role 0 is still at its first cursor when saved again
    third = loader_over(sources, 2)
    third.load_state_dict(saved(second.state_dict()))
    assert take(third) == straight[8:]


def test_a_state_without_cursors_resumes_by_rebuilding_the_consumed_batches(tmp_path, decode_calls):
    """A checkpoint from before cursors holds only the epoch and the batch count: still exact, but it
    decodes everything consumed again."""
    sources = mixed_sources(tmp_path)
    straight = take(loader_over(sources, 0))
    interrupted = loader_over(sources, 0)
    take(interrupted, 10)
    state = interrupted.state_dict()
    older = {"epoch": state["epoch"], "batches_done": state["batches_done"]}
    resumed_loader = loader_over(sources, 0)
    resumed_loader.load_state_dict(older)
    decode_calls.value = 0
    assert take(resumed_loader) == straight[10:]
    assert decode_calls.value >= BATCH * len(straight)


def test_a_resume_parses_only_the_samples_it_still_needs(tmp_path, monkeypatch):
    """Finished shard draws are not opened, and of the others only the samples the shuffle buffer held (each
    reached by a seek) and the last one read are parsed again: not the samples consumed before them."""
    sources = [ShardSource("s", write_good_shards(tmp_path, "s", shards=8, per_shard=4))]
    parsed = []
    read_tar = shards._tar_samples

    def counted(url: str, limits, start: int = 0):
        for sample in read_tar(url, limits, start):
            parsed.append(sample["__key__"])
            yield sample

    monkeypatch.setattr(shards, "_tar_samples", counted)
    kw = {"batch_size": 4, "batches_per_epoch": 40}
    interrupted = loader_over(sources, 0, **kw)
    take(interrupted, 30)
    assert len(parsed) > 120
    state = saved(interrupted.state_dict())

    parsed.clear()
    resumed = loader_over(sources, 0, **kw)
    resumed.load_state_dict(state)
    take(resumed, 1)
    buffered = len(state["stream_cursors"][0][0]["sources"][0]["buffer"])
    # The buffer's samples and the last one read again, then new ones: at most two per sample yielded.
    assert buffered < len(parsed) <= buffered + 1 + 2 * 4


def test_rereads_seek_to_each_run_of_buffered_samples_or_read_through_once():
    """``(first index, its offset, stop)`` stretches: consecutive buffered samples share one; the one holding
    the last sample read goes on to the shard's end; a stream that cannot seek is read through from the first."""
    buffered = {3: 30, 4: 40, 7: 70}
    assert shards._Reread(buffered, onward=(9, 90)).spans(seekable=True) == [(3, 30, 5), (7, 70, 8), (9, 90, None)]
    assert shards._Reread(buffered, onward=(8, 80)).spans(seekable=True) == [(3, 30, 5), (7, 70, None)]
    assert shards._Reread(buffered, onward=(7, 70)).spans(seekable=True) == [(3, 30, 5), (7, 70, None)]
    assert shards._Reread(buffered).spans(seekable=True) == [(3, 30, 5), (7, 70, 8)]
    assert shards._Reread(buffered, onward=(9, 90)).spans(seekable=False) == [(3, 30, None)]
    assert shards._Reread(buffered).spans(seekable=False) == [(3, 30, 8)]
    assert shards._Reread({}, onward=(2, 20)).spans(seekable=False) == [(2, 20, None)]


def test_a_changed_worker_count_or_world_size_is_refused_by_name(tmp_path):
    sources = mixed_sources(tmp_path)
    interrupted = loader_over(sources, 0)
    take(interrupted, 2)
    state = saved(interrupted.state_dict())

    with pytest.raises(ValueError, match=r"num_workers=0 per process, this run has num_workers=2.*--data\.num_workers 0"):
        loader_over(sources, 2).load_state_dict(state)
    two_processes = SimpleNamespace(current_epoch=0, world_size=2, global_rank=0)
    with pytest.raises(ValueError, match=r"saved by 1 training process\(es\) \(world size\), this run has 2.*Resume on 1 process"):
        loader_over(sources, 0, two_processes).load_state_dict(state)

    loader_over(sources, 1).load_state_dict(state)  # 0 workers and 1 read the same single stream
    allowed = loader_over(sources, 2, allow_new_layout=True)
    allowed.load_state_dict(state)
    assert len(take(allowed)) == 24 - 2  # the rest of the epoch, from fresh streams


def _interrupt_and_resume_on_two_ranks(rank: int, folder: str, sources: list[ShardSource]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2")  # read by the pipeline when it is built
    torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2)
    try:
        trainer = SimpleNamespace(current_epoch=0, world_size=2, global_rank=rank)
        # No DataLoader workers: in a spawned process they would be spawned too, each importing everything again.
        straight = take(loader_over(sources, 0, trainer))
        interrupted = loader_over(sources, 0, trainer)
        take(interrupted, 5)
        state = saved(interrupted.state_dict())  # a collective: rank 0's file gets every rank's cursors
        (rank0,), (rank1,) = state["stream_cursors"]  # one worker role each
        assert not torch.equal(rank0["mix_rng"], rank1["mix_rng"])
        resumed = loader_over(sources, 0, trainer)
        resumed.load_state_dict(state)
        assert take(resumed) == straight[5:], f"rank {rank}"
    finally:
        torch.distributed.destroy_process_group()


def test_every_rank_resumes_its_own_streams(tmp_path):
    sources = mixed_sources(tmp_path / "shards")
    torch.multiprocessing.spawn(_interrupt_and_resume_on_two_ranks, args=(str(tmp_path), sources), nprocs=2)


def test_the_shuffle_picks_as_webdataset_does_and_keeps_its_origins_in_step():
    """The shuffle's own pick draws what webdataset's ``filters.pick`` draws (streams stay as they were), and
    the origins a cursor copies are the buffered samples' own, in buffer order, after every take and pick."""
    import random

    import webdataset as wds

    from owl_lightning.data.shards import _ShuffleState

    samples = [{"__origin__": (i // 10, i % 10, 512 * i)} for i in range(60)]
    ours, theirs = _ShuffleState([], random.Random(7), read=None), []
    reference_rng = random.Random(7)
    for step, sample in enumerate(samples):
        ours.take(sample)
        theirs.append(sample)
        if step % 3:  # the buffer grows and shrinks
            assert ours.pick() is wds.filters.pick(theirs, reference_rng)
        assert ours.buffer == theirs
        assert ours.cursor()["buffer"].tolist() == [list(s["__origin__"]) for s in theirs]
