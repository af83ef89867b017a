"""Question/answer data: load rows through `datasets`, apply the prompt template, tokenize with
answer-only labels, and batch. Loading and checking the rows needs no model, so bad data fails
before the (slow) model load."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    import torch

from lora_exp.config import DataConfig, resolve_path
from lora_exp.errors import ConfigError

IGNORE = -100  # label value the loss skips


@dataclass(frozen=True)
class QA:
    question: str
    #: reference answers (empty when the prompt has none).
    answers: tuple[str, ...]


@dataclass(frozen=True)
class Rows:
    """Validated rows, before tokenization."""

    train: list[QA]
    validation: list[QA]
    generate: list[QA]
    key: str  # identifies the data (for caching base-model results)


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    #: training targets (answer-only or the whole text, per config)
    labels: list[int]
    #: answer-only targets: what eval loss measures
    answer_labels: list[int]


@dataclass(frozen=True)
class Prompt:
    text: str
    question: str
    answers: tuple[str, ...]


@dataclass(frozen=True)
class PreparedData:
    train: list[Example]
    validation: list[Example]
    prompts: list[Prompt]
    key: str


def load_rows(cfg: DataConfig) -> Rows:
    """Read train / validation / generation rows and check them: non-empty, fields present."""
    if cfg.hub_path:
        train = _hub_rows(cfg, cfg.train_split)
        validation = _hub_rows(cfg, cfg.validation_split) if cfg.validation_split else []
    else:
        train = _file_rows(cfg, cfg.train_files or [], "train_files")
        validation = _file_rows(cfg, cfg.validation_files, "validation_files") if cfg.validation_files else []
    train = _to_qa(train, cfg, "train_files", require_answer=True)[: cfg.max_train_examples]
    validation = _to_qa(validation, cfg, "validation_files", require_answer=True)[: cfg.max_eval_examples]
    if not train:
        raise ConfigError(f"data.train_files: the training data of data={cfg.name} is empty")
    if cfg.generate_files:
        generate = _to_qa(_file_rows(cfg, cfg.generate_files, "generate_files"), cfg, "generate_files",
                          require_answer=False)
    else:
        generate = (validation or train)
    generate = generate[: cfg.n_generate]
    key = hashlib.sha1(json.dumps([asdict(cfg), [asdict(q) for q in train + validation + generate]],
                                  sort_keys=True).encode()).hexdigest()[:16]
    return Rows(train, validation, generate, key)


def _file_rows(cfg: DataConfig, files: list[str], key: str) -> list[dict[str, Any]]:
    import datasets
    from datasets import load_dataset

    datasets.disable_progress_bars()
    paths = [str(resolve_path(f)) for f in files]
    for path, name in zip(paths, files):
        if not Path(path).is_file():
            raise ConfigError(f"data.{key}: file not found: {name}")
        with open(path, "rb") as fh:
            head = fh.read(65536)
        if not head.strip() and len(head) < 65536:
            raise ConfigError(f"data.{key}: {name} is empty")
    suffix = Path(paths[0]).suffix.lstrip(".")
    builder = {"jsonl": "json"}.get(suffix, suffix)
    try:
        ds = load_dataset(builder, data_files=paths, split="train")
    except Exception as exc:  # datasets raises many types for unreadable files
        if "corresponds to no data" in str(exc):
            raise ConfigError(f"data.{key}: {', '.join(files)} holds no rows") from exc
        raise ConfigError(f"data.{key}: cannot read {', '.join(files)}: "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from exc
    return list(ds)


def _hub_rows(cfg: DataConfig, split: str) -> list[dict[str, Any]]:
    from datasets import load_dataset

    try:
        return list(load_dataset(cfg.hub_path, cfg.hub_name, split=split))
    except Exception as exc:
        raise ConfigError(f"data.hub_path: cannot load {cfg.hub_path!r} split {split!r}: "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from exc


def _to_qa(rows: list[dict[str, Any]], cfg: DataConfig, key: str, require_answer: bool) -> list[QA]:
    out = []
    for i, row in enumerate(rows, start=1):
        question = row.get(cfg.question_field)
        if not isinstance(question, str) or not question.strip():
            raise ConfigError(f"data.question_field: row {i} of {key} has no {cfg.question_field!r} text "
                              f"(its fields: {', '.join(row)})")
        answer = row.get(cfg.answer_field)
        answers: tuple[str, ...]
        if isinstance(answer, str) and answer.strip():
            answers = (answer,)
        elif isinstance(answer, list) and all(isinstance(a, str) for a in answer) and answer:
            answers = tuple(answer)
        elif answer is None and not require_answer:
            answers = ()
        else:
            raise ConfigError(f"data.answer_field: row {i} of {key} has no {cfg.answer_field!r} text "
                              f"(its fields: {', '.join(row)})")
        out.append(QA(question, answers))
    return out


def prompt_text(cfg: DataConfig, question: str) -> str:
    return cfg.prompt_template.format(question=question)


def tokenize(rows: Rows, cfg: DataConfig, tokenizer: Any) -> PreparedData:
    """Prompt and answer are tokenized apart so the answer/prompt boundary is exact; EOS appended."""
    eos = tokenizer.eos_token_id

    def encode(qa: QA) -> Example:
        prompt = tokenizer(prompt_text(cfg, qa.question), add_special_tokens=False)["input_ids"]
        answer = tokenizer(cfg.answer_template.format(answer=qa.answers[0]), add_special_tokens=False)["input_ids"]
        if cfg.append_eos:
            answer = answer + [eos]
        ids = (prompt + answer)[: cfg.max_length]
        answer_labels = ([IGNORE] * len(prompt) + answer)[: cfg.max_length]
        labels = answer_labels if cfg.answer_only_loss else list(ids)
        return Example(ids, labels, answer_labels)

    prompts = [Prompt(prompt_text(cfg, qa.question), qa.question, qa.answers) for qa in rows.generate]
    return PreparedData([encode(q) for q in rows.train], [encode(q) for q in rows.validation], prompts,
                        rows.key)


def collate(examples: list[Example], pad_id: int, field: str = "labels") -> dict[str, torch.Tensor]:
    import torch

    """Right-pad to the longest row; padding is masked by the attention mask and IGNORE labels
    (never by pad id: on SmolLM2 pad == eos, and the appended EOS must keep its label)."""
    n = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e.input_ids)
        ids[i, :k] = torch.tensor(e.input_ids)
        mask[i, :k] = 1
        labels[i, :k] = torch.tensor(getattr(e, field))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def train_batches(examples: list[Example], batch_size: int, seed: int) -> Iterator[list[Example]]:
    """Endless stream of batches: each epoch a fresh seeded shuffle, like Trainer's RandomSampler."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(examples), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            yield [examples[i] for i in order[start:start + batch_size]]
