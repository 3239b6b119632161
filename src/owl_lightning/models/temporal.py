"""The video frames' learned temporal embedding (docs/video.md).

A clip's ``F`` frames go through the encoder as ``F`` views; before the connector summarises each
frame, every encoder feature of frame ``f`` gets row ``f`` of this table added, so that a frame's
visual tokens carry where in the clip it stands. Zero at initialisation, as the official video
variant's temporal modules are: a model starts out reading frames as the image model reads them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TemporalEmbedding(nn.Module):
    """``weight`` ``[num_frames, D]``: one learned vector per frame number, ``D`` the encoder's feature width.

    A module of its own, and its own FSDP unit (train/parallel.py): it runs before the connector's
    forward, where the connector's unit has not gathered its parameters."""

    def __init__(self, num_frames: int, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_frames, width))

    def forward(self, features: torch.Tensor, view_frames: torch.Tensor) -> torch.Tensor:
        """Encoder features ``[T, N, D]`` of ``T`` views and each view's frame number ``[T]`` (-1: a still
        image's view, which gets nothing) → ``[T, N, D]``."""
        # A zero row appended for the stills (index -1 picks it): every view adds a row, so the weight is
        # in the graph (FSDP/DDP reduce its gradient) whether or not the batch holds clips.
        table = F.pad(self.weight, (0, 0, 0, 1))
        return features + table[view_frames].to(features.dtype)[:, None]
