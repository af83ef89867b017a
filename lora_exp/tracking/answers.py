"""The sweep's parent run's `answers.json`: every eval prompt with the base model's answer and
the best trials' answers and scores side by side, written again whenever the best trials change."""
from __future__ import annotations

from typing import Any

from lora_exp.tracking.runs import read_table, write_table

#: the best trials whose answers `answers.json` shows beside the base model's
ANSWERS_TOP_K = 5
#: the text columns of a run's generations table (the others are scores)
GENERATION_COLUMNS = ("prompt", "expected", "base_output", "adapter_output")
#: the trials `answers.json` showed when last written, by parent run
_last_answers: dict[str, tuple[int, ...]] = {}


def top_trials(study: Any, front: list[Any], k: int = ANSWERS_TOP_K) -> list[Any]:
    """The k best completed trials (the Pareto front's first k, by its first objective, with several)."""
    from optuna.trial import TrialState

    sign = 1 if study.directions[0].name == "MINIMIZE" else -1
    pool = front or study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return sorted((t for t in pool if t.values), key=lambda t: (sign * t.values[0], t.number))[:k]


def answer_label(trial: Any, metric: str) -> str:
    return f"trial {trial.number} ({metric} {trial.values[0]:.4g})"


def log_answers(client: Any, parent_run_id: str, metric: str, study: Any, front: list[Any],
                tables: tuple[str, ...]) -> None:
    """`answers.json`: every eval prompt, the base model's answer and the best trials' answers
    with their scores side by side; written again whenever the best trials change."""
    top = top_trials(study, front)
    key = tuple(t.number for t in top)
    if not top or _last_answers.get(parent_run_id) == key:
        return
    sources = []
    for t in top:
        run_id = t.user_attrs.get("mlflow_run_id")
        table = read_table(client, run_id, "generations.json") if run_id else None
        if table:
            sources.append((answer_label(t, metric), table))
    if sources:
        write_table(client, parent_run_id, answers_side_by_side(sources), "answers.json", tables)
        _last_answers[parent_run_id] = key


def answers_side_by_side(sources: list[tuple[str, dict[str, list[Any]]]]) -> dict[str, list[Any]]:
    """Every prompt once, with the expected answer, the base model's answer and each source's
    answer side by side, then the scores (a column per metric and source). `sources` are (label,
    a run's generations table) pairs; rows are matched by prompt text (runs on other data add
    their prompts as rows of their own). The base model's answer comes from the first source that
    answered the prompt."""
    prompts: list[str] = []
    rows: dict[str, dict[str, Any]] = {}
    labels = [label for label, _ in sources]
    first = sources[0][1] if sources else {}
    scores = [c for c in first if c not in GENERATION_COLUMNS and not c.startswith("base_")]
    for label, table in sources:
        for i, prompt in enumerate(table.get("prompt", [])):
            row = rows.get(prompt)
            if row is None:
                prompts.append(prompt)
                row = rows[prompt] = {"expected": table["expected"][i], "base": table["base_output"][i],
                                      **{f"base {m}": table.get(f"base_{m}", [None] * (i + 1))[i] for m in scores}}
            row[label] = table["adapter_output"][i]
            for metric in scores:
                row[f"{label} {metric}"] = table.get(metric, [None] * (i + 1))[i]
    columns = ["expected", "base", *labels]  # the answers side by side, then their scores
    for metric in scores:
        columns += [f"base {metric}", *(f"{label} {metric}" for label in labels)]
    return {"prompt": prompts, **{c: [rows[p].get(c) for p in prompts] for c in columns}}
