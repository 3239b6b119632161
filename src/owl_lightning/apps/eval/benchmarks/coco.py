"""COCO Captions, Karpathy test split: CIDEr-D and BLEU-4 of one generated caption an image."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from owl_lightning.apps.eval.benchmarks._task import Answered, Question, Task, each_record
from owl_lightning.apps.eval.benchmarks.caption_scores import bleu4, cider_d
from owl_lightning.data.health import MALFORMED_RECORD, PATH_OUTSIDE_ROOT, SkipLog, SkipSample
from owl_lightning.data.images import resolve_under_root

# lmms-eval's COCO caption prompt: one sentence, as the references are.
CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."
EXAMPLES_KEPT = 5


class COCOCaptions(Task):
    """Karpathy's ``dataset_coco.json`` (``images`` with ``split``, ``filepath``, ``filename`` and ``sentences``
    of ``raw`` text), images under their ``filepath`` folder (val2014/). Only the ``test`` split is asked."""

    name = "coco_captions"
    source = "https://cs.stanford.edu/people/karpathy/deepimagesent/ (caption_datasets.zip; images: https://cocodataset.org)"
    SPLIT_FILE = "dataset_coco.json"

    def questions(self, skips: SkipLog) -> Iterator[Question]:
        def build(record: dict) -> Question | None:
            if record.get("split") != "test":
                return None
            references = [sentence["raw"] for sentence in record["sentences"] if isinstance(sentence.get("raw"), str)]
            if not references:
                raise SkipSample(MALFORMED_RECORD, f"image {record.get('cocoid')} has no reference caption")
            folder = record["filepath"]
            if Path(folder).name != folder or folder in (".", ".."):  # one folder under the root (val2014), which may be a link
                raise SkipSample(PATH_OUTSIDE_ROOT, f"filepath {folder!r} is not a folder name")
            image = resolve_under_root(record["filename"], self.root / folder)
            return Question(str(record["cocoid"]), CAPTION_PROMPT, image, truth=references, max_new_tokens=32)

        yield from each_record(self.files.read_json(self.SPLIT_FILE, list, "images"), str(self.root / self.SPLIT_FILE), skips, build)

    def score(self, answered: list[Answered]) -> dict:
        """Both metrics over the images answered (CIDEr-D's idf counts their references only)."""
        if not answered:
            return {"cider_d": 0.0, "bleu4": 0.0, "examples": []}
        captions, references = [a.answer for a in answered], [a.question.truth for a in answered]
        examples = [{"image": a.question.key, "generated": a.answer, "reference": a.question.truth[0]} for a in answered[:EXAMPLES_KEPT]]
        return {"cider_d": cider_d(captions, references), "bleu4": bleu4(captions, references), "examples": examples}
