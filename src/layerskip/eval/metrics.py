"""Quality metrics: ROUGE-1/2/L F-measure (rouge-score), BLEU on words (sacrebleu), whitespace-normalised exact match.

Empty generations are scored like any other (zero), never skipped.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge(prediction: str, reference: str) -> dict[str, float]:
    scores = _rouge_scorer().score(reference, prediction)
    return {name: scores[name].fmeasure for name in ROUGE_TYPES}


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the texts are equal after collapsing whitespace, else 0.0."""
    return float(" ".join(prediction.split()) == " ".join(reference.split()))


def sentence_bleu(prediction: str, reference: str) -> float:
    import sacrebleu

    return sacrebleu.sentence_bleu(prediction, [reference]).score


def corpus_bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (0-100) over word n-grams, sacrebleu's standard 13a tokenisation."""
    import sacrebleu

    return sacrebleu.corpus_bleu(list(predictions), [list(references)]).score


def sample_scores(prediction: str, reference: str) -> dict[str, float]:
    return {**rouge(prediction, reference), "bleu": sentence_bleu(prediction, reference),
            "exact_match": exact_match(prediction, reference)}
