"""Stage-1 shard pipeline: tiny img2dataset-layout shards written by the tests themselves."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from owl_lightning.data import shards
from owl_lightning.data.health import (
    BAD_TEXT,
    CORRUPT_IMAGE,
    DECOMPRESSION_BOMB,
    MALFORMED_RECORD,
    MISSING_IMAGE,
    MISSING_TEXT,
    OVERSIZED_MEMBER,
    OVERSIZED_SHARD,
    TRUNCATED_TAR,
    UNEXPECTED,
    SkipLog,
)
from owl_lightning.data.manifest import ShardSource
from owl_lightning.data.shards import build_shard_pipeline, expand_shards

PAD = 0
SIDE = 16  # every image arrives as [3, SIDE, SIDE]


def resize_to_tensor(image: PIL.Image.Image) -> torch.Tensor:
    """Trivial image_transform: no forced RGB, so a wrong mode would show as a wrong channel count."""
    array = np.asarray(image.resize((SIDE, SIDE)), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)


def caption_bytes(caption: str) -> tuple[list[int], list[int]]:
    """Trivial encode_caption: UTF-8 bytes as ids, all supervised."""
    ids = list(caption.encode("utf-8"))
    return ids, list(ids)


def encoded(image: PIL.Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def rgb_png(seed: int, size: int = 8) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return encoded(PIL.Image.fromarray(pixels, "RGB"))


def img2dataset_sample(key: int, caption: str | bytes | None, image: bytes | None, ext: str = "png") -> dict:
    """One sample as img2dataset writes it: ``%09d`` key, image, ``.txt`` caption, ``.json`` metadata."""
    metadata = {"key": f"{key:09d}", "caption": caption if isinstance(caption, str) else None, "status": "success"}
    sample = {"__key__": f"{key:09d}", "json": json.dumps(metadata)}
    if image is not None:
        sample[ext] = image
    if caption is not None:
        sample["txt"] = caption
    return sample


def write_shard(path: Path, samples: list[dict]) -> Path:
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)
    return path


def write_good_shards(folder: Path, prefix: str, shards: int, per_shard: int) -> str:
    """``shards`` shards of good samples captioned ``"{prefix} {shard} {i}"``; returns the brace spec."""
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        keys = range(shard * per_shard, (shard + 1) * per_shard)
        samples = [img2dataset_sample(key, f"{prefix} {shard} {key % per_shard}", rgb_png(key)) for key in keys]
        write_shard(folder / f"{prefix}-{shard:06d}.tar", samples)
    return str(folder / f"{prefix}-{{000000..{shards - 1:06d}}}.tar")


def build(sources: list[ShardSource], **kw):
    kw.setdefault("batch_size", 4)
    return build_shard_pipeline(sources, image_transform=resize_to_tensor, encode_caption=caption_bytes, pad_token_id=PAD, **kw)


def captions_of(batch: dict) -> list[str]:
    return [bytes(row[row != PAD].tolist()).decode("utf-8") for row in batch["input_ids"]]


def test_expand_shards_expands_braces_and_keeps_urls():
    assert expand_shards("/d/train-{000000..000002}.tar") == [f"/d/train-00000{i}.tar" for i in range(3)]
    assert expand_shards("pipe:curl -s https://h/a-{0..1}.tar") == ["pipe:curl -s https://h/a-0.tar", "pipe:curl -s https://h/a-1.tar"]
    with pytest.raises(ValueError, match="empty shard spec"):
        expand_shards(" ")


def test_every_bad_sample_kind_is_skipped_and_counted(tmp_path, monkeypatch):
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)  # 8×8 images pass, the 64×64 one is a "bomb"
    rgb = PIL.Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8))
    grey16 = PIL.Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    converted = {  # modes decode_image converts to RGB: they must arrive, as 3-channel tensors
        "L": encoded(rgb.convert("L")),
        "RGBA": encoded(rgb.convert("RGBA")),
        "P": encoded(rgb.convert("P")),
        "CMYK": encoded(rgb.convert("CMYK"), "JPEG"),
        "I;16": encoded(grey16),
    }
    bad = {  # key → the reason it must be skipped for
        10: (CORRUPT_IMAGE, img2dataset_sample(10, "corrupt bytes", b"\x89PNG not really an image")),
        11: (CORRUPT_IMAGE, img2dataset_sample(11, "truncated jpeg", encoded(rgb, "JPEG")[:60], ext="jpg")),
        12: (MISSING_TEXT, img2dataset_sample(12, "", rgb_png(12))),
        13: (MISSING_TEXT, img2dataset_sample(13, None, rgb_png(13))),
        14: (BAD_TEXT, img2dataset_sample(14, b"caf\xe9 latin-1", rgb_png(14))),
        15: (MISSING_IMAGE, img2dataset_sample(15, "no image member", None)),
        16: (DECOMPRESSION_BOMB, img2dataset_sample(16, "too many pixels", rgb_png(16, size=64))),
    }
    good = [img2dataset_sample(i, f"mode {mode}", data) for i, (mode, data) in enumerate(converted.items())]
    mixed = write_shard(tmp_path / "mixed-000000.tar", good + [sample for _, sample in bad.values()])
    whole = write_shard(tmp_path / "cut-000001.tar", [img2dataset_sample(key, f"cut {key}", rgb_png(key)) for key in range(100, 108)])
    data = whole.read_bytes()
    whole.write_bytes(data[: len(data) // 2])

    skips = SkipLog()
    pipeline = build([ShardSource("bad", str(tmp_path / "{mixed-000000,cut-000001}.tar"))], train=False, skips=skips)
    batches = list(DataLoader(pipeline, batch_size=None, num_workers=0))

    captions = [c for batch in batches for c in captions_of(batch)]
    assert sorted(c for c in captions if c.startswith("mode")) == sorted(f"mode {mode}" for mode in converted)
    assert 0 < sum(c.startswith("cut") for c in captions) < 8  # samples before the cut arrive
    for batch in batches:
        assert batch["images"].shape[1:] == (3, SIDE, SIDE)
    skipped = [tuple(s) for batch in batches for s in batch["skipped"]]  # the DataLoader turns tuples into lists
    mixed_skips = {where: reason for reason, where in skipped if where.startswith(str(mixed))}
    assert mixed_skips == {f"{mixed}:{key:09d}": reason for key, (reason, _) in bad.items()}
    assert (TRUNCATED_TAR, str(whole)) in skipped
    assert all(where.startswith(str(whole)) for reason, where in skipped if where not in mixed_skips)


def test_json_caption_key_and_its_bad_records(tmp_path):
    samples = [
        img2dataset_sample(0, "from json", rgb_png(0)) | {"txt": "from txt"},
        img2dataset_sample(1, "x", rgb_png(1)) | {"json": b"{not json"},
        img2dataset_sample(2, "x", rgb_png(2)) | {"json": json.dumps({"caption": 42})},
        img2dataset_sample(3, "x", rgb_png(3)) | {"json": json.dumps({"url": "no caption field"})},
    ]
    write_shard(tmp_path / "j.tar", samples)
    pipeline = build([ShardSource("j", str(tmp_path / "j.tar"), caption_key="json:caption")], train=False)
    (batch,) = list(pipeline)
    assert captions_of(batch) == ["from json"]
    assert sorted(reason for reason, _ in batch["skipped"]) == sorted([MALFORMED_RECORD, BAD_TEXT, MISSING_TEXT])


# With fewer shards than ranks, every rank reads them all and keeps its share of the samples.
@pytest.mark.parametrize(("shards", "world_size"), [(4, 1), (4, 2), (1, 2), (3, 4)])
def test_validation_reads_every_good_sample_exactly_once(tmp_path, monkeypatch, shards, world_size):
    spec = write_good_shards(tmp_path, "val", shards=shards, per_shard=5)
    expected = sorted(f"val {shard} {i}" for shard in range(shards) for i in range(5))
    seen = []
    for rank in range(world_size):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world_size))
        pipeline = build([ShardSource("val", spec)], train=False, batch_size=3)
        seen += [c for batch in DataLoader(pipeline, batch_size=None, num_workers=2) for c in captions_of(batch)]
    assert sorted(seen) == expected


def test_sources_mix_by_weight(tmp_path):
    sources = [
        ShardSource("a", write_good_shards(tmp_path / "a", "a", shards=2, per_shard=10), weight=1.0),
        ShardSource("b", write_good_shards(tmp_path / "b", "b", shards=2, per_shard=10), weight=3.0),
    ]
    pipeline = build(sources, batch_size=40, batches_per_epoch=25, shuffle_buffer=20)
    shares = Counter(name for batch in pipeline for name in batch["source"])
    assert sum(shares.values()) == 1000
    assert shares["b"] / 1000 == pytest.approx(0.75, abs=0.04)


def test_every_rank_and_worker_yields_its_share_of_batches(tmp_path, monkeypatch):
    # 3 shards for 2 ranks × 2 workers: resampling needs no shard per reader.
    spec = write_good_shards(tmp_path, "t", shards=3, per_shard=6)
    streams = {}
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        pipeline = build([ShardSource("t", spec)], batch_size=2, batches_per_epoch=5, shuffle_buffer=4)
        streams[rank] = [captions_of(batch) for batch in DataLoader(pipeline, batch_size=None, num_workers=2)]
    assert [len(batches) for batches in streams.values()] == [5, 5]  # 5 = 3 + 2 over the workers
    assert streams[0] != streams[1]


def test_spawned_workers_read_the_same_stream_as_forked_ones(tmp_path):
    # Spawn and forkserver (Python 3.14's default) pickle the pipeline into each worker.
    spec = write_good_shards(tmp_path, "s", shards=2, per_shard=4)
    pipeline = build([ShardSource("s", spec)], batches_per_epoch=3, shuffle_buffer=4)
    streams = [
        [captions_of(batch) for batch in DataLoader(pipeline, batch_size=None, num_workers=1, multiprocessing_context=context)]
        for context in ("fork", "spawn")
    ]
    assert len(streams[0]) == 3
    assert streams[0] == streams[1]


def test_stream_is_reproducible_and_changes_with_the_epoch(tmp_path):
    spec = write_good_shards(tmp_path, "e", shards=3, per_shard=6)

    def first_epochs(epochs: list[int]) -> list[list[str]]:
        pipeline = build([ShardSource("e", spec)], batches_per_epoch=3, shuffle_buffer=8, seed=7)
        out = []
        for epoch in epochs:
            pipeline.set_epoch(epoch)
            out.append([c for batch in pipeline for c in captions_of(batch)])
        return out

    epoch0, epoch1 = first_epochs([0, 1])
    assert first_epochs([0]) == [epoch0]
    assert epoch0 != epoch1


def test_a_source_with_no_usable_sample_stops_with_a_clear_error(tmp_path):
    spec = write_good_shards(tmp_path, "w", shards=1, per_shard=5)
    pipeline = build([ShardSource("w", spec, image_key="jpg")])
    with pytest.raises(RuntimeError, match=r"missing_image=.*image_key='jpg'"):
        next(iter(pipeline))


def test_missing_shard_files(tmp_path, caplog):
    spec = write_good_shards(tmp_path, "m", shards=2, per_shard=3)
    with pytest.raises(FileNotFoundError, match="none of the 2 shard"):
        build([ShardSource("m", str(tmp_path / "typo-{000000..000001}.tar"))])
    gappy = spec.replace("000001}", "000002}")  # img2dataset leaves gaps where a shard failed
    pipeline = build([ShardSource("m", gappy)], train=False)
    assert "1 of 3 shards missing" in caplog.text
    assert sum(len(batch["source"]) for batch in pipeline) == 6


def test_deeply_nested_json_caption_is_a_skipped_sample(tmp_path):
    """100,000 ``[`` overflow the JSON parser's recursion limit (RecursionError): one skipped sample."""
    samples = [
        img2dataset_sample(0, "fine", rgb_png(0)),
        img2dataset_sample(1, "x", rgb_png(1)) | {"json": "[" * 100_000},
        img2dataset_sample(2, "x", rgb_png(2)) | {"json": '{"caption": ' + "[" * 100_000},
        img2dataset_sample(3, "also fine", rgb_png(3)),
    ]
    shard = write_shard(tmp_path / "deep.tar", samples)
    (batch,) = list(build([ShardSource("deep", str(shard), caption_key="json:caption")], train=False))
    assert captions_of(batch) == ["fine", "also fine"]
    assert batch["skipped"] == [(MALFORMED_RECORD, f"{shard}:000000001"), (MALFORMED_RECORD, f"{shard}:000000002")]


def test_an_unforeseen_failure_is_skipped_as_unexpected(tmp_path, caplog):
    """Whatever a stage raises for one sample — here a bug planted in the caption encoder — costs that sample."""

    def encode_with_a_bug(caption: str) -> tuple[list[int], list[int]]:
        if caption == "bug":
            raise IndexError("planted")
        return caption_bytes(caption)

    shard = write_shard(tmp_path / "u.tar", [img2dataset_sample(key, "bug" if key == 1 else f"ok {key}", rgb_png(key)) for key in range(3)])
    pipeline = build_shard_pipeline(
        [ShardSource("u", str(shard))],
        image_transform=resize_to_tensor,
        encode_caption=encode_with_a_bug,
        pad_token_id=PAD,
        batch_size=4,
        train=False,
    )
    (batch,) = list(pipeline)
    assert captions_of(batch) == ["ok 0", "ok 2"]
    assert batch["skipped"] == [(UNEXPECTED, f"{shard}:000000001")]
    assert "IndexError: planted" in caplog.text


@pytest.mark.parametrize("compression", ["tar", "tar.gz", "tar.bz2", "tar.xz"])
def test_compressed_shards_are_read(tmp_path, compression):
    plain = write_good_shards(tmp_path, "c", shards=1, per_shard=5).replace("{000000..000000}", "000000")
    compress = {"tar": lambda data: data, "tar.gz": gzip.compress, "tar.bz2": bz2.compress, "tar.xz": lzma.compress}[compression]
    shard = tmp_path / f"packed.{compression}"
    shard.write_bytes(compress(Path(plain).read_bytes()))
    (batch,) = list(build([ShardSource("c", str(shard))], train=False, batch_size=8))
    assert captions_of(batch) == [f"c 0 {i}" for i in range(5)] and batch["skipped"] == []


def test_a_member_over_the_size_limit_skips_its_sample_and_reading_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "MAX_MEMBER_BYTES", 4_000)
    samples = [img2dataset_sample(key, f"small {key}", rgb_png(key)) for key in range(4)]
    samples[1]["png"] = rgb_png(1, size=64)  # 12 kB of noise
    samples[2]["txt"] = "a caption of many words " * 500
    shard = write_shard(tmp_path / "big.tar", samples)
    (batch,) = list(build([ShardSource("big", str(shard))], train=False))
    assert captions_of(batch) == ["small 0", "small 3"]
    assert batch["skipped"] == [(OVERSIZED_MEMBER, f"{shard}:000000001"), (OVERSIZED_MEMBER, f"{shard}:000000002")]


@pytest.mark.parametrize("bomb", ["member", "header"])
def test_a_compressed_shard_expanding_past_the_limit_stops_naming_the_shard(tmp_path, monkeypatch, caplog, bomb):
    """Gzip bombs: 64 MB of zeros in one member, or a 4 MB member name in a PAX header, compress to ~100 kB.
    Reading stops at MAX_SHARD_BYTES of expanded tar (the member: before any of it is read); the samples
    before it are kept."""
    monkeypatch.setattr(shards, "MAX_SHARD_BYTES", 1 << 20)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        members = [
            (f"{key:09d}.{extension}", data)
            for key in range(2)
            for extension, data in (("png", rgb_png(key)), ("txt", f"before {key}".encode()))
        ]
        members.append(("000000002.png", bytes(64 << 20)) if bomb == "member" else ("0" * (4 << 20) + ".txt", b"x"))
        for name, data in members:
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    shard = tmp_path / "bomb.tar.gz"
    shard.write_bytes(gzip.compress(buffer.getvalue()))
    assert shard.stat().st_size < 1 << 20
    (batch,) = list(build([ShardSource("bomb", str(shard))], train=False))
    assert captions_of(batch) == ["before 0", "before 1"]
    assert batch["skipped"] == [(OVERSIZED_SHARD, str(shard))]
    assert "MAX_SHARD_BYTES" in caplog.text


def test_a_duplicate_member_skips_its_sample_not_the_shard(tmp_path):
    """Two ``000000001.png`` members: that sample is malformed; the samples after it still arrive."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for key, extension, data in [
            (0, "png", rgb_png(0)),
            (0, "txt", b"zero"),
            (1, "png", rgb_png(1)),
            (1, "png", rgb_png(9)),
            (1, "txt", b"one"),
            (2, "png", rgb_png(2)),
            (2, "txt", b"two"),
        ]:
            member = tarfile.TarInfo(f"{key:09d}.{extension}")
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    shard = tmp_path / "dup.tar"
    shard.write_bytes(buffer.getvalue())
    (batch,) = list(build([ShardSource("dup", str(shard))], train=False))
    assert captions_of(batch) == ["zero", "two"]
    assert batch["skipped"] == [(MALFORMED_RECORD, f"{shard}:000000001")]
