"""Caption quality on held-out images: BLEU-4 (torchmetrics) of greedy captions against the references."""

from __future__ import annotations

import tarfile
from pathlib import Path

from PIL import Image
from torchmetrics.text import BLEUScore
from tqdm import tqdm

from owl_lightning.data.images import decode_image
from owl_lightning.inference import OwlAssistant


def read_captioned_images(shards: list[Path], limit: int) -> list[tuple[Image.Image, str]]:
    """(image, caption) pairs from img2dataset-layout tars, in shard order."""
    pairs: dict[str, dict] = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar:
                key, _, ext = member.name.rpartition(".")
                if ext in ("png", "jpg", "webp"):
                    pairs.setdefault(key, {})["image"] = decode_image(tar.extractfile(member).read())
                elif ext == "txt":
                    pairs.setdefault(key, {})["caption"] = tar.extractfile(member).read().decode().strip()
        if len(pairs) >= limit:
            break
    return [(p["image"], p["caption"]) for p in list(pairs.values())[:limit] if "image" in p and "caption" in p]


def caption_bleu(assistant: OwlAssistant, pairs: list[tuple[Image.Image, str]], batch_size: int = 64, progress: bool = True) -> dict:
    bleu = BLEUScore(n_gram=4, smooth=True)
    exact, examples = 0, []
    for start in tqdm(range(0, len(pairs), batch_size), desc="captions", disable=not progress, unit="batch"):
        chunk = pairs[start : start + batch_size]
        predicted = assistant.caption([image for image, _ in chunk])
        bleu.update(predicted, [[reference] for _, reference in chunk])
        for (_, reference), caption in zip(chunk, predicted):
            exact += caption.lower() == reference.lower()
            if len(examples) < 5:
                examples.append({"reference": reference, "generated": caption})
    return {"bleu4": float(bleu.compute()), "exact_match": exact / max(len(pairs), 1), "count": len(pairs), "examples": examples}
