"""`torchrun --nproc-per-node 2 owl-lightning eval|owleval ...`: two gloo processes on the CPU split the
questions and give exactly the results one process gives; rank 0 alone writes them."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from owl_lightning.checkpoints import export_checkpoint
from tests.helpers import SUBSET, write_owleval
from tests.test_benchmarks import write_mme, write_scienceqa
from tests.test_export import stage2_checkpoint

pytestmark = pytest.mark.slow  # several processes, each loading a model


def owl_lightning(*args: str, processes: int = 1) -> tuple[str, str]:
    """``owl-lightning ARGS`` in ``processes`` processes (torchrun's launcher when more than one): stdout, stderr."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"] if processes > 1 else []
    done = subprocess.run(
        [sys.executable, *launcher, "-m", "owl_lightning", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout, done.stderr


@pytest.fixture
def exported(tmp_path):
    """Two copies of one export of owl-tiny (its LLM varied: answers differ with question and image), one per run."""
    torch.manual_seed(0)
    export = export_checkpoint(stage2_checkpoint(tmp_path / "run.ckpt", system_prompt=None), tmp_path / "one")
    return export, shutil.copytree(export, tmp_path / "two")


def test_benchmark_results_of_two_processes_equal_one_process(tmp_path, exported):
    write_scienceqa(tmp_path / "sqa")
    (tmp_path / "mme").mkdir()
    write_mme(tmp_path / "mme")
    tasks = ["--tasks", "scienceqa_img,mme", "--root", f"scienceqa_img={tmp_path / 'sqa'}", "--root", f"mme={tmp_path / 'mme'}"]
    results = []
    for export, processes in zip(exported, (1, 2)):
        for choice in ("generate", "likelihood"):
            printed, _ = owl_lightning(
                "eval", "--ckpt", str(export), "--device", "cpu", "--precision", "fp32", *tasks, "--choice", choice, processes=processes
            )
            assert printed.count("scienceqa_img  accuracy") == 1  # one table: rank 0's
            written = json.loads((export / "eval.json").read_text())
            results.append({task: written[task] | {"root": None} for task in ("scienceqa_img", "mme")})
    one_generate, one_likelihood, two_generate, two_likelihood = results
    assert two_generate == one_generate and two_likelihood == one_likelihood
    assert one_generate["mme"]["count"] == 8 and one_generate["scienceqa_img"]["count"] == 2


def test_owleval_answers_of_two_processes_equal_one_process(tmp_path, exported):
    data = write_owleval(tmp_path / "owleval", SUBSET)
    files = []
    for export, processes in zip(exported, (1, 2)):
        out = tmp_path / f"answers_{processes}.jsonl"
        _, progress = owl_lightning(
            "owleval",
            "--ckpt",
            str(export),
            "--device",
            "cpu",
            "--precision",
            "fp32",
            "--data",
            str(data),
            "--out",
            str(out),
            "--model-id",
            "tiny",
            "--max-new-tokens",
            "8",
            processes=processes,
        )
        files.append([json.loads(line) for line in out.read_text().splitlines()])
        # Rank 0's progress bar counts its share: the single-turn conversation (1 question) of the two.
        assert re.search(r"OwlEval: 100%.*\| 3/3 " if processes == 1 else r"OwlEval: 100%.*\| 1/1 ", progress)
    assert files[1] == files[0] and [answer["question_id"] for answer in files[0]] == [1, 2, 3]
    assert len({answer["answer"] for answer in files[0]}) > 1  # really generated: the answers differ
