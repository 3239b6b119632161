"""Stage 2, joint instruction tuning: vision encoder frozen, LoRA adapters on the LLM (peft)
and, as in the paper, the abstractor trained (``train_abstractor=False`` is the official release)."""

from __future__ import annotations

from typing import Any

from owl_lightning.models.owl import OwlModel
from owl_lightning.train.system import OwlSystem


class Stage2Module(OwlSystem):
    """Args beyond :class:`OwlSystem`'s:
    train_abstractor: train the abstractor too (the paper) or freeze it (the official release).
    LoRA rank, alpha, dropout and target modules come from the model config's ``lora`` section
    (``--model.model_overrides '{"lora.r": 16}'``).
    """

    def __init__(
        self,
        model_name: str = "owl-smol",
        model_overrides: dict[str, Any] | None = None,
        init_from: str | None = None,
        lr: float = 2e-5,
        weight_decay: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        warmup_steps: int = 50,
        min_lr_ratio: float = 0.0,
        max_nonfinite_steps: int = 5,
        activation_checkpointing: bool = False,
        peak_flops: float | None = None,
        compile: bool = False,
        train_abstractor: bool = True,
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

    def freeze_policy(self, model: OwlModel) -> None:
        model.add_lora(self.owl_config.lora)
        model.vision.requires_grad_(False)
        model.abstractor.requires_grad_(self.hparams.train_abstractor)
