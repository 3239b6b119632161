"""OwlModel: the vision encoder, the abstractor and the LLM as one module tree.

Text carries one ``<image>`` token per image. ``embed`` replaces each of them with that
image's visual tokens, in order — adjacent placeholders stay separate images — and re-aligns
the attention mask and labels to the expanded sequence. A batch may mix text-only and
multimodal samples.

An image is one view (``V`` tokens from the connector: the abstractor's queries and end-of-image
token, or every encoder token under the MLP connector) or, under AnyRes (docs/high_resolution.md),
a global view and a ``rows × cols`` grid of tiles. Every view goes through the encoder and the
connector; the image's tokens are then::

    global view's V | row 1: tile 1's V … tile cols' V, separator | … | row rows: …, separator

``V·(1 + rows·cols) + rows`` in all (``config.visual_tokens_of_grid``).

A video clip (docs/video.md) sits at one ``<image>`` placeholder too: its ``F`` sampled frames are ``F``
views, each through the encoder and the connector, their tokens spliced in frame order
(``F·V`` in all). Before the connector, each frame's encoder features get the learned temporal
embedding of its frame number (``abstractor.temporal_embedding``, :mod:`.temporal`: ``[video.num_frames, Dv]``,
zero at initialisation): a frame's tokens then say where in the clip it lies, as the official video variant's
temporal modules (zero-initialised too) do inside its ViT. Stills (one frame) get none.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from owl_lightning.config import IGNORE_INDEX, IMAGE_TOKEN, LoRAConfig, OwlConfig, TrainRecipe, views_of_grid, visual_tokens_of_grid
from owl_lightning.models.abstractor import VisualAbstractor
from owl_lightning.models.llm import build_llm, load_tokenizer
from owl_lightning.models.projector import MLPProjector
from owl_lightning.models.temporal import TemporalEmbedding
from owl_lightning.models.vision import VisionEncoder, encoder_tokens


@dataclass
class OwlOutput:
    loss: torch.Tensor  # mean next-token loss over supervised tokens; a zero tied to the graph when there are none
    num_supervised: int  # tokens the loss averages over
    num_tokens: int  # real (non-padding) tokens the LLM processed, visual tokens included


@dataclass
class TokenLayout:
    """Where a batch's tokens go in the LLM's input once every ``<image>`` is its image's visual tokens.

    Index arithmetic only, done on the device the token ids are on. The trainer makes it on the host,
    before a batch moves to the accelerator (``OwlSystem.transfer_batch_to_device``): made there,
    the step reads nothing back from the accelerator, where each ``nonzero`` or ``.item()`` would
    stall the host until the accelerator had finished all the work queued before it.

    ``L = max_b (real tokens_b + Σ_images (tokens_i − 1))``: padding is dropped and re-added at one side.
    ``P``: the batch's visual tokens, ``T``: its views (one an image, ``1 + rows·cols`` under AnyRes, a clip's frames).
    """

    text_rows: torch.Tensor  # [K] batch row of each real text token
    text_cols: torch.Tensor  # [K] its column in ``input_ids``
    text_positions: torch.Tensor  # [K] its position in the expanded sequence
    image_rows: torch.Tensor  # [P] batch row of each visual token, sample-major in placeholder order
    image_positions: torch.Tensor  # [P] its position in the expanded sequence
    visual_index: torch.Tensor  # [P] its row in the views' tokens [T·V] (row T·V: the row separator)
    view_frames: torch.Tensor  # [T] each view's frame number in its clip; -1 for a still image's views
    mask: torch.Tensor  # [B, L] the input's mask values (1, or a packed row's sample numbers 1, 2, …; 0: padding)
    labels: torch.Tensor | None  # [B, L] with IGNORE_INDEX at image and padding positions
    position_ids: torch.Tensor  # [B, L] the LLM's positions (restarting with every packed sample)
    llm_mask: torch.Tensor | None  # [B, L] the LLM's attention mask; None for packed rows
    keep: torch.Tensor | None  # [K'] positions whose logits some sample's loss reads (with labels)
    targets: torch.Tensor | None  # [B, K'] the next token at those positions
    num_supervised: int
    num_tokens: int  # real tokens, visual tokens included

    @classmethod
    def of(
        cls,
        input_ids: torch.Tensor,
        sample_ids: torch.Tensor,
        num_images: int,
        visual_tokens_per_image: int,
        image_token_id: int,
        labels: torch.Tensor | None = None,
        image_counts: torch.Tensor | None = None,
        padding_side: str = "right",
        image_grids: torch.Tensor | None = None,
        image_frames: torch.Tensor | None = None,
    ) -> TokenLayout:
        """The layout of ``input_ids``/``sample_ids``/``labels`` ``[B, T]`` with ``num_images`` images
        (``image_counts`` ``[B]``, optional, names the sample whose placeholders and images disagree).
        ``padding_side``: where the expanded batch is padded (``left`` for generation). ``image_grids``
        ``[M, 2]``: each image's (rows, cols) of AnyRes tiles, ``(0, 0)`` for one view; None: all one view.
        ``image_frames`` ``[M]``: each item's frames (a clip's, 1 for a still); None: all stills.
        ``visual_tokens_per_image``: V, the tokens of one view."""
        real = sample_ids.bool()
        is_image = (input_ids == image_token_id) & real
        placeholders = is_image.sum(1)
        if image_counts is not None:
            for row in (placeholders != image_counts.to(placeholders.device)).nonzero().flatten().tolist():
                raise ValueError(
                    f"sample {row} of the batch has {int(placeholders[row])} {IMAGE_TOKEN} placeholders but "
                    f"{int(image_counts[row])} images; every image needs exactly one placeholder in its text"
                )
        if int(placeholders.sum()) != num_images:
            raise ValueError(f"the batch has {int(placeholders.sum())} {IMAGE_TOKEN} placeholders but {num_images} images")
        if image_grids is None:
            image_grids = input_ids.new_zeros(num_images, 2)
        grid_rows, grid_cols = image_grids.to(input_ids.device).unbind(1)
        frames = input_ids.new_ones(num_images) if image_frames is None else image_frames.to(input_ids.device)
        if bool(((frames > 1) & (grid_rows > 0)).any()):
            raise ValueError("a video clip's frames are single views: image_grids must be (0, 0) where image_frames > 1")
        widths = visual_tokens_of_grid(visual_tokens_per_image, grid_rows, grid_cols, frames)  # [M]
        # Each real token occupies 1 position, each image its visual tokens.
        spans = real.long()
        spans[is_image] = widths  # nonzero order: row-major = sample-major, placeholder order = the images' order
        lengths = spans.sum(1)
        total = int(lengths.max())
        offset = (total - lengths) if padding_side == "left" else torch.zeros_like(lengths)
        start = spans.cumsum(1) - spans + offset[:, None]  # first expanded position of each token

        text_rows, text_cols = (real & ~is_image).nonzero(as_tuple=True)
        image_rows, image_cols = is_image.nonzero(as_tuple=True)
        text_positions = start[text_rows, text_cols]
        owner = torch.arange(num_images, device=input_ids.device).repeat_interleave(widths)  # [P] image of each visual token
        within = torch.arange(len(owner), device=input_ids.device) - (widths.cumsum(0) - widths)[owner]
        image_positions = start[image_rows, image_cols][owner] + within
        visual_index = _visual_index(visual_tokens_per_image, grid_rows, grid_cols, frames, owner, within)
        views = views_of_grid(grid_rows, grid_cols, frames)  # [M]
        item_of_view = torch.arange(num_images, device=input_ids.device).repeat_interleave(views)  # [T]
        view_in_item = torch.arange(len(item_of_view), device=input_ids.device) - (views.cumsum(0) - views)[item_of_view]
        view_frames = torch.where(frames[item_of_view] > 1, view_in_item, -1)
        mask = sample_ids.new_zeros(len(input_ids), total)
        mask[text_rows, text_positions] = sample_ids[text_rows, text_cols]
        mask[image_rows[owner], image_positions] = sample_ids[image_rows, image_cols][owner]

        packed = bool(mask.max() > 1)
        if packed:
            # Positions restart with every sample (padding at the end too), and without a 2D mask
            # transformers reads the restarts as sample boundaries: block-diagonal causal attention.
            position_ids, llm_mask = packed_positions(mask), None
        else:
            position_ids, llm_mask = (mask.cumsum(1) - 1).clamp(min=0), mask

        out_labels = keep = targets = None
        num_supervised = 0
        if labels is not None:
            out_labels = labels.new_full((len(input_ids), total), IGNORE_INDEX)
            out_labels[text_rows, text_positions] = labels[text_rows, text_cols]
            shifted = out_labels[:, 1:]  # position t predicts token t + 1
            supervised = shifted != IGNORE_INDEX
            num_supervised = int(supervised.sum())
            # Logits only where some sample is supervised: the vocabulary projection of every visual
            # and prompt token would otherwise cost as much as a few decoder layers.
            keep = supervised.any(0).nonzero().flatten()
            targets = shifted[:, keep]
        return cls(
            text_rows,
            text_cols,
            text_positions,
            image_rows[owner],
            image_positions,
            visual_index,
            view_frames,
            mask,
            out_labels,
            position_ids,
            llm_mask,
            keep,
            targets,
            num_supervised,
            int((mask > 0).sum()),
        )

    def visual_sequence(self, view_tokens: torch.Tensor, row_separator: RowSeparator | None = None) -> torch.Tensor:
        """The abstractor's tokens of every view ``[T, V, D]`` (and AnyRes's learned ``row_separator``) →
        the batch's visual tokens in layout order ``[P, D]``."""
        table = view_tokens.flatten(0, 1)
        if row_separator is not None:
            table = row_separator(table)
        return table[self.visual_index]

    def splice(self, text_embeds: torch.Tensor, visual_tokens: torch.Tensor) -> torch.Tensor:
        """``text_embeds`` ``[B, T, D]`` (the LLM's embeddings of ``input_ids``) and ``visual_tokens``
        ``[P, D]`` (:meth:`visual_sequence`; or ``[M, V, D]`` when every image is one view) → the LLM's
        input embeddings ``[B, L, D]``; padding positions are zero."""
        embeds = text_embeds.new_zeros(*self.mask.shape, text_embeds.shape[-1])
        embeds[self.text_rows, self.text_positions] = text_embeds[self.text_rows, self.text_cols]
        embeds[self.image_rows, self.image_positions] = visual_tokens.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
        return embeds

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TokenLayout:
        """A copy on ``device`` (Lightning's batch transfer calls this). To a GPU without blocking, the
        tensors are pinned first: a copy from pageable memory may wait for the work queued on the GPU."""
        pin = non_blocking and torch.device(device).type == "cuda"
        moved = {
            f.name: (value.pin_memory() if pin and value.device.type == "cpu" else value).to(device, non_blocking=non_blocking)
            for f in fields(self)
            if isinstance(value := getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **moved)


def _visual_index(
    tokens_per_view: int,
    grid_rows: torch.Tensor,
    grid_cols: torch.Tensor,
    frames: torch.Tensor,
    owner: torch.Tensor,
    within: torch.Tensor,
) -> torch.Tensor:
    """``[P]`` row of each visual token in the views' tokens ``[T·V]`` (row ``T·V``: the row separator).

    ``grid_rows``/``grid_cols`` ``[M]`` each image's tiles, ``frames`` ``[M]`` each clip's frames (1: a
    still); ``owner`` ``[P]`` the image a visual token belongs to, ``within`` its place among that image's
    tokens (order in the module docstring).
    """
    views = views_of_grid(grid_rows, grid_cols, frames)
    first_view = (views.cumsum(0) - views)[owner]  # [P] the image's global view (a clip's first frame)
    # A clip's frames, like a single view, are views whose tokens lie end to end, separator-free.
    untiled = frames[owner] * tokens_per_view
    cols = grid_cols[owner]
    # Past the global view's V tokens, each row of tiles is cols·V tile tokens and one separator.
    tiled = within - tokens_per_view
    row, in_row = tiled.div(cols * tokens_per_view + 1, rounding_mode="floor"), tiled.remainder(cols * tokens_per_view + 1)
    tile_token = (first_view + 1 + row * cols) * tokens_per_view + in_row  # the row's tiles' tokens lie end to end
    index = torch.where(in_row == cols * tokens_per_view, int(views.sum()) * tokens_per_view, tile_token)
    return torch.where(within < untiled, first_view * tokens_per_view + within, index)


def packed_positions(mask: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` sample numbers of packed rows (0: padding) → each position's index within its run of equal numbers."""
    index = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    starts = torch.ones_like(mask, dtype=torch.bool)
    starts[:, 1:] = mask[:, 1:] != mask[:, :-1]
    return index - torch.where(starts, index, 0).cummax(1).values


def max_visual_tokens_per_image(config: OwlConfig) -> int:
    """The most LLM positions one image can take: ``V``, or under ``anyres`` at the largest tile grid."""
    if config.image.mode != "anyres":
        return visual_tokens_per_image(config)
    return max(visual_tokens_of_grid(visual_tokens_per_image(config), rows, cols) for rows, cols in config.image.tile_grids)


def visual_tokens_per_clip(config: OwlConfig) -> int:
    """LLM positions one video clip takes: ``video.num_frames · V`` (each sampled frame one view)."""
    return visual_tokens_of_grid(visual_tokens_per_image(config), frames=config.video.num_frames)


def visual_tokens_per_image(config: OwlConfig) -> int:
    """``V``, the LLM positions one image takes: the abstractor's queries plus its end-of-image token, or
    every encoder token under the MLP connector. From the config alone (data workers have no model)."""
    if config.connector == "mlp":
        return encoder_tokens(config.vision)
    return config.abstractor.num_queries + 1


class OwlModel(nn.Module):
    """vision ``[M, 3, H, W] → [M, N, Dv]`` → connector ``→ [M, V, Dllm]`` → spliced into the LLM.

    The connector (``config.connector``) is the visual abstractor or LLaVA's MLP projector; either is
    held as ``abstractor`` (see :class:`~owl_lightning.config.OwlConfig`)."""

    def __init__(
        self,
        config: OwlConfig,
        vision: VisionEncoder,
        abstractor: VisualAbstractor | MLPProjector,
        llm: PreTrainedModel,
        image_token_id: int,
    ) -> None:
        super().__init__()
        self.config = config
        self.vision = vision
        self.abstractor = abstractor
        self.llm = llm
        self.image_token_id = image_token_id

    @property
    def visual_tokens_per_image(self) -> int:
        return self.abstractor.num_tokens

    def encode_images(self, images: torch.Tensor, view_frames: torch.Tensor | None = None) -> torch.Tensor:
        """Views ``[T, 3, H, W]`` → visual tokens ``[T, V, Dllm]`` (encoder, then the connector).

        ``view_frames`` ``[T]`` (``TokenLayout.view_frames``): each view's frame number in its clip, -1 for
        a still; frame ``f``'s encoder features ``[N, Dv]`` get the learned temporal embedding row ``f``."""
        features = self.vision(images)
        if view_frames is not None:
            features = self.abstractor.temporal_embedding(features, view_frames)
        return self.abstractor(features)

    def layout(
        self,
        input_ids: torch.Tensor,
        sample_ids: torch.Tensor,
        images: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        image_counts: torch.Tensor | None = None,
        padding_side: str = "right",
        image_grids: torch.Tensor | None = None,
        image_frames: torch.Tensor | None = None,
    ) -> TokenLayout:
        """The :class:`TokenLayout` of a batch (``[B, T]`` tensors, ``images`` ``[T, 3, H, W]`` views,
        ``image_grids`` ``[M, 2]`` and ``image_frames`` ``[M]`` as :func:`~owl_lightning.data.collate.collate`
        gives them), on their device."""
        num_views = 0 if images is None else images.shape[0]
        items = image_grids if image_grids is not None else image_frames
        num_images = num_views if items is None else len(items)
        if image_grids is None:
            image_grids = torch.zeros(num_images, 2, dtype=torch.long, device=input_ids.device)
        if image_frames is None:
            image_frames = torch.ones(num_images, dtype=torch.long, device=input_ids.device)
        expected = int(views_of_grid(*image_grids.unbind(1), image_frames.to(image_grids.device)).sum())
        if len(image_grids) != len(image_frames) or expected != num_views:
            raise ValueError(
                f"the batch has {num_views} image views but its image_grids {image_grids.tolist()} and image_frames "
                f"{image_frames.tolist()} make {expected}; pass collate's images, image_grids and image_frames together"
            )
        if len(image_frames) and int(image_frames.max()) > self.config.video.num_frames:
            raise ValueError(
                f"a clip of {int(image_frames.max())} frames, but the model has temporal embeddings for "
                f"video.num_frames={self.config.video.num_frames}; sample clips with the model's OwlProcessor"
            )
        return TokenLayout.of(
            input_ids,
            sample_ids,
            num_images,
            self.visual_tokens_per_image,
            self.image_token_id,
            labels,
            image_counts,
            padding_side,
            image_grids,
            image_frames,
        )

    def embed(
        self,
        input_ids: torch.Tensor,
        sample_ids: torch.Tensor,
        images: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        image_counts: torch.Tensor | None = None,
        padding_side: str = "right",
        image_grids: torch.Tensor | None = None,
        image_frames: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Token ids ``[B, T]`` (+ images) → LLM input embeddings ``[B, L, D]``, mask and labels ``[B, L]``."""
        layout = self.layout(input_ids, sample_ids, images, labels, image_counts, padding_side, image_grids, image_frames)
        return self.input_embeddings(input_ids, images, layout), layout.mask, layout.labels

    def input_embeddings(self, input_ids: torch.Tensor, images: torch.Tensor | None, layout: TokenLayout) -> torch.Tensor:
        """``input_ids`` ``[B, T]`` and ``images`` ``[T, 3, H, W]`` views (or None) → the LLM's input embeddings ``[B, L, D]``."""
        text_embeds = self.llm.get_input_embeddings()(input_ids)
        if images is None:
            images = torch.zeros(0, *self.vision.input_size, dtype=torch.uint8, device=input_ids.device)
        # A batch without images still runs the encoder and abstractor (on zero images) and ties their
        # output (and the row separator) to the loss: under FSDP/DDP every rank must run the same
        # collectives (all-gathers, gradient reductions) whether or not its batch holds images.
        visual = layout.visual_sequence(self.encode_images(images, layout.view_frames), self.abstractor.row_separator)
        embeds = layout.splice(text_embeds, visual)
        return embeds if visual.shape[0] else embeds + visual.sum()

    def forward(
        self,
        input_ids: torch.Tensor,
        sample_ids: torch.Tensor,
        labels: torch.Tensor,
        images: torch.Tensor | None = None,
        image_counts: torch.Tensor | None = None,
        layout: TokenLayout | None = None,
        image_grids: torch.Tensor | None = None,
        image_frames: torch.Tensor | None = None,
    ) -> OwlOutput:
        """Next-token loss over the supervised positions of ``labels`` (``[B, T]``, aligned with ``input_ids``).

        ``sample_ids`` is 1 on real tokens, or numbers the samples packed in a row 1, 2, … (see
        :func:`~owl_lightning.data.collate.collate`); 0 on padding. ``layout``: the batch's
        :meth:`layout`, if already made (on the host, so that this step needs no host sync)."""
        layout = layout or self.layout(
            input_ids, sample_ids, images, labels, image_counts, image_grids=image_grids, image_frames=image_frames
        )
        # With nothing supervised the forward still runs (keep is empty) and the loss is a zero with a
        # graph: under DDP/FSDP every rank must run the same forward and backward collectives.
        logits = self._supervised_logits(input_ids, images, layout)
        loss = F.cross_entropy(logits.float().flatten(0, 1), layout.targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        return OwlOutput(loss=loss / max(layout.num_supervised, 1), num_supervised=layout.num_supervised, num_tokens=layout.num_tokens)

    @torch.no_grad()
    def supervised_log_likelihood(
        self,
        input_ids: torch.Tensor,
        sample_ids: torch.Tensor,
        labels: torch.Tensor,
        images: torch.Tensor | None = None,
        image_counts: torch.Tensor | None = None,
        image_grids: torch.Tensor | None = None,
        image_frames: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample of ``[B, T]`` inputs (not packed): the summed log-probability of its supervised tokens
        ``[B]`` (float32), and whether greedy decoding picks every one of them ``[B]`` (bool)."""
        layout = self.layout(input_ids, sample_ids, images, labels, image_counts, image_grids=image_grids, image_frames=image_frames)
        logits = self._supervised_logits(input_ids, images, layout).float()  # [B, K', vocab]
        supervised = layout.targets != IGNORE_INDEX  # [B, K']
        targets = layout.targets.clamp(min=0)
        log_probs = logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
        greedy = (logits.argmax(-1) == targets) | ~supervised
        return (log_probs * supervised).sum(1), greedy.all(1)

    def _supervised_logits(self, input_ids: torch.Tensor, images: torch.Tensor | None, layout: TokenLayout) -> torch.Tensor:
        """The LLM's logits ``[B, K', vocab]`` at the positions some sample's labels supervise (``layout.keep``)."""
        return self.llm(
            inputs_embeds=self.input_embeddings(input_ids, images, layout),
            attention_mask=layout.llm_mask,
            position_ids=layout.position_ids,
            logits_to_keep=layout.keep,
            use_cache=False,
        ).logits

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        sample_ids: torch.Tensor,
        images: torch.Tensor | None = None,
        image_counts: torch.Tensor | None = None,
        image_grids: torch.Tensor | None = None,
        image_frames: torch.Tensor | None = None,
        **generate_kwargs,
    ) -> torch.Tensor:
        """Prompts ``[B, T]`` (any padding side) → generated token ids ``[B, new]`` (prompt not included).

        Eager even where blocks were compiled for training: every new length and cache state would recompile."""
        with torch.compiler.set_stance("force_eager"):
            embeds, mask, _ = self.embed(input_ids, sample_ids, images, None, image_counts, "left", image_grids, image_frames)
            return self.llm.generate(inputs_embeds=embeds, attention_mask=mask, **generate_kwargs)

    # Freeze policies -------------------------------------------------------------------------------

    def apply_recipe(self, recipe: TrainRecipe) -> None:
        """Set which parameters train (adding LoRA adapters for ``llm: lora``); frozen modules also stay
        in eval mode (see ``train``). The one freeze policy: the training system and ``describe`` use it."""
        self.vision.requires_grad_(recipe.vision == "train")
        self.abstractor.requires_grad_(recipe.abstractor == "train")
        if self.config.llm.quantization is not None and recipe.llm == "full":
            raise ValueError(
                f"llm.quantization={self.config.llm.quantization!r} stores the LLM in 4 bits, which cannot be trained: "
                "use recipe llm: lora (QLoRA), or drop llm.quantization to fine-tune the whole LLM"
            )
        if recipe.llm == "lora":
            self.add_lora(self.config.lora)  # peft freezes the base weights and trains the adapters
        else:
            self.llm.requires_grad_(recipe.llm == "full")

    def add_lora(self, cfg: LoRAConfig) -> None:
        """Wrap the LLM with peft LoRA adapters; only the adapters of the LLM are trainable afterwards."""
        from peft import LoraConfig, get_peft_model

        self.llm = get_peft_model(
            self.llm,
            LoraConfig(
                r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules), task_type="CAUSAL_LM"
            ),
        )

    def train(self, mode: bool = True) -> OwlModel:
        """Frozen modules stay in eval mode (no dropout, no BatchNorm statistics updates)."""
        super().train(mode)
        for module in (self.vision, self.abstractor, self.llm):
            if mode and not any(p.requires_grad for p in module.parameters()):
                module.eval()
        return self


class RowSeparator(nn.Module):
    """AnyRes's learned row separator: ``weight`` ``[1, D]``, one LLM embedding closing each row of tiles.

    A module of its own, and its own FSDP unit (train/parallel.py): it is used after the connector's
    forward, when the connector's unit has resharded its parameters. Its forward appends it to the views'
    tokens (a new tensor: a unit's gathered parameters are freed after its forward)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, width) * 0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Visual tokens ``[N, D]`` → ``[N + 1, D]``, the separator last (row ``N`` of the layout's table)."""
        return torch.cat([tokens, self.weight.to(tokens.dtype)])


def build_owl(config: OwlConfig, pretrained: bool = True, tokenizer: PreTrainedTokenizerBase | None = None) -> OwlModel:
    """Build the model of a config. ``pretrained=False`` uses random init (under ``torch.device('meta')``
    it allocates nothing: the paper's 7B builds in a second)."""
    vision = VisionEncoder(config.vision, pretrained=pretrained)
    llm = build_llm(config.llm, load_weights=pretrained)
    if tokenizer is None and (pretrained or config.llm.tokenizer):
        tokenizer = load_tokenizer(config.llm)
    if tokenizer is not None:
        vocab, image_token_id = len(tokenizer), tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    else:  # a meta build of a hub model: the tokenizer will add <image> as the next id
        vocab = image_token_id = llm.config.vocab_size
        vocab += 1
    _resize_vocabulary(llm, vocab)
    llm_width = llm.get_input_embeddings().embedding_dim
    if config.connector == "mlp":
        connector = MLPProjector(visual_tokens_per_image(config), vision.num_features, llm_width)
    else:
        connector = VisualAbstractor(config.abstractor, vision.num_features, llm_width)
    # AnyRes's learned row separator lives in the connector's slot, whichever connector fills it: it trains
    # with it (the recipe's abstractor field) and is saved under its keys. Absent otherwise: crop and pad
    # checkpoints keep the paper's (and the official) keys.
    connector.row_separator = RowSeparator(llm_width) if config.image.mode == "anyres" else None
    # The video frames' temporal embedding (docs/video.md) lives there too, for the same reason. Zero at
    # first: a checkpoint saved before it existed loads with it at zero, reading frames as stills.
    connector.temporal_embedding = TemporalEmbedding(config.video.num_frames, vision.num_features)
    return OwlModel(config, vision, connector, llm, image_token_id)


def _resize_vocabulary(llm: PreTrainedModel, vocab: int) -> None:
    """Grow the embeddings to hold ``<image>``; new rows are the mean of the old ones.

    Deterministic on purpose: checkpoints leave out the base LLM, so a reload must rebuild the
    same rows (they still enter the softmax of a tied output layer).
    """
    old = llm.get_input_embeddings().weight.shape[0]
    if vocab <= old:
        return
    llm.resize_token_embeddings(vocab, mean_resizing=False)
    if llm.get_input_embeddings().weight.device.type == "meta":
        return
    with torch.no_grad():
        for layer in {id(m): m for m in (llm.get_input_embeddings(), llm.get_output_embeddings()) if m is not None}.values():
            layer.weight[old:] = layer.weight[:old].mean(0)
