"""Training FLOPs of one step, counted over the batch's real tokens, and the peak rate that turns
them into MFU (model FLOPs utilisation).

Model FLOPs (PaLM's convention): what the step must compute. Activation-checkpointing recompute and
the padding positions a batch carries are not counted, so MFU falls when they cost time.

Forward FLOPs ``F``, per image view and per sequence of ``L`` real tokens (text plus each image's
visual tokens: ``V``, or under AnyRes ``V·(1 + rows·cols) + rows`` for ``1 + rows·cols`` views, or for a
video clip ``F·V`` for its ``F`` frames, each a view):

    vision encoder, abstractor   counted per view (an image, or an AnyRes image's global view or one
                                 of its tiles) by running them once on a fake view under
                                 ``FlopCounterMode`` (fake tensors: no compute, any architecture)
    LLM matrices                 2 · P · L, P = the LLM's matrix parameters (decoder blocks, LoRA's
                                 A and B included; the embedding tables are lookups, not products)
    LLM attention                2 · 2 · layers · (heads · head_dim) · L(L+1)/2: QKᵀ and the
                                 weighted sum over each token's causal prefix
    LM head                      2 · d · vocab per supervised token (the logits the loss reads)

Backward: a matrix product's backward is the input gradient (F) plus the weight gradient (F), the
latter only for trainable weights; a frozen module costs F in backward when a gradient has to pass
through it to something trainable before it, nothing when not. Attention has no weights: its
backward is 2F (gradients to both operands) whenever a gradient passes through. Hence per module:
trainable 3F; frozen, gradient passing through 2F (its attention 3F); frozen, no gradient 1F.
For the vision encoder and abstractor, whose per-image F mixes products and attention, frozen
with a gradient passing through counts 2F.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from owl_lightning.config import views_of_grid, visual_tokens_of_grid
from owl_lightning.models.owl import OwlModel
from owl_lightning.models.vision import vision_data_config


@dataclass(frozen=True)
class StepFlops:
    """Training FLOPs (forward + backward) of an :class:`OwlModel` per unit of work.

    Build it with :meth:`of` after the freeze policy is applied (trainability sets the backward cost).
    """

    per_view: float  # vision encoder + abstractor, per view (an image, or an AnyRes global view or tile)
    per_token: float  # LLM matrices
    per_causal_pair: float  # LLM attention, per (query, key) pair with key ≤ query
    per_supervised_token: float  # LM head
    visual_tokens_per_image: int
    image_token_id: int

    @classmethod
    def of(cls, model: OwlModel) -> StepFlops:
        vision_forward, abstractor_forward = forward_flops_per_view(model)
        vision_trains, abstractor_trains = _trains(model.vision), _trains(model.abstractor)
        vision = vision_forward * (3 if vision_trains else 1)
        abstractor = abstractor_forward * (3 if abstractor_trains else 2 if vision_trains else 1)

        llm = model.llm
        tables = {id(m.weight) for m in (llm.get_input_embeddings(), llm.get_output_embeddings()) if m is not None}
        matrices = [p for p in llm.parameters() if p.ndim >= 2 and id(p) not in tables]
        # Something is always trained in a step, so a gradient passes through the whole LLM (at worst
        # this counts the first block's input gradient when only LoRA trains).
        per_token = sum(2 * p.numel() * (3 if p.requires_grad else 2) for p in matrices)
        config = llm.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        # QKᵀ and the weighted sum, 2 FLOPs per multiply-add, in every layer; backward 2F (no weights).
        per_pair = 2 * 2 * config.num_hidden_layers * config.num_attention_heads * head_dim * 3
        head = llm.get_output_embeddings().weight
        per_supervised = 2 * head.numel() * (3 if head.requires_grad else 2)
        return cls(vision + abstractor, per_token, per_pair, per_supervised, model.visual_tokens_per_image, model.image_token_id)

    def step(self, batch: dict, num_supervised: int) -> float:
        """Training FLOPs of one collated batch (``input_ids``/``sample_ids`` ``[B, T]``, ``image_grids``
        ``[M, 2]``, ``image_frames`` ``[M]``): real tokens only, each ``<image>`` counted as its visual tokens, every view through the
        encoder and abstractor, attention within each sample (packed rows hold several). ``num_supervised``:
        the positions the loss reads logits at (``OwlOutput.num_supervised``)."""
        lengths = sequence_lengths(batch, self.visual_tokens_per_image, self.image_token_id).double()
        return (
            num_views(batch) * self.per_view
            + float(lengths.sum()) * self.per_token
            + float((lengths * (lengths + 1) / 2).sum()) * self.per_causal_pair
            + num_supervised * self.per_supervised_token
        )


def sequence_lengths(batch: dict, visual_tokens_per_image: int, image_token_id: int) -> torch.Tensor:
    """``[S]`` real tokens of each sample as the LLM sees them: text without padding, each ``<image>``
    as its visual tokens (V a view; ``image_grids`` ``[M, 2]`` gives each image's AnyRes tiles,
    ``image_frames`` ``[M]`` each clip's frames). A packed row's ``sample_ids`` numbers its samples 1, 2, …
    (0: padding)."""
    sample = batch["sample_ids"]
    is_image = (batch["input_ids"] == image_token_id) & (sample > 0)
    tokens = (sample > 0).long()
    # nonzero order (row-major) is the images' order; a batch of fewer grids than placeholders is the layout's error to report
    tokens[is_image] = visual_tokens_of_grid(visual_tokens_per_image, *image_grids(batch).unbind(1), image_frames(batch))
    per_sample = torch.zeros(sample.shape[0], int(sample.max()) + 1, dtype=torch.long, device=sample.device)
    per_sample.scatter_add_(1, sample, tokens)
    lengths = per_sample[:, 1:].flatten()
    return lengths[lengths > 0]


def image_grids(batch: dict) -> torch.Tensor:
    """``[M, 2]`` each image's (rows, cols) of AnyRes tiles: collate's ``image_grids``; a batch made without
    them (by hand) holds single views, ``(0, 0)``."""
    if "image_grids" in batch:
        return batch["image_grids"]
    return torch.zeros(int(batch["image_counts"].sum()), 2, dtype=torch.long)


def image_frames(batch: dict) -> torch.Tensor:
    """``[M]`` each clip's frames (1: a still): collate's ``image_frames``; a batch made without them holds stills."""
    if "image_frames" in batch:
        return batch["image_frames"]
    return torch.ones(len(image_grids(batch)), dtype=torch.long)


def num_views(batch: dict) -> int:
    """Views the batch sends through the encoder and connector: an image's 1 (AnyRes ``1 + rows·cols``), a clip's frames."""
    return int(views_of_grid(*image_grids(batch).unbind(1), image_frames(batch)).sum())


def forward_flops_per_view(model: OwlModel) -> tuple[float, float]:
    """Forward FLOPs of the vision encoder and of the abstractor for one image view.

    Runs both on a fake ``[1, 3, H, W]`` image: shapes propagate, nothing is computed or allocated.
    Call before sharding (FSDP's hooks would start collectives).
    """
    size = vision_data_config(model.config.vision)["input_size"]
    # FlopCounterMode knows the GPU attention kernels but not the CPU one that fake CPU tensors pick.
    cpu_attention = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops}
    with FakeTensorMode(allow_non_fake_inputs=True):
        image = torch.zeros(1, *size, dtype=torch.uint8, device=model.vision.mean.device)  # cpu, or meta
        with FlopCounterMode(display=False, custom_mapping=cpu_attention) as vision:
            features = model.vision(image)
        with FlopCounterMode(display=False, custom_mapping=cpu_attention) as abstractor:
            model.abstractor(features)
    return float(vision.get_total_flops()), float(abstractor.get_total_flops())


def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def measure_matmul_flops(device: torch.device | str, dtype: torch.dtype, size: int = 2048, repeats: int = 3) -> float:
    """FLOP/s of the best of ``repeats`` ``size × size`` matrix products (2·size³ FLOPs each), after a warm-up.

    The CPU's peak for MFU: no datasheet figure fits a shared, throttled CPU; what its BLAS reaches
    on a large product does. (On GPUs use the datasheet's dense figure: ``peak_flops``.)
    """
    device = torch.device(device)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best = float("inf")
    for attempt in range(repeats + 1):
        _synchronize(device)
        start = time.perf_counter()
        a @ b
        _synchronize(device)
        if attempt:  # the first one warms up
            best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
