"""Generation metrics on hand-made examples, and the offline embedding model."""
from __future__ import annotations

import os

import pytest

from lora_exp.core.metrics import (
    exact_match,
    rouge_l,
    score,
    semantic_similarity,
    token_f1,
)


def test_exact_match():
    assert exact_match("  Paris is the capital. ", ["Paris  is the capital."]) == 1.0
    assert exact_match("Paris", ["paris"]) == 0.0  # exact means exact (case kept)
    assert exact_match("b", ["a", "b"]) == 1.0


def test_token_f1_known_values():
    # pred tokens [cat, sat], gold [cat, sat, on, mat]: P = 1, R = 1/2, F1 = 2/3 (articles dropped)
    assert token_f1("The cat sat.", ["a cat sat on the mat"]) == pytest.approx(2 / 3)
    assert token_f1("dog", ["cat"]) == 0.0
    assert token_f1("cat", ["dog", "cat"]) == 1.0


def test_rouge_l_known_values():
    # LCS of "a b c d" and "a c d e" is "a c d": P = R = 3/4
    assert rouge_l("a b c d", ["a c d e"]) == pytest.approx(0.75)
    assert rouge_l("x y", ["a b"]) == 0.0


def test_semantic_similarity_offline(capfd):
    import logging

    env_before = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.INFO)  # as in a sweep: no progress bar even then
    try:
        same, para, other = semantic_similarity(
            ["Dropout randomly zeroes activations during training.",
             "Dropout sets random activations to zero while training.",
             "Paris is the capital of France."],
            [["Dropout randomly zeroes activations during training."]] * 3)
    finally:
        logging.getLogger().setLevel(level)
        if env_before is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
    assert "Batches" not in capfd.readouterr().err
    assert same == pytest.approx(1.0, abs=1e-4)
    assert para > 0.7 > other
    scores = score(["cat"], [("cat",)])
    assert scores == {"exact_match": [1.0], "token_f1": [1.0], "rouge_l": [1.0],
                      "semantic_similarity": [pytest.approx(1.0, abs=1e-4)]}
