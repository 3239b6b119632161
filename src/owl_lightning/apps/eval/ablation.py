"""The paper's ablation (mPLUG-Owl Table 2) on the embedded task, with one training budget.

    r1  stage 1 only
    r2  stage 2 only (no stage 1: the abstractor starts random)
    r3  both stages, stage 2 on text-only instructions
    r4  both stages, stage 2 on multimodal instructions only
    r5  both stages, stage 2 joint (the default)

Every stage-2 run has the same steps and batch size (``experiments/stage2_smol.yaml``) and r1, r3-r5
share one stage-1 run (``experiments/stage1_smol.yaml``), each moved into its own folder with
``--trainer.default_root_dir``. Each run is a subprocess of the same CLI users call, resumable
(re-running skips finished runs), and evaluated with ``owl-lightning eval``'s metrics; the table
goes to ``docs/ablation.md``.

    python -m owl_lightning.apps.eval.ablation [--runs runs/ablation] [--vqa-limit 1000] [--only r3,r4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from owl_lightning.apps.eval.run import evaluate

BASE_CONFIG = "experiments/base.yaml"
STAGE1_CONFIG = "experiments/stage1_smol.yaml"
STAGE2_CONFIG = "experiments/stage2_smol.yaml"
SETTINGS = {
    "r1": ("stage 1 only", True, None),
    "r2": ("stage 2 only (no stage 1)", False, "data_manifests/embedded_stage2.yaml"),
    "r3": ("both stages; stage 2 text-only", True, "data_manifests/ablation_text_only.yaml"),
    "r4": ("both stages; stage 2 multimodal only", True, "data_manifests/ablation_multimodal_only.yaml"),
    "r5": ("both stages; stage 2 joint", True, "data_manifests/embedded_stage2.yaml"),
}


def _fit(stage: str, config: str, run_dir: Path, extra: list[str]) -> list[str]:
    """Train one run of the ablation with the shipped configs, moved to ``run_dir`` (one setting moves a run)."""
    command = [sys.executable, "-m", "owl_lightning", stage, "fit", "--config", BASE_CONFIG, "--config", config]
    command += ["--trainer.default_root_dir", str(run_dir), "--ckpt_path", "last", *extra]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    return command


def run_ablation(runs: Path, vqa_limit: int | None, only: list[str]) -> dict:
    stage1_ckpt = runs / "stage1" / "checkpoints" / "last.ckpt"
    commands: dict[str, list[list[str]]] = {}
    stage1_command = None
    if any(SETTINGS[name][1] for name in only):
        stage1_command = _fit("stage1", STAGE1_CONFIG, runs / "stage1", [])
    results = {}
    for name in only:
        description, with_stage1, manifest = SETTINGS[name]
        commands[name] = [stage1_command] if with_stage1 else []
        if manifest is None:
            ckpt = stage1_ckpt
        else:
            extra = ["--data.manifest", manifest] + (["--model.init_from", str(stage1_ckpt)] if with_stage1 else [])
            commands[name].append(_fit("stage2", STAGE2_CONFIG, runs / name, extra))
            ckpt = runs / name / "checkpoints" / "last.ckpt"
        metrics, path = evaluate(str(ckpt), vqa_limit=vqa_limit)
        results[name] = {
            "description": description,
            "eval": str(path),
            "commands": commands[name],
            "vqa": metrics["easy_vqa"]["accuracy"],
            "vqa_by_type": metrics["easy_vqa"]["by_type"],
            "vqa_count": metrics["easy_vqa"]["count"],
            "caption_bleu4": metrics["captions"]["bleu4"],
            "caption_exact": metrics["captions"]["exact_match"],
            "text_perplexity": metrics["text_same_task"]["tuned_perplexity"],
            "base_text_perplexity": metrics["text_same_task"]["base_perplexity"],
        }
    return results


def markdown(results: dict, vqa_limit: int | None) -> str:
    lines = [
        "# The paper's ablation on the embedded task",
        "",
        "mPLUG-Owl's Table 2 asks which training settings give multimodal and text-only ability. Reproduced "
        "here on owl-smol and easy-VQA with one budget: stage 1 = `experiments/stage1_smol.yaml` (shared), "
        "stage 2 = `experiments/stage2_smol.yaml` with the manifest of each setting. Made by "
        f"`make ablation` (`python -m owl_lightning.apps.eval.ablation`); easy-VQA on "
        f"{'all' if vqa_limit is None else f'the first {vqa_limit}'} test questions; captions: exact matches and "
        "BLEU-4 on 200 held-out images (the embedded captions have 3 words, so no 4-grams: BLEU-4 is 0 even for "
        "exact captions); text: perplexity of the 93 held-out docstring answers (base SmolLM2-135M: "
        f"{next(iter(results.values()))['base_text_perplexity']:.2f}).",
        "",
        "| setting | easy-VQA | shape | colour | yes/no | exact captions | caption BLEU-4 | text perplexity |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        by = r["vqa_by_type"]
        lines.append(
            f"| {name}: {r['description']} | {r['vqa']:.1%} | {by.get('shape', 0):.1%} | {by.get('color', 0):.1%} | "
            f"{by.get('yes_no', 0):.1%} | {r['caption_exact']:.1%} | {r['caption_bleu4']:.3f} | {r['text_perplexity']:.2f} |"
        )
    lines += ["", "## Commands", ""]
    for name, r in results.items():
        lines.append(f"- {name}:")
        # As a user types them: `python` for this interpreter.
        lines += [f"  - `{' '.join('python' if part == sys.executable else part for part in c)}`" for c in r["commands"] if c]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="owl-lightning ablation", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", default="runs/ablation")
    parser.add_argument("--vqa-limit", type=int, default=1000, help="easy-VQA test questions per setting (default 1000; 0: all)")
    parser.add_argument("--only", default=",".join(SETTINGS), help="comma-separated settings, e.g. r3,r4")
    parser.add_argument("--out", default="docs/ablation.md")
    ns = parser.parse_args(argv)
    only = [name.strip() for name in ns.only.split(",")]
    unknown = set(only) - set(SETTINGS)
    if unknown:
        parser.error(f"unknown settings {sorted(unknown)}; known: {', '.join(SETTINGS)}")
    limit = ns.vqa_limit or None
    results = run_ablation(Path(ns.runs), limit, only)
    (Path(ns.runs) / "ablation.json").write_text(json.dumps(results, indent=2) + "\n")
    Path(ns.out).write_text(markdown(results, limit))
    print(Path(ns.out).read_text())


if __name__ == "__main__":
    main()
