"""Closing a pack's trials: final metrics, generations (many slots at once), and the adapter of
each completed trial written as a normal peft folder, a few per step while the pack trains on.

A finished trial's slot is freed at once: its parameters go to pinned host memory, queued behind
the step in flight, and its adapter is written from there (`closing`), so the slot takes a new
trial while the host writes."""
from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections import deque
from typing import Any

import torch

from lora_exp.core.adapters import build_lora_config
from lora_exp.core.recording import finish_metrics, record_generations
from lora_exp.pack.runtime import PackRuntime
from lora_exp.pack.slots import SlotRun

log = logging.getLogger(__name__)

#: finished slots whose parameters come to the host in one copy (~10 MB a slot at rank 16), at
#: most this many and this many bytes
ROWS_PER_COPY = 64
ROW_COPY_BYTES = 1 << 29


class Finisher:
    """Trials that finished training, on their way out: generations, metrics, adapters."""

    def __init__(self, rt: PackRuntime):
        self.rt = rt
        #: finished trials, slots freed, whose adapters are still to be written (oldest first)
        self.closing: deque[SlotRun] = deque()

    def close_metrics(self, run: SlotRun) -> None:
        """The trial's final metrics (as a trial alone records them), and the pack's size."""
        r = run.result
        base_loss, _, _ = self.rt.base_results()
        tokens = run.tokens * (r.steps / max(1, run.spec.steps))
        finish_metrics(r, time.perf_counter() - run.started, run.eval_seconds, tokens, run.trainable, self.rt.device,
                       base_loss, run.tracker)
        r.metrics["pack_slots"] = self.rt.k
        # a packed trial's compute: its share of the pack's time by trial-steps and tokens (a trial
        # alone: its own training, evals and generations)
        r.metrics["compute_s"] = run.compute_s

    def finish_completed(self, runs: list[SlotRun]) -> None:
        """Completed trials: metrics, generations (together), tables; their parameters on their
        way to the host, and the trials queued for their adapters."""
        rt = self.rt
        for run in runs:
            self.close_metrics(run)
        _, base_out, base_scores = rt.base_results()
        t0 = time.perf_counter()
        outputs, counts = rt.generate([run.slot for run in runs])
        rt.host_s["generate"] += time.perf_counter() - t0
        seconds = (time.perf_counter() - t0) / len(runs)
        t_tables = time.perf_counter()
        rows: dict[int, torch.Tensor] = {}
        ready = None
        per = self.rows_per_copy()
        for i, (run, adapter_out, n_new) in enumerate(zip(runs, outputs, counts)):
            if i % per == 0:  # the next slots' parameters to the host in one copy
                t_rows = time.perf_counter()
                rows, ready = self.rows_to_host([r.slot for r in runs[i:i + per]])
                copied = time.perf_counter() - t_rows
                rt.host_s["rows"] += copied
                t_tables += copied  # not a table's time
            record_generations(run.tracker, run.result, rt.data.prompts, base_out, adapter_out, rt.metrics,
                               base_scores, seconds, n_new)
            run.row, run.row_ready = rows[run.slot], ready
            self.closing.append(run)
        # each trial's generations table, its means and its logging (the copies above apart)
        rt.host_s["tables"] += time.perf_counter() - t_tables

    def rows_per_copy(self) -> int:
        """Finished slots whose parameters go to the host in one copy: at most ~512 MB (a pinned block)."""
        params = self.rt.pm.params
        row_bytes = params.shape[1] * params.element_size()
        return max(1, min(ROWS_PER_COPY, ROW_COPY_BYTES // max(1, row_bytes)))

    def rows_to_host(self, slots: list[int]) -> tuple[dict[int, torch.Tensor], Any]:
        """These slots' trained parameters (`PackedModel.columns`: what the adapter holds, a third
        of a padded row on average in the seed's search), on their way to the host: each row, and
        the CUDA event after which it may be read (None on a CPU). On a GPU the copy goes to pinned
        memory, queued behind the step in flight, so the slots can take new trials at once and
        nothing waits for it: a copy to ordinary memory held the GPU idle at a wave's end (~7 s
        for 1024 trials)."""
        pm = self.rt.pm
        cols = [pm.columns(slot) for slot in slots]
        if self.rt.device.type != "cuda":
            return {slot: pm.params[slot].index_select(0, c) for slot, c in zip(slots, cols)}, None
        width = pm.params.shape[1]
        flat = torch.cat([c + slot * width for slot, c in zip(slots, cols)])
        host = torch.empty(flat.numel(), dtype=pm.params.dtype, pin_memory=True)
        host.copy_(pm.params.view(-1).index_select(0, flat), non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return dict(zip(slots, host.split([c.numel() for c in cols]))), ready

    def write_adapters(self, budget: float | None) -> list[SlotRun]:
        """Write finished trials' adapters (from their rows, already on the host) for up to `budget`
        seconds (at least one; all if None) and return those trials: they have ended. Writing a
        wave of a thousand at once kept the GPU idle ~14 s; a few a step run while it trains."""
        out: list[SlotRun] = []
        pm = self.rt.pm
        t0 = time.perf_counter()
        while self.closing and (budget is None or not out or time.perf_counter() - t0 < budget):
            run = self.closing[0]  # leaves `closing` once written (a write that fails leaves it there)
            if run.row_ready is not None and not run.row_ready.query():
                if budget is not None:  # its row is still on its way: the next step writes it
                    break
                run.row_ready.synchronize()
            row = run.row
            if run.tracker.run_id is not None or getattr(run.tracker, "records_artifacts", False):
                tmp = tempfile.mkdtemp(prefix="lora-exp-adapter-")
                pm.save_adapter(run.slot, build_lora_config(run.cfg), tmp, row, run.spec)
                run.tracker.log_dir(tmp, "adapter")
                cleanup = getattr(run.tracker, "remove_after", None)
                (cleanup or (lambda path: shutil.rmtree(path, ignore_errors=True)))(tmp)
            if run.adapter_dir is not None:
                pm.save_adapter(run.slot, build_lora_config(run.cfg), run.adapter_dir, row, run.spec)
            self.closing.popleft()
            run.row, run.row_ready = None, None
            run.tracker.log_metrics(run.result.metrics, step=run.result.steps)
            out.append(run)
        if out:
            self.rt.host_s["adapters"] += time.perf_counter() - t0
        return out

    def write_pending(self) -> list[SlotRun]:
        """After an error: write the adapters of the trials that finished training and wait only
        for them, as far as they can be written, and return those trials (they stay completed).
        Stops at the first that cannot be (its row unreadable, e.g. the GPU failed, or a second
        Ctrl-C): it and those after it stay in `closing`."""
        out: list[SlotRun] = []
        while self.closing:
            try:
                out += self.write_adapters(0.0)  # one at a time: each written one is kept
            except BaseException as exc:  # noqa: BLE001 -- the caller fails what is left
                log.warning("pack: %d finished trial(s) could not be written (%s)", len(self.closing),
                            f"{type(exc).__name__}: {exc}".splitlines()[0])
                break
        return out
