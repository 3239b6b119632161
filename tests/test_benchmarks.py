"""eval --tasks: each benchmark read from a few records in its official schema, and scored against values
worked out by hand from the official definitions (the arithmetic is in the comments)."""

import base64
import json
import re

import pytest

from owl_lightning.apps.eval.benchmarks import TASKS, BenchmarkFileError
from owl_lightning.apps.eval.benchmarks.answers import (
    LETTERS,
    chosen_letter,
    normalise_vqa_answer,
    pope_yes_or_no,
    vqa_soft_accuracy,
    yes_or_no,
)
from owl_lightning.apps.eval.benchmarks.caption_scores import bleu4, caption_tokens, cider_d
from owl_lightning.apps.eval.benchmarks.harness import CHOICE_MODES, LETTER_INSTRUCTION, _most_likely_option, read_questions, run_task
from owl_lightning.apps.eval.benchmarks.metrics import yes_no_metrics
from owl_lightning.cli import main
from owl_lightning.data.images import decode_image
from owl_lightning.export import write_export
from owl_lightning.inference import Generation, OwlAssistant, Request, Sampling
from tests.helpers import png_bytes, reply_log_probability


class ScriptedAssistant:
    """Answers by the question asked: ``answers`` maps a phrase of the question to the reply. For a
    multiple-choice question whose reply is one of the listed options' texts, it answers that option's letter.
    Its "encoded samples" are the prompts, its "tokens" the replies."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers
        self.prompts: list[str] = []

    def encode(self, request: Request) -> str:
        return request.turns[-1].content.removeprefix("<image>\n")

    def generate(self, prompts: list[str], samplings: list[Sampling]) -> list[Generation]:
        return [Generation(tokens=self._reply(prompt)) for prompt in prompts]

    def decode(self, reply: str) -> str:
        return reply

    def _reply(self, prompt: str) -> str:
        self.prompts.append(prompt)
        reply = next(reply for phrase, reply in self.answers.items() if phrase in prompt)
        listed = dict(re.findall(r"^([A-Z])\. (.*)$", prompt, flags=re.MULTILINE))
        return next((letter for letter, text in listed.items() if text == reply), reply)


def score(task_name, root, answers, choice="generate"):
    task = TASKS[task_name](root)
    return run_task(ScriptedAssistant(answers), task, *read_questions(task), choice=choice, batch_size=2, progress=False)


def write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def write_png(path, colour="red"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(colour))


# ------------------------------------------------------------------------------ answer rules


def test_vqa_normalisation_follows_the_official_script():
    assert normalise_vqa_answer("Two dogs.") == "2 dogs"  # number word to digit, final period dropped
    assert normalise_vqa_answer("The  cat") == "cat"  # article dropped, spaces collapsed
    assert normalise_vqa_answer("dont know") == "don't know"  # contraction restored
    assert normalise_vqa_answer("yes/no") == "yes no"  # a mark touching no space becomes a space
    assert normalise_vqa_answer("red, white") == "red white"  # ... and touching one is removed
    assert normalise_vqa_answer("1,000 people!") == "1000 people"  # a 1,000-style number: every mark removed
    assert normalise_vqa_answer("2.5") == "2.5"  # a period before a digit stays


def test_vqa_soft_accuracy_averages_the_ten_leave_one_out_subsets():
    humans = ["two"] * 2 + ["3"] * 8
    # "2" agrees with 2 humans: leaving out one of them leaves 1 match (1/3), leaving out another leaves 2 (2/3):
    # (2 × 1/3 + 8 × 2/3) / 10 = 0.6
    assert vqa_soft_accuracy("2", humans) == pytest.approx(0.6)
    assert vqa_soft_accuracy("Three.", humans) == 1.0  # 8 agree: 7 or 8 matches in every subset, capped at 1
    # 3 agree: 3 subsets leave 2 matches (2/3), 7 leave 3 (1): (3 × 2/3 + 7) / 10 = 0.9
    assert vqa_soft_accuracy("blue", ["blue"] * 3 + ["red"] * 7) == pytest.approx(0.9)
    assert vqa_soft_accuracy("green", humans) == 0.0


def test_yes_no_and_letter_readings():
    # MME: the whole answer, else "yes"/"no" within its first four characters.
    assert [yes_or_no(a) for a in ("Yes", "No.", "yes, there is", "Not sure", "I think so")] == ["yes", "no", "yes", "no", "other"]
    # POPE: "no", "No" or "not" as a word of the first sentence.
    assert [pope_yes_or_no(a) for a in ("Yes.", "No, there is none", "There is not a dog. No doubt", "Nope")] == ["yes", "no", "no", "yes"]
    options = ("a cat", "a dog", "a bird")
    assert [chosen_letter(a, options) for a in ("B", "(C)", "A. a cat", "a dog.", "D", "It is unclear")] == ["B", "C", "A", "B", "", ""]


def test_yes_no_metrics_by_hand():
    pairs = [("yes", "yes"), ("yes", "yes"), ("no", "yes"), ("yes", "no"), ("no", "no")]
    # TP 2, FN 1, FP 1, TN 1: accuracy 3/5, precision 2/3, recall 2/3, F1 2/3, yes-ratio 3/5
    assert yes_no_metrics(pairs) == pytest.approx({"accuracy": 0.6, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "yes_ratio": 0.6})


# ------------------------------------------------------------------------------ caption metrics


def test_bleu4_by_hand():
    candidate, references = "The cat sat on the mat.", ["the cat sat on a mat", "a cat is on the mat"]
    # clipped matches / candidate n-grams: 1-grams 5/6 ("the" twice, at most once in a reference), 2-grams 5/5,
    # 3-grams 3/4 (not "sat on the"), 4-grams 1/3 (only "the cat sat on"); lengths 6 and 6: no brevity penalty.
    # (5/6 × 1 × 3/4 × 1/3) ** (1/4) = (5/24) ** 0.25 = 0.675600
    assert bleu4([candidate], [references]) == pytest.approx(0.675600, abs=1e-6)
    # every precision 1 (5/5, 4/4, 3/3, 2/2); c = 5 < r = 6: brevity penalty e^(1 - 6/5) = 0.818731
    assert bleu4(["the cat sat on the"], [["the cat sat on the mat"]]) == pytest.approx(0.818731, abs=1e-6)
    assert bleu4(["a dog"], [["the cat sat on the mat"]]) == 0.0


def test_cider_d_by_hand():
    references = [["a cat"], ["a dog"]]
    # N = 2 images, idf(g) = ln 2 - ln(max(1, df)): "a" is in both (idf 0), "cat", "dog", "a cat", "a dog"
    # in one (idf ln 2), "bird", "a bird" in none (ln 2 - ln 1 = ln 2).
    # Image 1, "a cat" = its reference: cosine 1 for 1-grams and 2-grams, 0 for 3- and 4-grams (no n-grams):
    # 10 × (1 + 1 + 0 + 0) / 4 = 5. Image 2, "a bird": its only weighted n-grams miss "a dog": 0.  Mean 2.5.
    assert cider_d(["a cat", "a bird"], references) == pytest.approx(2.5)
    # "cat": 1-gram cosine (ln2 · ln2) / (ln2 · ln2) = 1, no bigram; lengths in bigrams 0 and 1: penalty e^(-1/72).
    # 10 × e^(-1/72) / 4 = 2.465518 for image 1; mean with image 2's 0: 1.232759
    assert cider_d(["cat", "a bird"], references) == pytest.approx(1.232759, abs=1e-6)
    # "a cat cat": "cat" twice is clipped to the reference's once: min(2 ln2, ln2) · ln2 / (2 ln2 · ln2) = 1/2 for
    # 1-grams; 2-grams "a cat", "cat cat" (ln2 each) against "a cat": ln2 · ln2 / (√2 ln2 · ln2) = 0.707107; the
    # reference has no 3-gram: 0. Lengths 2 and 1 bigrams: e^(-1/72) = 0.986207.
    # 10 × (0.5 + 0.707107) × 0.986207 / 4 = 2.976143 for image 1; mean with image 2's 0: 1.488072
    assert cider_d(["a cat cat", "a bird"], references) == pytest.approx(1.488072, abs=1e-6)
    assert caption_tokens("A dog, running.") == ["a", "dog", "running"]


# ------------------------------------------------------------------------------ tasks on official schemas


def write_vqav2(root):
    questions = [
        {"image_id": 42, "question": "How many dogs?", "question_id": 420},
        {"image_id": 42, "question": "Is it sunny?", "question_id": 421},
        {"image_id": 42, "question": "What is it?", "question_id": 422},
        {"image_id": 42, "question": "Orphan?", "question_id": 999},  # no annotation: a counted skip
    ]
    answers = {420: ["2"] * 2 + ["3"] * 8, 421: ["yes"] * 10, 422: ["dog"] * 10}
    types = {420: "number", 421: "yes/no", 422: "other"}
    annotations = [
        {
            "question_id": qid,
            "image_id": 42,
            "answer_type": types[qid],
            "multiple_choice_answer": texts[-1],
            "answers": [{"answer": t, "answer_confidence": "yes", "answer_id": i + 1} for i, t in enumerate(texts)],
        }
        for qid, texts in answers.items()
    ]
    write_json(root / "v2_OpenEnded_mscoco_val2014_questions.json", {"questions": questions, "data_subtype": "val2014"})
    write_json(root / "v2_mscoco_val2014_annotations.json", {"annotations": annotations})
    write_png(root / "val2014" / "COCO_val2014_000000000042.jpg")


def test_vqav2(tmp_path):
    write_vqav2(tmp_path)
    result = score("vqav2", tmp_path, {"How many": "Two.", "sunny": "Yes", "What is": "a cat"})
    # number 0.6 (2 of 10 humans said 2), yes/no 1, other 0: mean (0.6 + 1 + 0) / 3
    assert result["accuracy"] == pytest.approx(0.533333, abs=1e-6)
    assert result["by_answer_type"] == pytest.approx({"number": 0.6, "other": 0.0, "yes/no": 1.0})
    assert result["count"] == 3 and result["skipped"] == {"malformed_record": 1}


def test_textvqa(tmp_path):
    data = [
        {"question_id": 1, "question": "What brand?", "image_id": "abc", "answers": ["Nike"] * 3 + ["nikes"] * 7},
        {"question_id": 2, "question": "What number?", "image_id": "abc", "answers": ["7"] * 9},  # 9 answers: skipped
    ]
    write_json(tmp_path / "TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "data": data})
    write_png(tmp_path / "train_images" / "abc.jpg")
    result = score("textvqa", tmp_path, {"brand": "nike"})
    assert result["accuracy"] == pytest.approx(0.9)  # 3 humans agree after lower-casing: (3 × 2/3 + 7 × 1) / 10
    assert result["count"] == 1 and result["skipped"] == {"malformed_record": 1}


def test_gqa(tmp_path):
    questions = {
        "201": {"imageId": "n1", "question": "Which side is the cup on?", "answer": "left", "types": {"structural": "query"}},
        "202": {"imageId": "n1", "question": "Is the cup red?", "answer": "no", "types": {"structural": "verify"}},
        "203": {"imageId": "n1", "question": "Is the cup blue?", "answer": "yes", "types": {"structural": "verify"}},
    }
    write_json(tmp_path / "testdev_balanced_questions.json", questions)
    write_png(tmp_path / "images" / "n1.jpg")
    result = score("gqa", tmp_path, {"Which side": "Left.", "red": "No", "blue": "no"})
    assert result["accuracy"] == pytest.approx(2 / 3)  # "Left." matches "left" exactly once normalised; "no" ≠ "yes"
    assert result["by_structural_type"] == pytest.approx({"query": 1.0, "verify": 0.5})


def test_pope_per_split(tmp_path):
    questions = {
        "random": [("dog", "yes"), ("cat", "yes"), ("cow", "yes"), ("car", "no"), ("cup", "no")],
        "popular": [("bus", "no"), ("kite", "yes")],
    }
    for split, asked in questions.items():
        lines = [
            {"question_id": i, "image": "COCO_val2014_000000000001.jpg", "text": f"Is there a {o} in the image?", "label": label}
            for i, (o, label) in enumerate(asked)
        ]
        (tmp_path / f"coco_pope_{split}.json").write_text("".join(json.dumps(line) + "\n" for line in lines) + "{not json\n")
    write_png(tmp_path / "val2014" / "COCO_val2014_000000000001.jpg")
    answers = {
        "dog": "Yes.",
        "cat": "Yes, there is",
        "cow": "No, there is not.",
        "car": "Yes",
        "cup": "There is no cup.",
        "bus": "No",
        "kite": "no",
    }
    result = score("pope", tmp_path, answers)
    # random: TP 2 (dog, cat), FN 1 (cow), FP 1 (car), TN 1 (cup): accuracy 3/5, precision = recall = F1 = 2/3, yes 3/5
    assert result["random"] == pytest.approx({"accuracy": 0.6, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "yes_ratio": 0.6})
    # popular: TN 1 (bus), FN 1 (kite): accuracy 1/2, no "yes" said: precision, recall, F1 and yes-ratio 0
    assert result["popular"] == pytest.approx({"accuracy": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0})
    assert "adversarial" not in result and result["skipped"] == {"malformed_record": 2}  # the bad line of each file


def write_scienceqa(root):
    def problem(question, choices, answer, split="test", image="image.png", subject="natural science"):
        return {"question": question, "choices": choices, "answer": answer, "hint": "", "image": image, "split": split, "subject": subject}

    problems = {
        "1": problem("Which animal is a mammal?", ["frog", "whale"], 1),
        "2": problem("Which is a noun?", ["run", "table", "blue"], 1, subject="language science"),
        "3": problem("Text only?", ["a", "b"], 0, image=None),  # no image: not ScienceQA-IMG
        "4": problem("Training question?", ["a", "b"], 0, split="train"),
        "5": problem("Broken?", ["a", "b"], 7),  # answer outside the choices: a counted skip
    }
    problems["2"]["hint"] = "Nouns name things."
    write_json(root / "problems.json", problems)
    for pid in problems:
        write_png(root / "test" / pid / "image.png")


def test_scienceqa_img(tmp_path):
    write_scienceqa(tmp_path)
    assistant = ScriptedAssistant({"mammal": "whale", "noun": "blue"})
    task = TASKS["scienceqa_img"](tmp_path)
    result = run_task(assistant, task, *read_questions(task), progress=False)
    assert result["accuracy"] == 0.5 and result["by_subject"] == {"language science": 0.0, "natural science": 1.0}
    assert result["count"] == 2 and result["skipped"] == {"malformed_record": 1}
    noun = next(p for p in assistant.prompts if "noun" in p)
    assert noun == f"Context: Nouns name things.\nWhich is a noun?\nA. run\nB. table\nC. blue\n{LETTER_INSTRUCTION}"


def test_seed_bench_image_questions(tmp_path):
    def question(qid, text, answer, data_type="image", type_id=1):
        choices = {f"choice_{c}": f"{text} option {c}" for c in "abcd"}
        return {
            "question_id": qid,
            "question": text,
            "answer": answer,
            "data_id": "1.jpg",
            "data_type": data_type,
            "question_type_id": type_id,
            **choices,
        }

    questions = [
        question("q1", "Where?", "C"),
        question("q2", "How many?", "A", type_id=2),
        question("v1", "Video?", "A", data_type="video"),
    ]
    write_json(tmp_path / "SEED-Bench.json", {"questions": questions, "question_type": {"Scene Understanding": 1, "Instances Counting": 2}})
    write_png(tmp_path / "SEED-Bench-image" / "1.jpg")
    result = score("seed_bench", tmp_path, {"Where": "Where? option c", "How many": "How many? option b"})
    assert result["accuracy"] == 0.5 and result["count"] == 2  # the video question is not asked
    assert result["by_question_type"] == {"Instances Counting": 0.0, "Scene Understanding": 1.0}


def write_mme(root):
    """existence (text beside images), artwork (questions_answers_YN/ and images/), code_reasoning."""
    files = {
        ("existence", "1"): "Is there a dog? Please answer yes or no.\tYes\nIs there a cat? Please answer yes or no.\tNo\n",
        ("existence", "2"): "Is there a car? Please answer yes or no.\tYes\nIs there a bus? Please answer yes or no.\tNo\nbroken line\n",
        ("artwork", "3"): "Is this by Monet? Please answer yes or no.\tYes\nIs this by Dali? Please answer yes or no.\tNo\n",
        ("code_reasoning", "4"): "Does it print 3? Please answer yes or no.\tYes\nDoes it print 4? Please answer yes or no.\tNo\n",
    }
    for (subtask, stem), text in files.items():
        texts, images = (
            (root / subtask / "questions_answers_YN", root / subtask / "images") if subtask == "artwork" else (root / subtask,) * 2
        )
        texts.mkdir(parents=True, exist_ok=True)
        (texts / f"{stem}.txt").write_text(text)
        write_png(images / f"{stem}.png")


def test_mme_scores_as_the_official_tool(tmp_path):
    write_mme(tmp_path)
    answers = {
        "dog": "Yes",
        "cat": "No",
        "car": "Yes",
        "bus": "Yes",
        "Monet": "Yes, it is.",
        "Dali": "no",
        "print 3": "No",
        "print 4": "Yes",
    }
    result = score("mme", tmp_path, answers)
    # existence: 3 of 4 questions right (75), 1 of 2 images with both right (50): 125. artwork: 100 + 100 = 200.
    # perception = 125 + 200 = 325. code_reasoning: both wrong: 0 + 0 = cognition 0.
    assert result["subtasks"]["existence"] == pytest.approx({"acc": 75.0, "acc_plus": 50.0, "score": 125.0})
    assert result["subtasks"]["artwork"]["score"] == 200.0 and result["subtasks"]["code_reasoning"]["score"] == 0.0
    assert result["perception"] == pytest.approx(325.0) and result["cognition"] == 0.0
    assert result["skipped"] == {"malformed_record": 1}


def write_mmbench(root):
    image = base64.b64encode(png_bytes("green")).decode()
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source", "l2-category", "split"]
    rows = [
        ["10", "What animal is shown?", "nan", "dog", "cat", "cow", "nan", "B", "recognition", image, "x", "y", "dev"],
        [
            "11",
            "What colour is it?",
            "Look closely.",
            "green",
            "red",
            "blue",
            "",
            "A",
            "attribute",
            "10",
            "x",
            "y",
            "dev",
        ],  # image of row 10
        ["12", "Broken image?", "nan", "a", "b", "nan", "nan", "A", "attribute", "@@not base64@@" * 10, "x", "y", "dev"],
    ]
    (root / "MMBench_DEV_EN.tsv").write_text("\n".join("\t".join(row) for row in [header, *rows]) + "\n")


def test_mmbench_circular_evaluation(tmp_path):
    write_mmbench(tmp_path)
    # Knows the animal whatever the order; for the colour always says "A", right only while "green" is listed first.
    assistant = ScriptedAssistant({"animal": "cat", "colour": "A"})
    task = TASKS["mmbench"](tmp_path)
    result = run_task(assistant, task, *read_questions(task), progress=False)
    # 3 rotations each: animal right in all (counts), colour right in 1 of 3 (does not): circular 1/2; unrotated 2/2
    assert result["accuracy"] == 0.5 and result["single_pass"] == 1.0 and result["questions"] == 2
    assert result["by_category"] == {"attribute": 0.0, "recognition": 1.0}
    assert result["count"] == 6 and result["skipped"] == {"corrupt_image": 1}  # the row whose image is not base64
    colour_prompts = [p for p in assistant.prompts if "colour" in p]
    assert [p.splitlines()[2:5] for p in colour_prompts] == [
        ["A. green", "B. red", "C. blue"],
        ["A. red", "B. blue", "C. green"],
        ["A. blue", "B. green", "C. red"],
    ]
    assert colour_prompts[0].startswith("Look closely.\nWhat colour is it?\n")

    cut = run_task(ScriptedAssistant({"animal": "cat", "colour": "green"}), task, *read_questions(task, limit=4), progress=False)
    assert cut["count"] == 4 and cut["questions"] == 1 and cut["accuracy"] == 1.0  # the colour question's 1 of 3 rotations: left out


def test_coco_captions(tmp_path):
    def image(cocoid, split, captions):
        sentences = [{"tokens": c.split(), "raw": c} for c in captions]
        return {
            "filepath": "val2014",
            "filename": f"COCO_val2014_{cocoid:012d}.jpg",
            "cocoid": cocoid,
            "split": split,
            "sentences": sentences,
        }

    images = [image(1, "test", ["A cat."]), image(2, "test", ["A dog."]), image(3, "train", ["A cow."])]
    write_json(tmp_path / "dataset_coco.json", {"images": images, "dataset": "coco"})
    for record in images:
        write_png(tmp_path / "val2014" / record["filename"])
    result = score("coco_captions", tmp_path, {"caption": "a cat"})
    # the same caption for both test images: "a cat" vs ["a cat"] and vs ["a dog"], as in test_cider_d_by_hand
    assert result["cider_d"] == pytest.approx(cider_d(["a cat", "a cat"], [["a cat"], ["a dog"]]))
    assert result["cider_d"] == pytest.approx(2.5)  # image 1: 5, image 2: "cat" has no weight in "a dog": 0
    assert result["count"] == 2 and result["examples"][0] == {"image": "1", "generated": "a cat", "reference": "A cat."}


def test_a_missing_benchmark_file_names_the_file_and_where_to_get_it(tmp_path):
    task = TASKS["gqa"](tmp_path / "gqa")
    with pytest.raises(FileNotFoundError, match=r"gqa: .*testdev_balanced_questions.json not found.*stanford.*--root gqa=DIR"):
        read_questions(task)


def test_a_file_of_another_schema_is_refused_naming_what_was_expected(tmp_path):
    write_vqav2(tmp_path)
    write_json(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json", [{"question_id": 1}])  # a bare list
    with pytest.raises(BenchmarkFileError, match=r"vqav2: .*questions.json does not hold a list under 'questions': is it the official"):
        read_questions(TASKS["vqav2"](tmp_path))


def test_image_names_stay_inside_their_folder_which_may_be_a_link(tmp_path):
    shared = tmp_path / "coco" / "val2014"  # one COCO folder linked into a task's root, as docs/evaluation.md suggests
    write_png(shared / "COCO_val2014_000000000001.jpg")
    write_png(tmp_path / "pope" / "secret.jpg")
    (tmp_path / "pope" / "val2014").symlink_to(shared)
    lines = [
        {"question_id": 1, "image": "COCO_val2014_000000000001.jpg", "text": "Is there a dog?", "label": "yes"},
        {"question_id": 2, "image": "../secret.jpg", "text": "Is there a cat?", "label": "no"},
    ]
    (tmp_path / "pope" / "coco_pope_random.json").write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = score("pope", tmp_path / "pope", {"dog": "yes"})
    assert result["count"] == 1 and result["skipped"] == {"path_outside_root": 1}


def test_a_missing_image_is_a_counted_skip(tmp_path):
    write_vqav2(tmp_path)
    (tmp_path / "val2014" / "COCO_val2014_000000000042.jpg").unlink()
    result = score("vqav2", tmp_path, {"": "2"})
    assert result["count"] == 0 and result["skipped"] == {"malformed_record": 1, "missing_image": 3}


# ------------------------------------------------------------------------------ on owl-tiny


def test_likelihood_ranking_picks_the_option_of_highest_total_log_probability_wherever_it_is_listed(tiny_model, tiny_tokenizer):
    assistant = OwlAssistant(tiny_model, tiny_tokenizer, precision="fp32")
    options = ("red", "a small green square", "blue")
    request = Request.single("What colour is the square?", [decode_image(png_bytes("red"))])

    best = max(options, key=lambda option: reply_log_probability(assistant, request, option))
    for shift in range(len(options)):
        rotated = options[shift:] + options[:shift]
        assert rotated[LETTERS.index(_most_likely_option(assistant, request, rotated))] == best


def test_a_prompt_too_long_for_the_model_is_a_counted_skip(tmp_path, tiny_model, tiny_tokenizer):
    write_scienceqa(tmp_path)
    problems = json.loads((tmp_path / "problems.json").read_text())
    problems["1"]["hint"] = "Whales breathe air. " * 200
    write_json(tmp_path / "problems.json", problems)
    assistant = OwlAssistant(tiny_model, tiny_tokenizer, precision="fp32", max_length=1024)
    for choice in CHOICE_MODES:
        task = TASKS["scienceqa_img"](tmp_path)
        result = run_task(assistant, task, *read_questions(task), choice=choice, progress=False)
        assert result["count"] == 1 and result["skipped"] == {"too_long": 1, "malformed_record": 1}, choice


def test_eval_tasks_on_owl_tiny_writes_eval_json_tensorboard_and_a_table(tmp_path, tiny_model, tiny_tokenizer, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    export = write_export(tiny_model, tiny_tokenizer, {"template": "owl", "system_prompt": None}, tmp_path / "run")
    write_scienceqa(tmp_path / "sqa")
    (tmp_path / "mme").mkdir()
    write_mme(tmp_path / "mme")
    common = ["eval", "--ckpt", str(export), "--device", "cpu", "--precision", "fp32", "--batch-size", "4"]
    main([*common, "--tasks", "scienceqa_img,mme", "--root", f"scienceqa_img={tmp_path / 'sqa'}", "--root", f"mme={tmp_path / 'mme'}"])
    results = json.loads((export / "eval.json").read_text())
    assert {"scienceqa_img", "mme", "checkpoint"} <= set(results)
    assert results["scienceqa_img"]["count"] == 2 and results["scienceqa_img"]["choice"] == "generate"
    assert results["mme"]["count"] == 8 and set(results["mme"]["subtasks"]) == {"existence", "artwork", "code_reasoning"}
    assert 0 <= results["mme"]["perception"] <= 400 and 0 <= results["scienceqa_img"]["accuracy"] <= 1
    table = capsys.readouterr().out
    assert re.search(r"^scienceqa_img\s+accuracy\s+", table, re.MULTILINE) and re.search(r"^mme\s+perception\s+", table, re.MULTILINE)

    main([*common, "--tasks", "scienceqa_img", "--root", f"scienceqa_img={tmp_path / 'sqa'}", "--choice", "likelihood"])
    results = json.loads((export / "eval.json").read_text())
    assert results["scienceqa_img"]["choice"] == "likelihood" and "mme" in results  # the same checkpoint's other task stays
    scalars = set(EventAccumulator(str(export)).Reload().Tags()["scalars"])
    assert {"eval/scienceqa_img/accuracy", "eval/mme/perception", "eval/mme/subtasks/existence/acc_plus"} <= scalars


def test_eval_tasks_refuses_an_unknown_task_before_loading_anything(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--ckpt", str(tmp_path), "--tasks", "vqav3"])
    assert "unknown task(s) ['vqav3']" in capsys.readouterr().err
