"""Answering conversations with images: the training template, batched left-padded generation.

Used by ``owl-lightning chat`` and ``eval``; keeps prompts exactly as the model was trained on
(template style and system prompt are read from the checkpoint's data settings).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from owl_lightning.checkpoints import model_from_checkpoint, read_checkpoint, template_settings
from owl_lightning.config import IGNORE_INDEX, IMAGE_TOKEN, compute_dtype
from owl_lightning.data.collate import EncodedSample, collate
from owl_lightning.data.images import to_rgb
from owl_lightning.data.template import OWL_SYSTEM_PROMPT, Conversation, ConversationTemplate, Turn, resolve_system_prompt
from owl_lightning.models.llm import load_tokenizer
from owl_lightning.models.owl import OwlModel
from owl_lightning.models.vision import image_transform


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def autocast(device: torch.device, dtype: torch.dtype) -> AbstractContextManager:
    """Autocast to ``dtype`` on ``device``'s type; nothing for float32."""
    return nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


@dataclass(frozen=True)
class LoadOptions:
    """How a command loads a checkpoint for inference (the ``--device``, ``--precision``, ``--llm-source``
    and ``--trust-remote-code`` flags): the keyword arguments of :meth:`OwlAssistant.from_checkpoint`."""

    device: str | None = None
    precision: str = "bf16"
    llm_source: str | None = None
    trust_remote_code: bool = False


@dataclass
class Request:
    """One conversation to continue: ``turns`` ends with a user turn whose ``<image>``
    placeholders (in any user turn) match ``images`` in order."""

    turns: list[Turn]
    images: list[Image.Image] = field(default_factory=list)

    @classmethod
    def single(cls, question: str, images: list[Image.Image] = ()) -> Request:
        """A one-turn question about ``images`` (their placeholders go first, one per image)."""
        return cls([Turn("user", IMAGE_TOKEN * len(images) + ("\n" if images else "") + question)], list(images))


class OwlAssistant:
    """Batched answers from an :class:`OwlModel`.

    Args:
        model, tokenizer: the model and its tokenizer (with ``<image>``).
        template: ``owl`` or ``chat_template``; system_prompt: the system line used in training.
        max_length: longest prompt accepted (visual tokens included).
        precision: ``bf16`` (autocast, on CPUs too), ``fp16`` or ``fp32``.
    """

    def __init__(
        self,
        model: OwlModel,
        tokenizer,
        template: str = "owl",
        system_prompt: str | None = OWL_SYSTEM_PROMPT,
        max_length: int = 2048,
        precision: str = "bf16",
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.template = ConversationTemplate(
            tokenizer,
            style=template,
            system_prompt=system_prompt,
            max_length=max_length,
            visual_tokens_per_image=model.visual_tokens_per_image,
        )
        self.transform = image_transform(model.config.vision)
        self.device = next(model.parameters()).device
        self.dtype = compute_dtype(precision)

    def autocast(self) -> AbstractContextManager:
        """The precision's autocast on the model's device (none for fp32)."""
        return autocast(self.device, self.dtype)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str | None = None,
        precision: str = "bf16",
        llm_source: str | None = None,
        trust_remote_code: bool = False,
        **kwargs,
    ) -> OwlAssistant:
        """From a stage-1/2 checkpoint, a run folder or an exported folder; template settings follow the
        run's data settings (an export keeps them).

        ``device``: None picks ``cuda`` when there is one. ``llm_source`` / ``trust_remote_code``: what
        the checkpoint itself may not choose (see :func:`owl_lightning.checkpoints.trusted_config`)."""
        checkpoint = read_checkpoint(path)
        template = template_settings(checkpoint)
        model = model_from_checkpoint(checkpoint, str(path), llm_source, trust_remote_code).to(device or default_device())
        settings = {
            "template": template["template"],
            "system_prompt": resolve_system_prompt(template["template"], template["system_prompt"]),
            **kwargs,
        }
        return cls(model, load_tokenizer(model.config.llm), precision=precision, **settings)

    @torch.no_grad()
    def answer(
        self,
        requests: list[Request],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        template: ConversationTemplate | None = None,
    ) -> list[str]:
        """Continue each conversation with one assistant turn. Greedy when ``temperature`` is 0.

        ``template``: prompt with another template than the run's (e.g. the base LLM's own chat
        template, to compare with the model before tuning)."""
        template = template or self.template
        samples = []
        for request in requests:
            conversation = Conversation(request.turns, images=[f"image {i}" for i in range(len(request.images))])
            ids = template.encode_prompt(conversation)
            samples.append(EncodedSample(ids, [IGNORE_INDEX] * len(ids), [self.transform(to_rgb(i)) for i in request.images]))
        return generate(self.model, self.tokenizer, samples, max_new_tokens, temperature, top_p, self.dtype)

    def caption(self, images: list[Image.Image], max_new_tokens: int = 20) -> list[str]:
        """Stage-1 style captions, generated from ``BOS <image>``."""
        pixels = [self.transform(to_rgb(image)) for image in images]
        return generate_captions(self.model, self.tokenizer, self.template, pixels, max_new_tokens, self.dtype)


def generate_captions(
    model: OwlModel,
    tokenizer,
    template: ConversationTemplate,
    pixels: list[torch.Tensor],
    max_new_tokens: int,
    dtype: torch.dtype = torch.float32,
) -> list[str]:
    """Greedy captions of preprocessed images (uint8 ``[3, H, W]`` each), from the stage-1 prompt ``BOS <image>``."""
    prompt = template.caption_prompt()
    samples = [EncodedSample(prompt, [IGNORE_INDEX] * len(prompt), [image]) for image in pixels]
    return generate(model, tokenizer, samples, max_new_tokens, dtype=dtype)


@torch.no_grad()
def generate(
    model: OwlModel,
    tokenizer,
    samples: list[EncodedSample],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> list[str]:
    """Prompts (token ids with ``<image>`` tokens, and their image tensors) → decoded continuations.

    One left-padded batch, generated with the KV cache, under ``dtype`` autocast; greedy when
    ``temperature`` is 0; each answer stops at EOS."""
    device = next(model.parameters()).device
    batch = collate(samples, tokenizer.pad_token_id, padding_side="left")
    images = None if batch["images"] is None else batch["images"].to(device)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    with autocast(device, dtype):
        generated = model.generate(
            batch["input_ids"].to(device),
            batch["sample_ids"].to(device),
            images,
            batch["image_counts"].to(device),
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
        )
    return [text.strip() for text in tokenizer.batch_decode(generated, skip_special_tokens=True)]


class ChatSession:
    """A multi-turn conversation about a fixed set of images; their placeholders open the first turn."""

    def __init__(
        self, assistant: OwlAssistant, images: list[Image.Image] = (), max_new_tokens: int = 128, temperature: float = 0.0
    ) -> None:
        self.assistant, self.images = assistant, list(images)
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.turns: list[Turn] = []

    def ask(self, text: str) -> str:
        opening = IMAGE_TOKEN * len(self.images) + "\n" if self.images and not self.turns else ""
        self.turns.append(Turn("user", opening + text))
        reply = self.assistant.answer([Request(list(self.turns), self.images)], self.max_new_tokens, self.temperature)[0]
        self.turns.append(Turn("assistant", reply))
        return reply

    def reset(self) -> None:
        self.turns = []
