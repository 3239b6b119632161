"""Packing several samples into a row: the same loss and gradients as one sample a row, far less padding."""

import pytest
import torch

from owl_lightning.config import IGNORE_INDEX, get_config
from owl_lightning.data.collate import EncodedSample, collate
from owl_lightning.models.owl import build_owl, packed_positions
from owl_lightning.train.flops import StepFlops, sequence_lengths

V = 5  # visual tokens per image in these collate-only tests


def sample(length: int, images: int = 0, first: int = 10, source: str = "s") -> EncodedSample:
    ids = [first + i for i in range(length)]
    ids[1 : 1 + images] = [3] * images  # <image> placeholders (id 3 here)
    labels = [IGNORE_INDEX] * (length // 2) + ids[length // 2 :]
    pixels = [torch.full((3, 4, 4), (first + i) % 256, dtype=torch.uint8) for i in range(images)]
    return EncodedSample(ids, labels, pixels, source)


def expanded(s: EncodedSample) -> int:
    return len(s.input_ids) + len(s.images) * (V - 1)


def test_padding_right_and_left_keeps_tokens_labels_and_mask_together():
    samples = [sample(6, 1, first=10), sample(3, first=20)]
    for side in ("right", "left"):
        batch = collate(samples, pad_token_id=0, padding_side=side)
        assert batch["input_ids"].shape == batch["labels"].shape == batch["sample_ids"].shape == (2, 6)
        real = slice(0, 3) if side == "right" else slice(3, 6)
        pad = slice(3, 6) if side == "right" else slice(0, 3)
        assert batch["input_ids"][1, real].tolist() == samples[1].input_ids
        assert batch["labels"][1, real].tolist() == samples[1].labels
        assert batch["sample_ids"][1].tolist()[real] == [1, 1, 1] and batch["sample_ids"][1].tolist()[pad] == [0, 0, 0]
        assert batch["input_ids"][1, pad].tolist() == [0, 0, 0] and batch["labels"][1, pad].tolist() == [IGNORE_INDEX] * 3
        assert batch["input_ids"][0].tolist() == samples[0].input_ids and batch["sample_ids"][0].tolist() == [1] * 6
    assert batch["image_counts"].tolist() == [1, 0] and batch["images"].shape == (1, 3, 4, 4)


def test_packed_rows_hold_every_sample_once():
    samples = [
        sample(40, first=100),
        sample(8, 1, first=200),
        sample(12, first=300),
        sample(6, 1, first=400),
        sample(30, first=500),
        sample(9, first=600),
    ]
    batch = collate(samples, pad_token_id=0, pack_visual_tokens_per_image=V)
    assert batch["input_ids"].shape[0] < len(samples)
    longest = max(expanded(s) for s in samples)
    assert batch["input_ids"].shape[1] <= 4 * longest
    seen = []
    for row in range(batch["input_ids"].shape[0]):
        numbers = batch["sample_ids"][row]
        parts = [batch["input_ids"][row][numbers == k].tolist() for k in range(1, int(numbers.max()) + 1)]
        assert sum(len(p) + p.count(3) * (V - 1) for p in parts) <= 4 * longest
        seen += parts
    assert sorted(seen) == sorted(s.input_ids for s in samples)
    # Images follow their placeholders row by row; labels stay with their tokens.
    order = [int(batch["input_ids"][r][c]) for r, c in (batch["input_ids"] == 3).nonzero().tolist()]
    assert len(order) == batch["images"].shape[0] == int(batch["image_counts"].sum()) == 2
    owner = {s.input_ids[0]: s for s in samples}
    for row in range(batch["input_ids"].shape[0]):
        for k in range(1, int(batch["sample_ids"][row].max()) + 1):
            ids = batch["input_ids"][row][batch["sample_ids"][row] == k].tolist()
            assert batch["labels"][row][batch["sample_ids"][row] == k].tolist() == owner[ids[0]].labels
    assert sorted(batch["source"]) == ["s"] * len(samples)


def test_positions_restart_with_every_packed_sample():
    mask = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    assert packed_positions(mask).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))]


def batches(tiny_tokenizer, tiny_model):
    """The same six samples (three with an image, lengths 7 to 40) padded one a row, and packed."""
    image = tiny_model.image_token_id
    generator = torch.Generator().manual_seed(0)
    samples = []
    for index, (length, images) in enumerate([(40, 0), (9, 1), (14, 1), (7, 0), (25, 1), (11, 0)]):
        ids = (
            [tiny_tokenizer.bos_token_id] + [image] * images + torch.randint(60, 120, (length - 1 - images,), generator=generator).tolist()
        )
        labels = [IGNORE_INDEX] * (length // 2) + ids[length // 2 :]
        pixels = [torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=generator) for _ in range(images)]
        samples.append(EncodedSample(ids, labels, pixels, f"source{index % 2}"))
    pad = tiny_tokenizer.pad_token_id
    return collate(samples, pad), collate(samples, pad, pack_visual_tokens_per_image=tiny_model.visual_tokens_per_image)


def loss_and_grads(model, batch):
    model.zero_grad()
    out = model(batch["input_ids"], batch["sample_ids"], batch["labels"], batch["images"], batch["image_counts"])
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_packed_batch_has_the_loss_and_gradients_of_the_padded_one(tiny_model, tiny_tokenizer):
    tiny_model.eval()  # no dropout: the two forwards must see the same function
    padded, packed = batches(tiny_tokenizer, tiny_model)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]
    out_padded, grads_padded = loss_and_grads(tiny_model, padded)
    out_packed, grads_packed = loss_and_grads(tiny_model, packed)
    assert out_packed.num_supervised == out_padded.num_supervised and out_packed.num_tokens == out_padded.num_tokens
    torch.testing.assert_close(out_packed.loss, out_padded.loss, rtol=1e-5, atol=1e-6)
    assert grads_packed.keys() == grads_padded.keys() and grads_padded
    for name in grads_padded:
        torch.testing.assert_close(grads_packed[name], grads_padded[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_eager_attention_computes_what_sdpa_does(tiny_model, tiny_tokenizer, packed):
    """owl-smol trains with eager attention (faster on CPU): the mask each kernel builds — padding,
    causal, block-diagonal for packed rows — must be the same."""
    eager = build_owl(get_config("owl-tiny", {"llm.attn_implementation": "eager"}), tokenizer=tiny_tokenizer)
    eager.load_state_dict(tiny_model.state_dict())
    assert (eager.llm.config._attn_implementation, tiny_model.llm.config._attn_implementation) == ("eager", "sdpa")
    tiny_model.eval(), eager.eval()
    batch = batches(tiny_tokenizer, tiny_model)[packed]
    out_sdpa, grads_sdpa = loss_and_grads(tiny_model, batch)
    out_eager, grads_eager = loss_and_grads(eager, batch)
    torch.testing.assert_close(out_eager.loss, out_sdpa.loss, rtol=1e-5, atol=1e-6)
    assert grads_eager.keys() == grads_sdpa.keys() and grads_sdpa
    for name in grads_sdpa:
        torch.testing.assert_close(grads_eager[name], grads_sdpa[name], rtol=1e-4, atol=1e-6, msg=name)


def test_packing_removes_most_padding_and_counts_the_same_flops(tiny_model, tiny_tokenizer):
    padded, packed = batches(tiny_tokenizer, tiny_model)
    flops = StepFlops.of(tiny_model)
    lengths = [sequence_lengths(b, flops.visual_tokens_per_image, flops.image_token_id) for b in (padded, packed)]
    assert sorted(lengths[0].tolist()) == sorted(lengths[1].tolist())
    assert flops.step(padded, 10) == flops.step(packed, 10)

    def real_fraction(batch) -> float:
        """Real positions over all positions the LLM computes."""
        _, mask, _ = tiny_model.embed(batch["input_ids"], batch["sample_ids"], batch["images"], batch["labels"], batch["image_counts"])
        return float((mask > 0).float().mean())

    # One 40-token text beside five short samples: padded, most positions are padding.
    assert real_fraction(padded) < 0.5 and real_fraction(packed) > 0.8
