"""Video input (docs/video.md): decoding and sampling clips, the frames as views with a learned temporal
embedding, token and FLOP counts, the Video-ChatGPT reader, stage-1 clip shards, bad clips as counted skips,
and clips in chat, on the chat page and through the OpenAI-compatible route. Clips are generated here."""

from __future__ import annotations

import base64
import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import openai
import pytest
import torch
import webdataset as wds
import yaml

from owl_lightning.apps.web import running
from owl_lightning.apps.web.demo import read_conversation
from owl_lightning.apps.web.openai_api import OpenAIApp
from owl_lightning.cli import main
from owl_lightning.config import IMAGE_TOKEN, get_config
from owl_lightning.data import video as video_module
from owl_lightning.data.collate import EncodedSample, collate
from owl_lightning.data.health import (
    CORRUPT_VIDEO,
    DECOMPRESSION_BOMB,
    MISSING_VIDEO,
    UNSUPPORTED_VIDEO,
    VIDEO_TOO_LONG,
    VIDEO_TOO_SHORT,
    SkipLog,
    SkipSample,
)
from owl_lightning.data.instruct import read_conversations
from owl_lightning.data.manifest import InstructionSource, load_manifest
from owl_lightning.data.mixture import InstructionMixture
from owl_lightning.data.processor import OwlProcessor
from owl_lightning.data.video import Video, VideoClip, decode_video, encode_clip, sample_indices
from owl_lightning.inference import OwlAssistant, Request
from owl_lightning.models.llm import load_tokenizer
from owl_lightning.models.owl import build_owl, visual_tokens_per_clip
from owl_lightning.train.datamodules import CaptionDataModule
from owl_lightning.train.flops import StepFlops, num_views, sequence_lengths
from tests.helpers import fit, png_bytes, tiny_system

# Frame k of a test clip is solid grey at LEVELS[k]: which frames were sampled, in which order, reads off the pixels.
LEVELS = [10 + 25 * k for k in range(8)]


def clip_bytes(levels=LEVELS, codec="mpeg4", container="mp4", size=32) -> bytes:
    return encode_clip([np.full((size, size, 3), level, np.uint8) for level in levels], codec=codec, container=container)


def grey_levels(frames) -> list[int]:
    return [round(float(np.asarray(frame).mean())) for frame in frames]


def near(levels, expected, tolerance=4) -> bool:
    """Lossy codecs move a grey level by a few steps."""
    return len(levels) == len(expected) and all(abs(a - b) <= tolerance for a, b in zip(levels, expected))


@pytest.fixture
def processor():
    return OwlProcessor(get_config("owl-tiny"))


# -- decoding and sampling --------------------------------------------------------------------------


def test_sampling_takes_each_segments_centre_and_repeats_frames_of_short_clips():
    assert sample_indices(8, 4) == [1, 3, 5, 7]
    assert sample_indices(100, 8) == [6, 18, 31, 43, 56, 68, 81, 93]
    assert sample_indices(3, 4) == [0, 1, 1, 2]  # fewer frames than asked for: some twice, still in order
    assert sample_indices(4, 4) == [0, 1, 2, 3]


@pytest.mark.parametrize(("codec", "container"), [("mpeg4", "mp4"), ("libvpx", "webm"), ("gif", "gif")])
def test_clips_decode_to_their_sampled_frames_in_order(codec, container, tmp_path):
    data = clip_bytes(codec=codec, container=container)
    assert near(grey_levels(decode_video(data, 4)), [LEVELS[i] for i in (1, 3, 5, 7)])
    path = tmp_path / f"clip.{container}"
    path.write_bytes(data)
    assert near(grey_levels(decode_video(path, 2)), [LEVELS[i] for i in (2, 6)])


def test_a_clip_shorter_than_num_frames_repeats_frames_and_one_below_min_frames_is_skipped():
    assert near(grey_levels(decode_video(clip_bytes(LEVELS[:3]), 4, min_frames=2)), [LEVELS[i] for i in (0, 1, 1, 2)])
    with pytest.raises(SkipSample) as skip:
        decode_video(clip_bytes(LEVELS[:1]), 4, min_frames=2)
    assert skip.value.reason == VIDEO_TOO_SHORT


def bad_clips(tmp_path) -> dict[str, bytes | Path]:
    whole = clip_bytes()
    return {
        CORRUPT_VIDEO: whole[: len(whole) // 3],  # the index (moov) is written last: cut, nothing can be found
        UNSUPPORTED_VIDEO: clip_bytes(codec="ffv1", container="matroska"),  # a codec outside ALLOWED_CODECS
        VIDEO_TOO_SHORT: clip_bytes(LEVELS[:1]),
        MISSING_VIDEO: tmp_path / "nowhere.mp4",
    }


def test_bad_clips_raise_their_reasons(tmp_path, monkeypatch):
    for reason, data in bad_clips(tmp_path).items():
        with pytest.raises(SkipSample) as skip:
            decode_video(data, 4, min_frames=2)
        assert skip.value.reason == reason, (reason, skip.value)
    with pytest.raises(SkipSample, match="not an MP4/MOV") as skip:
        decode_video(b"#EXTM3U\n#EXT-X-STREAM-INF\nhttp://example.com/a.m3u8\n", 4)  # HLS: never probed, never fetched
    assert skip.value.reason == UNSUPPORTED_VIDEO
    monkeypatch.setattr(video_module, "MAX_FRAME_PIXELS", 31 * 31)
    with pytest.raises(SkipSample) as skip:
        decode_video(clip_bytes(), 4)
    assert skip.value.reason == DECOMPRESSION_BOMB
    monkeypatch.setattr(video_module, "MAX_DECODED_FRAMES", 7)
    with pytest.raises(SkipSample) as skip:
        decode_video(clip_bytes(size=16), 4)
    assert skip.value.reason == VIDEO_TOO_LONG


def test_the_processor_reads_a_clip_as_num_frames_views_of_the_encoders_size(processor):
    clip = processor.video_reader(clip_bytes(size=48))
    assert isinstance(clip, VideoClip) and clip.views.shape == (4, 3, 32, 32) and clip.views.dtype == torch.uint8
    assert processor.video_reader.visual_tokens == visual_tokens_per_clip(processor.config) == 4 * 5
    means = clip.views.float().mean((1, 2, 3)).tolist()
    assert means == sorted(means)  # time order kept


def test_num_frames_is_a_checked_config_setting():
    assert get_config("owl-tiny", {"video.num_frames": 8}).video.num_frames == 8
    with pytest.raises(ValueError, match="min_frames"):
        get_config("owl-tiny").video.__class__(num_frames=2, min_frames=3)


# -- the model: frames as views, temporal embedding ------------------------------------------------


def clip_of(levels, size=32) -> VideoClip:
    return VideoClip(torch.stack([torch.full((3, size, size), level, dtype=torch.uint8) for level in levels]))


def two_samples(tokenizer):
    """A still image and a 4-frame clip, one sample each."""
    image_token = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    text = tokenizer("what is it?", add_special_tokens=False)["input_ids"]
    still = EncodedSample([image_token, *text], [-100, *text], [torch.full((3, 32, 32), 200, dtype=torch.uint8)])
    moving = EncodedSample([*text, image_token, *text], [-100] * len(text) + [-100, *text], [clip_of([20, 80, 140, 200])])
    return [still, moving]


def test_a_clips_frames_are_views_spliced_in_order_with_their_temporal_embedding(tiny_model, tiny_tokenizer):
    batch = collate(two_samples(tiny_tokenizer), tiny_tokenizer.pad_token_id)
    assert batch["images"].shape == (5, 3, 32, 32) and batch["image_frames"].tolist() == [1, 4]
    with torch.no_grad():
        tiny_model.abstractor.temporal_embedding.weight.normal_()
    layout = tiny_model.layout(
        batch["input_ids"],
        batch["sample_ids"],
        batch["images"],
        batch["labels"],
        batch["image_counts"],
        "right",
        batch["image_grids"],
        batch["image_frames"],
    )
    assert layout.view_frames.tolist() == [-1, 0, 1, 2, 3]  # the still gets no temporal embedding
    v = tiny_model.visual_tokens_per_image
    text = len(tiny_tokenizer("what is it?", add_special_tokens=False)["input_ids"])
    assert layout.mask.sum(1).tolist() == [v + text, 2 * text + 4 * v]  # the clip: 4 frames × V
    with torch.no_grad():
        embeds = tiny_model.input_embeddings(batch["input_ids"], batch["images"], layout)
        views = tiny_model.encode_images(batch["images"], layout.view_frames)  # [5, V, D]
    torch.testing.assert_close(embeds[1, text : text + 4 * v], views[1:].flatten(0, 1))
    torch.testing.assert_close(embeds[0, :v], views[0])


def test_the_temporal_embedding_tells_a_clip_from_its_frames_reversed(tiny_model):
    frames = clip_of([20, 80, 140, 200]).views
    order = torch.arange(4)

    def tokens(views):
        with torch.no_grad():
            return tiny_model.encode_images(views, order)

    # At initialisation (zero) a frame's tokens do not depend on where it stands: reversed = blocks reversed.
    torch.testing.assert_close(tokens(frames.flip(0)), tokens(frames).flip(0))
    with torch.no_grad():
        tiny_model.abstractor.temporal_embedding.weight.normal_()
    assert not torch.allclose(tokens(frames.flip(0)), tokens(frames).flip(0), atol=1e-3)


def test_the_temporal_embedding_gets_gradients_from_clips_and_zeros_from_stills(tiny_model, tiny_tokenizer):
    """One row per frame; a batch of stills still reaches it (zeros): DDP/FSDP reduce every rank's gradient."""
    assert tiny_model.abstractor.temporal_embedding.weight.shape == (4, tiny_model.vision.num_features)
    for samples, trained in ((two_samples(tiny_tokenizer), True), (two_samples(tiny_tokenizer)[:1], False)):
        tiny_model.zero_grad(set_to_none=True)
        batch = collate(samples, tiny_tokenizer.pad_token_id)
        images, counts, grids, frames = batch["images"], batch["image_counts"], batch["image_grids"], batch["image_frames"]
        tiny_model(batch["input_ids"], batch["sample_ids"], batch["labels"], images, counts, None, grids, frames).loss.backward()
        grad = tiny_model.abstractor.temporal_embedding.weight.grad
        assert grad is not None and bool((grad.abs().sum(1) > 0).all()) == trained


def test_a_clip_longer_than_the_models_frames_is_refused(tiny_model, tiny_tokenizer):
    sample = two_samples(tiny_tokenizer)[1]
    sample.images = [clip_of([20] * 5)]
    batch = collate([sample], tiny_tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="video.num_frames=4"):
        tiny_model.layout(batch["input_ids"], batch["sample_ids"], batch["images"], image_frames=batch["image_frames"])


def test_packing_lengths_and_flops_count_every_frame(tiny_model, tiny_tokenizer):
    samples = two_samples(tiny_tokenizer)
    image_token = tiny_tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    v = tiny_model.visual_tokens_per_image
    packed = collate(samples, tiny_tokenizer.pad_token_id, pack_visual_tokens_per_image=v)
    lengths = sequence_lengths(packed, v, image_token).tolist()
    text = len(tiny_tokenizer("what is it?", add_special_tokens=False)["input_ids"])
    assert sorted(lengths) == sorted([v + text, 2 * text + 4 * v])
    assert num_views(packed) == 5
    flops = StepFlops.of(tiny_model)
    as_stills = {**packed, "image_frames": torch.ones(2, dtype=torch.long)}  # what a count blind to frames would see
    assert flops.step(packed, 0) - flops.step(as_stills, 0) > 3 * flops.per_view  # 3 more views and 15 more tokens


# -- data: the Video-ChatGPT reader, the stage-2 mixture, stage-1 shards --------------------------------


def write_video_chatgpt(root: Path) -> Path:
    (root / "clips").mkdir(parents=True)
    (root / "clips" / "a.mp4").write_bytes(clip_bytes())
    records = [
        {
            "id": "v1",
            "video": "a.mp4",
            "conversations": [{"from": "human", "value": "<video>\nWhich way?"}, {"from": "gpt", "value": "up"}],
        },
        {"id": "v2", "video": "a.mp4", "conversations": [{"from": "human", "value": "What colour?"}, {"from": "gpt", "value": "grey"}]},
        {"id": "v3", "conversations": [{"from": "human", "value": "no video"}, {"from": "gpt", "value": "x"}]},
    ]
    path = root / "video_chatgpt.json"
    path.write_text(json.dumps(records))
    return path


def test_video_chatgpt_records_put_the_clip_at_its_placeholder_or_first(tmp_path):
    source = InstructionSource(
        name="vc", format="video_chatgpt", path=str(write_video_chatgpt(tmp_path)), video_root=str(tmp_path / "clips")
    )
    skips = SkipLog(warnings_left=0)
    first, second = read_conversations(source, skips)
    assert first.turns[0].content == f"{IMAGE_TOKEN}\nWhich way?" and first.images == ["a.mp4"]
    assert second.turns[0].content == f"{IMAGE_TOKEN}\nWhat colour?" and second.images == ["a.mp4"]
    assert [reason for reason, _ in skips.drain()] == ["malformed_record"]  # v3 has no 'video'
    assert source.media_root == str(tmp_path / "clips")


def test_the_mixture_reads_clips_from_the_video_root(tmp_path, processor):
    path = write_video_chatgpt(tmp_path)
    (tmp_path / "clips" / "b.mp4").write_bytes(b"not a clip at all")
    records = json.loads(path.read_text())[:2]
    records.append({"id": "bad", "video": "b.mp4", "conversations": records[0]["conversations"]})
    path.write_text(json.dumps(records))
    source = InstructionSource(name="vc", format="video_chatgpt", path=str(path), video_root=str(tmp_path / "clips"))
    conversations = read_conversations(source, SkipLog())
    template = processor.template(256)
    mixture = InstructionMixture(
        [(source, conversations)], template, processor.image_transform, batch_size=3, pad_token_id=0, video_reader=processor.video_reader
    )
    batch = next(iter(mixture))
    assert batch["image_frames"].tolist() == [4, 4, 4] and batch["images"].shape == (12, 3, 32, 32)
    assert {reason for reason, _ in batch["skipped"]} <= {UNSUPPORTED_VIDEO}
    with pytest.raises(ValueError, match="video_root"):
        InstructionMixture(
            [(InstructionSource(name="vc", format="video_chatgpt", path=str(path)), conversations)],
            template,
            processor.image_transform,
            batch_size=2,
            pad_token_id=0,
            video_reader=processor.video_reader,
        )


def write_clip_shards(root: Path, bad: dict[str, bytes | Path] | None = None) -> Path:
    """Two train shards of 4 clips each, captioned by the direction their grey level runs, plus the bad clips."""
    root.mkdir(parents=True, exist_ok=True)
    key = 0
    for shard in range(2):
        with wds.TarWriter(str(root / f"train-{shard:06d}.tar")) as sink:
            for index in range(4):
                levels = LEVELS if index % 2 else LEVELS[::-1]
                sink.write({"__key__": f"{key:09d}", "mp4": clip_bytes(levels), "txt": "brighter" if index % 2 else "darker"})
                key += 1
            for data in (bad or {}).values() if shard == 0 else ():
                if isinstance(data, bytes):
                    sink.write({"__key__": f"{key:09d}", "mp4": data, "txt": "bad"})
                    key += 1
    manifest = root / "manifest.yaml"
    manifest.write_text(
        yaml.safe_dump({"train": [{"name": "clips", "shards": "train-{000000..000001}.tar", "format": "video", "num_samples": key}]})
    )
    return manifest


def test_stage1_trains_on_clip_shards_and_counts_bad_clips_by_reason(tmp_path):
    manifest = write_clip_shards(tmp_path / "shards", bad_clips(tmp_path))
    assert load_manifest(manifest).train[0].format == "video"
    system = tiny_system("stage1", warmup_steps=0)
    data = CaptionDataModule(
        manifest=str(manifest), processor=system.processor, batch_size=4, num_workers=0, max_length=40, batches_per_epoch=2
    )
    frames = []
    transfer = system.transfer_batch_to_device

    def recording(batch, device, dataloader_idx):
        frames.append(batch["image_frames"].tolist())
        return transfer(batch, device, dataloader_idx)

    system.transfer_batch_to_device = recording
    trainer = fit(system, data, tmp_path, steps=2, max_epochs=10)
    assert trainer.global_step == 2 and frames[0] == [4, 4, 4, 4]
    assert set(data.health.skipped_by_reason) <= {CORRUPT_VIDEO, UNSUPPORTED_VIDEO, VIDEO_TOO_SHORT}
    assert data.health.skipped_by_reason  # the shuffle buffer reads the whole (small) shard: its bad clips are counted


def test_a_video_source_without_a_reader_is_refused(tmp_path, processor):
    from owl_lightning.data.shards import build_shard_pipeline

    manifest = load_manifest(write_clip_shards(tmp_path / "shards"))
    template = processor.template(40)
    with pytest.raises(ValueError, match="video_reader"):
        build_shard_pipeline(
            manifest.train, image_transform=processor.image_transform, encode_caption=template.encode_caption, pad_token_id=0, batch_size=2
        )


# -- using it: chat, the page, the OpenAI route ----------------------------------------------------------


@pytest.fixture
def assistant(tiny_model, tiny_tokenizer):
    return OwlAssistant(tiny_model, tiny_tokenizer, precision="fp32")


def test_the_assistant_answers_about_a_clip_with_its_frames_as_tokens(assistant):
    clip = assistant.read_video(clip_bytes())
    assert isinstance(clip, Video) and near(grey_levels(clip.frames), [LEVELS[i] for i in (1, 3, 5, 7)])
    request = Request.single("what happens?", [clip])
    sample = assistant.encode(request)
    assert assistant.prompt_tokens(sample) == len(sample.input_ids) - 1 + 4 * assistant.model.visual_tokens_per_image
    assert assistant.image_tokens(clip) == 20
    (answer,) = assistant.answer([request], max_new_tokens=3)
    assert isinstance(answer, str)


def test_chat_takes_videos_and_images_in_command_line_order(tmp_path, monkeypatch, capsys):
    config = get_config("owl-tiny")
    model = build_owl(config, tokenizer=load_tokenizer(config.llm))
    state = {f"model.{k}": v for k, v in model.state_dict().items() if not k.startswith("llm.")}
    torch.save({"state_dict": state, "owl_config": config.to_dict()}, tmp_path / "tiny.ckpt")
    (tmp_path / "clip.mp4").write_bytes(clip_bytes())
    (tmp_path / "still.png").write_bytes(png_bytes("red"))
    asked = []
    monkeypatch.setattr(OwlAssistant, "answer", lambda self, requests, *args, **kwargs: asked.extend(requests) or ["fine"])
    argv = ["chat", "--ckpt", str(tmp_path / "tiny.ckpt"), "--device", "cpu", "--precision", "fp32"]
    main([*argv, "--video", str(tmp_path / "clip.mp4"), "--image", str(tmp_path / "still.png"), "--prompt", "what moves?"])
    assert capsys.readouterr().out.strip() == "fine"
    (request,) = asked
    assert request.turns[0].content == f"{IMAGE_TOKEN * 2}\nwhat moves?"
    assert isinstance(request.images[0], Video) and not isinstance(request.images[1], Video)
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 broken")
    with pytest.raises(SystemExit):
        main([*argv, "--video", str(tmp_path / "broken.mp4"), "--prompt", "?"])
    assert "cannot read video" in capsys.readouterr().err


def data_url(data: bytes, mime: str = "video/mp4") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def test_the_chat_page_reads_an_uploaded_clip_within_its_caps(assistant):
    upload = {"name": "clip.mp4", "data": data_url(clip_bytes())}
    request = read_conversation([{"role": "user", "text": "what?", "images": [upload]}], read_video=assistant.read_video)
    assert request.turns[0].content == f"{IMAGE_TOKEN}\nwhat?" and isinstance(request.images[0], Video)
    from owl_lightning.apps.web import HttpError

    with pytest.raises(HttpError, match="over 2 video clips"):
        read_conversation([{"role": "user", "text": "?", "images": [upload] * 3}], read_video=assistant.read_video)
    with pytest.raises(HttpError, match="images only"):
        read_conversation([{"role": "user", "text": "?", "images": [upload]}])
    broken = {"name": "broken.mp4", "data": data_url(clip_bytes()[:200])}
    with pytest.raises(HttpError, match="not a clip the server can use"):
        read_conversation([{"role": "user", "text": "?", "images": [broken]}], read_video=assistant.read_video)


@contextmanager
def api(assistant):
    app = OpenAIApp(assistant, model_name="owl-tiny-test", api_key="key")
    with running(app) as server:
        yield openai.OpenAI(base_url=server.url + "v1", api_key="key", max_retries=0, timeout=60)


def video_part(data: bytes) -> dict:
    return {"type": "video_url", "video_url": {"url": data_url(data)}}


def test_the_openai_route_answers_about_a_video_url_part(assistant, monkeypatch):
    encoded = []
    encode = assistant.encode
    monkeypatch.setattr(assistant, "encode", lambda request, template=None: encoded.append(request) or encode(request, template))
    with api(assistant) as client:
        content = [{"type": "text", "text": "Which way does it move?"}, video_part(clip_bytes())]
        response = client.chat.completions.create(model="owl-tiny-test", messages=[{"role": "user", "content": content}], max_tokens=4)
        (request,) = encoded
        assert isinstance(request.images[0], Video) and request.turns[0].content == f"{IMAGE_TOKEN}\nWhich way does it move?"
        assert response.usage.prompt_tokens == assistant.prompt_tokens(encode(request)) > 4 * assistant.model.visual_tokens_per_image
        with pytest.raises(openai.BadRequestError, match="not a clip the server can use"):
            client.chat.completions.create(
                model="owl-tiny-test", messages=[{"role": "user", "content": [video_part(b"GIF89a broken")]}], max_tokens=4
            )
        with pytest.raises(openai.APIStatusError, match="over 2 video clips") as error:
            client.chat.completions.create(
                model="owl-tiny-test", messages=[{"role": "user", "content": [video_part(clip_bytes())] * 3}], max_tokens=4
            )
        assert error.value.status_code == 413


# -- the embedded video set and both stages on it --------------------------------------------------------


def test_the_video_set_is_deterministic_and_readable(tmp_path):
    from owl_lightning.apps.video import VideoSizes, build_video

    sizes = VideoSizes(train=1, val=1, test=1)
    first, second = tmp_path / "a", tmp_path / "b"
    counts = build_video(first, sizes)
    build_video(second, sizes)
    assert counts["clips_train"] == 48 and counts["video_test_records"] == 3 * 48
    for path in sorted(first.rglob("*")):
        if path.is_file():
            assert path.read_bytes() == (second / path.relative_to(first)).read_bytes(), path
    records = json.loads((first / "stage2" / "video_train.json").read_text())
    clip = decode_video(first / "clips" / "train" / records[0]["video"].split("/", 1)[1], 4)
    assert len(clip) == 4 and records[0]["conversations"][0]["value"].startswith("<video>\n")


@pytest.mark.slow
def test_stage1_then_stage2_train_owl_tiny_on_the_generated_video_set(tmp_path):
    """``data video``, then both stages through the CLI on owl-tiny, with the shipped manifests' shape."""
    main(["data", "video", "--out", str(tmp_path / "data"), "--train-per-combination", "1", "--val-per-combination", "1"])
    manifests = {}
    for stage, shipped in (("stage1", "video_stage1.yaml"), ("stage2", "video_stage2.yaml")):
        manifest = yaml.safe_load((Path(__file__).parents[1] / "data_manifests" / shipped).read_text())
        text = yaml.safe_dump(manifest).replace("../data/video", str(tmp_path / "data"))
        manifest = yaml.safe_load(text)
        manifest["train"] = [source for source in manifest["train"] if "video" in yaml.safe_dump(source)]  # no data/embedded here
        manifest["val"] = []
        manifests[stage] = tmp_path / shipped
        manifests[stage].write_text(yaml.safe_dump(manifest))
    common = ["--model.config", str(Path(__file__).parents[1] / "experiments" / "models" / "owl-tiny.yaml"), "--trainer.max_steps", "2"]
    common += [
        "--trainer.accelerator",
        "cpu",
        "--trainer.logger",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--data.num_workers",
        "0",
    ]
    main(
        ["stage1", "fit", "--data.manifest", str(manifests["stage1"]), "--data.batch_size", "4", "--data.batches_per_epoch", "2"]
        + ["--trainer.default_root_dir", str(tmp_path / "stage1"), "--trainer.limit_val_batches", "0", *common]
    )
    stage1 = next((tmp_path / "stage1").rglob("*.ckpt"))
    main(
        ["stage2", "fit", "--data.manifest", str(manifests["stage2"]), "--data.batch_size", "4", "--data.batches_per_epoch", "2"]
        + ["--model.init_from", str(stage1)]
        + ["--trainer.default_root_dir", str(tmp_path / "stage2"), "--trainer.limit_val_batches", "0", *common]
    )
    assert next((tmp_path / "stage2").rglob("*.ckpt")).is_file()


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_the_video_experiments_stack_on_the_smol_stages_and_num_frames_is_an_option(stage, capsys):
    root = Path(__file__).parents[1]
    argv = [stage, "fit", "--config", str(root / "experiments" / "base.yaml"), "--config", str(root / "experiments" / f"{stage}_smol.yaml")]
    argv += ["--config", str(root / "experiments" / "video" / f"{stage}.yaml"), "--model.config.video.num_frames", "8", "--print_config"]
    with pytest.raises(SystemExit):
        main(argv)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["config"]["video"] == {"num_frames": 8, "min_frames": 2}
    assert printed["data"]["manifest"] == f"data_manifests/video_{stage}.yaml"
    assert printed["trainer"]["default_root_dir"] == f"runs/{stage}_video"
    assert load_manifest(root / printed["data"]["manifest"]).train[0].name.startswith("video")
