import pytest
import torch

from owl_lightning.config import IGNORE_INDEX
from owl_lightning.models.owl import TokenLayout

IMG = 99


def embed(ids):
    return ids.float()[..., None].expand(*ids.shape, 3).clone()  # embedding of token t = [t, t, t]


def visual(m, v=2):
    return -(torch.arange(m * v, dtype=torch.float) + 1).reshape(m, v, 1).expand(m, v, 3).clone()


def splice_visual_tokens(ids, mask, text_embeds, vis, image_token_id, labels=None, image_counts=None, padding_side="right"):
    layout = TokenLayout.of(ids, mask, vis.shape[0], vis.shape[1], image_token_id, labels, image_counts, padding_side)
    return layout.splice(text_embeds, vis), layout.mask, layout.labels


def test_placeholders_become_visual_tokens_in_order_and_text_stays():
    ids = torch.tensor([[1, IMG, 5, IMG, IMG, 6]])
    mask = torch.ones_like(ids)
    labels = torch.tensor([[-100, -100, -100, -100, -100, 6]])
    vis = visual(3)
    out, out_mask, out_labels = splice_visual_tokens(ids, mask, embed(ids), vis, IMG, labels)
    assert out.shape == (1, 3 + 3 * 2, 3)
    # text 1, image 0 (2 tokens), text 5, image 1, image 2 (adjacent stays two images), text 6
    assert out[0, :, 0].tolist() == [1, -1, -2, 5, -3, -4, -5, -6, 6]
    assert out_mask.tolist() == [[1] * 9]
    assert out_labels[0, :8].eq(IGNORE_INDEX).all() and out_labels[0, 8] == 6


def test_mixed_text_only_and_multimodal_batch_right_padding():
    ids = torch.tensor([[1, IMG, 7, 0], [1, 8, 9, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])
    labels = torch.tensor([[-100, -100, 7, -100], [-100, 8, 9, -100]])
    out, out_mask, out_labels = splice_visual_tokens(ids, mask, embed(ids), visual(1, v=3), IMG, labels, torch.tensor([1, 0]))
    assert out.shape == (2, 5, 3)
    assert out[0, :, 0].tolist() == [1, -1, -2, -3, 7]
    assert out[1, :3, 0].tolist() == [1, 8, 9] and out_mask[1].tolist() == [1, 1, 1, 0, 0]
    assert out_labels[0].tolist() == [-100, -100, -100, -100, 7]
    assert out_labels[1].tolist() == [-100, 8, 9, -100, -100]


def test_left_padding_aligns_the_ends_of_expanded_sequences():
    ids = torch.tensor([[0, 1, IMG], [1, 8, 9]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    out, out_mask, _ = splice_visual_tokens(ids, mask, embed(ids), visual(1, v=3), IMG, padding_side="left")
    assert out_mask.tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
    assert out[0, :, 0].tolist() == [1, -1, -2, -3]
    assert out[1, 1:, 0].tolist() == [1, 8, 9]


def test_count_mismatch_names_the_sample():
    ids = torch.tensor([[1, IMG], [1, 2]])
    mask = torch.ones_like(ids)
    with pytest.raises(ValueError, match="sample 1 .* 0 <image> placeholders but 1 images"):
        splice_visual_tokens(ids, mask, embed(ids), visual(2), IMG, image_counts=torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="1 <image> placeholders but 2 images"):
        splice_visual_tokens(ids, mask, embed(ids), visual(2), IMG)


def test_model_embeddings_at_image_positions_equal_the_abstractor_output(tiny_model, tiny_tokenizer):
    tok = tiny_tokenizer
    image_id = tiny_model.image_token_id
    ids = torch.tensor([[tok.bos_token_id, image_id, image_id, 65, 66]])
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    tiny_model.eval()
    embeds, mask, _ = tiny_model.embed(ids, torch.ones_like(ids), images)
    v = tiny_model.visual_tokens_per_image
    expected = tiny_model.encode_images(images)
    torch.testing.assert_close(embeds[0, 1 : 1 + v], expected[0])
    torch.testing.assert_close(embeds[0, 1 + v : 1 + 2 * v], expected[1])
    text = tiny_model.llm.get_input_embeddings()(ids)
    torch.testing.assert_close(embeds[0, 0], text[0, 0])
    torch.testing.assert_close(embeds[0, -2:], text[0, -2:])


def test_loss_is_finite_and_zero_without_supervision(tiny_model, tiny_tokenizer):
    ids = torch.tensor([[tiny_tokenizer.bos_token_id, tiny_model.image_token_id, 70, 71, 72]])
    mask = torch.ones_like(ids)
    images = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    out = tiny_model(ids, mask, torch.tensor([[-100, -100, 70, 71, 72]]), images)
    assert torch.isfinite(out.loss) and out.num_supervised == 3
    assert out.num_tokens == 4 + tiny_model.visual_tokens_per_image
    empty = tiny_model(ids, mask, torch.full_like(ids, -100), images)
    assert empty.num_supervised == 0 and empty.loss.item() == 0.0
    empty.loss.backward()  # a graph to run backward on (every DDP/FSDP rank must), with zero gradients
    assert all(p.grad is None or not p.grad.any() for p in tiny_model.parameters())


def test_loss_matches_full_logits_cross_entropy(tiny_model, tiny_tokenizer):
    """Computing logits only at supervised positions must not change the loss."""
    tiny_model.eval()
    ids = torch.tensor([[1, tiny_model.image_token_id, 70, 71, 72], [1, 80, 81, 82, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    labels = torch.tensor([[-100, -100, -100, 71, 72], [-100, -100, 81, 82, -100]])
    images = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    out = tiny_model(ids, mask, labels, images)
    embeds, emask, elabels = tiny_model.embed(ids, mask, images, labels)
    logits = tiny_model.llm(inputs_embeds=embeds, attention_mask=emask).logits
    reference = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), elabels[:, 1:].flatten())
    torch.testing.assert_close(out.loss, reference)
