"""What AnyRes costs on the embedded default (issue 24 §2): visual tokens per image and the stage-2
training step (LoRA + abstractor, vision frozen, the configs' precision) of owl-smol against owl-smol-anyres
on the same samples — one real photo each (scikit-image's landscape and portrait photos), a question
and a short answer.

    python bench/highres_step.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics

import skimage.data
from PIL import Image

from common import median_step_seconds, record
from owl_lightning.config import STAGE2, get_config
from owl_lightning.data.collate import EncodedSample, collate
from owl_lightning.data.highres import visual_tokens_of
from owl_lightning.data.processor import OwlProcessor
from owl_lightning.data.template import Conversation, Turn
from owl_lightning.models.owl import build_owl
from owl_lightning.train.flops import sequence_lengths

PHOTOS = ("coffee", "chelsea", "rocket", "astronaut")  # 600×400, 451×300, 640×427, 512×512


def photos() -> list[Image.Image]:
    images = [Image.fromarray(getattr(skimage.data, name)()) for name in PHOTOS]
    return images + [image.transpose(Image.Transpose.TRANSPOSE) for image in images]  # and their portraits


def step_seconds(name: str, repeats: int) -> dict:
    processor = OwlProcessor(get_config(name))
    template = processor.template(max_length=1024)
    model = build_owl(processor.config, tokenizer=processor.tokenizer)
    model.apply_recipe(STAGE2)
    model.train()
    conversation = Conversation([Turn("user", "<image>\nWhat is in this picture?"), Turn("assistant", "A photo.")], ["photo"])
    samples = []
    for image in photos():
        pixels = processor.image_transform(image)
        input_ids, labels, _ = template.encode(conversation, [visual_tokens_of(pixels, template.visual_tokens_per_image)])
        samples.append(EncodedSample(input_ids, labels, [pixels]))
    batch = collate(samples, processor.tokenizer.pad_token_id, pack_visual_tokens_per_image=template.visual_tokens_per_image)
    lengths = sequence_lengths(batch, template.visual_tokens_per_image, template.image_token_id)
    return {
        "views": int(batch["images"].shape[0]),
        "visual_tokens_per_image": [visual_tokens_of(sample.images[0], template.visual_tokens_per_image) for sample in samples],
        "tokens_per_sample": statistics.mean(lengths.tolist()),
        "step_s": median_step_seconds(model, batch, repeats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    crop, anyres = step_seconds("owl-smol", args.repeats), step_seconds("owl-smol-anyres", args.repeats)
    record("highres_step", {"owl-smol": crop, "owl-smol-anyres": anyres, "step_ratio": anyres["step_s"] / crop["step_s"]})


if __name__ == "__main__":
    main()
