"""lmms-eval runs an owl_lightning model by name (`lmms-eval --model owl_lightning --model_args ckpt=...`),
offline, on a local copy of a tiny MME-format dataset scored by lmms-eval's own MME task code.

The model is an export of owl-tiny (it holds the whole LLM), so the test's own OwlAssistant and the one
lmms-eval loads are the same model: lmms-eval's answers must be that model's answers."""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from owl_lightning.checkpoints import export_checkpoint
from owl_lightning.inference import OwlAssistant, Request
from tests.helpers import COLOURS, reply_log_probability
from tests.test_export import stage2_checkpoint

datasets = pytest.importorskip("datasets")
pytest.importorskip("lmms_eval")

# Two questions per image, as MME asks them (acc+ needs both right); one perception and one cognition category.
QUESTIONS = [
    ("red.png", "color", "Is the square red? Please answer yes or no.", "Yes"),
    ("red.png", "color", "Is the square blue? Please answer yes or no.", "No"),
    ("blue.png", "color", "Is the square blue? Please answer yes or no.", "Yes"),
    ("blue.png", "color", "Is the square green? Please answer yes or no.", "No"),
    ("green.png", "commonsense_reasoning", "Is this a colour of grass? Please answer yes or no.", "Yes"),
    ("green.png", "commonsense_reasoning", "Is this a colour of snow? Please answer yes or no.", "No"),
]
# lmms-eval's MME task, as it ships, on a local dataset saved with datasets.save_to_disk.
TASK_YAML = """\
task: owl_local_mme
dataset_path: {dataset}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: generate_until
doc_to_visual: !function utils.mme_doc_to_visual
doc_to_text: !function utils.mme_doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 16
  temperature: 0
  do_sample: false
process_results: !function utils.mme_process_results
metric_list:
  - metric: mme_perception_score
    aggregation: !function utils.mme_aggregate_results
    higher_is_better: true
  - metric: mme_cognition_score
    aggregation: !function utils.mme_aggregate_results
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: "\\nAnswer the question using a single word or phrase."
"""


def write_local_mme(folder):
    """A DatasetDict {"test": ...} with MME's columns (question_id, question, answer, category, image)."""
    records = {"question_id": [], "question": [], "answer": [], "category": [], "image": []}
    for image_name, category, question, answer in QUESTIONS:
        records["question_id"].append(image_name)  # MME pairs the two questions of an image by this id
        records["question"].append(question)
        records["answer"].append(answer)
        records["category"].append(category)
        records["image"].append(Image.new("RGB", (32, 32), COLOURS[image_name.removesuffix(".png")]))
    features = datasets.Features(
        {name: datasets.Value("string") for name in ("question_id", "question", "answer", "category")} | {"image": datasets.Image()}
    )
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(records, features=features)}).save_to_disk(str(folder))


def mme_score(predictions: list[str]) -> dict[str, float]:
    """MME's score from its definition: per category, the mean over images of acc + acc+ (in percent:
    acc = share of the image's two questions answered right, acc+ = 100 when both are); a yes/no is read
    from the answer's first four characters (lmms-eval's parse)."""

    def said(prediction: str) -> str:
        head = prediction.lower().strip().replace(".", "")[:4]
        return "yes" if "yes" in head else "no" if "no" in head else "other"

    per_image: dict[tuple[str, str], list[bool]] = {}
    for (image_name, category, _, answer), prediction in zip(QUESTIONS, predictions):
        per_image.setdefault((category, image_name), []).append(said(prediction) == answer.lower())
    by_category: dict[str, list[float]] = {}
    for (category, _), right in per_image.items():
        by_category.setdefault(category, []).append(50.0 * sum(right) + 100.0 * all(right))
    totals = {name: sum(scores) / len(scores) for name, scores in by_category.items()}
    return {"mme_perception_score": totals["color"], "mme_cognition_score": totals["commonsense_reasoning"]}


@pytest.mark.slow  # lmms-eval's start-up (datasets, its task registry) takes tens of seconds
def test_lmms_eval_scores_an_owl_lightning_model_by_name(tmp_path):
    torch.manual_seed(0)
    export = export_checkpoint(stage2_checkpoint(tmp_path / "run.ckpt", system_prompt=None), tmp_path / "export")
    write_local_mme(tmp_path / "mme")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "owl_local_mme.yaml").write_text(TASK_YAML.format(dataset=tmp_path / "mme"))
    (tasks / "utils.py").write_text("from lmms_eval.tasks.mme.utils import *  # the official MME scoring, unchanged\n")

    offline = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run(
        [
            *(sys.executable, "-m", "lmms_eval"),
            *("--model", "owl_lightning", "--model_args", f"ckpt={export},device=cpu,precision=fp32"),
            *("--tasks", "owl_local_mme", "--include_path", str(tasks), "--batch_size", "4"),
            *("--output_path", str(tmp_path / "out"), "--log_samples"),
        ],
        capture_output=True,
        text=True,
        env=offline,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # lmms-eval reports a failed evaluation in its log and still exits 0: the results file is the proof.
    (results_file,) = (tmp_path / "out").rglob("*_results.json")
    scores = json.loads(results_file.read_text())["results"]["owl_local_mme"]
    (samples_file,) = (tmp_path / "out").rglob("*_samples_owl_local_mme.jsonl")
    logged = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda sample: sample["doc_id"])
    answers = [sample["filtered_resps"] for sample in logged]

    assistant = OwlAssistant.from_checkpoint(export, device="cpu", precision="fp32")
    # MME's doc_to_text swaps its own yes/no instruction for the task's post_prompt.
    prompts = [
        question.replace(" Please answer yes or no.", "\nAnswer the question using a single word or phrase.")
        for _, _, question, _ in QUESTIONS
    ]
    images = [Image.new("RGB", (32, 32), COLOURS[name.removesuffix(".png")]) for name, _, _, _ in QUESTIONS]
    expected = assistant.answer([Request.single(prompt, [image]) for prompt, image in zip(prompts, images)], max_new_tokens=16)
    assert answers == expected
    assert len(set(answers)) > 1  # the model's answers differ with the question and the image: they were really generated
    for metric, value in mme_score(answers).items():
        assert scores[f"{metric},none"] == pytest.approx(value)


def test_the_adapter_cuts_answers_at_stop_strings_and_reads_generation_settings():
    from owl_lightning.apps.eval.lmms_eval_model import OwlLightningModel, _cut_at_first, _stop_strings

    assert _cut_at_first("yes\n\nBecause it is red", _stop_strings({"until": ["\n\n"]})) == "yes"
    assert _cut_at_first("A. red</s>B", _stop_strings({"until": "</s>"})) == "A. red"
    model = OwlLightningModel.__new__(OwlLightningModel)
    model.default_max_new_tokens = 128
    greedy = model._sampling({"temperature": 0.7, "do_sample": False})
    assert (greedy.max_new_tokens, greedy.temperature, greedy.top_p) == (128, 0.0, 1.0)
    sampled = model._sampling({"max_new_tokens": 16, "temperature": 0.7, "top_p": 0.9, "do_sample": True})
    assert (sampled.max_new_tokens, sampled.temperature, sampled.top_p) == (16, 0.7, 0.9)


def test_lmms_eval_finds_the_model_through_its_entry_point():
    from lmms_eval import models

    from owl_lightning.apps.eval.lmms_eval_model import OwlLightningModel

    assert models.get_model("owl_lightning") is OwlLightningModel


def test_a_task_with_videos_is_refused_by_name():
    from owl_lightning.apps.eval.lmms_eval_model import _images

    with pytest.raises(TypeError, match=r"task 'videomme', document 3: owl_lightning takes images, this task gives a str"):
        _images(["/data/clip.mp4"], "videomme", 3)


def test_likelihood_requests_score_the_continuation_as_the_reply(tmp_path):
    """lmms-eval's loglikelihood requests: each continuation's summed log-probability as the reply (and the
    end of the answer) equals minus the training loss's sum over the same supervised tokens."""
    from lmms_eval.api.instance import Instance

    from owl_lightning.apps.eval.lmms_eval_model import OwlLightningModel

    torch.manual_seed(0)
    export = export_checkpoint(stage2_checkpoint(tmp_path / "run.ckpt", system_prompt=None), tmp_path / "export")
    model = OwlLightningModel(ckpt=str(export), device="cpu", precision="fp32")
    image = Image.new("RGB", (32, 32), COLOURS["red"])
    model.task_dict = {"colours": {"test": [{"image": image}]}}
    continuations = ["red", "blue", "a green square"]
    requests = [
        Instance(
            "loglikelihood",
            ("What colour?", continuation, lambda doc: [doc["image"]], 0, "colours", "test"),
            idx=index,
            metadata={"task": "colours", "doc_id": 0, "repeats": 1},
        )
        for index, continuation in enumerate(continuations)
    ]
    scores = model.loglikelihood(requests)

    request = Request.single("What colour?", [image])
    for continuation, (score, greedy) in zip(continuations, scores):
        assert score == pytest.approx(reply_log_probability(model.assistant, request, continuation), rel=1e-5)
        assert greedy is False  # owl-tiny's random LLM writes none of these
