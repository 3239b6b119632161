"""How a generated answer is compared with the reference: the official rules of each benchmark.

- :func:`normalise_vqa_answer`, :func:`vqa_soft_accuracy`: the VQA evaluation script's answer processing
  (github.com/GT-Vision-Lab/VQA, ``vqaEval.py``, as the EvalAI server applies it) and its accuracy,
  ``min(#humans who gave the answer / 3, 1)`` averaged over the 10 sets of 9 of the 10 human answers.
  VQAv2 and TextVQA (whose evaluator applies the same processing and formula) share them.
- :func:`yes_or_no`: MME's eval tool's reading of a yes/no answer; :func:`pope_yes_or_no`: POPE's.
- :func:`chosen_letter`: which option of a multiple-choice question a generated answer picks.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

# The script's contractions table, written as the contracted forms: it maps each form with one apostrophe
# left out (what an annotator typed, "dont", "couldnt've", "couldn'tve") to the form itself. Its entries
# for "let's" and "she's" map them to themselves ("lets", "shes" stay), so they are not listed.
_CONTRACTED_FORMS = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd he'd've "
    "he's how'd how'll how's I'd've I'm I've isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't "
    "must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've "
    "somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've "
    "something'll that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't "
    "we'd've we've weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's "
    "who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll "
    "you're you've"
).split()
CONTRACTIONS = {form[:at] + form[at + 1 :]: form for form in _CONTRACTED_FORMS for at in range(len(form)) if form[at] == "'"}
CONTRACTIONS["somebody'd"] = "somebodyd"  # the official table has this one entry backwards; scores follow the table
NUMBER_WORDS = dict(zip("none zero one two three four five six seven eight nine ten".split(), "0 0 1 2 3 4 5 6 7 8 9 10".split()))
ARTICLES = frozenset({"a", "an", "the"})
# Removed where they touch a space (or anywhere in an answer with a 1,000-style number), else become a space.
_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
_THOUSANDS_COMMA = re.compile(r"(\d)(,)(\d)")
# The script writes (?!<=\d)\.(?!\d), a lookbehind typed as a lookahead that never matches: every period
# not followed by a digit goes ("5." → "5", "2.5" stays).
_SENTENCE_PERIOD = re.compile(r"\.(?!\d)")


def _vqa_punctuation(text: str) -> str:
    out = text
    glued = _THOUSANDS_COMMA.search(text) is not None
    for mark in _PUNCTUATION:
        out = out.replace(mark, "" if glued or f"{mark} " in text or f" {mark}" in text else " ")
    return _SENTENCE_PERIOD.sub("", out)


def normalise_vqa_answer(answer: str) -> str:
    """The official processing: line breaks to spaces, punctuation, lower case, number words to digits,
    articles dropped, contractions restored. ``"Two dogs."`` → ``"2 dogs"``; ``"dont know"`` → ``"don't know"``."""
    text = _vqa_punctuation(answer.replace("\n", " ").replace("\t", " ").strip())
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split() if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def vqa_soft_accuracy(answer: str, human_answers: Sequence[str]) -> float:
    """``answer`` against the 10 human answers: for each human left out, min(matches among the other 9 / 3, 1);
    the mean of those 10. Both sides go through :func:`normalise_vqa_answer`. Agreeing with 4 or more
    humans scores 1; with 3, 0.9 ((7 × 1 + 3 × 2/3) / 10); with 2, 0.6 ((8 × 2/3 + 2 × 1/3) / 10)."""
    answer = normalise_vqa_answer(answer)
    humans = [normalise_vqa_answer(human) for human in human_answers]
    matches = sum(human == answer for human in humans)
    # Leaving out a matching human leaves matches - 1 among the other nine; leaving out another leaves matches.
    per_subset = [min((matches - (human == answer)) / 3, 1.0) for human in humans]
    return sum(per_subset) / len(per_subset)


def yes_or_no(answer: str) -> str:
    """``"yes"``, ``"no"`` or ``"other"``: the whole answer if it is one of the two words, else whichever
    of them appears in its first four characters (MME's ``parse_pred_ans``; ``"Yes, there is"`` → ``"yes"``)."""
    text = answer.strip().lower()
    if text in ("yes", "no"):
        return text
    opening = text[:4]
    return "yes" if "yes" in opening else "no" if "no" in opening else "other"


def pope_yes_or_no(answer: str) -> str:
    """POPE's evaluation's reading: ``"no"`` when the first sentence (commas removed) has the word "no",
    "No" or "not", else ``"yes"`` (``"There is not a dog."`` → ``"no"``, ``"Nope"`` → ``"yes"``)."""
    words = answer.split(".")[0].replace(",", "").split(" ")
    return "no" if {"no", "No", "not"} & set(words) else "yes"


LETTERS = string.ascii_uppercase


def chosen_letter(answer: str, options: Sequence[str]) -> str:
    """The letter of the option a generated answer picks, or ``""``: the option whose text the answer
    is (case and a final period aside), else a leading letter of the options' range (``"B"``, ``"(B)"``, ``"B. a cat"``)."""
    text = answer.strip()
    by_text = {option.strip().lower().rstrip("."): LETTERS[i] for i, option in enumerate(options)}
    if text.lower().rstrip(".") in by_text:
        return by_text[text.lower().rstrip(".")]
    leading = re.match(r"\W*([A-Z])(?![A-Za-z])", text)
    return leading.group(1) if leading and leading.group(1) in LETTERS[: len(options)] else ""
