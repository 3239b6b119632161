"""Answering conversations with images and video clips: the training template, batched left-padded generation.

Used by ``owl-lightning chat`` and ``eval``; keeps prompts exactly as the model was trained on
(template style and system prompt are read from the checkpoint's data settings).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from owl_lightning.checkpoints import model_from_checkpoint, read_checkpoint, template_settings
from owl_lightning.config import IGNORE_INDEX, IMAGE_TOKEN, compute_dtype, resolve_precision
from owl_lightning.data.collate import EncodedSample, collate
from owl_lightning.data.highres import Media, frame_preprocess, image_preprocess, image_token_counter, visual_tokens_of
from owl_lightning.data.images import to_rgb
from owl_lightning.data.template import OWL_SYSTEM_PROMPT, Conversation, ConversationTemplate, Turn, resolve_system_prompt
from owl_lightning.data.video import Video, VideoClip, decode_video
from owl_lightning.models.llm import load_tokenizer
from owl_lightning.models.owl import OwlModel, visual_tokens_per_clip


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
    precision: str = "auto"
    llm_source: str | None = None
    trust_remote_code: bool = False


def user_turn(text: str, image_count: int = 0) -> Turn:
    """A user message about ``image_count`` images: their placeholders open it, one per image, as in training."""
    return Turn("user", IMAGE_TOKEN * image_count + ("\n" if image_count else "") + text)


@dataclass
class Request:
    """One conversation to continue: ``turns`` ends with a user turn whose ``<image>``
    placeholders (in any user turn) match ``images`` in order: still images, or decoded clips
    (:meth:`OwlAssistant.read_video`), one placeholder each. ``system`` replaces the
    template's system line for this conversation (None: the line the model was trained with)."""

    turns: list[Turn]
    images: list[Image.Image | Video] = field(default_factory=list)
    system: str | None = None

    @classmethod
    def single(cls, question: str, images: list[Image.Image | Video] = ()) -> Request:
        """A one-turn question about ``images`` (their placeholders go first, one per image)."""
        return cls([user_turn(question, len(images))], list(images))


@dataclass(frozen=True)
class Sampling:
    """How one answer is generated: at most ``max_new_tokens`` tokens; greedy when ``temperature`` is 0,
    else sampled at that temperature from the smallest set of tokens whose probability reaches ``top_p``."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0

    def decoding(self) -> tuple[float, float]:
        """What decides the token choice (not the length); every greedy setting is the same choice."""
        return (self.temperature, self.top_p) if self.temperature > 0 else (0.0, 1.0)


@dataclass
class Generation:
    """One answer as it is generated: its tokens so far (the EOS that ends it left out), the decoding
    steps spent on it (EOS included) and, once it has ended, why: ``stop`` (EOS), ``length`` (its
    ``max_new_tokens``) or ``cancelled`` (its listener asked to stop)."""

    tokens: list[int] = field(default_factory=list)
    steps: int = 0
    finish_reason: str | None = None


# Called after each decoding step for every answer of the batch still going, and once more as it ends:
# its row and its Generation (updated in place). Returning False cancels that answer.
Listener = Callable[[int, Generation], bool]


class OwlAssistant:
    """Batched answers from an :class:`OwlModel`.

    Args:
        model, tokenizer: the model and its tokenizer (with ``<image>``).
        template: ``owl`` or ``chat_template``; system_prompt: the system line used in training.
        max_length: longest prompt accepted (visual tokens included).
        precision: ``auto`` (bf16 autocast where the device computes bf16 natively, else fp32), ``bf16``,
            ``fp16`` or ``fp32``.
    """

    def __init__(
        self,
        model: OwlModel,
        tokenizer,
        template: str = "owl",
        system_prompt: str | None = OWL_SYSTEM_PROMPT,
        max_length: int = 2048,
        precision: str = "auto",
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
        self.transform = image_preprocess(model.config)
        self.frame_transform = frame_preprocess(model.config)
        self._count_image_tokens = image_token_counter(model.config)
        self.device = next(model.parameters()).device
        self.dtype = compute_dtype(resolve_precision(precision, self.device))

    def autocast(self) -> AbstractContextManager:
        """The precision's autocast on the model's device (none for fp32)."""
        return autocast(self.device, self.dtype)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str | None = None,
        precision: str = "auto",
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

    def encode(self, request: Request, template: ConversationTemplate | None = None) -> EncodedSample:
        """A request as the model takes it: the prompt's token ids (``template``: None for the run's own)
        and each image preprocessed (a small uint8 tensor, so the decoded picture can be dropped). Raises
        ``SkipSample(TOO_LONG)`` past ``max_length``."""
        conversation = Conversation(request.turns, images=[f"image {i}" for i in range(len(request.images))], system=request.system)
        images = [self.preprocess(image) for image in request.images]
        ids = (template or self.template).encode_prompt(conversation, self._image_tokens(images))
        return EncodedSample(ids, [IGNORE_INDEX] * len(ids), images)

    def prompt_tokens(self, sample: EncodedSample) -> int:
        """Positions the LLM reads for ``sample``'s prompt: its text tokens and every image's visual tokens."""
        return self.template.expanded_length(sample.input_ids, self._image_tokens(sample.images))

    def read_video(self, data: bytes | Path) -> Video:
        """An encoded clip (bytes or a file) → its ``video.num_frames`` frames, sampled as in training.
        Raises ``SkipSample`` for a clip that cannot be used (data/video.py's bounds and reasons)."""
        video = self.model.config.video
        return Video(tuple(decode_video(data, video.num_frames, video.min_frames)))

    def preprocess(self, image: Image.Image | Video) -> Media:
        """A decoded image or clip as the model takes it (small uint8 tensors: the decoded pictures can go)."""
        if isinstance(image, Video):
            return VideoClip(torch.stack([self.frame_transform(frame) for frame in image.frames]))
        return self.transform(to_rgb(image))

    def image_tokens(self, image: Image.Image | Video) -> int:
        """Visual tokens ``image`` takes in a prompt: one view's, under AnyRes its tiles' (by its size), a clip's frames'."""
        if isinstance(image, Video):
            return visual_tokens_per_clip(self.model.config)
        if self._count_image_tokens is None:
            return self.model.visual_tokens_per_image
        return self._count_image_tokens(image)

    def _image_tokens(self, images: list[Media]) -> list[int]:
        return [visual_tokens_of(image, self.model.visual_tokens_per_image) for image in images]

    def decode(self, tokens: list[int]) -> str:
        """An answer's text, as :meth:`answer` returns it."""
        return decode_answer(self.tokenizer, tokens)

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
        samples = [self.encode(request, template) for request in requests]
        return generate(self.model, self.tokenizer, samples, max_new_tokens, temperature, top_p, self.dtype)

    @torch.no_grad()
    def reply_likelihoods(self, request: Request, replies: list[str]) -> list[tuple[float, bool]]:
        """Each reply scored as the assistant's answer to ``request``, in one batch: the total log-probability
        of its tokens and of the end of the answer (so a reply that is a prefix of another gains nothing),
        and whether greedy decoding would give exactly it. Ranks multiple-choice options; lmms-eval's
        ``loglikelihood`` requests."""
        placeholders = [f"image {i}" for i in range(len(request.images))]
        pixels = [self.preprocess(image) for image in request.images]
        samples = []
        for reply in replies:
            conversation = Conversation([*request.turns, Turn("assistant", reply)], images=placeholders, system=request.system)
            input_ids, labels, _ = self.template.encode(conversation, self._image_tokens(pixels))
            samples.append(EncodedSample(input_ids, labels, pixels))
        batch = collate(samples, self.tokenizer.pad_token_id)
        with self.autocast():
            totals, greedy = self.model.supervised_log_likelihood(
                batch["input_ids"].to(self.device),
                batch["sample_ids"].to(self.device),
                batch["labels"].to(self.device),
                None if batch["images"] is None else batch["images"].to(self.device),
                batch["image_counts"].to(self.device),
                batch["image_grids"].to(self.device),
                batch["image_frames"].to(self.device),
            )
        return list(zip(totals.tolist(), greedy.tolist()))

    def generate(self, samples: list[EncodedSample], samplings: list[Sampling], listener: Listener | None = None) -> list[Generation]:
        """Encoded requests (:meth:`encode`) answered in one batch, each with its own :class:`Sampling`;
        ``listener`` sees every answer grow (see :data:`Listener`)."""
        return generate_answers(self.model, self.tokenizer, samples, samplings, self.dtype, listener)

    def caption(self, images: list[Image.Image], max_new_tokens: int = 20) -> list[str]:
        """Stage-1 style captions, generated from ``BOS <image>``."""
        pixels = [self.transform(to_rgb(image)) for image in images]
        return generate_captions(self.model, self.tokenizer, self.template, pixels, max_new_tokens, self.dtype)


def generate_captions(
    model: OwlModel,
    tokenizer,
    template: ConversationTemplate,
    pixels: list[Media],
    max_new_tokens: int,
    dtype: torch.dtype = torch.float32,
) -> list[str]:
    """Greedy captions of preprocessed images (uint8 ``[3, H, W]`` each, or AnyRes tiles), from the stage-1 prompt ``BOS <image>``."""
    prompt = template.caption_prompt()
    samples = [EncodedSample(prompt, [IGNORE_INDEX] * len(prompt), [image]) for image in pixels]
    return generate(model, tokenizer, samples, max_new_tokens, dtype=dtype)


def generate(
    model: OwlModel,
    tokenizer,
    samples: list[EncodedSample],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> list[str]:
    """Prompts (token ids with ``<image>`` tokens, and their image tensors) → decoded continuations,
    all with the same settings (see :func:`generate_answers`)."""
    sampling = Sampling(max_new_tokens, temperature, top_p)
    generations = generate_answers(model, tokenizer, samples, [sampling] * len(samples), dtype)
    return [decode_answer(tokenizer, generation.tokens) for generation in generations]


def decode_answer(tokenizer, tokens: list[int]) -> str:
    """Generated token ids → the answer's text (special tokens dropped, surrounding space stripped)."""
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


@torch.no_grad()
def generate_answers(
    model: OwlModel,
    tokenizer,
    samples: list[EncodedSample],
    samplings: list[Sampling],
    dtype: torch.dtype = torch.float32,
    listener: Listener | None = None,
) -> list[Generation]:
    """Prompts (token ids with ``<image>`` tokens, and their image tensors) → one :class:`Generation` each.

    One left-padded batch, generated with the KV cache, under ``dtype`` autocast. Each answer has its
    own :class:`Sampling`: it ends at EOS or at its own ``max_new_tokens`` (the batch runs until its
    last answer ends), and is greedy or sampled at its own temperature and top-p."""
    if len(samplings) != len(samples):
        raise ValueError(f"{len(samples)} samples but {len(samplings)} samplings: give one Sampling per sample")
    device = next(model.parameters()).device
    batch = collate(samples, tokenizer.pad_token_id, padding_side="left")
    images = None if batch["images"] is None else batch["images"].to(device)
    limits = _AnswerLimits(samplings, tokenizer.eos_token_id, listener)
    decodings = {sampling.decoding() for sampling in samplings}
    if len(decodings) > 1:  # transformers' own warpers take one temperature and top-p for the whole batch
        # Theirs neutral (a model's generation config may set its own), ours per answer.
        per_answer = LogitsProcessorList([_AnswerSampling(samplings, device)])
        sampling_kwargs = {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "logits_processor": per_answer}
    else:
        temperature, top_p = decodings.pop()
        sampling_kwargs = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    with autocast(device, dtype):
        model.generate(
            batch["input_ids"].to(device),
            batch["sample_ids"].to(device),
            images,
            batch["image_counts"].to(device),
            batch["image_grids"].to(device),
            batch["image_frames"].to(device),
            max_new_tokens=max(sampling.max_new_tokens for sampling in samplings),
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            stopping_criteria=StoppingCriteriaList([limits]),
            **sampling_kwargs,
        )
    for generation in limits.generations:  # stopped by transformers for its own reasons (the model's length limit)
        generation.finish_reason = generation.finish_reason or "length"
    return limits.generations


class _AnswerLimits(StoppingCriteria):
    """Ends each answer of a batch on its own (at EOS, at its own ``max_new_tokens``, or when its listener
    cancels it) and keeps its tokens, which is why it runs after every decoding step."""

    def __init__(self, samplings: list[Sampling], eos_token_id: int, listener: Listener | None) -> None:
        self.limits = [sampling.max_new_tokens for sampling in samplings]
        self.eos_token_id, self.listener = eos_token_id, listener
        self.generations = [Generation() for _ in samplings]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        for row, token in enumerate(input_ids[:, -1].tolist()):
            generation = self.generations[row]
            if generation.finish_reason is not None:  # transformers keeps padding it until the batch ends
                continue
            generation.steps += 1
            if token == self.eos_token_id:
                generation.finish_reason = "stop"
            else:
                generation.tokens.append(token)
                if generation.steps >= self.limits[row]:
                    generation.finish_reason = "length"
            if self.listener is not None and not self.listener(row, generation) and generation.finish_reason is None:
                generation.finish_reason = "cancelled"  # the listener already knows: it asked
        return torch.tensor([g.finish_reason is not None for g in self.generations], device=input_ids.device)


class _AnswerSampling(LogitsProcessor):
    """Temperature and top-p per answer of a batch. A greedy answer (temperature 0) keeps only its best
    token, so sampling it picks that token: greedy and sampled requests can share one batch."""

    def __init__(self, samplings: list[Sampling], device: torch.device) -> None:
        decodings = [sampling.decoding() for sampling in samplings]
        self.temperatures = torch.tensor([temperature for temperature, _ in decodings], device=device)
        self.top_ps = torch.tensor([top_p for _, top_p in decodings], device=device)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        greedy = self.temperatures == 0
        scores = scores / torch.where(greedy, 1.0, self.temperatures)[:, None]
        # The nucleus: tokens in order of probability until their sum reaches top_p; the first always stays.
        ranked, order = scores.sort(dim=-1, descending=True)
        probabilities = ranked.softmax(dim=-1)
        outside_ranked = probabilities.cumsum(dim=-1) - probabilities >= self.top_ps[:, None]
        outside = torch.zeros_like(outside_ranked).scatter(-1, order, outside_ranked)
        scores = scores.masked_fill(outside, float("-inf"))
        best = scores.argmax(dim=-1, keepdim=True)
        only_best = torch.full_like(scores, float("-inf")).scatter(-1, best, scores.gather(-1, best))
        return torch.where(greedy[:, None], only_best, scores)


class ChatSession:
    """A multi-turn conversation about a fixed set of images and clips; their placeholders open the first turn."""

    def __init__(
        self, assistant: OwlAssistant, images: list[Image.Image | Video] = (), max_new_tokens: int = 128, temperature: float = 0.0
    ) -> None:
        self.assistant, self.images = assistant, list(images)
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.turns: list[Turn] = []

    def ask(self, text: str) -> str:
        self.turns.append(user_turn(text, 0 if self.turns else len(self.images)))
        reply = self.assistant.answer([Request(list(self.turns), self.images)], self.max_new_tokens, self.temperature)[0]
        self.turns.append(Turn("assistant", reply))
        return reply

    def reset(self) -> None:
        self.turns = []
