"""OwlProcessor: what turns records into model inputs, built once per run from the model config.

The training system makes it and the CLI hands that same object to the data module, so the
tokenizer (with ``<image>``), the image transform and the visual-token count the data is encoded
with are the model's own: there is one place they come from.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from owl_lightning.config import OwlConfig
from owl_lightning.data.highres import TiledImage, frame_preprocess, image_preprocess, image_token_counter
from owl_lightning.data.template import ConversationTemplate, resolve_system_prompt
from owl_lightning.data.video import VideoReader
from owl_lightning.models.llm import load_tokenizer
from owl_lightning.models.owl import visual_tokens_per_clip, visual_tokens_per_image


class OwlProcessor:
    """The tokenizer, image transform and conversation templates of one model config (loaded on first use)."""

    def __init__(self, config: OwlConfig) -> None:
        self.config = config

    @cached_property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return load_tokenizer(self.config.llm)

    @cached_property
    def image_transform(self) -> Callable[[Image.Image], torch.Tensor | TiledImage]:
        """PIL RGB image → uint8 ``[3, H, W]`` (``image.mode`` crop: as timm evaluates the vision encoder;
        pad), or a :class:`~owl_lightning.data.highres.TiledImage` (anyres)."""
        return image_preprocess(self.config)

    @cached_property
    def image_tokens(self) -> Callable[[Image.Image], int] | None:
        """Decoded image → its visual tokens where they depend on its size (anyres); None where every
        image takes ``visual_tokens_per_image(config)``."""
        return image_token_counter(self.config)

    @cached_property
    def video_reader(self) -> VideoReader:
        """An encoded clip (bytes or a path) → its ``video.num_frames`` sampled frames, each preprocessed as
        one view (data/video.py); every clip takes ``visual_tokens_per_clip(config)`` visual tokens."""
        video = self.config.video
        return VideoReader(frame_preprocess(self.config), video.num_frames, video.min_frames, visual_tokens_per_clip(self.config))

    def template(self, max_length: int = 1024, style: str = "owl", system_prompt: str | None = None) -> ConversationTemplate:
        """The conversation template; ``system_prompt`` as a run sets it (None: the style's default, "": none)."""
        return ConversationTemplate(
            self.tokenizer,
            style=style,
            system_prompt=resolve_system_prompt(style, system_prompt),
            max_length=max_length,
            visual_tokens_per_image=visual_tokens_per_image(self.config),
        )
