"""AdamW with a learning rate per module, linear warm-up then cosine decay (transformers' schedule)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from owl_lightning.models.owl import OwlModel


@dataclass
class OptimizerConfig:
    """AdamW and its schedule.

    lr: the peak learning rate; ``vision_lr``, ``abstractor_lr``, ``llm_lr`` set one module's apart
        (None: ``lr``), e.g. a lower LLM rate when the whole LLM trains.
    weight_decay: on matrices only (biases and norm scales get none). betas, eps: AdamW's.
    warmup_steps: linear warm-up from 0; then cosine decay to ``lr * min_lr_ratio`` at the run's last
        optimizer step.
    """

    lr: float = 1e-4
    vision_lr: float | None = None
    abstractor_lr: float | None = None
    llm_lr: float | None = None
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 2000
    min_lr_ratio: float = 0.0


def build_optimizer(model: OwlModel, config: OptimizerConfig, total_steps: int) -> dict:
    """Lightning's ``configure_optimizers`` answer: AdamW over the trainable parameters, stepped per
    optimizer step by the warm-up/cosine schedule over ``total_steps``."""
    groups = []
    for module, lr in ((model.vision, config.vision_lr), (model.abstractor, config.abstractor_lr), (model.llm, config.llm_lr)):
        params = [p for p in module.parameters() if p.requires_grad]
        decayed, plain = [p for p in params if p.ndim >= 2], [p for p in params if p.ndim < 2]
        for group, weight_decay in ((decayed, config.weight_decay), (plain, 0.0)):
            if group:
                groups.append({"params": group, "weight_decay": weight_decay, "lr": config.lr if lr is None else lr})
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps)
    total_steps = max(total_steps, 1)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, min(config.warmup_steps, total_steps), total_steps, min_lr_rate=config.min_lr_ratio
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
