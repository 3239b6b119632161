"""A corpus of broken and hostile training data, written on demand by the tests.

Stage 1: WebDataset shards in img2dataset's layout where every shard mixes good samples with
one of each bad kind, plus a 0-byte shard, a truncated one and a gzip bomb. Stage 2: instruction
files in three formats with bad records of every kind, image paths that try to leave the image
root, and a 0-byte file. ``outside/secret.png`` is a valid image that no reader may ever open.

Some kinds are bad only under the limits a test sets (PIL's default pixel limit, for one, is too
big to write here): :data:`LIMITS` names them; the tests apply them with ``monkeypatch``.

Each writer returns the manifest path and ``expected``: the skip reason of every bad record,
keyed by where the pipeline reports it (``shard.tar:key`` or ``file#index`` / ``file:line``).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import webdataset as wds
import yaml
from PIL import Image

from owl_lightning.data.health import (
    BAD_TEXT,
    CORRUPT_IMAGE,
    DECOMPRESSION_BOMB,
    EMPTY_SOURCE,
    IMAGE_COUNT_MISMATCH,
    MALFORMED_RECORD,
    MISSING_IMAGE,
    MISSING_TEXT,
    OVERSIZED_MEMBER,
    OVERSIZED_SHARD,
    PATH_OUTSIDE_ROOT,
    TOO_LONG,
    TRUNCATED_TAR,
    UNSUPPORTED_IMAGE,
)

SIDE = 32
BOMB_SIDE = 128  # past the pixel limit of LIMITS
ENORMOUS = "word " * 200_000  # a megabyte of text in one answer
LONG_CAPTION = "word " * 20_000  # 100 kB: far past what max_length tokens hold, within the member limit
HUGE_MEMBER = 512 << 10  # bytes of one tar member, past the member limit of LIMITS
GZIP_BOMB = 64 << 20  # bytes of zeros in one member of a .tar.gz, past the shard limit of LIMITS
# (module, attribute, value) the tests set: the limits under which the corpus's bombs are bombs.
LIMITS = [
    ("owl_lightning.data.images", "MAX_IMAGE_PIXELS", SIDE * SIDE * 2),
    ("owl_lightning.data.shards", "MAX_MEMBER_BYTES", 256 << 10),
    ("owl_lightning.data.shards", "MAX_SHARD_BYTES", 8 << 20),
]
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n"
DEEP_JSON = "[" * 100_000  # past the JSON parser's recursion limit


def png(seed: int, side: int = SIDE, mode: str = "RGB") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


def write_outside(root: Path) -> Path:
    """The file every escaping path points at."""
    secret = root / "outside" / "secret.png"
    secret.parent.mkdir(parents=True)
    secret.write_bytes(png(999))
    return secret


# -- stage 1 ------------------------------------------------------------------------------------


def _bad_samples(shard: int) -> list[tuple[str | None, dict]]:
    """(reason, sample) for every bad kind of image–caption sample; ``None``: must arrive (converted)."""
    truncated = png(shard)[:50]
    return [
        (CORRUPT_IMAGE, {"png": b"\x89PNG\r\n\x1a\n not an image", "txt": b"corrupt"}),
        (CORRUPT_IMAGE, {"png": truncated, "txt": b"truncated"}),
        (CORRUPT_IMAGE, {"png": b"", "txt": b"zero-byte image"}),
        (MISSING_TEXT, {"png": png(1), "txt": b"   "}),
        (MISSING_TEXT, {"png": png(2)}),
        (MISSING_IMAGE, {"txt": b"no image"}),
        (BAD_TEXT, {"png": png(3), "txt": "caf\u00e9".encode("latin-1")}),
        (DECOMPRESSION_BOMB, {"png": png(4, side=BOMB_SIDE), "txt": b"bomb"}),
        (TOO_LONG, {"png": png(5), "txt": LONG_CAPTION.encode()}),
        (UNSUPPORTED_IMAGE, {"png": EPS, "txt": b"a PostScript drawing: Ghostscript must never run"}),
        (OVERSIZED_MEMBER, {"png": png(9) + bytes(HUGE_MEMBER), "txt": b"a huge member"}),
        (None, {"png": png(6, mode="P"), "txt": b"a palette image"}),
        (None, {"png": png(7, mode="RGBA"), "txt": b"an rgba image"}),
        (None, {"png": png(8, mode="L"), "txt": b"a grey image"}),
    ]


def write_hostile_shards(root: Path) -> tuple[Path, dict[str, str]]:
    """Train shards ``mixed-00000{0,1}`` (good and bad samples), ``empty-000000`` (0 bytes),
    ``cut-000000`` (truncated) and ``bomb-000000.tar.gz`` (a gzip bomb after one good sample); a
    JSON-caption source with wrong-typed, over-deep and unencodable fields; one val shard."""
    folder = root / "shards"
    folder.mkdir(parents=True)
    expected: dict[str, str] = {}
    for shard in range(2):
        path = folder / f"mixed-{shard:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for index, (reason, sample) in enumerate(_bad_samples(shard)):
                key = f"bad{index:06d}"
                sink.write({"__key__": key, **sample})
                if reason is not None:
                    expected[f"{path}:{key}"] = reason
            for index in range(6):
                sink.write({"__key__": f"good{index:05d}", "png": png(100 + index), "txt": f"good sample {index}".encode()})
    (folder / "empty-000000.tar").write_bytes(b"")
    expected[str(folder / "empty-000000.tar")] = TRUNCATED_TAR
    with wds.TarWriter(str(folder / "cut-000000.tar")) as sink:
        for index in range(8):
            sink.write({"__key__": f"cut{index:06d}", "png": png(200 + index), "txt": b"before the cut"})
    data = (folder / "cut-000000.tar").read_bytes()
    (folder / "cut-000000.tar").write_bytes(data[: len(data) // 2])
    expected[str(folder / "cut-000000.tar")] = TRUNCATED_TAR
    bomb = folder / "bomb-000000.tar.gz"
    bomb.write_bytes(_gzip_bomb())
    expected[str(bomb)] = OVERSIZED_SHARD

    json_path = folder / "json-000000.tar"
    with wds.TarWriter(str(json_path)) as sink:
        for index in range(4):
            sink.write({"__key__": f"ok{index:07d}", "png": png(300 + index), "json": json.dumps({"caption": f"json caption {index}"})})
        for key, record, reason in [
            ("wrongtype", {"caption": 42}, BAD_TEXT),
            ("notjson00", b"{broken", MALFORMED_RECORD),
            ("nofield00", {"url": "x"}, MISSING_TEXT),
            ("deepjson0", DEEP_JSON.encode(), MALFORMED_RECORD),
            ("surrogat0", {"caption": "caf\ud800"}, BAD_TEXT),  # the tokenizer cannot take a lone surrogate
        ]:
            sink.write({"__key__": key, "png": png(400), "json": record if isinstance(record, bytes) else json.dumps(record)})
            expected[f"{json_path}:{key}"] = reason
    with wds.TarWriter(str(folder / "val-000000.tar")) as sink:
        for index in range(4):
            sink.write({"__key__": f"val{index:06d}", "png": png(500 + index), "txt": f"val sample {index}".encode()})

    manifest = root / "hostile_stage1.yaml"
    manifest.write_text(
        yaml.safe_dump(
            {
                "train": [
                    {
                        "name": "mixed",
                        "shards": "shards/{mixed-000000.tar,mixed-000001.tar,empty-000000.tar,cut-000000.tar,bomb-000000.tar.gz}",
                        "image_key": "png",
                        "num_samples": 60,  # 15 batches of 4 an epoch: the 12 steps a test runs stay in epoch 0
                        "weight": 3,
                    },
                    {"name": "json", "shards": "shards/json-000000.tar", "image_key": "png", "caption_key": "json:caption", "weight": 1},
                ],
                "val": [{"name": "val", "shards": "shards/val-000000.tar", "image_key": "png"}],
            }
        )
    )
    return manifest, expected


def _gzip_bomb() -> bytes:
    """A .tar.gz of ~64 kB: one good sample, then a member of GZIP_BOMB zero bytes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in [("good00000.png", png(700)), ("good00000.txt", b"before the bomb"), ("bomb00000.png", bytes(GZIP_BOMB))]:
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return gzip.compress(buffer.getvalue())


# -- stage 2 ------------------------------------------------------------------------------------


def _turns(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def write_hostile_instructions(root: Path) -> tuple[Path, dict[str, str]]:
    """``llava.json`` (good records, bad images and paths that leave the root, bad fields),
    ``owl.jsonl`` (bad lines), ``alpaca.json`` (wrong types) and ``empty.jsonl`` (0 bytes)."""
    secret = root / "outside" / "secret.png"
    folder = root / "instructions"
    images = folder / "images"
    images.mkdir(parents=True)
    for index in range(4):
        (images / f"good{index}.png").write_bytes(png(600 + index))
    (images / "zero.png").write_bytes(b"")
    (images / "corrupt.png").write_bytes(b"GIF89a garbage")
    os.symlink(secret, images / "escape.png")  # a symlink inside the root that leaves it

    good = [{"image": f"good{i}.png", "conversations": _turns("<image>\nWhat is it?", f"picture {i}")} for i in range(4)]
    bad = [
        ({"image": "../../outside/secret.png", "conversations": _turns("<image>\nx", "y")}, PATH_OUTSIDE_ROOT),
        ({"image": str(secret), "conversations": _turns("<image>\nx", "y")}, PATH_OUTSIDE_ROOT),
        ({"image": "escape.png", "conversations": _turns("<image>\nx", "y")}, PATH_OUTSIDE_ROOT),
        ({"image": "missing.png", "conversations": _turns("<image>\nx", "y")}, MISSING_IMAGE),
        ({"image": "zero.png", "conversations": _turns("<image>\nx", "y")}, CORRUPT_IMAGE),
        ({"image": "corrupt.png", "conversations": _turns("<image>\nx", "y")}, CORRUPT_IMAGE),
        ({"image": "good0.png", "conversations": _turns("<image>\n<image>\ntwo placeholders, one image", "y")}, IMAGE_COUNT_MISMATCH),
        ({"image": "good0.png", "conversations": _turns("<image>\nx", ENORMOUS)}, TOO_LONG),
        ({"conversations": [{"from": "system", "value": "x" * 5_000_000}] + _turns("x", "y")}, TOO_LONG),
        ({"image": "good0.png", "conversations": [{"from": "system", "value": "<image>"}] + _turns("x", "y")}, MALFORMED_RECORD),
        ({"conversations": [{"from": "system", "value": "Look: <image>"}] + _turns("x", "y")}, IMAGE_COUNT_MISMATCH),
        ({"conversations": _turns("caf\ud800?", "y")}, BAD_TEXT),  # a lone surrogate: the tokenizer raises TypeError
        ({"image": "good0.png\x00.png", "conversations": _turns("<image>\nx", "y")}, MALFORMED_RECORD),  # Path.resolve: ValueError
        ({"image": "good0.png", "conversations": "not a list"}, MALFORMED_RECORD),
        ({"image": "good0.png", "conversations": [{"from": "human", "value": 7}]}, MALFORMED_RECORD),
        ({"image": 12, "conversations": _turns("<image>\nx", "y")}, MALFORMED_RECORD),
        ("a string, not a record", MALFORMED_RECORD),
    ]
    records = good + [record for record, _ in bad]
    llava = folder / "llava.json"
    llava.write_text(json.dumps(records))
    expected = {f"{llava}#{len(good) + index}": reason for index, (_, reason) in enumerate(bad)}

    owl = folder / "owl.jsonl"
    lines = [json.dumps({"text": f"\nHuman: say {i}\nAI: {i}"}).encode() for i in range(3)]
    lines += [b"{not json", b'{"text": "\\nHuman: caf\xe9\\nAI: ok"}', json.dumps({"text": 5}).encode()]
    lines += [DEEP_JSON.encode(), json.dumps({"text": "\nHuman: \ud800\nAI: ok"}).encode()]
    owl.write_bytes(b"\n".join(lines) + b"\n")
    expected |= {f"{owl}:4": MALFORMED_RECORD, f"{owl}:5": BAD_TEXT, f"{owl}:6": MALFORMED_RECORD, f"{owl}:7": MALFORMED_RECORD}
    expected[f"{owl}:8"] = BAD_TEXT

    alpaca = folder / "alpaca.json"
    alpaca.write_text(
        json.dumps(
            [{"instruction": "Say hi.", "output": "hi"}, {"instruction": "Say 5.", "output": 5}, {"instruction": ["list"], "output": "x"}]
        )
    )
    expected |= {f"{alpaca}#1": MALFORMED_RECORD, f"{alpaca}#2": MALFORMED_RECORD}

    empty = folder / "empty.jsonl"
    empty.write_bytes(b"")
    expected[str(empty)] = EMPTY_SOURCE

    manifest = root / "hostile_stage2.yaml"
    manifest.write_text(
        yaml.safe_dump(
            {
                "train": [
                    {
                        "name": "llava",
                        "format": "llava",
                        "path": "instructions/llava.json",
                        "image_root": "instructions/images",
                        "weight": 2,
                    },
                    {"name": "owl", "format": "owl_jsonl", "path": "instructions/owl.jsonl", "weight": 1},
                    {"name": "alpaca", "format": "alpaca", "path": "instructions/alpaca.json", "weight": 1},
                    {"name": "empty", "format": "owl_jsonl", "path": "instructions/empty.jsonl", "weight": 1},
                ],
            }
        )
    )
    return manifest, expected
