"""A qualitative sheet: fixed prompts on real photos (scikit-image's sample images), as Markdown."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from owl_lightning.extras import require
from owl_lightning.inference import OwlAssistant, Request

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
PROMPTS = ("Describe this image.", "What color is the main object?", "What shape is in the image?")


def photo(name: str) -> tuple[Image.Image, str]:
    """A scikit-image sample photo and its human caption (the first line of its docstring)."""
    loader = getattr(require("skimage.data", "eval"), name)
    return Image.fromarray(loader()).convert("RGB"), (loader.__doc__ or name).strip().splitlines()[0]


def qualitative_sheet(assistant: OwlAssistant, out_dir: Path) -> list[dict]:
    """Answer every prompt about every photo; write ``out_dir/qualitative.md`` with the images beside it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    lines = ["# Qualitative sheet", "", "Greedy answers to fixed prompts on scikit-image's sample photos.", ""]
    for name in PHOTOS:
        image, caption = photo(name)
        image.save(out_dir / f"{name}.png")
        answers = assistant.answer([Request.single(prompt, [image]) for prompt in PROMPTS], max_new_tokens=40)
        lines += [f"## {name}: {caption}", "", f"![{name}]({name}.png)", ""]
        for prompt, answer in zip(PROMPTS, answers):
            lines.append(f"- **{prompt}** {answer}")
            rows.append({"photo": name, "prompt": prompt, "answer": answer})
        lines.append("")
    (out_dir / "qualitative.md").write_text("\n".join(lines))
    return rows
