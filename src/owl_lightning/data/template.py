"""Conversations → token ids and labels: the mPLUG-Owl template, or the tokenizer's own chat template.

Pure functions of the tokenizer and the text: no I/O, no randomness. Only assistant answers (and
the EOS that ends each) are supervised; every other position gets ``IGNORE_INDEX``. Segments are
tokenised one at a time and concatenated, so which tokens are supervised is known exactly rather
than guessed from offsets.

Lengths count the *expanded* sequence: each ``<image>`` token stands for its image's visual tokens
in the model (``visual_tokens_per_image``, or the count given per image for AnyRes tiles), so a
sample that fits here fits the LLM's context.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from owl_lightning.config import IGNORE_INDEX, IMAGE_TOKEN
from owl_lightning.data.health import BAD_TEXT, IMAGE_COUNT_MISMATCH, MALFORMED_RECORD, MISSING_TEXT, TOO_LONG, SkipSample

# Text longer than this many characters per token of max_length is refused untokenised: no
# tokenizer's tokens run that long on average, so such a record is garbage, not a long sample.
MAX_CHARACTERS_PER_TOKEN = 64

OWL_SYSTEM_PROMPT = (
    "The following is a conversation between a curious human and AI assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
TEMPLATE_STYLES = ("owl", "chat_template")
ROLES = ("user", "assistant")
_HUMAN = "\nHuman: "
_AI = "\nAI: "


@dataclass
class Turn:
    """One message. ``content`` of a user turn may hold ``<image>`` placeholders."""

    role: str
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"Turn role must be one of {ROLES}, got {self.role!r}")


@dataclass
class Conversation:
    """A conversation as read from an instruction file.

    ``images`` are paths (relative to the source's image root) in placeholder order; ``origin``
    names the file and record (``path/llava.json#17``, ``path/x.jsonl:34``) for skip messages;
    ``system`` overrides the template's system prompt for this conversation.
    """

    turns: list[Turn]
    images: list[str] = field(default_factory=list)
    source: str = ""
    origin: str = ""
    system: str | None = None

    def check_images(self) -> None:
        """Raise :class:`SkipSample` unless every image has its placeholder, in a user turn. The system
        message is counted too: it is tokenised like any turn, so a placeholder there would have no image."""
        placeholders = sum(text.count(IMAGE_TOKEN) for text in self.texts())
        if placeholders != len(self.images):
            raise SkipSample(IMAGE_COUNT_MISMATCH, f"{placeholders} {IMAGE_TOKEN} placeholders, {len(self.images)} images")
        if any(IMAGE_TOKEN in turn.content for turn in self.turns if turn.role == "assistant"):
            # It would be supervised as an output token and get visual features spliced in.
            raise SkipSample(MALFORMED_RECORD, f"an assistant turn contains {IMAGE_TOKEN}; images belong in user turns")
        if self.system and IMAGE_TOKEN in self.system:
            raise SkipSample(MALFORMED_RECORD, f"the system message contains {IMAGE_TOKEN}; images belong in user turns")

    def texts(self) -> list[str]:
        """Every message's text, the system message included."""
        return [turn.content for turn in self.turns] + ([self.system] if self.system else [])


def resolve_system_prompt(style: str, system_prompt: str | None) -> str | None:
    """A run's ``system_prompt`` setting → the template's: ``None`` means the style's default (owl:
    the paper's line; chat_template: whatever the tokenizer's template adds), ``""`` means none."""
    if system_prompt is None:
        return OWL_SYSTEM_PROMPT if style == "owl" else None
    return system_prompt or None


# (token ids, supervised?) — the unit both styles build a sequence from.
_Segment = tuple[list[int], bool]


class ConversationTemplate:
    """Tokenises conversations and captions into ``(input_ids, labels)`` for the LLM.

    Args:
        tokenizer: the LLM's tokenizer with ``<image>`` as one special token (``load_tokenizer``).
        style: ``"owl"`` (the mPLUG-Owl template) or ``"chat_template"`` (``tokenizer.apply_chat_template``;
            pass ``system_prompt=None`` unless the model was trained with a system message).
        system_prompt: the system text used when a conversation has none; ``None``: no system text.
        max_length: limit of the expanded sequence (text tokens + every image's visual tokens).
        visual_tokens_per_image: visual tokens the model puts in place of one ``<image>`` token, unless
            a call gives each image's count (``image_tokens``: AnyRes images take more, by their size).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        style: str = "owl",
        system_prompt: str | None = OWL_SYSTEM_PROMPT,
        max_length: int = 1024,
        visual_tokens_per_image: int = 65,
    ) -> None:
        if style not in TEMPLATE_STYLES:
            raise ValueError(f"template style must be one of {TEMPLATE_STYLES}, got {style!r}")
        if style == "chat_template" and not tokenizer.chat_template:
            raise ValueError(f"{type(tokenizer).__name__} has no chat_template; use style='owl' or a chat model's tokenizer")
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token: answers must end with one so the model learns to stop")
        image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if tokenizer(IMAGE_TOKEN, add_special_tokens=False)["input_ids"] != [image_token_id]:
            raise ValueError(f"the tokenizer does not keep {IMAGE_TOKEN} as one token; build it with models.llm.load_tokenizer")
        if system_prompt and IMAGE_TOKEN in system_prompt:
            raise ValueError(f"system_prompt contains {IMAGE_TOKEN}: images belong in user turns; remove it from the system prompt")
        if max_length < 1 or visual_tokens_per_image < 1:
            raise ValueError(f"max_length and visual_tokens_per_image must be positive, got {max_length}, {visual_tokens_per_image}")
        self.tokenizer = tokenizer
        self.style = style
        self.system_prompt = system_prompt
        self.max_length = max_length
        self.visual_tokens_per_image = visual_tokens_per_image
        self.image_token_id: int = image_token_id
        # Some tokenizers (e.g. Qwen) have no BOS; the sequence then starts with the system text.
        self._bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        # A fast tokenizer's Rust backend, called directly: the HF call around it costs ~10 µs of
        # Python per text, half the tokenising time of a stage-1 caption. Same ids (tested).
        self._backend = getattr(tokenizer, "backend_tokenizer", None)

    # ----------------------------------------------------------------------------------- public

    def encode(self, conv: Conversation, image_tokens: Sequence[int] | None = None) -> tuple[list[int], list[int], int]:
        """Training sample of a conversation; ``image_tokens``: each image's visual tokens (None: all
        ``visual_tokens_per_image``).

        Layout (style ``owl``; ``[...]`` marks supervised tokens, one line per image)::

            BOS {system}\\nHuman: <image>\\nHuman: {question 1}\\nAI: [{answer 1} EOS]\\nHuman: {question 2}\\nAI: [{answer 2} EOS]

        Style ``chat_template`` renders the tokenizer's template and supervises each assistant
        message's content up to and including its first EOS token.

        Returns ``input_ids`` and ``labels`` (same length ``T``, ``IGNORE_INDEX`` where not
        supervised) and the number of images whose ``<image>`` token survived truncation — they
        are ``conv.images[:num_images]``.

        Raises :class:`SkipSample` (``IMAGE_COUNT_MISMATCH``, ``MALFORMED_RECORD``, ``TOO_LONG``).
        """
        conv.check_images()
        if not any(turn.role == "assistant" for turn in conv.turns):
            raise SkipSample(MALFORMED_RECORD, "no assistant turn to learn from")
        self._check_text(conv.texts())
        input_ids, labels = self._join(self._segments(conv, add_generation_prompt=False))
        input_ids, labels = self._fit(input_ids, labels, image_tokens)
        return input_ids, labels, input_ids.count(self.image_token_id)

    def encode_prompt(self, conv: Conversation, image_tokens: Sequence[int] | None = None) -> list[int]:
        """Generation prompt for a conversation whose last turn is the user's; earlier assistant
        turns are history. Style ``owl`` ends with ``\\nAI: ``; ``chat_template`` with the
        template's generation prompt. Raises ``SkipSample(TOO_LONG)`` past ``max_length``;
        ``image_tokens`` as in :meth:`encode`."""
        conv.check_images()
        if not conv.turns or conv.turns[-1].role != "user":
            raise ValueError(f"{conv.origin or 'conversation'}: encode_prompt needs a conversation that ends with a user turn")
        self._check_text(conv.texts())
        input_ids, _ = self._join(self._segments(conv, add_generation_prompt=True))
        if self.expanded_length(input_ids, image_tokens) > self.max_length:
            raise SkipSample(
                TOO_LONG,
                f"prompt of {self.expanded_length(input_ids, image_tokens)} tokens (images expanded) "
                f"exceeds max_length={self.max_length}; shorten the history or raise max_length",
            )
        return input_ids

    def encode_caption(self, caption: str, image_tokens: int | None = None) -> tuple[list[int], list[int]]:
        """Stage-1 sample: ``BOS <image> [{caption} EOS]`` (bracketed tokens supervised); the caption
        is cut from the right so the expanded length fits ``max_length``, the image counted as
        ``image_tokens`` visual tokens (None: ``visual_tokens_per_image``).

        Raises ``SkipSample(MISSING_TEXT)`` for an empty caption, ``SkipSample(TOO_LONG)`` when not
        even one caption token fits after the image."""
        caption = caption.strip()
        if not caption:
            raise SkipSample(MISSING_TEXT, "empty caption")
        self._check_text([caption])
        segments = [(self._bos, False), ([self.image_token_id], False), (self._tokens(caption) + [self.tokenizer.eos_token_id], True)]
        return self._fit(*self._join(segments), None if image_tokens is None else [image_tokens])

    def encode_document(self, pieces: list[str | None], image_tokens: Sequence[int] | None = None) -> tuple[list[int], list[int], int]:
        """Stage-1 sample of an interleaved document: ``pieces`` in document order, a text chunk (``str``)
        or an image slot (``None``), → ``BOS {text} <image> [{text}] <image> [{text} EOS]`` (bracketed
        tokens supervised). Text chunks are tokenised as given: the reader puts the separators in.
        ``image_tokens``: each image's visual tokens, in order (None: ``visual_tokens_per_image`` each).

        Text before the first image stays unsupervised, as OpenFlamingo trains on MMC4: it cannot see any
        image, and with the LLM frozen in stage 1 its loss would only dilute the mean over the tokens that
        teach the visual modules. The sequence is cut from the right to ``max_length`` expanded tokens, an
        image kept whole or not at all, and an image the cut leaves with no text after it goes too: nothing
        would attend to it. (A document that ends in image slots should lose them before it comes here.)

        Returns ``input_ids``, ``labels`` (same length) and how many images kept their ``<image>`` token:
        the first ``num_images`` slots of ``pieces``; the rest fell past the cut.

        Raises :class:`SkipSample`: ``MISSING_TEXT`` when no text follows an image, ``MALFORMED_RECORD``
        for a text chunk containing ``<image>`` (it would become a placeholder without an image),
        ``BAD_TEXT`` / ``TOO_LONG`` as for any text.
        """
        texts = [piece for piece in pieces if piece is not None]
        if any(IMAGE_TOKEN in text for text in texts):
            raise SkipSample(MALFORMED_RECORD, f"the document's text contains {IMAGE_TOKEN}; remove it from the text")
        first_image = pieces.index(None) if None in pieces else len(pieces)
        if not any(piece and piece.strip() for piece in pieces[first_image:]):
            raise SkipSample(MISSING_TEXT, "no text follows an image: nothing to learn from")
        self._check_text(texts)
        segments: list[_Segment] = [(self._bos, False)]
        for position, piece in enumerate(pieces):
            if piece is None:
                segments.append(([self.image_token_id], False))
            else:
                segments.append((self._tokens(piece), position > first_image))
        segments.append(([self.tokenizer.eos_token_id], True))
        input_ids, labels = self._fit(*self._join(segments), image_tokens)
        while input_ids[-1] == self.image_token_id:  # cut right after an image: nothing left that sees it
            input_ids, labels = input_ids[:-1], labels[:-1]
        return input_ids, labels, input_ids.count(self.image_token_id)

    def caption_prompt(self) -> list[int]:
        """``BOS <image>``: the prompt from which the model generates a caption."""
        return self._bos + [self.image_token_id]

    def expanded_length(self, input_ids: list[int], image_tokens: Sequence[int] | None = None) -> int:
        """Sequence length the LLM sees: every ``<image>`` token becomes its image's visual tokens
        (``image_tokens`` in placeholder order; None: ``visual_tokens_per_image`` each)."""
        return len(input_ids) + sum(tokens - 1 for tokens in self._image_tokens(input_ids.count(self.image_token_id), image_tokens))

    def _image_tokens(self, num_images: int, image_tokens: Sequence[int] | None) -> Sequence[int]:
        if image_tokens is None:
            return [self.visual_tokens_per_image] * num_images
        if len(image_tokens) < num_images:
            raise ValueError(
                f"visual-token counts for {len(image_tokens)} images, but the text has {num_images} {IMAGE_TOKEN} placeholders"
            )
        return image_tokens[:num_images]

    # --------------------------------------------------------------------------------- internal

    def _segments(self, conv: Conversation, add_generation_prompt: bool) -> list[_Segment]:
        if self.style == "owl":
            return self._owl_segments(conv, add_generation_prompt)
        return self._chat_template_segments(conv, add_generation_prompt)

    def _system(self, conv: Conversation) -> str | None:
        return conv.system if conv.system is not None else self.system_prompt

    def _owl_segments(self, conv: Conversation, add_generation_prompt: bool) -> list[_Segment]:
        system = self._system(conv)
        segments: list[_Segment] = [(self._bos + self._tokens(system or ""), False)]
        for turn in conv.turns:
            if turn.role == "user":
                # One line per image, as mPLUG-Owl was trained; adjacent placeholders stay separate images.
                text = turn.content.replace(IMAGE_TOKEN, "").strip()
                lines = [_HUMAN + IMAGE_TOKEN] * turn.content.count(IMAGE_TOKEN) + ([_HUMAN + text] if text else [])
                segments.append((self._tokens("".join(lines)), False))
            else:
                segments.append((self._tokens(_AI), False))
                segments.append((self._tokens(turn.content.strip()) + [self.tokenizer.eos_token_id], True))
        if add_generation_prompt:
            segments.append((self._tokens(_AI), False))
        return segments

    def _chat_template_segments(self, conv: Conversation, add_generation_prompt: bool) -> list[_Segment]:
        system = self._system(conv)
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": turn.role, "content": turn.content} for turn in conv.turns
        ]
        segments: list[_Segment] = []
        rendered = ""  # the text already turned into segments
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self._render(messages[:k], add_generation_prompt=True, after=rendered)
            full = self._render(messages[: k + 1], add_generation_prompt=False, after=prompt)
            answer = self._tokens(full[len(prompt) :])
            # Whatever the template puts after the EOS (e.g. a newline) is never generated: not supervised.
            eos_at = answer.index(self.tokenizer.eos_token_id) + 1 if self.tokenizer.eos_token_id in answer else len(answer)
            segments += [(self._tokens(prompt[len(rendered) :]), False), (answer[:eos_at], True), (answer[eos_at:], False)]
            rendered = full
        tail = self._render(messages, add_generation_prompt=add_generation_prompt, after=rendered)
        segments.append((self._tokens(tail[len(rendered) :]), False))
        return segments

    def _render(self, messages: list[dict], add_generation_prompt: bool, after: str) -> str:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        if not text.startswith(after):
            # Templates that rewrite earlier turns (e.g. strip reasoning from past answers) cannot be split
            # into per-message segments, so the supervised span would be unknown.
            raise ValueError(
                "the tokenizer's chat template renders a conversation prefix differently from the whole "
                "conversation, so assistant spans cannot be located; use style='owl' or a template that only appends"
            )
        return text

    def _check_text(self, texts: list[str]) -> None:
        """The checks on raw text before any of it is tokenised.

        Length first, in characters: text far beyond anything ``max_length`` tokens could hold is refused
        (``TOO_LONG``) — a multi-megabyte record would cost seconds of tokenizer time for a sample cut to a
        few hundred tokens. Then lone surrogates (a JSON ``"\\ud800"`` escape decodes to one): the
        tokenizer cannot take them (``TypeError``), so they are ``BAD_TEXT``."""
        characters = sum(len(text) for text in texts)
        limit = self.max_length * MAX_CHARACTERS_PER_TOKEN
        if characters > limit:
            raise SkipSample(
                TOO_LONG,
                f"{characters:,} characters of text, more than {limit:,} "
                f"({MAX_CHARACTERS_PER_TOKEN} per token of max_length={self.max_length})",
            )
        for text in texts:
            if text.isascii():
                continue
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:
                raise SkipSample(
                    BAD_TEXT, f"a lone surrogate {text[err.start]!r} at character {err.start}; text must be valid Unicode"
                ) from None

    def _tokens(self, text: str) -> list[int]:
        if not text:
            return []
        if self._backend is not None:
            return self._backend.encode(text, add_special_tokens=False).ids
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @staticmethod
    def _join(segments: list[_Segment]) -> tuple[list[int], list[int]]:
        input_ids: list[int] = []
        labels: list[int] = []
        for ids, supervised in segments:
            input_ids += ids
            labels += ids if supervised else [IGNORE_INDEX] * len(ids)
        return input_ids, labels

    def _fit(self, input_ids: list[int], labels: list[int], image_tokens: Sequence[int] | None = None) -> tuple[list[int], list[int]]:
        """Cut from the right to ``max_length`` expanded tokens; an image is kept whole or not at all.
        Refuses a sample left without a supervised token: its loss would be 0/0 (NaN)."""
        expanded = self.expanded_length(input_ids, image_tokens)
        if expanded > self.max_length:
            length = 0
            images = iter(self._image_tokens(input_ids.count(self.image_token_id), image_tokens))
            for keep, token in enumerate(input_ids):
                length += next(images) if token == self.image_token_id else 1
                if length > self.max_length:
                    input_ids, labels = input_ids[:keep], labels[:keep]
                    break
        if all(label == IGNORE_INDEX for label in labels):
            raise SkipSample(
                TOO_LONG,
                f"{expanded} tokens (images expanded to their visual tokens) leave no answer "
                f"token within max_length={self.max_length}; raise max_length or shorten the prompt",
            )
        return input_ids, labels
