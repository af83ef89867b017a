"""The sweep's parent run's `answers.json`: every eval prompt with the base model's answer and
the best trials' answers and scores side by side, written again whenever the best trials change."""
from __future__ import annotations

from typing import Any

from lora_exp.tracking.runs import read_table, write_table

#: the best trials whose answers `answers.json` shows beside the base model's
ANSWERS_TOP_K = 5
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
    from lora_exp.core.evaluation import answers_side_by_side

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
