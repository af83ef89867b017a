"""`lora-exp sweep`: everything checked before anything runs, the study created and topped up,
the parent run opened, the workers run, the summary printed."""
from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

from lora_exp.compose import compose
from lora_exp.config import check_packable
from lora_exp.core.data import load_rows
from lora_exp.errors import LoraExpError
from lora_exp.sweep.plan import SweepOptions, SweepPlan, default_workers, parse_options
from lora_exp.sweep.spec import SweepSpec, corner_overrides, load_sweep
from lora_exp.sweep.storage import open_study, top_up
from lora_exp.sweep.trial import check_ratio_anchors
from lora_exp.sweep.worker import PackedWorker, quiet_libraries, run_worker, run_worker_processes
from lora_exp.tracking import parent
from lora_exp.tracking.provenance import redact_uri

log = logging.getLogger("lora_exp")


def cmd_sweep(args: list[str], packed: PackedWorker | None = None) -> int:
    """Run (or resume) the sweep the arguments name; `packed` trains `pack=K` trials at once."""
    quiet_libraries()
    options = parse_options(args)
    spec = load_sweep(options.sweep)
    study_name = options.study or spec.study
    n_trials = options.n_trials or spec.n_trials
    base_overrides = list(spec.base) + list(options.overrides)
    base_cfg = compose(base_overrides)  # a bad base override fails here, before anything runs
    for corner in corner_overrides(spec.space):  # and so does a search space the config rejects
        compose(base_overrides + corner)
    check_ratio_anchors(spec, base_cfg)
    check_packable(base_cfg)
    load_rows(base_cfg.data)
    study, created = open_study(spec, options.storage, study_name, create=True)
    study.set_user_attr("base_overrides", base_overrides)  # `lora-exp best` prints the full command
    study.set_user_attr("objectives", spec.metrics)
    if spec.multi and spec.pruner.get("name") != "none":
        print(f"note: pruning is off: Optuna cannot prune multi-objective studies ({', '.join(spec.metrics)})")
    record = parent.SweepRecord(study_name, base_cfg.tracking, spec.objectives, n_trials, tuple(base_overrides),
                                len(spec.space))
    run_id = parent.open_parent(base_cfg.tracking, study, parent_params(spec, options, study_name),
                                spec.text or "", created)
    record = dataclasses.replace(record, run_id=run_id)
    import optuna

    optuna.storages.fail_stale_trials(study)  # trials left RUNNING by a killed worker: failed, retried
    added = top_up(study, n_trials)
    workers = options.workers or default_workers()
    plan = SweepPlan(spec, options, study_name, n_trials, record, base_overrides, options.timeout or spec.timeout,
                     base_cfg, workers)
    parent.close_orphan_runs(record, study)
    log.info("study %s: %d trials wanted, %d to run now, %d worker(s); storage %s", study_name, n_trials, added,
             workers, redact_uri(options.storage))
    try:
        if workers == 1:
            finished = run_worker(plan, worker_index=0, packed=packed)
        else:
            finished = run_worker_processes(plan, workers, packed)
    finally:
        final = open_study(spec, options.storage, study_name, create=False)
        print(parent.finish_parent(final, record))
    if not finished:
        raise LoraExpError(f"sweep stopped: {spec.max_failures} trials failed (max_failures); the trials' "
                           f"`failure` attribute and their runs' `error` tags say why")
    return 0


def parent_params(spec: SweepSpec, options: SweepOptions, study_name: str) -> dict[str, Any]:
    """The parent run's params: what the sweep searches, and how."""
    return {"study": study_name, "storage": redact_uri(options.storage), "sweep_file": spec.name,
            "sampler": json.dumps(spec.sampler), "pruner": json.dumps(spec.pruner), "objective": spec.metric,
            "direction": spec.direction, "base_overrides": " ".join(spec.base + list(options.overrides)),
            "search_space": json.dumps({k: v.__dict__ for k, v in spec.space.items()})}
