"""`lora-exp compare RUN_A RUN_B ...`: the runs' answers to their eval prompts side by side with
the base model's, with their scores; printed, and logged as one table (`answers.json`) in a run
of its own (tag `lora_exp.kind=comparison`) that the MLflow UI opens."""
from __future__ import annotations

import textwrap
from typing import Any

from lora_exp.errors import ConfigError
from lora_exp.runs.recorded import resolve_run, tracking_for
from lora_exp.tracking.answers import GENERATION_COLUMNS, answers_side_by_side
from lora_exp.tracking.runs import read_table, write_table

WIDTH = 100


def cmd_compare(refs: list[str], overrides: list[str], log: bool = True) -> int:
    tracking = tracking_for(overrides)
    resolved = [resolve_run(ref, tracking) for ref in refs]  # every id checked before anything is read
    client = resolved[0][0]
    sources = []
    for _, run, _ in resolved:
        table = read_table(client, run.info.run_id, "generations.json")
        if not table:
            raise ConfigError(f"compare: run {run.info.run_id} has no generations (generations.json): it did not "
                              f"complete, or its data has no prompts")
        sources.append((label(run), table))
    table = answers_side_by_side(sources)
    print(render(table, [s[0] for s in sources], [c for c in sources[0][1] if c not in GENERATION_COLUMNS
                                                  and not c.startswith("base_")]))
    if log and tracking.enabled:
        run_id = log_comparison(client, resolved, table)
        print(f"\nlogged: run {run_id} (answers.json)")
    return 0


def label(run: Any) -> str:
    """A run as a column title: its trial number and objective where it has them, and its id."""
    tags, metrics = run.data.tags, run.data.metrics
    name = f"trial {tags['trial_number']}" if "trial_number" in tags else run.info.run_name or "run"
    value = metrics.get("final_eval_loss")
    shown = f", eval_loss {value:.4g}" if value is not None else ""
    return f"{name} ({run.info.run_id[:8]}{shown})"


def render(table: dict[str, list[Any]], labels: list[str], scores: list[str]) -> str:
    """The table as text: a block per prompt, an answer per line."""
    width = max(len("expected"), len("base"), *(len(label) for label in labels))
    out = []
    for i, prompt in enumerate(table["prompt"]):
        out.append(f"[{i + 1}] {_line(prompt)}")
        out.append(f"  {'expected':<{width}}  {_line(table['expected'][i])}")
        for name in ("base", *labels):
            answer = table[name][i]
            score = " ".join(f"{m}={_score(table[f'{name} {m}'][i])}" for m in scores)
            out.append(f"  {name:<{width}}  {_line(answer) if answer is not None else '-'}"
                       + (f"   [{score}]" if score and answer is not None else ""))
        out.append("")
    return "\n".join(out).rstrip()


def _line(text: Any) -> str:
    return textwrap.shorten(str(text).replace("\n", " / "), WIDTH, placeholder=" ...")


def _score(value: Any) -> str:
    return "-" if value is None else str(value) if isinstance(value, bool) else f"{value:.3g}"


def log_comparison(client: Any, resolved: list[Any], table: dict[str, list[Any]]) -> str:
    """A run of its own in the first run's experiment, holding the table and naming the runs."""
    runs = [r for _, r, _ in resolved]
    first = runs[0]
    run = client.create_run(first.info.experiment_id, run_name="compare-" + "-".join(r.info.run_id[:6] for r in runs),
                            tags={"lora_exp.kind": "comparison",
                                  "lora_exp.compared": " ".join(r.info.run_id for r in runs)})
    run_id = run.info.run_id
    write_table(client, run_id, table, "answers.json")
    client.set_terminated(run_id, "FINISHED")
    return run_id
