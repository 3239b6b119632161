"""One evaluation split over processes: ``torchrun --nproc-per-node N owl-lightning eval|owleval ...``.

Every process loads the model on a device of its own (``cuda:LOCAL_RANK`` on GPUs, the CPU otherwise) and
answers every N-th question; the answers are gathered back into the questions' order on every process,
so scoring sees exactly what one process would have answered, and only rank 0 writes, logs and prints.
torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) is all
it takes; without it, one process does everything and nothing here communicates.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import TypeVar

import torch
import torch.distributed as dist

from owl_lightning.inference import LoadOptions, default_device

T = TypeVar("T")


@dataclass(frozen=True)
class Processes:
    """This process's place among the evaluating processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> Processes:
        """The processes torchrun started (joining their process group: NCCL on GPUs, gloo on CPUs), or one."""
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            return cls()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            if torch.cuda.is_available():
                torch.cuda.set_device(local_rank)  # NCCL's collectives run on the current device
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), local_rank)

    @property
    def is_main(self) -> bool:
        """Whether this process writes the results (rank 0)."""
        return self.rank == 0

    def load_options(self, load: LoadOptions) -> LoadOptions:
        """``load`` with this process's GPU when the device is (or defaults to) ``cuda``."""
        device = load.device or default_device()
        if self.world_size > 1 and device == "cuda":
            device = f"cuda:{self.local_rank}"
        return replace(load, device=device)

    def share(self, items: list[T]) -> list[T]:
        """This process's items: every ``world_size``-th, from its rank on."""
        return items[self.rank :: self.world_size]

    def gather(self, mine: list[T]) -> list[T]:
        """Every process's :meth:`share` (each answered in its order) back in the order of the items shared;
        on every process."""
        if self.world_size == 1:
            return list(mine)
        shares: list[list[T] | None] = [None] * self.world_size
        dist.all_gather_object(shares, mine)
        total = sum(len(share) for share in shares)
        return [shares[index % self.world_size][index // self.world_size] for index in range(total)]


SINGLE = Processes()
