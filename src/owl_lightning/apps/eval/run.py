"""``owl-lightning eval``: every metric of a checkpoint into ``<run>/eval.json``, a table, and TensorBoard."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from owl_lightning.apps.eval.captions import caption_bleu, read_captioned_images
from owl_lightning.apps.eval.qualitative import qualitative_sheet
from owl_lightning.apps.eval.text import text_retention
from owl_lightning.apps.eval.vqa import easy_vqa_accuracy, read_vqa_records
from owl_lightning.checkpoints import holds_lora, read_checkpoint, resolve_checkpoint, run_folder
from owl_lightning.inference import LoadOptions, OwlAssistant


def evaluate(
    ckpt: str,
    data_dir: str = "data/embedded",
    vqa_limit: int | None = None,
    text_limit: int | None = None,
    caption_limit: int = 200,
    batch_size: int = 64,
    progress: bool = True,
    load: LoadOptions | None = None,
) -> tuple[dict, Path]:
    run, ckpt_file = run_folder(ckpt), resolve_checkpoint(ckpt)
    data = Path(data_dir)
    for needed in (data / "stage2" / "easyvqa_test.json", data / "stage2" / "text_heldout.json", data / "stage1"):
        if not needed.exists():
            raise FileNotFoundError(f"{needed} not found: build the embedded data with `make data` (or pass --data)")
    started = time.perf_counter()
    assistant = OwlAssistant.from_checkpoint(ckpt_file, **asdict(load or LoadOptions()))
    stage = "stage2" if holds_lora(read_checkpoint(ckpt_file)["state_dict"]) else "stage1"
    results: dict = {"checkpoint": str(ckpt_file), "stage": stage}
    records = read_vqa_records(data / "stage2" / "easyvqa_test.json", vqa_limit)
    results["easy_vqa"] = easy_vqa_accuracy(assistant, records, data / "images", batch_size, progress)
    pairs = read_captioned_images(sorted((data / "stage1").glob("val-*.tar")), caption_limit)
    results["captions"] = caption_bleu(assistant, pairs, batch_size, progress)
    results["text_retention"] = text_retention(assistant, str(data / "stage2" / "text_heldout.json"), text_limit, progress)
    results["qualitative"] = qualitative_sheet(assistant, run / "eval")
    results["seconds"] = round(time.perf_counter() - started, 1)
    path = run / "eval.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    _log_to_tensorboard(run, results)
    return results, path


def summary_table(results: dict) -> str:
    vqa, captions, text = results["easy_vqa"], results["captions"], results["text_retention"]
    rows = [("easy-VQA accuracy", f"{vqa['accuracy']:.1%} of {vqa['count']}")]
    rows += [(f"  {kind}", f"{value:.1%}") for kind, value in vqa["by_type"].items()]
    rows += [
        ("caption BLEU-4", f"{captions['bleu4']:.3f} ({captions['exact_match']:.1%} exact, {captions['count']} images)"),
        ("text perplexity, base LLM", f"{text['base_perplexity']:.3f}"),
        ("text perplexity, tuned", f"{text['tuned_perplexity']:.3f} ({text['ratio'] - 1:+.1%})"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _log_to_tensorboard(run: Path, results: dict) -> None:
    from torch.utils.tensorboard import SummaryWriter

    step = read_checkpoint(results["checkpoint"]).get("global_step", 0)
    with SummaryWriter(str(run)) as writer:  # beside the run's own TensorBoard files: one run in TensorBoard
        writer.add_scalar("eval/easy_vqa_accuracy", results["easy_vqa"]["accuracy"], step)
        for kind, value in results["easy_vqa"]["by_type"].items():
            writer.add_scalar(f"eval/easy_vqa_{kind}", value, step)
        writer.add_scalar("eval/caption_bleu4", results["captions"]["bleu4"], step)
        writer.add_scalar("eval/text_perplexity_ratio", results["text_retention"]["ratio"], step)
        sheet = "\n".join(f"| {r['photo']} | {r['prompt']} | {r['answer']} |" for r in results["qualitative"])
        writer.add_text("eval/qualitative", "| photo | prompt | answer |\n|---|---|---|\n" + sheet, step)
