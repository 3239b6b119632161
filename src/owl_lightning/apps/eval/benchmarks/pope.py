"""POPE (object hallucination): yes/no questions about COCO val2014 images, three splits."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

from owl_lightning.apps.eval.benchmarks._task import Answered, Question, Task, each_record
from owl_lightning.apps.eval.benchmarks.answers import pope_yes_or_no
from owl_lightning.apps.eval.benchmarks.metrics import yes_no_metrics
from owl_lightning.data.health import MALFORMED_RECORD, SkipLog, SkipSample, parse_json_record
from owl_lightning.data.images import resolve_under_root

SPLITS = ("adversarial", "popular", "random")


class POPE(Task):
    """``coco_pope_<split>.json`` (one JSON record a line: ``question_id``, ``image``, ``text``, ``label``),
    images in val2014/. Splits whose file is absent are left out; none at all is an error."""

    name = "pope"
    source = "https://github.com/AoiDragon/POPE (output/coco/)"

    def split_files(self) -> dict[str, str]:
        present = {split: f"coco_pope_{split}.json" for split in SPLITS if (self.root / f"coco_pope_{split}.json").is_file()}
        if not present:
            self.files.path(f"coco_pope_{SPLITS[0]}.json")  # raises, naming the file and where to get it
        return present

    def questions(self, skips: SkipLog) -> Iterator[Question]:
        for split, filename in self.split_files().items():
            path = self.files.path(filename)
            yield from each_record(path.read_text().splitlines(), str(path), skips, partial(self._question, split))

    def _question(self, split: str, line: str) -> Question | None:
        if not line.strip():
            return None
        record = parse_json_record(line, "line")
        if record.get("label") not in ("yes", "no"):
            raise SkipSample(MALFORMED_RECORD, f"label is {record.get('label')!r}, not 'yes' or 'no'")
        image = resolve_under_root(record["image"], self.root / "val2014")
        return Question(f"{split}/{record['question_id']}", record["text"], image, truth=record["label"], group=split, max_new_tokens=8)

    def score(self, answered: list[Answered]) -> dict:
        splits = sorted({a.question.group for a in answered})
        return {
            split: yes_no_metrics((pope_yes_or_no(a.answer), a.question.truth) for a in answered if a.question.group == split)
            for split in splits
        }
