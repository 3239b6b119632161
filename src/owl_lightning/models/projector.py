"""LLaVA-1.5's connector: a two-layer MLP that maps every encoder token into the LLM's embedding space.

The alternative to the visual abstractor (``OwlConfig.connector: mlp``). It keeps all ``N`` tokens the
encoder gives (a ViT's patches and CLS, a CNN's ``h × w`` positions), so an image costs the LLM ``N``
positions instead of the abstractor's ``num_queries + 1``::

    features [M, N, Dv] → Linear(Dv, Dllm) → GELU → Linear(Dllm, Dllm) → visual tokens [M, N, Dllm]
"""

from __future__ import annotations

import torch
from torch import nn


class MLPProjector(nn.Module):
    """``[M, N, Dv]`` encoder features → ``[M, N, Dllm]`` visual tokens (LLaVA-1.5's ``mlp2x_gelu``).

    Args:
        num_tokens: ``N``, the tokens the encoder gives per image (the visual tokens per image).
        vision_width: ``Dv``, the encoder's feature width. llm_width: ``Dllm``.
    """

    def __init__(self, num_tokens: int, vision_width: int, llm_width: int) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.fc1 = nn.Linear(vision_width, llm_width)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(llm_width, llm_width)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.shape[1] != self.num_tokens:
            raise ValueError(
                f"the MLP projector was built for {self.num_tokens} encoder tokens per image, got {features.shape[1]}: "
                "the images must have the size the vision config gives"
            )
        return self.fc2(self.act(self.fc1(features)))
