"""Interleaved documents: in stage 1, MMC4 and OBELICS records in WebDataset shards, written by the tests in
the datasets' own schemas, read in document order, supervised on text only, with every image slot left out
counted by reason, mixed with caption shards, trained, and resumed exactly; in stage 2, the same records
read from JSONL files with their images under the image root; and the generated document set."""

from __future__ import annotations

import base64
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from owl_lightning.apps.interleaved import build_interleaved
from owl_lightning.cli import main
from owl_lightning.config import IGNORE_INDEX, IMAGE_TOKEN
from owl_lightning.data.health import (
    AFTER_LAST_TEXT,
    CORRUPT_IMAGE,
    MALFORMED_RECORD,
    MISSING_IMAGE,
    MISSING_TEXT,
    OVER_MAX_IMAGES,
    PAST_MAX_LENGTH,
    PATH_OUTSIDE_ROOT,
    DataHealth,
    SkipLog,
    SkipSample,
)
from owl_lightning.data.instruct import read_conversations
from owl_lightning.data.manifest import InstructionSource, ShardSource, load_manifest
from owl_lightning.data.mixture import InstructionMixture
from owl_lightning.data.shards import build_shard_pipeline
from owl_lightning.data.template import ConversationTemplate
from owl_lightning.train.datamodules import CaptionDataModule, ResumableLoader
from tests.helpers import COLOURS, fit, png_bytes, tiny_system
from tests.test_shards import caption_bytes, resize_to_tensor, write_good_shards, write_shard
from tests.test_stream_resume import ONE_PROCESS, saved

VISUAL = 4  # visual tokens per image in these templates


@pytest.fixture
def template(tiny_tokenizer) -> ConversationTemplate:
    return ConversationTemplate(tiny_tokenizer, max_length=256, visual_tokens_per_image=VISUAL)


def mmc4_record(sentences: list[str], matches: list[int], embedded: dict[int, bytes] | None = None) -> dict:
    """An MMC4 document as allenai/mmc4 releases it (plus OpenFlamingo's ``image_base64`` where ``embedded``)."""
    image_info = []
    for index, sentence in enumerate(matches):
        info = {
            "image_name": f"{index:04x}.jpg",
            "raw_url": f"https://example.com/{index}.jpg",
            "matched_text_index": sentence,
            "matched_sim": 0.31,
        }
        if embedded and index in embedded:
            info["image_base64"] = base64.b64encode(embedded[index]).decode("ascii")
        image_info.append(info)
    return {"url": "https://example.com/page", "text_list": sentences, "image_info": image_info, "similarity_matrix": []}


def obelics_record(layout: list[str | None]) -> dict:
    """An OBELICS document: parallel ``texts``/``images`` lists, ``null`` in the other list at each position
    (``None`` in ``layout`` is an image)."""
    return {
        "texts": list(layout),
        "images": [f"https://example.com/{i}.jpg" if piece is None else None for i, piece in enumerate(layout)],
        "metadata": json.dumps([None] * len(layout)),
        "general_metadata": json.dumps({"url": "https://example.com/page"}),
    }


def document_sample(key: int, record: dict | str | bytes, images: dict[str, bytes] | None = None) -> dict:
    """One document sample: ``KEY.json`` and its images as ``KEY.{k}.{ext}`` (``images``: ``"k.ext"`` → bytes)."""
    document = record if isinstance(record, (str, bytes)) else json.dumps(record)
    return {"__key__": f"{key:09d}", "json": document, **(images or {})}


def colour_of(image: torch.Tensor) -> str:
    """The colour whose reference RGB is nearest the image's mean pixel (``[3, H, W]`` in 0..1)."""
    mean = image.float().mean(dim=(1, 2)) * 255
    return min(COLOURS, key=lambda name: float(((mean - torch.tensor(COLOURS[name], dtype=torch.float)) ** 2).sum()))


def read_all(source: ShardSource, template: ConversationTemplate, skips: SkipLog | None = None, batch_size: int = 8) -> list[dict]:
    pipeline = build_shard_pipeline(
        [source],
        image_transform=resize_to_tensor,
        encode_caption=caption_bytes,
        encode_document=template.encode_document,
        pad_token_id=0,
        batch_size=batch_size,
        train=False,
        skips=skips,
    )
    return list(pipeline)


def test_mmc4_images_go_before_their_matched_sentence_from_members_or_base64(tmp_path, template):
    # image 0 (a member) is matched to sentence 1, image 1 (base64 in image_info) to sentence 0.
    record = mmc4_record(["A red page.", "It shows a blue square.", "Then it ends."], matches=[1, 0], embedded={1: png_bytes("red")})
    shard = write_shard(tmp_path / "mmc4-000000.tar", [document_sample(0, record, {"0.png": png_bytes("blue")})])
    (batch,) = read_all(ShardSource("mmc4", str(shard), format="mmc4"), template)

    expected_ids, expected_labels, _ = template.encode_document([None, "A red page.", None, "It shows a blue square. Then it ends."])
    assert batch["input_ids"][0].tolist() == expected_ids
    assert batch["labels"][0].tolist() == expected_labels
    assert batch["image_counts"].tolist() == [2]
    assert [colour_of(image) for image in batch["images"]] == ["red", "blue"]
    assert batch["dropped_images"] == [] and batch["skipped"] == []


def test_obelics_documents_interleave_in_order(tmp_path, template):
    record = obelics_record(["An introduction.", None, "About the green one.", None, "About the red one."])
    images = {"0.png": png_bytes("green"), "1.png": png_bytes("red")}
    shard = write_shard(tmp_path / "obelics-000000.tar", [document_sample(0, record, images)])
    (batch,) = read_all(ShardSource("obelics", str(shard), format="obelics"), template)

    expected_ids, _, _ = template.encode_document(["An introduction.", None, "About the green one.", None, "About the red one."])
    assert batch["input_ids"][0].tolist() == expected_ids
    assert [colour_of(image) for image in batch["images"]] == ["green", "red"]


def test_only_text_after_the_first_image_and_the_eos_are_supervised(template, tiny_tokenizer):
    input_ids, labels, kept = template.encode_document(["Before any image.", None, "Seen with one.", None, "Seen with two."])
    image = tiny_tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    first_image = input_ids.index(image)
    assert kept == 2
    assert all(label == IGNORE_INDEX for label in labels[: first_image + 1])  # BOS and the text no image precedes
    assert all(label == IGNORE_INDEX for token, label in zip(input_ids, labels) if token == image)
    supervised = [token for token, label in zip(input_ids, labels) if label != IGNORE_INDEX]
    assert supervised == [token for token in input_ids[first_image:] if token != image]
    assert supervised[-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.decode(supervised[:-1]) == "Seen with one.Seen with two."


def test_max_length_cuts_whole_images_and_never_ends_on_one(tiny_tokenizer):
    pieces = [None, "one two three four five six", None, "seven", None, "eight"]
    full_ids, _, _ = ConversationTemplate(tiny_tokenizer, max_length=512, visual_tokens_per_image=VISUAL).encode_document(pieces)
    image = tiny_tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    second_image = [at for at, token in enumerate(full_ids) if token == image][1]
    # Room for everything up to the second <image> and half its visual tokens: it cannot be cut in half.
    expanded_before = second_image + (VISUAL - 1)
    cut = ConversationTemplate(tiny_tokenizer, max_length=expanded_before + VISUAL // 2, visual_tokens_per_image=VISUAL)
    input_ids, labels, kept = cut.encode_document(pieces)
    assert kept == 1 and input_ids == full_ids[:second_image] and input_ids[-1] != image
    # Room for the second image but no text after it: the image goes too.
    just_the_image = ConversationTemplate(tiny_tokenizer, max_length=expanded_before + VISUAL, visual_tokens_per_image=VISUAL)
    assert just_the_image.encode_document(pieces)[2] == 1


def test_dropped_image_slots_are_counted_by_reason_and_the_text_stays(tmp_path, template):
    # Slots in document order: 0 good, 1 missing, 2 corrupt, 3 good, 4 good (over max_images=2), 5 after the last text.
    layout = ["Intro.", None, "a", None, "b", None, "c", None, "d", None, "e", None]
    images = {"0.png": png_bytes("red"), "2.png": b"\x89PNG not an image", "3.png": png_bytes("blue"), "4.png": png_bytes("green")}
    images["5.png"] = png_bytes("green")
    shard = write_shard(tmp_path / "obelics-000000.tar", [document_sample(0, obelics_record(layout), images)])
    (batch,) = read_all(ShardSource("obelics", str(shard), format="obelics", max_images=2), template)

    assert Counter(batch["dropped_images"]) == {MISSING_IMAGE: 1, CORRUPT_IMAGE: 1, OVER_MAX_IMAGES: 1, AFTER_LAST_TEXT: 1}
    assert [colour_of(image) for image in batch["images"]] == ["red", "blue"]
    expected_ids, _, _ = template.encode_document(["Intro.", None, "a\n\nb\n\nc", None, "d\n\ne"])
    assert batch["input_ids"][0].tolist() == expected_ids

    health = DataHealth()
    health.update(batch["source"], batch["skipped"], batch["dropped_images"])
    assert health.metrics()["data/dropped_images/over_max_images"] == 1.0
    assert health.skip_fraction() == 0.0  # dropped slots of a used document are not skipped samples
    restored = DataHealth()
    restored.load_state_dict(health.state_dict())  # a resumed run goes on counting from the checkpoint's totals
    assert restored.dropped_images_by_reason == health.dropped_images_by_reason


def test_images_past_max_length_are_dropped_and_counted(tmp_path, tiny_tokenizer):
    record = mmc4_record(["First sentence here.", "Second sentence here."], matches=[0, 1])
    images = {"0.png": png_bytes("red"), "1.png": png_bytes("blue")}
    shard = write_shard(tmp_path / "mmc4-000000.tar", [document_sample(0, record, images)])
    short = ConversationTemplate(tiny_tokenizer, max_length=VISUAL + 8, visual_tokens_per_image=VISUAL)
    (batch,) = read_all(ShardSource("mmc4", str(shard), format="mmc4"), short)
    assert batch["image_counts"].tolist() == [1]
    assert batch["dropped_images"] == [PAST_MAX_LENGTH]


def test_bad_documents_are_counted_skips(tmp_path, template):
    good = document_sample(0, mmc4_record(["A red square."], [0]), {"0.png": png_bytes("red")})
    bad = {  # key → the reason it must be skipped for
        1: (MALFORMED_RECORD, document_sample(1, '{"text_list": ["cut off')),
        2: (MALFORMED_RECORD, document_sample(2, obelics_record(["An OBELICS record in an MMC4 source.", None]))),
        3: (MISSING_IMAGE, document_sample(3, mmc4_record(["Its image is gone."], [0]))),
        4: (MISSING_IMAGE, document_sample(4, mmc4_record(["Its image is not a PNG."], [0]), {"0.png": b"not an image"})),
        5: (MISSING_TEXT, document_sample(5, mmc4_record(["", " "], [0]), {"0.png": png_bytes("red")})),
        6: (MISSING_TEXT, {"__key__": f"{6:09d}", "0.png": png_bytes("red")}),  # no .json member
        7: (MALFORMED_RECORD, document_sample(7, mmc4_record([f"Says {IMAGE_TOKEN} in its text."], [0]), {"0.png": png_bytes("red")})),
    }
    shard = write_shard(tmp_path / "mmc4-000000.tar", [good] + [sample for _, sample in bad.values()])
    skips = SkipLog()
    batches = read_all(ShardSource("mmc4", str(shard), format="mmc4"), template, skips=skips)

    assert sum(len(batch["source"]) for batch in batches) == 1
    skipped = {where.rsplit(":", 1)[1]: reason for batch in batches for reason, where in batch["skipped"]}
    assert skipped == {f"{key:09d}": reason for key, (reason, _) in bad.items()}


def test_manifest_format_chooses_the_reader_and_is_checked(tmp_path):
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        yaml.safe_dump({"train": [{"name": "d", "shards": "d.tar", "format": "mmc4", "max_images": 3}, {"name": "c", "shards": "c.tar"}]})
    )
    documents, captions = load_manifest(manifest).train
    assert (documents.format, documents.max_images, captions.format) == ("mmc4", 3, "captions")
    manifest.write_text(yaml.safe_dump({"train": [{"name": "d", "shards": "d.tar", "format": "laion"}]}))
    with pytest.raises(ValueError, match=r"format 'laion'; use one of \('captions', 'mmc4', 'obelics', 'video'\)"):
        load_manifest(manifest)
    manifest.write_text(yaml.safe_dump({"train": [{"name": "d", "shards": "d.tar", "format": "obelics", "max_images": 0}]}))
    with pytest.raises(ValueError, match="max_images of at least 1"):
        load_manifest(manifest)
    with pytest.raises(ValueError, match="pass encode_document"):
        build_shard_pipeline(
            [ShardSource("d", "d.tar", format="mmc4")],
            image_transform=resize_to_tensor,
            encode_caption=caption_bytes,
            pad_token_id=0,
            batch_size=1,
        )


def write_obelics_shards(folder: Path, shards: int, per_shard: int) -> str:
    """OBELICS shards of documents with 1 to 3 images, some missing; returns the brace spec."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    for shard in range(shards):
        samples = []
        for key in range(shard * per_shard, (shard + 1) * per_shard):
            count = 1 + key % 3
            layout: list[str | None] = [f"Document {key}."]
            for slot in range(count):
                layout += [None, f"Picture {slot} is {names[(key + slot) % 3]}."]
            images = {f"{slot}.png": png_bytes(names[(key + slot) % 3]) for slot in range(count) if (key + slot) % 5}
            samples.append(document_sample(key, obelics_record(layout), images))
        write_shard(folder / f"docs-{shard:06d}.tar", samples)
    return str(folder / f"docs-{{000000..{shards - 1:06d}}}.tar")


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_stream_over_documents_and_captions_goes_on_exactly(tmp_path, template, workers):
    sources = [
        ShardSource("docs", write_obelics_shards(tmp_path / "docs", shards=3, per_shard=5), format="obelics", max_images=2),
        ShardSource("captions", write_good_shards(tmp_path / "captions", "c", shards=2, per_shard=6), weight=0.5),
    ]

    def loader() -> ResumableLoader:
        pipeline = build_shard_pipeline(
            sources,
            image_transform=resize_to_tensor,
            encode_caption=caption_bytes,
            encode_document=template.encode_document,
            pad_token_id=0,
            batch_size=3,
            batches_per_epoch=16,
            shuffle_buffer=6,
        )
        return ResumableLoader(pipeline, workers, ONE_PROCESS)

    def take(resumable: ResumableLoader, batches: int | None = None) -> list[tuple]:
        taken = []
        for index, batch in enumerate(resumable):
            if batches is not None and index == batches:
                break
            resumable.took_batch(batch.pop("stream_cursor"))
            taken.append(
                (batch["input_ids"].tolist(), batch["image_counts"].tolist(), batch["images"].sum().item(), batch["dropped_images"])
            )
        return taken

    straight = take(loader())
    assert {count for _, counts, _, _ in straight for count in counts} >= {1, 2}  # several images per sample
    assert any(dropped for _, _, _, dropped in straight[6:])
    interrupted = loader()
    take(interrupted, 6)
    resumed = loader()
    resumed.load_state_dict(saved(interrupted.state_dict()))
    assert take(resumed) == straight[6:]


def test_a_mixed_manifest_trains_owl_tiny_stage1(tmp_path, caption_manifest):
    """Captions and OBELICS documents mixed by weight through CaptionDataModule: a few owl-tiny steps."""
    write_obelics_shards(tmp_path / "docs", shards=2, per_shard=6)
    manifest = yaml.safe_load(caption_manifest.read_text())
    manifest["train"].append(
        {"name": "docs", "shards": "docs/docs-{000000..000001}.tar", "format": "obelics", "weight": 1.0, "max_images": 2}
    )
    mixed = tmp_path / "mixed.yaml"
    mixed.write_text(yaml.safe_dump(manifest))

    system = tiny_system()
    data = CaptionDataModule(
        manifest=str(mixed), processor=system.processor, batch_size=4, num_workers=0, max_length=160, batches_per_epoch=3
    )
    counts = []  # image_counts of each batch the model is handed
    transfer = system.transfer_batch_to_device

    def recording(batch, device, dataloader_idx):
        counts.append(batch["image_counts"].tolist())
        return transfer(batch, device, dataloader_idx)

    system.transfer_batch_to_device = recording
    trainer = fit(system, data, tmp_path, steps=3)
    assert trainer.global_step == 3
    assert len(counts) == 3 and max(max(row) for row in counts) == 2
    assert data.health.used_by_source.keys() == {"squares", "docs"}
    assert set(data.health.skipped_by_reason) <= {MISSING_IMAGE}  # documents whose only image is missing


def test_encode_document_refuses_what_it_cannot_learn_from(template):
    with pytest.raises(SkipSample, match="no text follows an image"):
        template.encode_document(["Only text before.", None])


def test_anyres_images_count_their_own_visual_tokens_in_the_cut(template):
    """With AnyRes, an image's visual tokens depend on its size: the cut counts each image's own."""
    pieces = [None, "A small image.", None, "A large image."]
    assert template.encode_document(pieces, image_tokens=[VISUAL, VISUAL])[2] == 2
    assert template.encode_document(pieces, image_tokens=[VISUAL, template.max_length])[2] == 1


# ----------------------------------------------------------------------------- stage 2: documents in JSONL files


def write_documents(path: Path, records: list[dict | str]) -> Path:
    path.write_text("".join((record if isinstance(record, str) else json.dumps(record)) + "\n" for record in records))
    return path


def test_stage2_trains_on_documents_read_from_jsonl_with_their_images_under_the_image_root(tmp_path, template):
    images = tmp_path / "images"
    images.mkdir()
    for colour in ("red", "blue", "green"):
        (images / f"{colour}.png").write_bytes(png_bytes(colour))
    (tmp_path / "secret.png").write_bytes(png_bytes("green"))
    first = {"texts": ["A page.", None, "It is red.", None, "It is blue."], "images": [None, "red.png", None, "blue.png", None]}
    second = {"texts": [None, "Outside the root.", None, "It is green."], "images": ["../secret.png", None, "green.png", None]}
    path = write_documents(tmp_path / "docs.jsonl", [first, "{not json", second])
    source = InstructionSource(name="docs", format="obelics", path=str(path), image_root=str(images), max_images=3)

    skips = SkipLog()
    documents = read_conversations(source, skips)
    assert [reason for reason, _ in skips.drain()] == [MALFORMED_RECORD]  # the broken line, by its line number
    assert [document.origin for document in documents] == [f"{path}:1", f"{path}:3"]
    mixture = InstructionMixture([(source, documents)], template, resize_to_tensor, batch_size=2, pad_token_id=0, batches_per_epoch=1)
    (batch,) = list(mixture)

    by_sample = dict(zip(batch["image_counts"].tolist(), range(2)))  # the first document keeps 2 images, the second 1
    expected_ids, expected_labels, _ = template.encode_document(["A page.", None, "It is red.", None, "It is blue."])
    row = by_sample[2]
    assert batch["input_ids"][row, : len(expected_ids)].tolist() == expected_ids
    assert batch["labels"][row, : len(expected_labels)].tolist() == expected_labels
    colours = [colour_of(image) for image in batch["images"]]
    assert sorted(colours) == ["blue", "green", "red"]  # three images: the one outside the root never read
    assert colours.index("red") + 1 == colours.index("blue")
    assert batch["dropped_images"] == [PATH_OUTSIDE_ROOT] and batch["skipped"] == []


def test_stage2_mmc4_documents_name_their_images_or_embed_them(tmp_path, template):
    (tmp_path / "0000.jpg").write_bytes(png_bytes("blue"))  # mmc4_record names image k f"{k:04x}.jpg"
    record = mmc4_record(["A red page.", "It shows a blue square."], matches=[1, 0], embedded={1: png_bytes("red")})
    record["image_info"][1].pop("image_name")
    path = write_documents(tmp_path / "mmc4.jsonl", [record])
    source = InstructionSource(name="mmc4", format="mmc4", path=str(path), image_root=str(tmp_path))
    documents = read_conversations(source, SkipLog())
    (batch,) = list(InstructionMixture([(source, documents)], template, resize_to_tensor, batch_size=1, pad_token_id=0))
    assert [colour_of(image) for image in batch["images"]] == ["red", "blue"]


def test_a_stage2_document_with_no_usable_image_is_a_counted_skip_and_replaced(tmp_path, template):
    (tmp_path / "red.png").write_bytes(png_bytes("red"))
    good = {"texts": [None, "It is red."], "images": ["red.png", None]}
    missing = {"texts": [None, "Nothing to see."], "images": ["missing.png", None]}
    path = write_documents(tmp_path / "docs.jsonl", [missing, good])
    source = InstructionSource(name="docs", format="obelics", path=str(path), image_root=str(tmp_path))
    mixture = InstructionMixture(
        [(source, read_conversations(source, SkipLog()))], template, resize_to_tensor, batch_size=4, pad_token_id=0
    )
    batches = list(mixture)
    assert all(colour_of(image) == "red" for batch in batches for image in batch["images"])
    skipped = [skip for batch in batches for skip in batch["skipped"]]
    assert skipped and all(reason == MISSING_IMAGE and where == f"{path}:1" for reason, where in skipped)


def test_a_stage2_document_source_needs_an_image_root(tmp_path, template):
    path = write_documents(tmp_path / "docs.jsonl", [{"texts": [None, "Red."], "images": ["red.png", None]}])
    source = InstructionSource(name="docs", format="obelics", path=str(path))
    with pytest.raises(ValueError, match="image_root"):
        InstructionMixture([(source, read_conversations(source, SkipLog()))], template, resize_to_tensor, batch_size=1, pad_token_id=0)


# ----------------------------------------------------------------------------- the generated document set


def write_embedded_shards(folder: Path, per_split: int) -> None:
    """Stand-ins for the embedded stage-1 shards: ``KEY.png`` + ``KEY.txt`` ("a red circle") per sample."""
    (folder / "stage1").mkdir(parents=True)
    colours = list(COLOURS)
    for split in ("train", "val"):
        samples = [
            {"__key__": f"{key:09d}", "png": png_bytes(colours[key % len(colours)]), "txt": f"a {colours[key % len(colours)]} circle"}
            for key in range(per_split)
        ]
        write_shard(folder / "stage1" / f"{split}-000000.tar", samples)


def test_the_generated_set_holds_each_image_once_with_its_caption_after_it(tmp_path, tiny_tokenizer):
    write_embedded_shards(tmp_path / "embedded", per_split=7)
    counts = build_interleaved(tmp_path / "out", tmp_path / "embedded")
    again = build_interleaved(tmp_path / "again", tmp_path / "embedded")
    assert counts == again == {"train_documents": 2, "stage1_train_shards": 1, "val_documents": 2, "stage1_val_shards": 1}
    lines = (tmp_path / "out" / "stage2" / "documents_train.jsonl").read_text().splitlines()
    assert lines == (tmp_path / "again" / "stage2" / "documents_train.jsonl").read_text().splitlines()
    named = []
    for line in lines:
        record = json.loads(line)
        for at, image in enumerate(record["images"]):
            if image is not None:
                colour = colour_of(resize_to_tensor(Image.open(tmp_path / "out" / "images" / image)))
                assert record["texts"][at + 1] == f"A {colour} circle."
                named.append(image)
    assert len(named) == len(set(named)) == 6  # 7 images make two documents of three
    source = ShardSource("docs", str(tmp_path / "out" / "stage1" / "train-000000.tar"), format="obelics", image_key="png", max_images=3)
    template = ConversationTemplate(tiny_tokenizer, max_length=2048, visual_tokens_per_image=VISUAL)
    batches = read_all(source, template)
    assert sum(int(batch["image_counts"].sum()) for batch in batches) == 6 and not any(batch["skipped"] for batch in batches)


@pytest.mark.slow
def test_stage1_then_stage2_train_owl_tiny_on_the_generated_document_set(tmp_path):
    """``data interleaved``, then both stages through the CLI on owl-tiny, with the shipped manifests' document sources."""
    write_embedded_shards(tmp_path / "embedded", per_split=12)
    main(["data", "interleaved", "--out", str(tmp_path / "data"), "--embedded", str(tmp_path / "embedded")])
    root = Path(__file__).parents[1]
    manifests = {}
    for stage in ("stage1", "stage2"):
        text = (root / "data_manifests" / f"interleaved_{stage}.yaml").read_text().replace("../data/interleaved", str(tmp_path / "data"))
        manifest = yaml.safe_load(text.replace("{000000..000002}", "000000"))
        manifest["train"] = [source for source in manifest["train"] if source["name"] == "documents"]  # no data/embedded here
        manifest["val"] = []
        manifests[stage] = tmp_path / f"{stage}.yaml"
        manifests[stage].write_text(yaml.safe_dump(manifest))
    common = ["--model.config", str(root / "experiments" / "models" / "owl-tiny.yaml"), "--trainer.max_steps", "2"]
    common += ["--trainer.accelerator", "cpu", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    common += ["--data.num_workers", "0", "--data.batch_size", "2", "--data.batches_per_epoch", "2", "--trainer.limit_val_batches", "0"]
    common += ["--data.max_length", "512"]  # owl-tiny reads bytes: a document (~830 tokens) keeps its first images
    main(["stage1", "fit", "--data.manifest", str(manifests["stage1"]), "--trainer.default_root_dir", str(tmp_path / "stage1"), *common])
    stage1 = next((tmp_path / "stage1").rglob("*.ckpt"))
    main(
        ["stage2", "fit", "--data.manifest", str(manifests["stage2"]), "--model.init_from", str(stage1)]
        + ["--trainer.default_root_dir", str(tmp_path / "stage2"), *common]
    )
    assert next((tmp_path / "stage2").rglob("*.ckpt")).is_file()


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_the_interleaved_experiments_stack_on_the_smol_stages(stage, capsys):
    root = Path(__file__).parents[1]
    argv = [stage, "fit", "--config", str(root / "experiments" / "base.yaml"), "--config", str(root / "experiments" / f"{stage}_smol.yaml")]
    with pytest.raises(SystemExit):
        main([*argv, "--config", str(root / "experiments" / "interleaved" / f"{stage}.yaml"), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["default_root_dir"] == f"runs/{stage}_interleaved"
    manifest = load_manifest(root / printed["data"]["manifest"])
    assert "obelics" in {source.format for source in manifest.train}
