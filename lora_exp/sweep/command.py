"""`lora-exp sweep`: everything checked before anything runs, the study created and topped up,
the parent run opened, the workers run, the summary printed."""
from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

from lora_exp.compose import compose, replace_keys
from lora_exp.config import RunConfig, TrackingConfig
from lora_exp.core.data import Rows, load_rows
from lora_exp.core.recording import metric_problem
from lora_exp.errors import ConfigError, LoraExpError
from lora_exp.sweep.enqueue import (
    ENQUEUED,
    EXTRA_OVERRIDES,
    Seeded,
    enqueue_seeded,
    seeded_trials,
    trial_overrides,
)
from lora_exp.sweep.plan import SweepOptions, SweepPlan, default_workers, parse_options, usable_cores
from lora_exp.sweep.report import shown_overrides, study_counts
from lora_exp.sweep.spec import SweepSpec, corner_overrides, load_sweep
from lora_exp.sweep.storage import make_sampler, open_study, top_up
from lora_exp.sweep.trial import base_values, check_ratio_anchors, trial_config
from lora_exp.sweep.worker import PackedWorker, quiet_libraries, run_worker, run_worker_processes
from lora_exp.tracking import parent
from lora_exp.tracking.links import run_link, ui_base
from lora_exp.tracking.provenance import redact_uri
from lora_exp.tracking.store import check_server

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
    check_space(spec, base_cfg, base_overrides)  # and so does a search space the config rejects
    check_ratio_anchors(spec, base_cfg)
    base_cfg.check_packable()
    rows = load_rows(base_cfg.data)
    check_objectives(spec, base_cfg, rows)
    seeded = checked_seeds(options, spec, base_cfg, base_overrides)
    if base_cfg.tracking.enabled and base_cfg.tracking.uri.startswith(("http://", "https://")):
        check_server(base_cfg.tracking.uri)  # before the study is created: nothing written for a wrong URL
    workers = options.workers or default_workers()
    if workers > 1 and base_cfg.trainer.num_threads is None and default_workers() == 1:
        # worker processes share the CPU cores; each trial records its share (a rerun uses it)
        base_overrides.append(f"trainer.num_threads={max(1, usable_cores() // workers)}")
        base_cfg = compose(base_overrides)
    study, created = open_study(spec, options.storage, study_name, create=True)
    done_at_start = study_counts(study)[0]
    log.info("study %s: %d trials wanted, %d done; %d training rows, %d validation; storage %s", study_name,
             n_trials, done_at_start, len(rows.train), len(rows.validation), redact_uri(options.storage))
    study.set_user_attr("base_overrides", base_overrides)  # `lora-exp best` prints the full command
    study.set_user_attr("objectives", spec.metrics)
    if spec.multi and spec.pruner.get("name") != "none":
        print(f"note: pruning is off: Optuna cannot prune multi-objective studies ({', '.join(spec.metrics)})")
    record = parent.SweepRecord(study_name, base_cfg.tracking, spec.objectives, n_trials, tuple(base_overrides),
                                len(spec.space), storage=options.storage)
    run_id = parent.open_parent(base_cfg.tracking, study, parent_params(spec, options, study_name),
                                spec.text or "", created)
    record = dataclasses.replace(record, run_id=run_id)
    if run_id is not None:
        log.info("tracking %s; watch it: %s", redact_uri(base_cfg.tracking.uri), watch_hint(base_cfg.tracking, run_id))
    import optuna

    optuna.storages.fail_stale_trials(study)  # trials left RUNNING by a killed worker: failed, retried
    enqueued = enqueue_seeded(study, seeded, options.storage)
    if seeded:
        log.info("%d trial(s) enqueued to run first (%s)%s", enqueued, ", ".join(sorted({s.source.split("#")[0]
                                                                                      for s in seeded})),
                 f"; {len(seeded) - enqueued} enqueued by an earlier run" if enqueued < len(seeded) else "")
    added = top_up(study, n_trials, options.storage)
    plan = SweepPlan(spec, options, study_name, n_trials, record, base_overrides, options.timeout or spec.timeout,
                     base_cfg, workers, done_at_start=done_at_start)
    parent.close_orphan_runs(record, study)
    monitor = parent.monitor_system(record)
    packing = ("" if not plan.packed else f", {plan.pack} trials at once each" if plan.pack != "auto"
               else ", pack=auto (as many trials at once as the GPU holds; on a CPU one at a time)")
    log.info("%d trials to run now, %d worker(s)%s", added, workers, packing)
    stopped: str | None = "an error"
    finished = False
    try:
        if workers == 1:
            finished = run_worker(plan, worker_index=0, packed=packed)
        else:
            finished = run_worker_processes(plan, workers, packed)
        stopped = None if finished else f"max_failures ({spec.max_failures} trials failed)"
    except KeyboardInterrupt:
        stopped = "interrupted"
        raise
    except BaseException as exc:
        stopped = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        raise
    finally:
        if monitor is not None:
            monitor.finish()
        final = open_study(spec, options.storage, study_name, create=False)
        print(parent.finish_parent(final, record, stopped))
        if run_id is not None:
            print(f"watch it: {watch_hint(base_cfg.tracking, run_id)}")
    if not finished:
        raise LoraExpError(f"sweep stopped: {spec.max_failures} trials failed (max_failures); the trials' "
                           f"`failure` attribute and their runs' `error` tags say why")
    return 0


def check_space(spec: SweepSpec, base: RunConfig, base_overrides: list[str]) -> None:
    """Every extreme value of the space, applied to the base config as a trial's would be (the
    same validation; a group override composes through Hydra): refused now, not at a trial."""
    base_dict = base.to_dict()
    for corner in corner_overrides(spec.space):
        trial_config(base, base_overrides, corner, base_dict)


def checked_seeds(options: SweepOptions, spec: SweepSpec, base: RunConfig, base_overrides: list[str]) -> list[Seeded]:
    """The trials `warm_start=` and `enqueue=` ask for, each config checked now (one line, exit 2)."""
    if options.warm_start and options.warm_start.partition(":")[0] == (options.study or spec.study):
        raise ConfigError(f"warm_start={options.warm_start}: that is this study; name another study (study=NEW "
                          f"starts a new one from it)")
    seeded = seeded_trials(options.warm_start, options.enqueue, spec, base, options.storage)
    base_dict = base.to_dict()
    for s in seeded:
        overrides = [o for o in s.overrides if o.partition("=")[0] in s.params] + s.extras
        try:
            replace_keys(base, base_dict, overrides, base_overrides + overrides)
        except ConfigError as exc:
            raise ConfigError(f"enqueued trial {s.source}: {exc}") from None
    return seeded


def check_objectives(spec: SweepSpec, cfg: RunConfig, rows: Rows) -> None:
    """Every objective is a metric the trials will record: refused now, not after training."""
    scored = sum(bool(q.answers) for q in rows.generate)
    for metric in spec.metrics:
        problem = metric_problem(metric, cfg, len(rows.validation), scored)
        if problem:
            raise ConfigError(f"sweep {spec.name}: objective {metric} {problem}")


def watch_hint(tracking: TrackingConfig, run_id: str) -> str:
    """The parent run's page in the UI (Model-training view), and how to serve it."""
    from lora_exp.tracking.store import connect

    link = run_link(ui_base(tracking), connect(tracking)[1], run_id)
    return link if tracking.uri.startswith(("http://", "https://")) else f"lora-exp ui, then {link}"


def parent_params(spec: SweepSpec, options: SweepOptions, study_name: str) -> dict[str, Any]:
    """The parent run's params: what the sweep searches, and how."""
    return {"study": study_name, "storage": redact_uri(options.storage), "sweep_file": spec.name,
            "sampler": json.dumps(spec.sampler), "pruner": json.dumps(spec.pruner), "objective": spec.metric,
            "direction": spec.direction, "base_overrides": " ".join(spec.base + list(options.overrides)),
            "search_space": json.dumps({k: v.__dict__ for k, v in spec.space.items()})}


def dry_run(args: list[str], limit: int = 20) -> int:
    """What `lora-exp sweep` with these arguments would run, without training or writing: the
    checks it makes first, then the first trials' overrides as its sampler draws them for a new
    study (an in-memory study; the trials of an existing study are not read), shown as the
    sweep's trial lines show them (`shown_overrides`)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    options = parse_options(args)
    spec = load_sweep(options.sweep)
    base_overrides = list(spec.base) + list(options.overrides)
    base_cfg = compose(base_overrides)
    check_space(spec, base_cfg, base_overrides)
    check_ratio_anchors(spec, base_cfg)
    base_cfg.check_packable()
    check_objectives(spec, base_cfg, load_rows(base_cfg.data))
    seeded = checked_seeds(options, spec, base_cfg, base_overrides)
    n_trials = options.n_trials or spec.n_trials
    study = optuna.create_study(directions=spec.directions, sampler=make_sampler(spec))
    values = base_values(base_cfg)
    print(f"study {options.study or spec.study} ({spec.name}): {n_trials} trials, sampler {spec.sampler['name']}, "
          f"pruner {spec.pruner['name']}; base: {' '.join(base_overrides) or '-'}")
    for s in seeded:
        study.enqueue_trial(s.params, user_attrs={ENQUEUED: s.source, EXTRA_OVERRIDES: s.extras})
    for _ in range(min(n_trials, limit)):
        trial = study.ask()
        source = trial.user_attrs.get(ENQUEUED)
        print(f"trial {trial.number:>3}  {shown_overrides(trial_overrides(trial, spec.space, values))}"
              + (f"  (enqueued: {source})" if source else ""))
        study.tell(trial, state=optuna.trial.TrialState.FAIL)  # nothing trained: no value to tell
    if n_trials > limit:
        print(f"... and {n_trials - limit} more")
    return 0
