"""Batches leave DataLoader workers by value, with the layout they had (data/transfer.py)."""

import pickle

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from owl_lightning.data.collate import EncodedSample, collate
from owl_lightning.data.transfer import send_batches_by_value, tensor_by_value


def through_pickle(tensor: torch.Tensor) -> torch.Tensor:
    rebuild, args = tensor_by_value(tensor)
    return rebuild(*pickle.loads(pickle.dumps(args, protocol=5)))


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randint(0, 255, (4, 3, 8, 8), dtype=torch.uint8).contiguous(memory_format=torch.channels_last),
        lambda: torch.arange(24).view(2, 12),
        lambda: torch.randn(5, 3).to(torch.bfloat16),
        lambda: torch.tensor([True, False, True]),
        lambda: torch.empty(0, 7),
        lambda: torch.arange(30.0).view(5, 6)[1:4, ::2],  # a strided view with an offset
    ],
)
def test_tensor_round_trip_keeps_values_and_layout(make):
    tensor = make()
    original = tensor.clone()
    copy = through_pickle(tensor)
    assert copy.dtype == tensor.dtype and copy.shape == tensor.shape and copy.stride() == tensor.stride()
    assert torch.equal(copy, tensor)
    copy.zero_()  # writable, and its own memory
    assert torch.equal(tensor, original)


def test_tensors_in_autograd_go_torchs_way():
    rebuild, _ = tensor_by_value(torch.ones(2, requires_grad=True))
    assert rebuild.__module__ == "torch.multiprocessing.reductions"


class OneBatch(IterableDataset):
    def __iter__(self):
        image = torch.arange(3 * 4 * 4, dtype=torch.uint8).view(3, 4, 4)
        yield collate([EncodedSample([1, 2, 3], [-100, 2, 3], [image], "s")], pad_token_id=0)


@pytest.mark.parametrize("by_value", [True, False])
def test_worker_batches_arrive_whole_and_by_value(by_value):
    loader = DataLoader(OneBatch(), batch_size=None, num_workers=1, worker_init_fn=send_batches_by_value if by_value else None)
    (batch,) = list(loader)
    expected = next(iter(OneBatch()))
    assert torch.equal(batch["input_ids"], expected["input_ids"]) and torch.equal(batch["images"], expected["images"])
    assert batch["images"].is_contiguous(memory_format=torch.channels_last)
    # torch's own way puts every tensor in shared memory; by value, none is.
    assert batch["images"].is_shared() != by_value and batch["labels"].is_shared() != by_value
