"""COCO caption metrics as the coco-caption toolkit (pycocoevalcap) defines them: BLEU-4 and CIDEr-D.

pycocoevalcap is not a dependency (its tokenizer needs Java); both metrics are written from their
definitions and checked against hand-computed values in tests/test_benchmarks.py.

Tokens: lower case, punctuation dropped (what the toolkit's PTB tokenizer leaves of a caption; unlike it,
"dog's" stays one token).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

MAX_N = 4
CIDER_SIGMA = 6.0  # standard deviation, in tokens, of CIDEr-D's Gaussian length penalty


def caption_tokens(caption: str) -> list[str]:
    """``"A dog, running."`` → ``["a", "dog", "running"]``."""
    return re.findall(r"[a-z0-9]+(?:'[a-z0-9]+)*", caption.lower())


def ngram_counts(tokens: Sequence[str], max_n: int = MAX_N) -> Counter:
    """Every 1- to ``max_n``-gram of ``tokens`` (as tuples) with its count."""
    return Counter(tuple(tokens[i : i + n]) for n in range(1, max_n + 1) for i in range(len(tokens) - n + 1))


def bleu4(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4: the geometric mean of the corpus's clipped 1- to 4-gram precisions times the brevity
    penalty exp(1 - r / c) when the candidates' total length c is below r, the sum over images of the
    reference length closest to the candidate's (the shorter on a tie). 0 when some precision is 0 (the
    toolkit gives ~1e-9 there)."""
    matched, proposed = [0] * MAX_N, [0] * MAX_N
    candidate_length = reference_length = 0
    for candidate, image_references in zip(candidates, references, strict=True):
        tokens = caption_tokens(candidate)
        reference_tokens = [caption_tokens(reference) for reference in image_references]
        most = Counter()
        for reference in reference_tokens:
            most |= ngram_counts(reference)  # per n-gram, the most any one reference has
        for ngram, count in ngram_counts(tokens).items():
            matched[len(ngram) - 1] += min(count, most[ngram])
            proposed[len(ngram) - 1] += count
        candidate_length += len(tokens)
        reference_length += min((abs(len(r) - len(tokens)), len(r)) for r in reference_tokens)[1]
    if min(matched) == 0:
        return 0.0
    log_precision = sum(math.log(m / p) for m, p in zip(matched, proposed)) / MAX_N
    brevity = 1.0 if candidate_length >= reference_length else math.exp(1 - reference_length / candidate_length)
    return brevity * math.exp(log_precision)


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus CIDEr-D (Vedantam et al. 2015, as coco-caption computes it), the mean over images of

        10 × mean over n = 1..4 of mean over references of  Σ_g min(c_g, r_g)·r_g / (‖c‖·‖r‖) × exp(-δ² / 2σ²)

    where c and r are the candidate's and a reference's n-gram vectors of tf × idf, idf(g) = log(N) -
    log(max(1, images whose references hold g)), N = images; the min clips n-grams repeated more than a
    reference has them; δ is the difference of their lengths, counted as coco-caption counts them (in
    bigrams), and σ = 6. A norm of 0 leaves that n's similarity undivided (it is 0)."""
    tokens = [[caption_tokens(reference) for reference in image_references] for image_references in references]
    document_frequency = Counter(g for image in tokens for g in set().union(*(ngram_counts(r) for r in image)))
    log_images = math.log(len(tokens))

    def vectors(counts: Counter) -> tuple[list[dict], list[float], int]:
        by_n: list[dict] = [{} for _ in range(MAX_N)]
        for ngram, count in counts.items():
            by_n[len(ngram) - 1][ngram] = count * (log_images - math.log(max(1.0, document_frequency[ngram])))
        norms = [math.sqrt(sum(v * v for v in weights.values())) for weights in by_n]
        return by_n, norms, sum(counts[g] for g in by_n[1])

    scores = []
    for candidate, image_references in zip(candidates, tokens, strict=True):
        candidate_vectors, candidate_norms, candidate_length = vectors(ngram_counts(caption_tokens(candidate)))
        total = 0.0
        for reference in image_references:
            reference_vectors, reference_norms, reference_length = vectors(ngram_counts(reference))
            penalty = math.exp(-((candidate_length - reference_length) ** 2) / (2 * CIDER_SIGMA**2))
            for n in range(MAX_N):
                overlap = sum(
                    min(w, reference_vectors[n].get(g, 0.0)) * reference_vectors[n].get(g, 0.0) for g, w in candidate_vectors[n].items()
                )
                if candidate_norms[n] and reference_norms[n]:
                    overlap /= candidate_norms[n] * reference_norms[n]
                total += overlap * penalty
        scores.append(10.0 * total / MAX_N / len(image_references))
    return sum(scores) / len(scores)
