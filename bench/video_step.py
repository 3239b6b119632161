"""What a video clip costs in training against a single image (docs/video.md): the stage-1 training step
(vision encoder + abstractor trained, LLM frozen, the configs' precision) of owl-smol on a batch of clip–caption
samples against the same batch size of image–caption samples, and the tokens per sample the LLM reads.

Clips are the moving-shapes set's (drawn here, :mod:`owl_lightning.apps.video`: nothing to build first),
encoded and decoded as training reads them; the images are each clip's middle frame. Reported: the median
step of each after a warm-up step, their ratio, encoder views and tokens per sample.

    python bench/video_step.py [--steps 3] [--batch-size 8] [--num-frames 4] [--config owl-smol] [--no-record]
"""

from __future__ import annotations

import argparse
import json
import statistics

from PIL import Image

from common import median_step_seconds, record
from owl_lightning.apps.video import COLOURS, DIRECTIONS, SHAPES, Clip, draw_clip
from owl_lightning.config import STAGE1, get_config
from owl_lightning.data.collate import EncodedSample, collate
from owl_lightning.data.processor import OwlProcessor
from owl_lightning.data.video import encode_clip
from owl_lightning.models.owl import build_owl
from owl_lightning.train.flops import num_views, sequence_lengths


def samples(processor: OwlProcessor, count: int, video: bool) -> list[EncodedSample]:
    """``count`` captioned clips (or their middle frames), cycling through colours, shapes and directions."""
    template = processor.template(max_length=1024)
    encoded = []
    for index in range(count):
        colour, shape, direction = list(COLOURS)[index % 4], SHAPES[index % 3], list(DIRECTIONS)[index % 4]
        frames = draw_clip(Clip(colour, shape, direction, 8, 0.1, 30, (240, 240, 240)))
        if video:
            media = processor.video_reader(encode_clip(frames))
            input_ids, labels = template.encode_caption(f"a {colour} {shape} moving {direction}", processor.video_reader.visual_tokens)
        else:
            media = processor.image_transform(Image.fromarray(frames[len(frames) // 2]))
            input_ids, labels = template.encode_caption(f"a {colour} {shape}")
        encoded.append(EncodedSample(input_ids, labels, [media]))
    return encoded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps of each (after one warm-up step)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-frames", type=int, default=4, help="video.num_frames")
    parser.add_argument("--config", default="owl-smol", help="model config (owl-tiny for a quick check that it runs)")
    parser.add_argument("--no-record", action="store_true", help="print the figures without writing bench/results.json")
    args = parser.parse_args()
    processor = OwlProcessor(get_config(args.config, {"video.num_frames": args.num_frames}))
    model = build_owl(processor.config, tokenizer=processor.tokenizer)
    model.apply_recipe(STAGE1)
    model.train()
    entry = {"config": args.config, "num_frames": args.num_frames, "batch_size": args.batch_size}
    for kind in ("image", "video"):
        batch = collate(samples(processor, args.batch_size, kind == "video"), processor.tokenizer.pad_token_id)
        lengths = sequence_lengths(batch, model.visual_tokens_per_image, model.image_token_id)
        entry[kind] = {
            "views_per_sample": num_views(batch) / args.batch_size,
            "tokens_per_sample": statistics.mean(lengths.tolist()),
            "step_s": median_step_seconds(model, batch, args.steps),
        }
    entry["step_ratio"] = entry["video"]["step_s"] / entry["image"]["step_s"]
    if args.no_record:
        print(json.dumps(entry, indent=2))
    else:
        record("video_step", entry)


if __name__ == "__main__":
    main()
