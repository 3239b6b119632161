"""``owl-lightning eval``: every metric of a checkpoint into ``<run>/eval.json``, a table, and TensorBoard.

Without ``--tasks``: the embedded data's checks (easy-VQA, captions, text-only ability, a qualitative
sheet). With ``--tasks``: those benchmarks (:mod:`owl_lightning.apps.eval.benchmarks`), read from local copies.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from owl_lightning.apps.eval.benchmarks import TASKS
from owl_lightning.apps.eval.benchmarks.easy_vqa import EasyVQA
from owl_lightning.apps.eval.benchmarks.harness import numeric_leaves, read_questions, run_task
from owl_lightning.apps.eval.captions import caption_bleu, read_captioned_images
from owl_lightning.apps.eval.instructions import instruction_following
from owl_lightning.apps.eval.processes import SINGLE, Processes
from owl_lightning.apps.eval.qualitative import qualitative_sheet
from owl_lightning.apps.eval.text import prose_perplexity, same_task_perplexity
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
    prose_windows: int = 64,
    answer_tokens: int = 128,
    processes: Processes = SINGLE,
) -> tuple[dict, Path]:
    """Every metric of a checkpoint into ``<run>/eval.json`` (and TensorBoard); returns the results and the path.

    Text-only ability, each base LLM (LoRA off) against tuned: ``text_same_task`` (perplexity on held-out
    answers of the training's own text task: task learning), ``text_unseen_prose`` (perplexity on
    ``prose_windows`` windows of 256 tokens of English news prose: retention) and ``text_instructions``
    (answers of up to ``answer_tokens`` tokens to held-out general prompts: length, repetition, agreement).

    ``processes``: easy-VQA's questions are split among them; the rest (a few minutes) runs on rank 0, which
    alone writes. The other processes return after easy-VQA."""
    run, ckpt_file = run_folder(ckpt), resolve_checkpoint(ckpt)
    data = Path(data_dir)
    for needed in (data / "stage2" / "easyvqa_test.json", data / "stage2" / "text_heldout.json", data / "stage1"):
        if not needed.exists():
            raise FileNotFoundError(f"{needed} not found: build the embedded data with `make data` (or pass --data)")
    started = time.perf_counter()
    assistant = OwlAssistant.from_checkpoint(ckpt_file, **asdict(processes.load_options(load or LoadOptions())))
    stage = "stage2" if holds_lora(read_checkpoint(ckpt_file)["state_dict"]) else "stage1"
    results: dict = {"checkpoint": str(ckpt_file), "stage": stage}
    easy_vqa = EasyVQA(data)
    results["easy_vqa"] = run_task(
        assistant, easy_vqa, *read_questions(easy_vqa, vqa_limit), batch_size=batch_size, progress=progress, processes=processes
    )
    path = run / "eval.json"
    if not processes.is_main:
        return results, path
    pairs = read_captioned_images(sorted((data / "stage1").glob("val-*.tar")), caption_limit)
    results["captions"] = caption_bleu(assistant, pairs, batch_size, progress)
    results["text_same_task"] = same_task_perplexity(assistant, str(data / "stage2" / "text_heldout.json"), text_limit, progress)
    results["text_unseen_prose"] = prose_perplexity(assistant, prose_windows, progress=progress)
    results["text_instructions"] = instruction_following(assistant, max_new_tokens=answer_tokens, batch_size=batch_size)
    results["qualitative"] = qualitative_sheet(assistant, run / "eval")
    results["seconds"] = round(time.perf_counter() - started, 1)
    path.write_text(json.dumps(results, indent=2) + "\n")
    _log_to_tensorboard(run, results)
    return results, path


class UnknownTask(ValueError):
    pass


def evaluate_tasks(
    ckpt: str,
    names: list[str],
    roots: dict[str, str] | None = None,
    choice: str = "generate",
    batch_size: int = 16,
    limit: int | None = None,
    progress: bool = True,
    load: LoadOptions | None = None,
    processes: Processes = SINGLE,
) -> tuple[dict, Path]:
    """Benchmarks ``names`` (keys of :data:`TASKS`) into ``<run>/eval.json`` (and TensorBoard); returns the results and the path.

    ``roots``: task name → its folder (default: each task's ``default_root``); ``choice``: how multiple-choice
    questions are answered (``generate`` or ``likelihood``); ``limit``: the first N questions of each task.
    Each task's results sit under its name, beside what an earlier eval of the same checkpoint wrote there.
    ``processes``: each answers its share of every task; all return the results, rank 0 alone writes them."""
    unknown = sorted(set(names) - set(TASKS)) + sorted(set(roots or {}) - set(TASKS))
    if unknown:
        raise UnknownTask(f"unknown task(s) {unknown}: the tasks are {', '.join(TASKS)}")
    tasks = [TASKS[name]((roots or {}).get(name)) for name in names]
    run, ckpt_file = run_folder(ckpt), resolve_checkpoint(ckpt)
    started = time.perf_counter()
    questions = {task.name: read_questions(task, limit) for task in tasks}
    assistant = OwlAssistant.from_checkpoint(ckpt_file, **asdict(processes.load_options(load or LoadOptions())))
    path = run / "eval.json"
    earlier = json.loads(path.read_text()) if path.is_file() else {}
    results = earlier if earlier.get("checkpoint") == str(ckpt_file) else {"checkpoint": str(ckpt_file)}
    for task in tasks:
        scores = run_task(assistant, task, *questions[task.name], choice, batch_size, progress, processes)
        results[task.name] = {**scores, "choice": choice, "root": str(task.root)}
    results["seconds"] = round(time.perf_counter() - started, 1)
    if processes.is_main:
        path.write_text(json.dumps(results, indent=2) + "\n")
        _log_tasks_to_tensorboard(run, results, names)
    return results, path


def tasks_table(results: dict, names: list[str]) -> str:
    """``task  metric  value`` rows of every number in each task's results."""
    rows = [(name, leaf, f"{value:.4g}") for name in names for leaf, value in numeric_leaves(results[name])]
    width = [max(len(row[i]) for row in rows) for i in range(2)] if rows else [0, 0]
    return "\n".join(f"{task:<{width[0]}}  {leaf:<{width[1]}}  {value}" for task, leaf, value in rows)


def summary_table(results: dict, examples: int = 3) -> str:
    """The results as aligned ``name  value`` rows, then ``examples`` prompt/answer pairs of the text prompts."""
    vqa, captions = results["easy_vqa"], results["captions"]
    same_task, prose, prompts = results["text_same_task"], results["text_unseen_prose"], results["text_instructions"]
    base, tuned = prompts["base"], prompts["tuned"]
    count = prompts["prompts"]
    length_change = "n/a" if prompts["length_ratio"] is None else f"x{prompts['length_ratio']:.2f}"
    rows = [("easy-VQA accuracy", f"{vqa['accuracy']:.1%} of {vqa['count']}")]
    rows += [(f"  {kind}", f"{value:.1%}") for kind, value in vqa["by_type"].items()]
    rows += [
        ("caption BLEU-4", f"{captions['bleu4']:.3f} ({captions['exact_match']:.1%} exact, {captions['count']} images)"),
        ("same-task text perplexity, base -> tuned", _perplexities(same_task) + f", {same_task['count']} held-out answers"),
        (
            "unseen prose perplexity, base -> tuned",
            _perplexities(prose) + f", {'within' if prose['within_target'] else 'outside'} the +{prose['target_ratio'] - 1:.0%} target, "
            f"{prose['windows']} x {prose['window_tokens']} tokens",
        ),
        ("text prompts: answer tokens, base / tuned", f"{base['mean_tokens']:.1f} / {tuned['mean_tokens']:.1f} ({length_change})"),
        ("text prompts: degenerate, base / tuned", f"{base['degenerate']} / {tuned['degenerate']} of {count}"),
        ("text prompts: 3-gram repetition, base / tuned", f"{base['mean_repetition']:.3f} / {tuned['mean_repetition']:.3f}"),
        ("text prompts: agreement with base (ROUGE-L)", f"{prompts['agreement_rouge_l']:.3f}"),
    ]
    width = max(len(name) for name, _ in rows)
    table = [f"{name:<{width}}  {value}" for name, value in rows]
    if examples:
        table += ["", f"text prompts: base LLM (template: {prompts['base_template']}) vs tuned (template: {prompts['tuned_template']})"]
        for answer in prompts["answers"][:examples]:
            table += [f"  {_shorten(answer['prompt'])}"]
            table += [f"    base:  {_shorten(answer['base'])}", f"    tuned: {_shorten(answer['tuned'])}"]
    return "\n".join(table)


def _perplexities(scores: dict) -> str:
    return f"{scores['base_perplexity']:.3f} -> {scores['tuned_perplexity']:.3f} ({scores['ratio'] - 1:+.1%})"


def _shorten(text: str, width: int = 100) -> str:
    """One line of at most ``width`` characters (an answer's line breaks would break the table)."""
    line = _one_line(text)
    return line if len(line) <= width else line[: width - 3] + "..."


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _log_to_tensorboard(run: Path, results: dict) -> None:
    from torch.utils.tensorboard import SummaryWriter

    step = read_checkpoint(results["checkpoint"]).get("global_step", 0)
    with SummaryWriter(str(run)) as writer:  # beside the run's own TensorBoard files: one run in TensorBoard
        writer.add_scalar("eval/easy_vqa_accuracy", results["easy_vqa"]["accuracy"], step)
        for kind, value in results["easy_vqa"]["by_type"].items():
            writer.add_scalar(f"eval/easy_vqa_{kind}", value, step)
        writer.add_scalar("eval/caption_bleu4", results["captions"]["bleu4"], step)
        writer.add_scalar("eval/text_same_task_perplexity_ratio", results["text_same_task"]["ratio"], step)
        prose = results["text_unseen_prose"]
        writer.add_scalar("eval/prose_base_perplexity", prose["base_perplexity"], step)
        writer.add_scalar("eval/prose_tuned_perplexity", prose["tuned_perplexity"], step)
        writer.add_scalar("eval/prose_perplexity_ratio", prose["ratio"], step)
        prompts = results["text_instructions"]
        writer.add_scalar("eval/prompts_agreement_rouge_l", prompts["agreement_rouge_l"], step)
        for model in ("base", "tuned"):
            for name in ("mean_tokens", "mean_repetition", "degenerate_rate"):
                writer.add_scalar(f"eval/prompts_{model}_{name}", prompts[model][name], step)
        pairs = "\n".join(f"| {_cell(a['prompt'])} | {_cell(a['base'])} | {_cell(a['tuned'])} |" for a in prompts["answers"])
        writer.add_text("eval/text_prompts", "| prompt | base LLM | tuned |\n|---|---|---|\n" + pairs, step)
        sheet = "\n".join(f"| {r['photo']} | {r['prompt']} | {r['answer']} |" for r in results["qualitative"])
        writer.add_text("eval/qualitative", "| photo | prompt | answer |\n|---|---|---|\n" + sheet, step)


def _log_tasks_to_tensorboard(run: Path, results: dict, names: list[str]) -> None:
    """Every number of each task's results as ``eval/<task>/<metric>`` (``eval/pope/random/f1``)."""
    from torch.utils.tensorboard import SummaryWriter

    step = read_checkpoint(results["checkpoint"]).get("global_step", 0)
    with SummaryWriter(str(run)) as writer:
        for name in names:
            for tag, value in numeric_leaves(results[name], f"eval/{name}/"):
                writer.add_scalar(tag, value, step)


def _cell(text: str) -> str:
    """Text as one Markdown table cell."""
    return _one_line(text).replace("|", "\\|")
