"""The visual abstractor (mPLUG-Owl, DESIGN §2).

Learned queries summarise a variable number of visual features into a short, fixed
sequence of visual tokens in the LLM's embedding space::

    features [B, N, Dv] ─(input proj if Dv ≠ H)→ [B, N, H]
    queries  [1, Q, H] → for each layer:
        q   = LN_q(queries);  ctx = LN_k(features)
        att = MultiHeadAttention(query=q, key/value=concat(q, ctx))   # no separate self-attention
                                                    # (feature_positions="sincos2d": the keys of ctx get + P)
        x   = q + out_proj(att)                                       # residual on the normed queries, as the official code
        x   = x + SwiGLU(LN_ffn(x))                                   # SwiGLU with an inner LayerNorm
    → proj to the LLM width [B, Q, Dllm] → append one learned end-of-image token → [B, Q + 1, Dllm]
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from owl_lightning.config import AbstractorConfig


class _SwiGLU(nn.Module):
    """``w2(LN(silu(w1 x) * w3 x))``: ``[..., H] → [..., H]`` through width ``I``."""

    def __init__(self, hidden: int, intermediate: int, eps: float) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden, intermediate)
        self.w3 = nn.Linear(hidden, intermediate)
        self.inner_norm = nn.LayerNorm(intermediate, eps=eps)
        self.w2 = nn.Linear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.inner_norm(F.silu(self.w1(x)) * self.w3(x)))


class _AbstractorLayer(nn.Module):
    def __init__(self, cfg: AbstractorConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        if h % cfg.num_heads:
            raise ValueError(f"abstractor.hidden_size={h} is not divisible by abstractor.num_heads={cfg.num_heads}")
        self.num_heads = cfg.num_heads
        self.dropout = cfg.attention_dropout
        self.query_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.context_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.q_proj = nn.Linear(h, h)
        self.k_proj = nn.Linear(h, h)
        self.v_proj = nn.Linear(h, h)
        self.out_proj = nn.Linear(h, h)
        self.ffn_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.ffn = _SwiGLU(h, cfg.intermediate_size, cfg.inner_norm_eps)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, H] → [B, heads, L, H/heads]
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(self, queries: torch.Tensor, context: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """queries ``[B, Q, H]``, context ``[B, N, H]``, positions ``[N, H]`` added to the context's keys
        (None: none) → ``[B, Q, H]``."""
        q = self.query_norm(queries)
        context = self.context_norm(context)
        keys = values = torch.cat([q, context], dim=1)  # [B, Q + N, H]
        if positions is not None:
            keys = torch.cat([q, context + positions.to(context.dtype)], dim=1)
        attended = F.scaled_dot_product_attention(
            self._heads(self.q_proj(q)),
            self._heads(self.k_proj(keys)),
            self._heads(self.v_proj(values)),
            dropout_p=self.dropout if self.training else 0.0,
        )
        x = q + self.out_proj(attended.transpose(1, 2).flatten(2))
        return x + self.ffn(self.ffn_norm(x))


class VisualAbstractor(nn.Module):
    """Visual features ``[B, N, vision_width]`` → visual tokens ``[B, num_queries + 1, llm_width]``."""

    def __init__(self, cfg: AbstractorConfig, vision_width: int, llm_width: int) -> None:
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        # The paper's ViT-L width equals the abstractor's (1024); other encoders need a projection
        # because keys/values concatenate queries and features along the sequence.
        self.input_proj = nn.Linear(vision_width, h) if vision_width != h else nn.Identity()
        # Random, not zero: identical queries would receive identical gradients and never differ.
        self.queries = nn.Parameter(torch.randn(1, cfg.num_queries, h) * 0.02)
        self.layers = nn.ModuleList(_AbstractorLayer(cfg) for _ in range(cfg.num_layers))
        self.proj = nn.Linear(h, llm_width)
        self.end_token = nn.Parameter(torch.randn(1, 1, llm_width) * 0.02)

    @property
    def num_tokens(self) -> int:
        return self.cfg.num_queries + 1

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        context = self.input_proj(features)
        positions = None
        if self.cfg.feature_positions == "sincos2d":
            positions = grid_positions(features.shape[1], context.shape[-1], context.device)
        x = self.queries.expand(features.shape[0], -1, -1)
        for layer in self.layers:
            x = layer(x, context, positions)
        tokens = self.proj(x)
        return torch.cat([tokens, self.end_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype)], dim=1)


def grid_positions(num_features: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Fixed 2-D sin-cos positions ``[N, width]`` of an image's ``N`` features in row-major order (MAE's
    embedding: half the channels encode the row, half the column). ``N`` is a square grid ``s × s`` (a CNN's
    feature map) or ``1 + s × s`` (a ViT's class token first, which gets zeros)."""
    side = math.isqrt(num_features)
    prefix = num_features - side * side
    if prefix not in (0, 1) or width % 4:
        raise ValueError(
            f"abstractor.feature_positions='sincos2d' needs N = s*s or 1 + s*s features per image and a hidden "
            f"size divisible by 4; got N={num_features}, hidden_size={width}: use feature_positions='none'"
        )
    frequencies = 1.0 / 10000 ** (torch.arange(width // 4, device=device, dtype=torch.float32) / (width // 4))
    coordinates = torch.arange(side, device=device, dtype=torch.float32)
    rows, cols = torch.meshgrid(coordinates, coordinates, indexing="ij")  # [s, s] each

    def encode(values: torch.Tensor) -> torch.Tensor:  # [s*s] → [s*s, width/2]
        angles = values.flatten()[:, None] * frequencies[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    grid = torch.cat([encode(rows), encode(cols)], dim=1)  # [s*s, width]
    return torch.cat([grid.new_zeros(prefix, width), grid])
