"""Instruction mixture: per-batch source quotas, determinism, bad-sample replacement, rank/worker split."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from owl_lightning.config import IMAGE_TOKEN
from owl_lightning.data.health import CORRUPT_IMAGE, MALFORMED_RECORD, MISSING_IMAGE, PATH_OUTSIDE_ROOT, TOO_LONG, UNEXPECTED
from owl_lightning.data.manifest import InstructionSource
from owl_lightning.data.mixture import InstructionMixture, batch_quotas
from owl_lightning.data.template import Conversation, ConversationTemplate, Turn
from owl_lightning.models.llm import byte_tokenizer

IMAGE_SIZE = 8


def to_tensor(image: Image.Image) -> torch.Tensor:
    """``[3, 8, 8]`` float in [0, 1]."""
    array = np.asarray(image.resize((IMAGE_SIZE, IMAGE_SIZE)), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)


@pytest.fixture(scope="module")
def tok():
    tokenizer = byte_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    return tokenizer


@pytest.fixture
def image_root(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for i in range(6):
        Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(root / f"good{i}.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    Image.new("RGB", (16, 16)).save(tmp_path / "outside.png")  # exists, but outside the root
    return root


def text_source(n: int = 20, weight: float = 1.0) -> tuple[InstructionSource, list[Conversation]]:
    source = InstructionSource(name="text", format="alpaca", path="text.json", weight=weight)
    conversations = [
        Conversation([Turn("user", f"Question {i}?"), Turn("assistant", f"Text answer {i}.")], source="text", origin=f"text.json#{i}")
        for i in range(n)
    ]
    return source, conversations


def vision_source(image_root, image_names: list[str], weight: float = 3.0) -> tuple[InstructionSource, list[Conversation]]:
    source = InstructionSource(name="vision", format="llava", path="vision.json", weight=weight, image_root=str(image_root))
    conversations = [
        Conversation(
            [Turn("user", "<image>\nWhat colour?"), Turn("assistant", f"Vision answer {i}.")],
            images=[name],
            source="vision",
            origin=f"vision.json#{i}",
        )
        for i, name in enumerate(image_names)
    ]
    return source, conversations


def mixture(tok, sources, **kwargs) -> InstructionMixture:
    template = ConversationTemplate(tok, visual_tokens_per_image=4, max_length=kwargs.pop("max_length", 512))
    return InstructionMixture(sources, template, to_tensor, batch_size=kwargs.pop("batch_size", 8), pad_token_id=tok.pad_token_id, **kwargs)


def answers(tok, batch) -> list[str]:
    """The supervised text of each sample (identifies which conversation it is)."""
    return [tok.decode(ids[labels != -100], skip_special_tokens=True) for ids, labels in zip(batch["input_ids"], batch["labels"])]


def test_every_batch_holds_sources_in_weight_proportion(tok, image_root):
    good = [f"good{i % 6}.png" for i in range(30)]
    data = mixture(tok, [text_source(), vision_source(image_root, good)])
    batches = list(data)
    assert len(batches) == len(data) == data.batches_per_epoch
    for batch in batches:
        assert Counter(batch["source"]) == {"text": 2, "vision": 6}
        assert batch["images"].shape == (6, 3, IMAGE_SIZE, IMAGE_SIZE)
        assert batch["image_counts"].tolist() == [0, 0, 1, 1, 1, 1, 1, 1]
        assert batch["skipped"] == []


def test_default_epoch_sees_the_slowest_source_once(tok, image_root):
    # text: 20 samples at 2 per batch needs 10 batches; vision: 12 at 6 per batch needs 2.
    data = mixture(tok, [text_source(20), vision_source(image_root, [f"good{i % 6}.png" for i in range(12)])])
    assert len(data) == 10
    seen = Counter(a for batch in data for a in answers(tok, batch) if a.startswith("Text"))
    assert seen == {f"Text answer {i}.": 1 for i in range(20)}


def test_quotas_carry_remainders_fairly():
    assert batch_quotas([1, 3], 8, 4).tolist() == [[2, 6]] * 4
    assert batch_quotas([1, 1], 256, 1).tolist() == [[128, 128]]  # the paper: 128 text-only + 128 multimodal
    generator = random.Random(0)
    for _ in range(50):
        weights = [generator.uniform(0.05, 5.0) for _ in range(generator.randint(1, 5))]
        batch_size = generator.randint(1, 17)
        quotas = batch_quotas(weights, batch_size, 300)
        shares = np.array(weights) / sum(weights) * batch_size
        assert (quotas.sum(axis=1) == batch_size).all()
        assert ((quotas == np.floor(shares)) | (quotas == np.ceil(shares))).all()
        ideal = np.arange(1, 301)[:, None] * shares
        assert np.abs(quotas.cumsum(axis=0) - ideal).max() < 1.0


def test_same_seed_and_epoch_same_batches_new_epoch_new_order(tok, image_root):
    sources = [text_source(), vision_source(image_root, [f"good{i % 6}.png" for i in range(30)])]
    first, second = mixture(tok, sources, seed=3), mixture(tok, sources, seed=3)
    epoch0 = [answers(tok, b) for b in first]
    assert epoch0 == [answers(tok, b) for b in second]
    second.set_epoch(1)
    epoch1 = [answers(tok, b) for b in second]
    assert epoch1 != epoch0
    assert sorted(map(sorted, epoch1)) != sorted(map(sorted, epoch0))  # different samples together, not only reordered
    assert [answers(tok, b) for b in mixture(tok, sources, seed=4)] != epoch0


def test_bad_samples_are_skipped_counted_and_replaced(tok, image_root):
    names = ["good0.png", "good1.png", "missing.png", "corrupt.png", "../outside.png", "good2.png"]
    vision = vision_source(image_root, names)
    long_question = Conversation(
        [Turn("user", "<image>" + "why? " * 200), Turn("assistant", "Because.")],
        images=["good3.png"],
        source="vision",
        origin="vision.json#6",
    )
    vision[1].append(long_question)
    data = mixture(tok, [text_source(), vision], max_length=256)
    batches = list(data)
    skipped = [skip for batch in batches for skip in batch["skipped"]]
    assert {reason for reason, _ in skipped} == {MISSING_IMAGE, CORRUPT_IMAGE, PATH_OUTSIDE_ROOT, TOO_LONG}
    assert dict(skipped) == {
        MISSING_IMAGE: "vision.json#2",
        CORRUPT_IMAGE: "vision.json#3",
        PATH_OUTSIDE_ROOT: "vision.json#4",
        TOO_LONG: "vision.json#6",
    }
    for batch in batches:
        assert Counter(batch["source"]) == {"text": 2, "vision": 6}
        assert batch["images"].shape[0] == int(batch["image_counts"].sum()) == 6
        assert not any("Because" in a for a in answers(tok, batch))
    # The replacements are deterministic too.
    assert [answers(tok, b) for b in mixture(tok, [text_source(), vision], max_length=256)] == [answers(tok, b) for b in batches]


def test_a_source_that_is_all_bad_stops_with_its_name(tok, image_root):
    data = mixture(tok, [vision_source(image_root, ["missing.png"] * 3)])
    with pytest.raises(RuntimeError, match="'vision'.*image_root"):
        next(iter(data))


def test_images_without_image_root_refused(tok, image_root):
    source, conversations = vision_source(image_root, ["good0.png"])
    source.image_root = None
    with pytest.raises(ValueError, match="image_root"):
        mixture(tok, [(source, conversations)])


def test_ranks_get_equal_disjoint_shares(tok, image_root):
    sources = [text_source(), vision_source(image_root, [f"good{i % 6}.png" for i in range(30)])]
    single = {b["batch_index"]: answers(tok, b) for b in mixture(tok, sources, batches_per_epoch=7)}
    ranks = [mixture(tok, sources, batches_per_epoch=7, rank=rank, world_size=2) for rank in (0, 1)]
    assert [len(r) for r in ranks] == [3, 3]
    indices = [[b["batch_index"] for b in r] for r in ranks]
    assert indices == [[0, 2, 4], [1, 3, 5]]
    # A rank's batch b is the same batch b a single process makes.
    assert all(answers(tok, b) == single[b["batch_index"]] for r in ranks for b in r)


def test_dataloader_workers_cover_each_batch_once(tok, image_root):
    sources = [text_source(), vision_source(image_root, [f"good{i % 6}.png" for i in range(30)])]
    data = mixture(tok, sources, batches_per_epoch=9, rank=1, world_size=2)
    in_process = [answers(tok, b) for b in data]
    loader = DataLoader(data, batch_size=None, num_workers=2)
    assert len(loader) == len(data) == 4
    batches = list(loader)
    assert [b["batch_index"] for b in batches] == [1, 3, 5, 7]
    assert [answers(tok, b) for b in batches] == in_process


@pytest.mark.parametrize("name", ["good0.png\x00.txt", "good\ud800.png"])
def test_an_image_path_the_os_cannot_take_is_a_skipped_record(tok, image_root, name):
    """A NUL byte (``Path.resolve`` raises ValueError) or a lone surrogate (UnicodeEncodeError) in a path."""
    data = mixture(tok, [text_source(), vision_source(image_root, ["good0.png", name, "good1.png"])], batches_per_epoch=2)
    skipped = [tuple(skip) for batch in data for skip in batch["skipped"]]
    assert skipped and set(skipped) == {(MALFORMED_RECORD, "vision.json#1")}


def test_an_unforeseen_failure_is_skipped_as_unexpected_and_replaced(tok, image_root, caplog):
    """An exception nobody planned for (here from the image transform) costs one sample, not the run:
    counted under ``unexpected``, with its type in the warning."""

    def transform_with_a_bug(image: Image.Image) -> torch.Tensor:
        if image.getpixel((0, 0))[0] == 40:  # good1.png
            raise ZeroDivisionError("planted")
        return to_tensor(image)

    data = InstructionMixture(
        [text_source(), vision_source(image_root, ["good0.png", "good1.png", "good2.png"])],
        ConversationTemplate(tok, visual_tokens_per_image=4),
        transform_with_a_bug,
        batch_size=8,
        pad_token_id=tok.pad_token_id,
        batches_per_epoch=2,
    )
    batches = list(data)
    skipped = {tuple(skip) for batch in batches for skip in batch["skipped"]}
    assert skipped == {(UNEXPECTED, "vision.json#1")}
    assert all(Counter(batch["source"]) == {"text": 2, "vision": 6} for batch in batches)
    assert "ZeroDivisionError: planted" in caplog.text
