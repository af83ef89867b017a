"""Claiming and sampling a packed sweep's trials, in a process of its own.

TPE with a thousand trials in the study takes ~25 ms a trial, plus a commit per parameter; a
pack that refills a thousand slots would otherwise stop the GPU for tens of seconds. The sampler
process claims WAITING trials a chunk at a time and samples each against one read of the study
(`claims.BatchView`); the training process asks for trials and polls for them, never waiting."""
from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import time
from dataclasses import dataclass
from typing import Any

from lora_exp.errors import LoraExpError
from lora_exp.sweep.claims import claim_waiting_trials
from lora_exp.sweep.enqueue import ENQUEUED, trial_overrides
from lora_exp.sweep.plan import SweepPlan
from lora_exp.sweep.storage import TrialReader, open_study
from lora_exp.sweep.trial import base_values
from lora_exp.sweep.worker import quiet_libraries

log = logging.getLogger("lora_exp")


@dataclass
class ClaimedTrial:
    """A trial the sampler process claimed and sampled: what the training process needs of it
    (its number and id for the stores, its params and distributions for the pruner)."""

    number: int
    _trial_id: int
    params: dict[str, Any]
    distributions: dict[str, Any]
    overrides: list[str] | None
    error: str | None = None
    #: where an enqueued trial came from (`sweep.enqueue`)
    enqueued: str | None = None


class Sampler:
    """The training process's end of the sampling process: `ask(n)` asks for n more trials,
    `poll()` returns those sampled since (never blocks).

    The process claims WAITING trials (RUNNING from then on, with a first heartbeat) a chunk at a
    time and samples each with the study's sampler (one read of the study per chunk: TPE's constant
    liar sees the chunk's own trials as they are sampled). Its answers queue up on its side, so it
    samples on while the training process is busy (compiling its first step, say). A claim that
    finds no WAITING trial answers `[]` and is retried every `retry_s` while trials are wanted."""

    def __init__(self, plan: SweepPlan, worker_index: int = 0, chunk: int = 64, retry_s: float = 2.0):
        ctx = multiprocessing.get_context("spawn")
        self.requests, self.answers = ctx.Queue(), ctx.Queue()
        self.process = ctx.Process(target=sampler_main,
                                   args=(plan, worker_index, self.requests, self.answers, chunk, retry_s),
                                   name="lora-exp-sampler", daemon=True)
        self.process.start()
        self.asked = 0  # asked for and not delivered yet
        self.seconds_per_trial = 0.0  # the last chunk's claim and sampling time, a trial
        self.closed = False

    def ask(self, n: int) -> None:
        if n > 0:
            self._alive()
            self.requests.put(n)
            self.asked += n

    def poll(self, timeout: float = 0.0) -> tuple[list[ClaimedTrial], bool]:
        """The trials sampled since the last call, and whether a claim found no WAITING trial.
        With a timeout, waits that long for the first answer."""
        out: list[ClaimedTrial] = []
        empty = False
        while True:
            try:
                trials, seconds = self.answers.get(timeout=timeout) if timeout else self.answers.get_nowait()
            except queue.Empty:
                break
            timeout = 0.0
            if trials:
                self.seconds_per_trial = seconds / len(trials)
            out += [ClaimedTrial(*t) for t in trials]
            empty = empty or not trials
            self.asked -= len(trials)
        if not out and not empty:
            self._alive()
        return out, empty

    def _alive(self) -> None:
        if not self.process.is_alive():
            raise LoraExpError(f"the sampling process {self.process.name} stopped (exit code "
                               f"{self.process.exitcode}); its trials are retried when the sweep runs again")

    def close(self) -> list[ClaimedTrial]:
        """Stop the process; returns the trials it claimed that no one took yet (none once closed)."""
        out: list[ClaimedTrial] = []
        if self.closed:
            return out
        self.closed = True
        if self.process.is_alive():
            self.requests.put(None)
        while True:  # read on until it is gone: it cannot exit while its answers fill the pipe
            try:
                out += [ClaimedTrial(*t) for t in self.answers.get(timeout=0.1)[0]]
                continue
            except queue.Empty:
                pass
            if not self.process.is_alive():
                break
        self.process.join()
        try:  # what it flushed on its way out
            while True:
                out += [ClaimedTrial(*t) for t in self.answers.get_nowait()[0]]
        except queue.Empty:
            pass
        self.requests.close()
        self.answers.close()
        return out


def sampler_main(plan: SweepPlan, worker_index: int, requests: Any, answers: Any, chunk: int,
                  retry_s: float) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the trainer, which stops us
    name_process("lora-exp-sample")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    quiet_libraries()
    study = open_study(plan.spec, plan.options.storage, plan.study_name, create=False)
    values = base_values(plan.base)
    reader = TrialReader(study)  # each batch reads only the trials finished since and those live
    parent = multiprocessing.parent_process()
    wanted, retry_at = 0, 0.0
    count, busy = 0, 0.0  # trials sampled, and the seconds spent on them (for a line per 512)
    while True:
        wait = 1.0 if not wanted else max(0.0, retry_at - time.monotonic())
        try:
            while True:
                message = requests.get(timeout=wait) if wait else requests.get_nowait()
                if message is None:
                    return
                wanted += message
                wait = 0.0
        except queue.Empty:
            pass
        if parent is not None and not parent.is_alive():
            os._exit(1)  # the trials it claimed get no more beats: they go stale and are retried
        if not wanted or time.monotonic() < retry_at:
            continue
        began = time.perf_counter()
        claimed = claim_waiting_trials(study, plan.options.storage, min(wanted, chunk), batch_view=True,
                                       reader=reader)
        sampled = []
        for trial in claimed:
            try:
                overrides, error = trial_overrides(trial, plan.spec.space, values), None
            except Exception as exc:  # a bad sampled value: this trial fails, the sweep goes on
                overrides, error = None, f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
            sampled.append((trial.number, trial._trial_id, dict(trial.params), dict(trial.distributions),
                            overrides, error, trial.user_attrs.get(ENQUEUED)))
        wanted -= len(claimed)
        retry_at = 0.0 if claimed else time.monotonic() + retry_s
        answers.put((sampled, time.perf_counter() - began))
        if claimed:
            busy += time.perf_counter() - began
            if (count + len(claimed)) // 512 > count // 512:
                log.info("sampler: %d trials claimed and sampled, %.1f ms a trial", count + len(claimed),
                         1e3 * busy / (count + len(claimed)))
            count += len(claimed)


def name_process(name: str) -> None:
    """The process's name as `ps`, `top` and psutil show it (Linux; 15 characters)."""
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(name[:15])
    except OSError:
        pass

