"""Interleaved image–text documents (MMC4, OBELICS): their schemas read in document order, and the rules
that make one document one sample.

Stage 1 reads documents from WebDataset shards, each image a member of the sample (:mod:`.shards`);
stage 2 from JSONL files, each image a file under the source's ``image_root`` (:mod:`.instruct`,
:mod:`.mixture`). Both read a record with :func:`read_document` and encode it with
:func:`encode_document_sample`; only where an image's bytes come from differs (``image_bytes``).
docs/interleaved.md shows the layouts.
"""

from __future__ import annotations

import base64
import binascii
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path

import torch
from PIL import Image

from owl_lightning.data.collate import EncodedSample
from owl_lightning.data.health import (
    AFTER_LAST_TEXT,
    CORRUPT_IMAGE,
    MALFORMED_RECORD,
    MISSING_IMAGE,
    MISSING_TEXT,
    OVER_MAX_IMAGES,
    PAST_MAX_LENGTH,
    SkipLog,
    SkipSample,
)
from owl_lightning.data.highres import TiledImage
from owl_lightning.data.images import decode_image

DOCUMENT_FORMATS = ("mmc4", "obelics")
# What joins two pieces of text with no image kept between them: MMC4's pieces are sentences of one page,
# OBELICS's paragraphs.
TEXT_SEPARATORS = {"mmc4": " ", "obelics": "\n\n"}


@dataclass(frozen=True)
class ImageSlot:
    """The document's ``index``-th image (its place in MMC4's ``image_info``, its rank among OBELICS's images).

    ``name``: where the record says the image is (MMC4's ``image_name``, OBELICS's ``images`` entry), a
    path under the image root in stage 2's files; ``embedded``: MMC4's ``image_base64``, where the record
    embeds the image."""

    index: int
    name: str | None = None
    embedded: object = None


@dataclass(frozen=True)
class Document:
    """A document's pieces in order — text (a sentence, a paragraph) or an image slot — and the slots its
    reader refused already (a malformed ``image_info`` entry), as ``(reason, detail)``."""

    format: str
    pieces: list[str | ImageSlot]
    refused: list[tuple[str, str]] = field(default_factory=list)
    source: str = ""
    origin: str = ""

    @property
    def images(self) -> list[str]:
        """The named images' paths, in document order."""
        return [piece.name for piece in self.pieces if isinstance(piece, ImageSlot) and piece.name]


def read_document(record: object, format: str, source: str = "", origin: str = "") -> Document:
    """A parsed record in ``format``'s schema → :class:`Document`; :class:`SkipSample` (``malformed_record``)
    when it is not one."""
    if not isinstance(record, dict):
        raise SkipSample(MALFORMED_RECORD, f"the record is a {type(record).__name__}, not a {format} document object")
    pieces, refused = _READERS[format](record)
    return Document(format, pieces, refused, source, origin)


def _mmc4_pieces(record: dict) -> tuple[list[str | ImageSlot], list[tuple[str, str]]]:
    """MMC4 (``{"text_list": [sentence, ...], "image_info": [{"image_name", "raw_url", "matched_text_index",
    "matched_sim", ["image_base64"]}, ...]}``) → pieces: each image right before the sentence it was matched
    to, as OpenFlamingo places them, so that sentence — the one most about the image — learns from it.
    Images matched to one sentence keep their ``image_info`` order."""
    text_list, image_info = record.get("text_list"), record.get("image_info")
    if not (isinstance(text_list, list) and all(isinstance(text, str) for text in text_list) and isinstance(image_info, list)):
        raise SkipSample(MALFORMED_RECORD, "an MMC4 record needs text_list (a list of strings) and image_info (a list)")
    before: defaultdict[int, list[ImageSlot]] = defaultdict(list)
    refused = []
    for index, info in enumerate(image_info):
        at = info.get("matched_text_index") if isinstance(info, dict) else None
        if isinstance(at, bool) or not isinstance(at, int) or not 0 <= at < len(text_list):
            refused.append(
                (MALFORMED_RECORD, f"image_info[{index}] has no matched_text_index within text_list ({len(text_list)} sentences)")
            )
            continue
        name = info.get("image_name")
        before[at].append(ImageSlot(index, name if isinstance(name, str) else None, info.get("image_base64")))
    pieces: list[str | ImageSlot] = []
    for at, sentence in enumerate(text_list):
        pieces += before[at]
        pieces.append(sentence)
    return pieces, refused


def _obelics_pieces(record: dict) -> tuple[list[str | ImageSlot], list[tuple[str, str]]]:
    """OBELICS (``{"texts": [...], "images": [...]}``, parallel lists: at each position a paragraph in one and
    ``null`` in the other) → pieces in that order."""
    texts, images = record.get("texts"), record.get("images")
    if not (isinstance(texts, list) and isinstance(images, list) and len(texts) == len(images)):
        raise SkipSample(MALFORMED_RECORD, "an OBELICS record needs texts and images: lists of one length")
    pieces: list[str | ImageSlot] = []
    slots = count()
    for position, (text, image) in enumerate(zip(texts, images)):
        if (text is None) == (image is None) or not (text is None or isinstance(text, str)):
            raise SkipSample(
                MALFORMED_RECORD, f"position {position} must hold a string in texts or an image in images, not both or neither"
            )
        pieces.append(ImageSlot(next(slots), image if isinstance(image, str) else None) if text is None else text)
    return pieces, []


_READERS = {"mmc4": _mmc4_pieces, "obelics": _obelics_pieces}


def embedded_image(slot: ImageSlot) -> bytes:
    """MMC4's base64 ``image_base64`` of ``slot``; :class:`SkipSample` when it has none or it is not base64."""
    if slot.embedded is None:
        raise SkipSample(MISSING_IMAGE, f"image {slot.index} has no image file and no image_base64")
    try:
        return base64.b64decode(slot.embedded, validate=True)
    except (binascii.Error, TypeError, ValueError) as err:
        raise SkipSample(CORRUPT_IMAGE, f"image_base64 is not base64: {err}") from None


def encode_document_sample(
    document: Document,
    image_bytes: Callable[[ImageSlot], bytes | Path],
    encode_document: Callable[..., tuple[list[int], list[int], int]],
    image_transform: Callable[[Image.Image], torch.Tensor | TiledImage],
    max_images: int,
    skips: SkipLog,
    where: str,
    image_tokens: Callable[[Image.Image], int] | None = None,
) -> EncodedSample:
    """An interleaved document → :class:`EncodedSample` with its images in document order.

    ``image_bytes``: a slot → its encoded image (bytes, or a path to the file), or :class:`SkipSample`;
    ``encode_document``: the template's (:meth:`~owl_lightning.data.template.ConversationTemplate.encode_document`).

    The rules for image slots (each slot dropped is counted in ``skips`` by reason, once the document is used;
    the document's text always stays):

    * a slot with no text after it in the document is dropped (``after_last_text``): nothing would attend to it;
    * the first ``max_images`` slots whose image decodes are kept; later ones are dropped unread
      (``over_max_images``);
    * a slot whose image is missing, cannot be decoded, or whose MMC4 entry is malformed is dropped under that
      reason (``missing_image``, ``corrupt_image``, ...);
    * images past ``max_length`` once tokenised are dropped (``past_max_length``).

    The document is skipped (one counted skip) when no image is left (``missing_image``: text alone teaches the
    visual modules nothing) or when no text follows an image (``missing_text``).
    """
    pieces, dropped = document.pieces, list(document.refused)
    last_text = max((at for at, piece in enumerate(pieces) if isinstance(piece, str) and piece.strip()), default=-1)
    if last_text < 0:
        raise SkipSample(MISSING_TEXT, "the document has no text")
    dropped += [(AFTER_LAST_TEXT, "")] * sum(isinstance(piece, ImageSlot) for piece in pieces[last_text + 1 :])
    chunks: list[str | None] = []  # text chunks and kept images (None), as encode_document takes them
    images: list[Image.Image] = []
    for piece in pieces[: last_text + 1]:
        if isinstance(piece, str):
            if not piece.strip():
                continue
            if chunks and chunks[-1] is not None:  # no image kept since the last text: one chunk
                chunks[-1] += TEXT_SEPARATORS[document.format] + piece.strip()
            else:
                chunks.append(piece.strip())
        elif len(images) == max_images:
            dropped.append((OVER_MAX_IMAGES, ""))
        else:
            try:
                images.append(decode_image(image_bytes(piece)))
                chunks.append(None)
            except SkipSample as refused:
                dropped.append((refused.reason, f"image {piece.index}: {refused.detail}"))
    if not images:
        reasons = Counter(reason for reason, _ in dropped)
        raise SkipSample(
            MISSING_IMAGE, f"no usable image in the document ({', '.join(f'{r}={n}' for r, n in reasons.items()) or 'none given'})"
        )
    # AnyRes: each image's visual tokens, by its size, for the max_length cut.
    input_ids, labels, kept = encode_document(chunks, None if image_tokens is None else [image_tokens(image) for image in images])
    dropped += [(PAST_MAX_LENGTH, "")] * (len(images) - kept)
    for reason, detail in dropped:
        skips.drop_image(reason, where, detail)
    return EncodedSample(
        input_ids=input_ids, labels=labels, images=[image_transform(image) for image in images[:kept]], source=document.source
    )
