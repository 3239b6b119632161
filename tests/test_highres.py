"""High resolution (docs/high_resolution.md): pad-to-square, AnyRes tiles with row separators, resampled
ViT position embeddings, and every count that follows an image's tile grid (template, packing, FLOPs)."""

import json
import math

import lightning as L
import pytest
import torch
import yaml
from PIL import Image

from owl_lightning.checkpoints import load_model_weights
from owl_lightning.config import IGNORE_INDEX, LLAVA_NEXT_TILE_GRIDS, OwlConfig, get_config, visual_tokens_of_grid
from owl_lightning.data.collate import EncodedSample, collate
from owl_lightning.data.health import SkipSample
from owl_lightning.data.highres import AnyResTiles, PadToSquare, TiledImage, image_preprocess, select_best_grid
from owl_lightning.data.template import Conversation, ConversationTemplate, Turn
from owl_lightning.inference import OwlAssistant, Request
from owl_lightning.models.llm import load_tokenizer
from owl_lightning.models.owl import RowSeparator, TokenLayout, build_owl, max_visual_tokens_per_image, visual_tokens_per_image
from owl_lightning.models.vision import VisionEncoder, resample_position_embeddings
from owl_lightning.train.datamodules import CaptionDataModule, InstructionDataModule
from owl_lightning.train.flops import StepFlops, sequence_lengths
from tests.helpers import fit, tiny_system

IMG = 99
RED, BLUE = (220, 30, 30), (30, 30, 220)


def halves(width: int, height: int) -> Image.Image:
    """Left half red, right half blue: where each part lands shows the geometry."""
    image = Image.new("RGB", (width, height), RED)
    image.paste(BLUE, (width // 2, 0, width, height))
    return image


@pytest.fixture(scope="module")
def anyres_tokenizer():
    return load_tokenizer(get_config("owl-tiny-anyres").llm)


@pytest.fixture
def anyres_model(anyres_tokenizer):
    return build_owl(get_config("owl-tiny-anyres"), tokenizer=anyres_tokenizer)


# -- choosing the grid -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "grid"),
    [
        # 1000×500 fits 1×2 (672×336) exactly: 672·336 of its pixels kept, none wasted; 2×2 and 1×3 keep
        # as many but pad 225,792 and 112,896 pixels.
        ((1000, 500), (1, 2)),
        # 700×1400 at 0.48 fills 2×1 (336×672) exactly; 3×1 keeps the same but pads a third.
        ((700, 1400), (2, 1)),
        # 1000×1000: 2×2 keeps 672² of its pixels, every other grid at most 336·672.
        ((1000, 1000), (2, 2)),
        # 3000×1000 at 0.336 fills 1×3 (1008×336); 2×2 keeps only 672×224.
        ((3000, 1000), (1, 3)),
        # 200×200 is smaller than every grid: each keeps all 40,000 pixels (upscaling adds none), so the
        # least padding wins, and of the tied 2×1 and 1×2 the first listed.
        ((200, 200), (2, 1)),
    ],
)
def test_best_grid_keeps_the_most_pixels_then_wastes_the_least(size, grid):
    assert select_best_grid(*size, tile_size=336, grids=LLAVA_NEXT_TILE_GRIDS) == grid


# -- views and token counts --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "grid", "tokens"),
    # owl-tiny-anyres: 32 px tiles, 4 queries + the end token (V = 5) a view: 5·(1 + rows·cols) + rows tokens.
    [((64, 32), (1, 2), 15 + 1), ((32, 64), (2, 1), 15 + 2), ((64, 64), (2, 2), 25 + 2), ((20, 10), (1, 2), 16)],
)
def test_anyres_tiles_and_tokens_follow_the_image_size(size, grid, tokens):
    config = get_config("owl-tiny-anyres")
    tiled = image_preprocess(config)(halves(*size))
    rows, cols = grid
    assert isinstance(tiled, TiledImage) and (tiled.rows, tiled.cols) == grid
    assert tiled.views.shape == (1 + rows * cols, 3, 32, 32) and tiled.views.dtype == torch.uint8
    assert visual_tokens_of_grid(visual_tokens_per_image(config), rows, cols) == tokens
    assert max_visual_tokens_per_image(config) == 27


def test_tiles_are_the_grid_canvas_cut_row_major_and_the_global_view_comes_first():
    config = get_config("owl-tiny-anyres")
    tiled = image_preprocess(config)(halves(64, 32))  # exactly the 1×2 canvas: left tile red, right tile blue
    global_view, left, right = tiled.views
    assert left[:, 4:28, 4:28].float().mean((1, 2)).round().tolist() == list(RED)
    assert right[:, 4:28, 4:28].float().mean((1, 2)).round().tolist() == list(BLUE)
    assert torch.equal(global_view, PadToSquare(config.vision)(halves(64, 32)))  # the global view is the pad view


def test_paper_scale_token_costs():
    config = get_config("owl-llama7b-anyres336")
    counts = {tuple(grid): visual_tokens_of_grid(visual_tokens_per_image(config), *grid) for grid in config.image.tile_grids}
    assert counts == {(2, 1): 197, (1, 2): 196, (2, 2): 327, (3, 1): 263, (1, 3): 261}
    assert max_visual_tokens_per_image(config) == 327 and max_visual_tokens_per_image(get_config("owl-llama7b-pad336")) == 65
    mlp = get_config("owl-llama7b-anyres336", {"connector": "mlp"})  # LLaVA-NeXT's pairing: every encoder token of every view
    assert visual_tokens_per_image(mlp) == 577 and max_visual_tokens_per_image(mlp) == 577 * 5 + 2


# -- pad to square -----------------------------------------------------------------------------------


def test_pad_to_square_keeps_the_whole_image_centred_on_the_mean_colour():
    pad = PadToSquare(get_config("owl-tiny").vision)  # 32 px, mean 0.5 → grey 128
    pixels = pad(halves(64, 32))  # 64×32 → 32×16 content, 8 rows of padding above and below
    assert pixels.shape == (3, 32, 32) and pad.fill == (128, 128, 128)
    grey = torch.tensor([128, 128, 128], dtype=torch.uint8).view(3, 1, 1)
    assert (pixels[:, :8] == grey).all() and (pixels[:, 24:] == grey).all()
    assert (pixels[:, 8:24, :14] == torch.tensor(RED, dtype=torch.uint8).view(3, 1, 1)).all()  # both halves are there
    assert (pixels[:, 8:24, 18:] == torch.tensor(BLUE, dtype=torch.uint8).view(3, 1, 1)).all()


def test_pad_to_square_at_paper_scale_uses_clips_mean():
    pad = image_preprocess(get_config("owl-llama7b-pad336"))
    assert isinstance(pad, PadToSquare) and pad.fill == (123, 117, 104)  # OpenAI CLIP's mean × 255
    pixels = pad(Image.new("RGB", (480, 640), RED))  # portrait: 252 px wide, 42 columns each side
    fill = torch.tensor(pad.fill, dtype=torch.uint8).view(3, 1, 1)
    assert pixels.shape == (3, 336, 336) and (pixels[:, :, :42] == fill).all() and (pixels[:, :, 294:] == fill).all()
    assert (pixels[:, :, 42:294] == torch.tensor(RED, dtype=torch.uint8).view(3, 1, 1)).all()


def test_crop_stays_the_default(anyres_tokenizer):
    assert all(get_config(name).image.mode == "crop" for name in ("owl-tiny", "owl-smol", "owl-llama7b"))
    assert not isinstance(image_preprocess(get_config("owl-smol")), PadToSquare)
    model = build_owl(get_config("owl-tiny"), tokenizer=anyres_tokenizer)
    assert model.abstractor.row_separator is None and not any("row_separator" in key for key in model.state_dict())
    ids = torch.tensor([[1, model.image_token_id, 7, model.image_token_id]])
    layout = model.layout(ids, torch.ones_like(ids), torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    assert layout.visual_index.tolist() == list(range(2 * 5))  # each image's own V tokens, in order


# -- the token order ---------------------------------------------------------------------------------


def test_visual_tokens_are_global_view_then_rows_of_tiles_each_ended_by_a_separator():
    v = 2  # tokens per view
    ids = torch.tensor([[1, IMG, 7, IMG, 8, IMG]])
    grids = torch.tensor([[2, 2], [0, 0], [1, 3]])  # a 2×2 AnyRes image, a single view, a 1×3 one: 10 views
    layout = TokenLayout.of(ids, torch.ones_like(ids), 3, v, IMG, image_grids=grids)
    views = torch.arange(10 * v, dtype=torch.float).view(10, v, 1) + 10  # view k's token j is 10 + 2k + j
    separator = RowSeparator(1)
    separator.weight.data.fill_(-1.0)
    with torch.no_grad():
        embeds = layout.splice(ids.float()[..., None], layout.visual_sequence(views, separator))
    tokens = embeds[0, :, 0].tolist()
    square = [10, 11] + [12, 13, 14, 15, -1] + [16, 17, 18, 19, -1]  # global view; tiles 1, 2, separator; tiles 3, 4, separator
    single = [20, 21]
    wide = [22, 23] + [24, 25, 26, 27, 28, 29, -1]
    assert tokens == [1, *square, 7, *single, 8, *wide]
    assert len(square) == visual_tokens_of_grid(v, 2, 2) and len(wide) == visual_tokens_of_grid(v, 1, 3)


@pytest.mark.parametrize(("connector", "v"), [("abstractor", 5), ("mlp", 17)])  # 4 queries + end; every encoder token
def test_model_puts_its_learned_separator_after_every_row_and_trains_it(anyres_tokenizer, connector, v):
    model = build_owl(get_config("owl-tiny-anyres", {"connector": connector}), tokenizer=anyres_tokenizer)
    image = AnyResTiles(model.config.vision, model.config.image.tile_grids)(halves(64, 64))  # 2×2
    image_id = anyres_tokenizer.convert_tokens_to_ids("<image>")
    batch = collate([EncodedSample([1, image_id, 65], [IGNORE_INDEX, IGNORE_INDEX, 65], [image])], pad_token_id=0)
    assert batch["image_grids"].tolist() == [[2, 2]] and batch["images"].shape == (5, 3, 32, 32)
    embeds, mask, _ = model.embed(batch["input_ids"], batch["sample_ids"], batch["images"], image_grids=batch["image_grids"])
    assert embeds.shape[1] == 2 + 5 * v + 2
    separator = model.abstractor.row_separator.weight[0]
    is_separator = [bool(torch.equal(embeds[0, position], separator)) for position in range(embeds.shape[1])]
    # BOS, the global view's V, row 1's 2V → separator; row 2's 2V → separator; then the text.
    assert [p for p, hit in enumerate(is_separator) if hit] == [1 + 3 * v, 2 + 5 * v]
    views = model.encode_images(batch["images"])  # [5, V, D]
    assert torch.equal(embeds[0, 1 : 1 + v], views[0]) and torch.equal(embeds[0, 1 + v : 1 + 3 * v], views[1:3].flatten(0, 1))
    out = model(
        batch["input_ids"], batch["sample_ids"], batch["labels"], batch["images"], batch["image_counts"], image_grids=batch["image_grids"]
    )
    out.loss.backward()
    assert model.abstractor.row_separator.weight.grad.abs().sum() > 0


def test_views_that_do_not_match_the_grids_are_refused_with_the_fix(anyres_model):
    ids = torch.tensor([[1, anyres_model.image_token_id]])
    with pytest.raises(ValueError, match="image_grids"):
        anyres_model.layout(ids, torch.ones_like(ids), torch.zeros(3, 3, 32, 32, dtype=torch.uint8), image_grids=torch.tensor([[2, 2]]))


# -- position embeddings -----------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "features"), [(224, 257), (336, 577), (448, 1025)])
def test_vit_l14_position_embeddings_resample_to_336_and_448(size, features):
    config = get_config("owl-llama7b", {"vision.image_size": size})
    with torch.device("meta"):
        encoder = VisionEncoder(config.vision, pretrained=False)
    assert encoder.model.pos_embed.shape == (1, features, 1024) and encoder.input_size == (3, size, size)
    assert encoder(torch.empty(1, 3, size, size, dtype=torch.uint8, device="meta")).shape == (1, features, 1024)


def test_resampling_keeps_the_trained_embeddings_shape_and_class_token():
    encoder = VisionEncoder(get_config("owl-tiny").vision, pretrained=False)  # 32 px, patch 8: 4×4 + CLS
    trained = encoder.model.pos_embed.detach().clone()
    assert resample_position_embeddings(encoder.model, 48)  # 6×6 + CLS
    assert encoder.model.pos_embed.shape == (1, 37, 48) and torch.equal(encoder.model.pos_embed[0, 0], trained[0, 0])
    assert encoder.model(torch.zeros(1, 3, 48, 48)).shape[1] == 37
    assert not resample_position_embeddings(encoder.model, 48)  # already there
    smol = VisionEncoder(get_config("owl-smol").vision, pretrained=False)
    assert not resample_position_embeddings(smol.model, 256)  # a CNN takes any size as it is


# -- paper scale on meta -----------------------------------------------------------------------------


def test_owl_llama7b_anyres336_builds_on_meta_and_counts_its_tiles():
    config = get_config("owl-llama7b-anyres336")
    assert OwlConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with torch.device("meta"):
        model = build_owl(config, pretrained=False)
        paper = build_owl(get_config("owl-llama7b"), pretrained=False)
    assert model.abstractor.row_separator.weight.shape == (1, 4096) and paper.abstractor.row_separator is None
    assert model.vision.input_size == (3, 336, 336) and model.vision.model.pos_embed.shape == (1, 577, 1024)
    extra = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in paper.parameters())
    assert extra == 4096 + (577 - 257) * 1024  # the separator and the resampled position embeddings

    flops = StepFlops.of(model)
    assert flops.per_view > StepFlops.of(paper).per_view * 2  # 577 features a view instead of 257
    image = model.image_token_id
    batch = {
        "input_ids": torch.tensor([[1, image, 5, 6], [1, image, 5, 0]]),
        "sample_ids": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
        "image_counts": torch.tensor([1, 1]),
        "image_grids": torch.tensor([[2, 2], [1, 3]]),
    }
    assert sequence_lengths(batch, flops.visual_tokens_per_image, image).tolist() == [3 + 327, 2 + 261]
    text = flops.per_token * (330 + 263) + flops.per_causal_pair * (330 * 331 + 263 * 264) / 2
    assert flops.step(batch, 0) == pytest.approx(9 * flops.per_view + text)  # 1 + 4 and 1 + 3 views


# -- the counts that follow the grid: template and packing ---------------------------------------------


def test_the_template_fits_text_around_each_images_own_token_count(anyres_tokenizer):
    template = ConversationTemplate(anyres_tokenizer, system_prompt=None, visual_tokens_per_image=5, max_length=40)
    caption = "a red and blue picture " * 4
    ids, labels = template.encode_caption(caption, image_tokens=27)
    assert template.expanded_length(ids, [27]) == 40 and ids.count(template.image_token_id) == 1
    single, _ = template.encode_caption(caption)
    assert len(single) - len(ids) == 27 - 5
    conversation = Conversation([Turn("user", "<image>\n<image>\nWhich is wider?"), Turn("assistant", "the first")], ["a", "b"])

    def template(max_length: int) -> ConversationTemplate:
        return ConversationTemplate(anyres_tokenizer, system_prompt=None, visual_tokens_per_image=5, max_length=max_length)

    ids, _, kept = template(1000).encode(conversation, [16, 27])
    full = template(1000).expanded_length(ids, [16, 27])
    assert kept == 2 and full == template(1000).expanded_length(ids) + 11 + 22
    prompt_only = full - len("the first") - 1  # the answer and its EOS cut off
    assert template(prompt_only).encode(conversation)[2] == 2  # at 5 tokens an image, the answer still fits
    with pytest.raises(SkipSample, match=f"max_length={prompt_only}"):  # at the tiles' 16 and 27 it does not
        template(prompt_only).encode(conversation, [16, 27])


def test_packing_counts_tiled_images_at_their_size():
    tiles = AnyResTiles(get_config("owl-tiny-anyres").vision, [[1, 2], [2, 2]])
    wide, square = tiles(halves(64, 32)), tiles(halves(64, 64))  # 16 and 27 tokens at V = 5
    samples = [EncodedSample([1, IMG, 2], [IGNORE_INDEX, 2, 3], [image]) for image in (wide, square, wide)]
    batch = collate(samples, pad_token_id=0, pack_visual_tokens_per_image=5)
    lengths = sorted(sequence_lengths(batch, 5, IMG).tolist())
    assert lengths == [18, 18, 29]  # 2 text tokens each plus 16, 16, 27 visual tokens
    assert batch["images"].shape == (3 + 3 + 5, 3, 32, 32) and batch["images"].is_contiguous(memory_format=torch.channels_last)
    assert batch["image_grids"].tolist() in ([[2, 2], [1, 2], [1, 2]], [[1, 2], [2, 2], [1, 2]], [[1, 2], [1, 2], [2, 2]])


# -- end to end on owl-tiny --------------------------------------------------------------------------


@pytest.fixture
def aspect_manifest(tmp_path):
    """LLaVA records over wide, tall and square images, so every batch mixes tile grids."""
    images = tmp_path / "images"
    images.mkdir()
    records = []
    for i, size in enumerate([(64, 32), (32, 64), (64, 64), (48, 40)] * 2):
        halves(*size).save(images / f"{i}.png")
        wider = "wide" if size[0] > size[1] else "tall" if size[1] > size[0] else "square"
        records.append(
            {
                "id": str(i),
                "image": f"{i}.png",
                "conversations": [{"from": "human", "value": "<image>\nWhat shape is it?"}, {"from": "gpt", "value": wider}],
            }
        )
    (tmp_path / "llava.json").write_text(json.dumps(records))
    manifest = tmp_path / "instructions.yaml"
    source = {"name": "shapes", "format": "llava", "path": "llava.json", "image_root": "images"}
    manifest.write_text(yaml.safe_dump({"train": [{**source, "weight": 1}], "val": [source]}))
    return manifest


def test_anyres_trains_on_images_of_different_aspect_ratios(tmp_path, aspect_manifest):
    system = tiny_system("stage2", config="owl-tiny-anyres", warmup_steps=0)
    data = InstructionDataModule(manifest=str(aspect_manifest), processor=system.processor, batch_size=4, num_workers=0)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    grids = {tuple(grid) for grid in batch["image_grids"].tolist()}
    assert len(grids) > 1 and batch["images"].shape[0] == int((1 + batch["image_grids"].prod(1)).sum())
    losses, separators = [], []

    class Record(L.Callback):
        def on_train_start(self, trainer, pl_module):
            separators.append(pl_module.model.abstractor.row_separator.weight.detach().clone())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    fit(system, data, tmp_path, steps=3, callbacks=[Record()])
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert not torch.equal(system.model.abstractor.row_separator.weight.detach(), separators[0])  # it trained


def test_assistant_answers_about_images_of_different_shapes(anyres_model, anyres_tokenizer):
    assistant = OwlAssistant(anyres_model, anyres_tokenizer, precision="fp32")
    requests = [Request.single("What shape?", [halves(64, 32)]), Request.single("And this?", [halves(32, 64)])]
    samples = [assistant.encode(request) for request in requests]
    assert [(image.rows, image.cols) for sample in samples for image in sample.images] == [(1, 2), (2, 1)]
    assert assistant.prompt_tokens(samples[0]) == len(samples[0].input_ids) - 1 + 16
    assert [assistant.image_tokens(image) for image in (halves(64, 32), halves(64, 64))] == [16, 27]
    answers = assistant.answer(requests, max_new_tokens=4)
    assert len(answers) == 2 and all(isinstance(answer, str) for answer in answers)
    scores = assistant.reply_likelihoods(requests[0], ["wide", "tall"])  # multiple choice over the same tiles
    assert len(scores) == 2 and all(math.isfinite(total) and total < 0 for total, _ in scores)


def test_stage1_captions_leave_room_for_the_tiles(tmp_path, caption_manifest):
    system = tiny_system("stage1", config="owl-tiny-anyres", warmup_steps=0)
    data = CaptionDataModule(manifest=str(caption_manifest), processor=system.processor, batch_size=4, num_workers=0, max_length=20)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    # 32 px squares: every grid keeps all their pixels, 1×2 and 2×1 waste the least, 1×2 is listed first: 16 tokens
    assert batch["image_grids"].tolist() == [[1, 2]] * 4 and batch["images"].shape == (12, 3, 32, 32)
    assert sequence_lengths(batch, 5, system.processor.tokenizer.convert_tokens_to_ids("<image>")).max() <= 20
    fit(system, data, tmp_path, steps=2)


def test_describe_shows_the_token_range(capsys):
    from owl_lightning.cli import main

    main(["describe", "owl-tiny-anyres"])
    assert "5–27 (anyres) visual tokens per image" in capsys.readouterr().out


def test_a_checkpoint_trained_at_another_size_continues_at_this_one(anyres_tokenizer):
    trained = build_owl(get_config("owl-tiny"), tokenizer=anyres_tokenizer)  # 32 px: 4×4 patches + CLS
    state = {f"model.{key}": value for key, value in trained.state_dict().items() if key.startswith(("vision.", "abstractor."))}
    larger = build_owl(get_config("owl-tiny-anyres", {"vision.image_size": 48}), tokenizer=anyres_tokenizer)  # 6×6 + CLS
    load_model_weights(larger, state, "stage1.ckpt")
    assert larger.vision.model.pos_embed.shape == (1, 37, 48)
    assert torch.equal(larger.vision.model.pos_embed[0, 0], trained.vision.model.pos_embed[0, 0])  # the class token's as trained
    assert torch.equal(larger.abstractor.queries, trained.abstractor.queries)
