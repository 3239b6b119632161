"""Readers for the instruction formats users already have, read as they are (DESIGN §3).

=============  ==========================================================================================
format         file
=============  ==========================================================================================
llava          JSON list of ``{"id", "image": path or [paths] (optional), "conversations": [{"from", "value"}]}``
sharegpt       JSON list of ``{"id", "conversations": [{"from", "value"}]}`` (Vicuna, Baize)
alpaca         JSON list of ``{"instruction", "input", "output"}``
owl_jsonl      one ``{"text": conversation in the mPLUG-Owl template, "image": [paths], "task_type"}`` per line
video_chatgpt  JSON list of ``{"id", "video": path, "conversations": [{"from", "value"}]}`` (Video-ChatGPT,
               VideoChat, Video-LLaVA): the clip stands at ``<video>`` (or ``<image>``) in the text, or before
               the first question when the text has no placeholder
mmc4           one MMC4 document per line (``{"text_list", "image_info": [{"image_name", "matched_text_index"}]}``),
               its images files under ``image_root`` (``image_name``) or base64 (``image_base64``)
obelics        one OBELICS document per line (``{"texts", "images"}``), its ``images`` entries paths under ``image_root``
=============  ==========================================================================================

Every conversation format becomes a list of :class:`Conversation`; the document formats (interleaved
image–text documents, trained like stage 1's: :mod:`~owl_lightning.data.documents`) a list of
:class:`~owl_lightning.data.documents.Document`. A bad record — whatever it makes a parser
raise — is skipped and recorded in the :class:`SkipLog` with its file and record (``file.json#17``:
index in the list; ``file.jsonl:34``: line number); a file that cannot be read at all raises. Image paths stay relative strings: the
mixture joins them with the source's ``image_root`` (clips: ``video_root``) and checks them when it loads them.

Normalisation, the same for every format: empty messages are dropped; leading assistant turns
(nothing to answer) are dropped; trailing user turns (no answer to learn) are dropped with their
images; consecutive turns of one role are merged with ``"\\n"``.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from owl_lightning.config import IMAGE_TOKEN
from owl_lightning.data.documents import DOCUMENT_FORMATS, Document, read_document
from owl_lightning.data.health import MALFORMED_RECORD, MISSING_TEXT, SkipLog, SkipSample, parse_json_record
from owl_lightning.data.manifest import INSTRUCTION_FORMATS, InstructionSource
from owl_lightning.data.template import Conversation, Turn
from owl_lightning.files import jsonl_lines

# Speaker names seen in LLaVA / ShareGPT / Vicuna / Baize exports → our roles.
SPEAKER_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "system": "system",
}
# Video-ChatGPT's (and Video-LLaVA's) placeholder of the clip; the model's is <image> for clips as for images.
VIDEO_TOKEN = "<video>"
# Splits "{system}\nHuman: ...\nAI: ..." into [system, "Human", text, "AI", text, ...].
_OWL_MARKERS = re.compile(r"\n(Human|AI): ")
_OWL_ROLES = {"Human": "user", "AI": "assistant"}

# (role, text) messages with role user/assistant/system, plus image paths in placeholder order.
_Parsed = tuple[list[tuple[str, str]], list[str]]


def read_conversations(source: InstructionSource, skips: SkipLog) -> list[Conversation | Document]:
    """All usable conversations (documents, for a document format) of ``source`` (at most
    ``source.num_samples`` records are read).

    Bad records are skipped and recorded in ``skips``; an unreadable file raises ``ValueError``.
    """
    if source.format not in _PARSERS and source.format not in DOCUMENT_FORMATS:
        raise ValueError(f"instruction source {source.name!r}: unknown format {source.format!r}; use one of {INSTRUCTION_FORMATS}")
    path = Path(source.path)
    if not path.is_file():
        raise FileNotFoundError(
            f"instruction source {source.name!r}: {path} not found; fix its 'path' in the data manifest, "
            "or build the data (the embedded data and the scenes task: make data)"
        )
    if source.format in DOCUMENT_FORMATS:
        documents = []
        for where, line in itertools.islice(_jsonl_lines(path), source.num_samples):
            with skips.catch(where):
                documents.append(read_document(parse_json_record(line, "line"), source.format, source.name, where))
        return documents
    records = _jsonl_lines(path) if source.format == "owl_jsonl" else _json_records(path, source.format)
    parse = _PARSERS[source.format]
    conversations = []
    for where, record in itertools.islice(records, source.num_samples):
        with skips.catch(where):
            messages, images = parse(record)
            conversations.append(_conversation(messages, images, source.name, where))
    return conversations


# ----------------------------------------------------------------------------- file → records


def _json_records(path: Path, format: str) -> Iterator[tuple[str, object]]:
    try:
        text = path.read_text(encoding="utf-8")
        if not text.strip():  # a 0-byte file: no records, not a broken one
            return
        records = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable JSON file ({err}); format {format!r} expects a JSON list of records") from None
    except RecursionError:
        # The file is parsed whole, so one over-deep record makes all of it unreadable.
        raise ValueError(
            f"{path}: JSON nested too deeply to parse (a record with thousands of nested lists or objects); "
            "remove that record, or convert the file to one record per line and read it as 'owl_jsonl'"
        ) from None
    if not isinstance(records, list):
        raise ValueError(
            f"{path}: format {format!r} expects a JSON list of records, found a {type(records).__name__}; "
            "for one JSON object per line use format 'owl_jsonl'"
        )
    for index, record in enumerate(records):
        yield f"{path}#{index}", record


def _jsonl_lines(path: Path) -> Iterator[tuple[str, bytes]]:
    """Raw lines, so one bad line is one skipped record rather than an unreadable file."""
    for number, line in jsonl_lines(path):
        yield f"{path}:{number}", line


# ---------------------------------------------------------------------------- record → messages


def _parse_conversations(record: object) -> _Parsed:
    """LLaVA and ShareGPT: the same ``conversations`` list; LLaVA adds ``image``."""
    conversations = _field(record, "conversations", list)
    messages = []
    for number, message in enumerate(conversations):
        if not (isinstance(message, dict) and isinstance(message.get("from"), str) and isinstance(message.get("value"), str)):
            raise SkipSample(MALFORMED_RECORD, f"conversations[{number}] must be {{'from': str, 'value': str}}, got {message!r:.80}")
        role = SPEAKER_ROLES.get(message["from"].lower())
        if role is None:
            raise SkipSample(
                MALFORMED_RECORD, f"conversations[{number}] has unknown speaker {message['from']!r}; known: {sorted(SPEAKER_ROLES)}"
            )
        messages.append((role, message["value"]))
    return messages, _image_list(record.get("image"))


def _parse_video_chatgpt(record: object) -> _Parsed:
    """A clip and a conversation about it: ``<video>`` becomes the model's placeholder (``<image>``); without
    one, the clip goes before the first question (where Video-ChatGPT's training prompt puts it)."""
    messages, _ = _parse_conversations(record)
    video = _field(record, "video", str)
    if not video:
        raise SkipSample(MALFORMED_RECORD, "'video' must be a non-empty path")
    messages = [(role, text.replace(VIDEO_TOKEN, IMAGE_TOKEN)) for role, text in messages]
    if not any(IMAGE_TOKEN in text for _, text in messages):
        first = next((index for index, (role, _) in enumerate(messages) if role == "user"), None)
        if first is not None:
            messages[first] = ("user", f"{IMAGE_TOKEN}\n{messages[first][1]}")
    return messages, [video]


def _parse_alpaca(record: object) -> _Parsed:
    instruction = _field(record, "instruction", str).strip()
    extra_input = (_field(record, "input", str, required=False) or "").strip()
    output = _field(record, "output", str).strip()
    if not instruction or not output:
        raise SkipSample(MISSING_TEXT, "empty 'instruction'" if not instruction else "empty 'output'")
    question = f"{instruction}\n\n{extra_input}" if extra_input else instruction
    return [("user", question), ("assistant", output)], []


def _parse_owl_line(line: object) -> _Parsed:
    record = parse_json_record(line, "line")
    # The leading "\n" makes a text without the system line split the same way.
    parts = _OWL_MARKERS.split("\n" + _field(record, "text", str))
    if len(parts) < 3:
        raise SkipSample(MALFORMED_RECORD, "'text' has no '\\nHuman: ' / '\\nAI: ' turns; expected the mPLUG-Owl template")
    # parts[0] is the system line: the template writes its own. A "Human: <image>" line becomes a
    # user turn of its own, which merging then prepends to the question that follows.
    messages = [(_OWL_ROLES[speaker], text) for speaker, text in zip(parts[1::2], parts[2::2])]
    return messages, _image_list(record.get("image"))


_PARSERS: dict[str, Callable[[object], _Parsed]] = {
    "llava": _parse_conversations,
    "sharegpt": _parse_conversations,
    "alpaca": _parse_alpaca,
    "owl_jsonl": _parse_owl_line,
    "video_chatgpt": _parse_video_chatgpt,
}


def _field(record: object, key: str, kind: type, required: bool = True):
    if not isinstance(record, dict):
        raise SkipSample(MALFORMED_RECORD, f"record must be a JSON object, got {type(record).__name__}")
    value = record.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, kind):
        raise SkipSample(MALFORMED_RECORD, f"field {key!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def _image_list(value: object) -> list[str]:
    """``image`` as the formats write it: absent (text-only), one path, or a list of paths."""
    images = [] if value is None else [value] if isinstance(value, str) else value
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise SkipSample(MALFORMED_RECORD, f"'image' must be a path or a list of paths, got {value!r:.80}")
    return images


# ---------------------------------------------------------------------- messages → Conversation


def _conversation(messages: list[tuple[str, str]], images: list[str], source: str, origin: str) -> Conversation:
    if not messages:
        raise SkipSample(MALFORMED_RECORD, "empty conversation")
    texts = [(role, text.strip()) for role, text in messages if text.strip()]
    system = "\n".join(text for role, text in texts if role == "system") or None
    turns = [Turn(role, text) for role, text in texts if role != "system"]
    Conversation(turns, images, system=system).check_images()
    while turns and turns[0].role == "assistant":
        turns.pop(0)
    while turns and turns[-1].role == "user":
        # Images are in placeholder order, so the dropped turn's images are the last ones.
        images = images[: len(images) - turns.pop().content.count(IMAGE_TOKEN)]
    if not turns:
        raise SkipSample(MALFORMED_RECORD, "no assistant turn answering a user turn")
    merged = [turns[0]]
    for turn in turns[1:]:
        if turn.role == merged[-1].role:
            merged[-1] = Turn(turn.role, f"{merged[-1].content}\n{turn.content}")
        else:
            merged.append(turn)
    return Conversation(turns=merged, images=images, source=source, origin=origin, system=system)
