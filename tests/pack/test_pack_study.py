"""How a packed worker reads and claims a study with thousands of trials: claims that find
nothing read nothing, one read per batch, each finished trial loaded once, and the sampler
process sampling while the trainer is busy."""
from __future__ import annotations

import time

from lora_exp.compose import compose


def test_a_claim_that_finds_nothing_reads_no_trial_in_flight(tmp_path, monkeypatch):
    """A pack with a free slot asks for WAITING trials at every step; Optuna's cached reads
    re-load every unfinished trial each time (~0.5 s with a thousand in flight: the step on the
    GPU went 6x slower). A claim that finds nothing must load no trial."""
    import optuna
    from optuna.trial import TrialState

    from lora_exp.sweep.claims import claim_waiting_trials

    url = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(storage=url, study_name="s", sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        study.ask()  # RUNNING, as a pack's trials are
    for _ in range(2):
        study.enqueue_trial({})
    backend = study._storage._backend
    loaded: list[TrialState] = []
    read = backend._get_trials

    def spy(*args, **kwargs):
        trials = read(*args, **kwargs)
        loaded.extend(t.state for t in trials)
        return trials

    monkeypatch.setattr(backend, "_get_trials", spy)
    claimed = claim_waiting_trials(study, url, 5)
    assert sorted(t.number for t in claimed) == [20, 21]
    assert 0 <= claimed[0].suggest_float("x", 0, 1) <= 1  # a claimed trial samples (no sampler read)
    loaded.clear()
    for _ in range(3):
        assert claim_waiting_trials(study, url, 5) == []
    assert loaded == []
    assert {t.state for t in study.get_trials()} == {TrialState.RUNNING}


def test_a_packed_worker_sees_trials_another_process_finished(tmp_path, monkeypatch):
    """A pack's trials are told to Optuna by its tracking process, so the training process never
    calls `tell` or `ask` (which drop Optuna's per-thread cache of the study's trials). Without a
    fresh read at each claim, TPE there counts the finished trials as of its first sample forever
    and never leaves its random start-up phase."""
    import optuna

    from lora_exp.sweep.claims import claim_waiting_trials

    url = f"sqlite:///{tmp_path}/optuna.db"
    optuna.create_study(storage=url, study_name="s")
    tpe = optuna.samplers.TPESampler(n_startup_trials=3, constant_liar=True, seed=0)
    worker = optuna.load_study(study_name="s", storage=url, sampler=tpe)  # the training process
    tracker = optuna.load_study(study_name="s", storage=url)  # the tracking process
    for _ in range(4):
        worker.enqueue_trial({})
    first = claim_waiting_trials(worker, url, 3)
    for trial in first:
        trial.suggest_float("x", 0, 1)
    for trial in first:
        tracker.tell(trial.number, trial.params["x"])  # three finished trials: TPE's start-up is over

    random_samples = []
    real = tpe._random_sampler.sample_independent

    def counting(*args, **kwargs):
        random_samples.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(tpe._random_sampler, "sample_independent", counting)
    (trial,) = claim_waiting_trials(worker, url, 1)
    trial.suggest_float("x", 0, 1)
    assert random_samples == []  # sampled by TPE from the three finished trials


def _study_with_history(url):
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial

    dists = {"x": FloatDistribution(0, 1), "y": FloatDistribution(1e-4, 1e-1, log=True)}
    tpe = optuna.samplers.TPESampler(n_startup_trials=3, constant_liar=True, seed=0)
    study = optuna.create_study(storage=url, study_name="s", sampler=tpe)
    for i in range(8):  # five finished trials and three in flight, whose params the liar counts
        params = {"x": (i * 0.37) % 1, "y": 10 ** (-1 - (i % 3))}
        study.add_trial(create_trial(params=params, distributions=dists, value=(params["x"] - 0.3) ** 2)
                        if i < 5 else create_trial(params=params, distributions=dists, state=TrialState.RUNNING))
    for _ in range(6):
        study.enqueue_trial({})
    return study


def test_a_batch_samples_as_trial_by_trial_reads_would_with_one_read(tmp_path, monkeypatch):
    """A pack claims trials in batches: TPE (constant liar) samples them against one read of the
    study, not one per trial (quadratic in the trials in flight), and samples exactly what it
    would with a fresh read per trial, the batch's earlier trials counted as in flight."""
    from lora_exp.sweep.claims import claim_waiting_trials
    from lora_exp.sweep.storage import TrialReader

    sampled, n_reads = {}, {}
    for view in (False, True, "reader"):
        url = f"sqlite:///{tmp_path}/optuna-{view}.db"
        study = _study_with_history(url)
        backend = study._storage._backend
        reads = []
        read = backend._get_trials

        def spy(*args, _read=read, _reads=reads, **kwargs):
            _reads.append(1)
            return _read(*args, **kwargs)

        monkeypatch.setattr(backend, "_get_trials", spy)
        trials = claim_waiting_trials(study, url, 6, batch_view=bool(view),
                                      reader=TrialReader(study) if view == "reader" else None)
        reads.clear()
        sampled[view] = [(t.suggest_float("x", 0, 1), t.suggest_float("y", 1e-4, 1e-1, log=True)) for t in trials]
        n_reads[view] = len(reads)
    assert n_reads[False] >= 6 and n_reads[True] == 1
    assert n_reads["reader"] == 2  # the finished trials, then the live ones
    assert len(set(sampled[True])) == 6
    assert sampled[True] == sampled[False] == sampled["reader"]


def test_a_trial_reader_answers_as_a_full_read_and_loads_each_finished_trial_once(tmp_path):
    """The pruner's view and the sampler read the study again and again in a long packed search:
    the reader answers exactly what a full read of the database answers (live trials as they are
    now), and loads a finished trial only once, also one that finishes after a later one."""
    import optuna
    from optuna.trial import TrialState as S

    from lora_exp.sweep.storage import TrialReader

    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/optuna.db", study_name="s")
    backend = getattr(study._storage, "_backend", study._storage)
    trials = [study.ask({"x": optuna.distributions.FloatDistribution(0, 1)}) for _ in range(6)]
    for t, (state, value) in zip(trials, [(S.COMPLETE, 0.5), (S.COMPLETE, 0.2), (S.PRUNED, None), (S.FAIL, None)]):
        t.report(t.params["x"], 10)
        t.set_user_attr("overrides", [f"x={t.params['x']}"])
        study.tell(t, value, state=state)
    study.enqueue_trial({"x": 0.25})

    def rows(got: list) -> list:
        return [(t.number, t.state, t.params, t.values, t.intermediate_values, t.user_attrs) for t in got]

    def same_as_full_reads() -> None:
        for states in (None, (S.COMPLETE, S.PRUNED), (S.RUNNING,), (S.WAITING, S.FAIL), (S.COMPLETE, S.RUNNING)):
            assert rows(reader.read(states)) == rows(backend.get_all_trials(study._study_id, deepcopy=False,
                                                                            states=states)), states

    reader = TrialReader(study)
    same_as_full_reads()
    assert reader.loaded == 4
    trials[4].report(0.1, 10)  # live trials change: seen at the next read
    study.tell(trials[5], 0.3)  # a later trial finishes first
    same_as_full_reads()
    assert reader.loaded == 5
    study.tell(trials[4], 0.1)  # then an earlier one
    same_as_full_reads()
    assert reader.loaded == 6
    kept = {t.number: t for t in reader.read((S.COMPLETE,))}
    same_as_full_reads()
    assert reader.loaded == 6 and all(kept[t.number] is t for t in reader.read((S.COMPLETE,)))


def test_the_sampler_process_claims_and_samples_while_the_trainer_is_busy(tmp_path):
    """A pack's trials are claimed and sampled in a process of their own (TPE over a thousand
    trials: ~25 ms each; a pack refilling a thousand slots would stop the GPU for tens of
    seconds): asked trials are ready when the training process looks, without waiting for them."""
    from optuna.trial import TrialState

    from lora_exp.pack.sampler import Sampler
    from lora_exp.sweep.plan import SweepPlan, parse_options
    from lora_exp.sweep.spec import load_sweep
    from lora_exp.sweep.storage import open_study, top_up

    url = f"sqlite:///{tmp_path}/optuna.db"
    spec = load_sweep("tiny")
    options = parse_options(["sweep=tiny", f"storage={url}"])
    plan = SweepPlan(spec, options, "s", 4, None, list(spec.base), None, compose(list(spec.base)))
    study, _ = open_study(spec, url, "s", create=True)
    top_up(study, 4, url)
    sampler = Sampler(plan, chunk=2, retry_s=0.5)
    try:
        sampler.ask(3)
        time.sleep(8)  # the trainer busy (its first step compiling, say): the sampler works on
        got, empty = sampler.poll()
        assert len(got) == 3 and not empty and sampler.asked == 0
        stored = {t.number: t for t in study.get_trials(deepcopy=False)}
        for trial in got:
            assert stored[trial.number].state == TrialState.RUNNING
            assert trial.params == stored[trial.number].params and set(trial.params) == set(spec.space)
            assert f"trainer.lr={trial.params['trainer.lr']!r}" in trial.overrides
        sampler.ask(3)  # one trial left to claim: then an empty answer, retried while wanted
        claimed, seen_empty = [], False
        deadline = time.time() + 60
        while not seen_empty and time.time() < deadline:
            more, seen_empty = sampler.poll(timeout=1.0)
            claimed += more
        assert len(claimed) == 1 and seen_empty and sampler.asked == 2
        top_up(study, 5, url)  # another trial appears (a retry, another process's top-up): it is claimed
        time.sleep(3)
    finally:
        left = sampler.close()
    assert len(left) == 1  # claimed, never taken: the caller fails it
    assert not sampler.process.is_alive()


def test_a_packed_worker_trains_with_the_thread_count_the_config_sets(tmp_path):
    """`trainer.num_threads` holds for a pack too (its trials train in the worker, not in
    `run_trial`, which sets it for a trial alone); unset, the worker leaves torch's default."""
    import torch

    from lora_exp.sweep.plan import SweepPlan, parse_options
    from lora_exp.sweep.spec import load_sweep
    from lora_exp.sweep.storage import open_study
    from lora_exp.sweep.worker import run_worker

    url = f"sqlite:///{tmp_path}/optuna.db"
    spec = load_sweep("tiny")
    open_study(spec, url, "s", create=True)
    default = torch.get_num_threads()
    seen = []
    try:
        for extra in (["trainer.num_threads=1"], []):
            overrides = [*spec.base, "pack.slots=2", *extra]
            plan = SweepPlan(spec, parse_options(["sweep=tiny", f"storage={url}"]), "s", 2, None, overrides, None,
                             compose(overrides))
            assert plan.packed
            torch.set_num_threads(default)
            assert run_worker(plan, 0, 1, packed=lambda *_: seen.append(torch.get_num_threads()) or True)
    finally:
        torch.set_num_threads(default)
    assert seen == [1, default]


def test_the_sampling_process_opens_its_study_and_sampler_without_importing_torch(tmp_path):
    """The sampling and tracking processes start fresh interpreters: what they need is Optuna and
    MLflow, not torch (~2.5 s of each one's start on 2 cores, and ~300 MB each; the sampler's
    per-trial reseeding once imported it for one hash)."""
    import json
    import subprocess
    import sys

    script = ("import json, sys\nfrom lora_exp.sweep.spec import load_sweep\n"
              "from lora_exp.sweep.storage import make_sampler, open_study\n"
              "spec = load_sweep('tiny')\n"
              f"study, created = open_study(spec, 'sqlite:///{tmp_path}/optuna.db', 'tiny', create=True)\n"
              "study.sampler = make_sampler(spec)\n"
              "study.ask()\n"
              "print(json.dumps([created, sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules)]))")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [True, []]


def test_a_packs_pruner_counts_the_trials_it_finished_before_the_storage_records_them(tmp_path):
    """A pack's finished trials reach the storage through its tracking process, seconds later
    (of a wave of 128 on an H100, 60 were recorded 15 s after it ended; the next wave's first
    eval came ~2 s after it):
    its pruner must count them at once, or a fast pack prunes nothing (0 of 256 on the GPU). Each
    counts once after the storage has it; a failed trial never does, nor one whose run the
    tracking process could not close."""
    import types

    import optuna
    from optuna.trial import TrialState

    from lora_exp.core.recording import TrialResult
    from lora_exp.core.status import TrialStatus
    from lora_exp.pack.study_view import PackPruning, StudyView
    from lora_exp.pack.worker import finish_run

    url = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(storage=url, study_name="s", pruner=optuna.pruners.MedianPruner(
        n_startup_trials=3, n_warmup_steps=10))  # the default sweep's
    view = StudyView(study)
    submitted = []
    io = types.SimpleNamespace(submit=lambda *args: submitted.append(args))  # the tracking process's queue
    plan = types.SimpleNamespace(spec=types.SimpleNamespace(metrics=["eval_loss"], multi=False))

    def run(loss: float, status: TrialStatus = TrialStatus.COMPLETE, error: str | None = None):
        trial = study.ask()
        trial.suggest_float("x", 0, 1)
        pruning = PackPruning(trial, "eval_loss", view, io)
        view.refresh()
        pruned = pruning.on_eval(10, {"eval_loss": loss})
        result = TrialResult(status=status, steps=20, metrics={"eval_loss": loss - 0.1})
        slot_run = types.SimpleNamespace(handle=(trial, [], time.perf_counter()), result=result, error=error,
                                         callbacks=[pruning])
        return pruned, slot_run

    first = [run(1.0 + i / 100) for i in range(3)]
    assert not any(pruned for pruned, _ in first)
    failed = run(0.5, error="CUDA error")[1]
    for _, slot_run in first:
        finish_run(plan, slot_run, io)
    finish_run(plan, failed, io)
    assert {t.state for t in study.get_trials()} == {TrialState.RUNNING}  # the storage knows of no end yet
    assert [s[0] for s in submitted].count("finish") == 4

    pruned, _ = run(5.0)
    assert pruned  # worse than the median of the three the pack finished
    assert not run(1.005)[0]
    assert [t.value for t in view.get_trials(states=(TrialState.COMPLETE,))] == [0.9, 0.91, 0.92]
    view.forget([2])  # its run could not be closed: the tracking process failed it
    assert [t.value for t in view.get_trials(states=(TrialState.COMPLETE,))] == [0.9, 0.91]

    for _, slot_run in first[:2]:  # the tracking process catches up
        trial = slot_run.handle[0]
        study.tell(trial.number, slot_run.result.metrics["eval_loss"])
    view.refresh()
    complete = view.get_trials(states=(TrialState.COMPLETE,))
    assert sorted(t.number for t in complete) == [0, 1]  # each once
    assert all(t.intermediate_values == {} for t in complete)  # the storage's copies: reports not sent here
