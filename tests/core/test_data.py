"""Data loading, templates and answer-only labels, on the shipped files and on temporary ones."""
from __future__ import annotations

import json

import pytest

from lora_exp.compose import compose
from lora_exp.core.data import IGNORE, collate, load_rows, tokenize
from lora_exp.core.models import byte_tokenizer
from lora_exp.errors import ConfigError

SEED_TEXTS = [
    "Q: How do transformers work?\nA: Transformers process sequences using self-attention.",
    "Q: What does physics explain?\nA: Physics explains natural phenomena using mathematical models.",
    "Q: What do machine learning models do?\nA: Machine learning models learn patterns from data.",
    "Q: How do transformers work?\nA: Transformers process sequences using self-attention mechanisms.",
    "Q: What is self-attention?\nA: Self-attention allows tokens in a sequence to attend to each other.",
]


def test_seed_template_rebuilds_the_blog_texts_exactly():
    cfg = compose(["data=seed"]).data
    rows = load_rows(cfg)
    texts = [cfg.prompt_template.format(question=q.question) + cfg.answer_template.format(answer=q.answers[0])
             for q in rows.train]
    assert texts == SEED_TEXTS
    assert [p.question for p in rows.generate] == [
        "How do transformers work?", "What does physics explain?", "What do machine learning models do?",
        "What is a language model?", "What is overfitting?", "What is a LoRA adapter?"]
    assert sum(bool(p.answers) for p in rows.generate) == 3


def test_qa_demo_has_a_fixed_split_of_150_plus_pairs():
    rows = load_rows(compose([]).data)
    assert len(rows.train) + len(rows.validation) >= 150
    assert len(rows.validation) >= 20
    assert not {q.question for q in rows.train} & {q.question for q in rows.validation}
    assert all(len(q.answers[0]) > 20 and q.answers[0].endswith(".") for q in rows.train + rows.validation)
    assert load_rows(compose([]).data).key == rows.key  # deterministic


def test_answer_only_labels_and_eos():
    cfg = compose(["data=seed"]).data
    tok = byte_tokenizer()
    data = tokenize(load_rows(cfg), cfg, tok)
    ex = data.train[0]
    prompt_len = len(tok("Q: How do transformers work?\nA:", add_special_tokens=False)["input_ids"])
    assert ex.input_ids[-1] == tok.eos_token_id
    assert ex.answer_labels[:prompt_len] == [IGNORE] * prompt_len
    assert ex.answer_labels[prompt_len:] == ex.input_ids[prompt_len:]
    assert ex.labels == ex.input_ids  # data=seed trains on the whole text, as the blog did
    answer_only = tokenize(load_rows(cfg), compose(["data=seed", "data.answer_only_loss=true"]).data, tok)
    assert answer_only.train[0].labels == ex.answer_labels


def test_collate_masks_padding_not_eos():
    tok = byte_tokenizer()
    cfg = compose(["data=seed"]).data
    data = tokenize(load_rows(cfg), cfg, tok)
    batch = collate(data.train[:2], tok.pad_token_id)
    short = min(range(2), key=lambda i: len(data.train[i].input_ids))
    n = len(data.train[short].input_ids)
    assert batch["attention_mask"][short, n:].sum() == 0
    assert (batch["labels"][short, n:] == IGNORE).all()
    assert batch["labels"][short, n - 1] == tok.eos_token_id  # EOS == pad id, yet it keeps its label


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_generic_loader_reads_local_files(workdir, fmt):
    import pandas as pd

    frame = pd.DataFrame({"q": ["What is 2+2?", "Capital of France?"], "a": ["4.", "Paris."]})
    path = workdir / f"rows.{fmt}"
    {"jsonl": lambda: frame.to_json(path, orient="records", lines=True),
     "json": lambda: frame.to_json(path, orient="records", lines=True),
     "csv": lambda: frame.to_csv(path, index=False),
     "parquet": lambda: frame.to_parquet(path)}[fmt]()
    cfg = compose(["data=custom", f"data.train_files=[{path}]", "data.question_field=q",
                   "data.answer_field=a", "data.prompt_template='Question: {question} Answer:'"]).data
    rows = load_rows(cfg)
    assert [q.question for q in rows.train] == ["What is 2+2?", "Capital of France?"]
    assert rows.train[1].answers == ("Paris.",)


def test_empty_file_is_rejected(workdir):
    (workdir / "empty.jsonl").write_text("")
    cfg = compose(["data=custom", f"data.train_files=[{workdir}/empty.jsonl]"]).data
    with pytest.raises(ConfigError, match="empty"):
        load_rows(cfg)


def test_row_without_the_configured_field_is_rejected(workdir):
    (workdir / "rows.jsonl").write_text(json.dumps({"question": "Q?", "reply": "A."}) + "\n")
    cfg = compose(["data=custom", f"data.train_files=[{workdir}/rows.jsonl]"]).data
    with pytest.raises(ConfigError, match="row 1 of train_files has no 'answer' text"):
        load_rows(cfg)
