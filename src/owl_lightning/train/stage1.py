"""Stage 1, visual knowledge learning: the LLM is frozen; vision encoder and abstractor learn
to caption images (next-token loss on the caption)."""

from __future__ import annotations

from typing import Any

import torch

from owl_lightning.data.template import ConversationTemplate
from owl_lightning.inference import generate_captions
from owl_lightning.models.owl import OwlModel
from owl_lightning.train.system import OwlSystem


class Stage1Module(OwlSystem):
    """Args beyond :class:`OwlSystem`'s:
    train_vision: train the vision encoder (the paper) or keep it frozen (cheaper).
    num_caption_samples: validation images captioned and logged (with the images) at each validation.
    max_caption_tokens: length limit of those generated captions.
    """

    def __init__(
        self,
        model_name: str = "owl-smol",
        model_overrides: dict[str, Any] | None = None,
        init_from: str | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        warmup_steps: int = 2000,
        min_lr_ratio: float = 0.0,
        max_nonfinite_steps: int = 5,
        activation_checkpointing: bool = False,
        peak_flops: float | None = None,
        compile: bool = False,
        train_vision: bool = True,
        num_caption_samples: int = 5,
        max_caption_tokens: int = 20,
    ) -> None:
        super().__init__(
            model_name,
            model_overrides,
            init_from,
            lr,
            weight_decay,
            betas,
            eps,
            warmup_steps,
            min_lr_ratio,
            max_nonfinite_steps,
            activation_checkpointing,
            peak_flops,
            compile,
        )
        self._caption_images: torch.Tensor | None = None

    def freeze_policy(self, model: OwlModel) -> None:
        model.set_trainable(vision=self.hparams.train_vision, abstractor=True, llm=False)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        if batch_idx == 0 and batch["images"] is not None:
            self._caption_images = batch["images"][: self.hparams.num_caption_samples]

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self._caption_images is not None and self.hparams.num_caption_samples and not self.trainer.sanity_checking:
            self.log_captions(self._caption_images)
        self._caption_images = None

    def generate_captions(self, images: torch.Tensor) -> list[str]:
        """Greedy captions for ``[M, 3, H, W]`` images, generated from ``BOS <image>``."""
        template = ConversationTemplate(self.tokenizer, image_token_length=self.model.visual_tokens_per_image)
        return generate_captions(self.model, self.tokenizer, template, list(images), self.hparams.max_caption_tokens)

    def log_captions(self, images: torch.Tensor) -> None:
        captions = self.generate_captions(images)
        for i, caption in enumerate(captions):
            self.print(f"step {self.global_step} caption {i}: {caption!r}")
        writer = getattr(self.logger, "experiment", None)
        if writer is None or not hasattr(writer, "add_text"):
            return
        for i, caption in enumerate(captions):
            writer.add_image(f"captions/{i}", images[i], self.global_step)  # uint8 [3, H, W]
            writer.add_text(f"captions/{i}", caption, self.global_step)
