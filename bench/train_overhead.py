"""Speed of `lora-exp train` on the default model against a plain PyTorch loop, same process.

    python bench/train_overhead.py [--steps 30]

1. seconds per optimizer step: `run_trial` (tracked into a real MLflow sqlite store, loss logged
   every step, progress output) vs a bare loop doing the same work on the same model and batches
   (peft adapter, AdamW, clipping, scheduler, a loss read-back each step). Target ratio <= 1.15.
   Beside them, the reference step: the bare loop with the dropout masks computed in int64 passes
   and the model's own full-vocabulary loss (the CPU step before its fast paths; same values).
2. start-up: `lora-exp train` as a subprocess, from exec to the first optimizer step, model cache
   warm. Target <= 10 s on 2 cores.
3. the default `lora-exp train`: wall time (target <= 5 min on 2 cores) and eval loss vs base.
Prints one JSON object and a summary line.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
EXE = Path(sys.executable).parent / "lora-exp"
os.environ.setdefault("LORA_EXP_CONFIG_DIR", str(REPO / "conf"))


def plain_loop(cfg, base, data, steps: int, reference: bool = False) -> float:
    """The same work with nothing around it: seconds per step. `reference`: the step as computed
    before the CPU fast paths (dropout masks in int64 passes, the model's own full-vocabulary
    loss), the same masks and the same loss value."""
    from transformers import get_scheduler

    from lora_exp.core import randomness
    from lora_exp.core.adapters import attach_adapter, detach_adapter
    from lora_exp.core.data import collate, train_batches
    from lora_exp.core.loss import causal_lm_loss

    fast_masks = randomness.dropout_mask_int32
    if reference:
        randomness.dropout_mask_int32 = randomness.dropout_mask
    loss_of = (lambda m, b: m(**b).loss) if reference else causal_lm_loss

    model = attach_adapter(base, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.trainer.lr)
    sched = get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=steps)
    batches = train_batches(data.train, cfg.trainer.batch_size, cfg.trainer.seed)
    pad = base.tokenizer.pad_token_id
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        batch = collate(next(batches), pad)
        loss = loss_of(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
    seconds = (time.perf_counter() - start) / steps
    detach_adapter(model)
    randomness.dropout_mask_int32 = fast_masks
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip-default-run", action="store_true")
    args = parser.parse_args()

    from lora_exp.compose import compose
    from lora_exp.core.data import load_rows, tokenize
    from lora_exp.core.models import load_base
    from lora_exp.core.training import run_trial
    from lora_exp.tracking.runs import start_run

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    os.chdir(work)
    overrides = [f"trainer.max_steps={args.steps}", "trainer.eval_steps=null", "data.n_generate=1",
                 "trainer.max_new_tokens=4", "trainer.warmup_steps=0"]
    cfg = compose(overrides)
    base = load_base(cfg.model, torch.device("cpu"))
    data = tokenize(load_rows(cfg.data), cfg.data, base.tokenizer)
    plain_loop(cfg, base, data, 3)  # warm-up: allocator, kernels
    ours, plain, before = [], [], []
    for _ in range(2):  # interleaved, to even out drift on a shared machine
        with start_run(cfg.tracking, run_name="bench-overhead") as tracker:
            ours.append(run_trial(cfg, base, data, tracker).metrics["train_step_s"])
        plain.append(plain_loop(cfg, base, data, args.steps))
        before.append(plain_loop(cfg, base, data, args.steps, reference=True))
    ratio = min(ours) / min(plain)

    env = {**os.environ}
    proc = subprocess.run([str(EXE), "train", "trainer.max_steps=2", "trainer.eval_steps=null", "data.n_generate=1",
                           "trainer.max_new_tokens=4"], cwd=work, env=env, capture_output=True, text=True)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work}/mlruns/mlflow.db")
    run_id = re.search(r"run ([0-9a-f]{32})", proc.stdout).group(1)
    startup = client.get_run(run_id).data.metrics["startup_s"]

    result = {"steps": args.steps, "lora_exp_step_s": round(min(ours), 4), "plain_loop_step_s": round(min(plain), 4),
              "ratio": round(ratio, 4), "reference_step_s": round(min(before), 4),
              "speedup_vs_reference": round(min(before) / min(ours), 3), "startup_to_first_step_s": round(startup, 2),
              "threads": torch.get_num_threads()}
    if not args.skip_default_run:
        start = time.perf_counter()
        proc = subprocess.run([str(EXE), "train"], cwd=work, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        run_id = re.search(r"run ([0-9a-f]{32})", proc.stdout).group(1)
        m = client.get_run(run_id).data.metrics
        result.update({"default_train_wall_s": round(wall, 1), "default_base_eval_loss": round(m["base_eval_loss"], 4),
                       "default_final_eval_loss": round(m["final_eval_loss"], 4)})
    print(json.dumps(result, indent=1))
    print(f"train overhead ratio {ratio:.3f} ({min(ours):.3f} vs {min(plain):.3f} s/step); the reference step "
          f"(int64 masks, full-vocabulary loss) {min(before):.3f} s: {min(before) / min(ours):.2f}x; "
          f"start-up to first step {startup:.1f}s" + (f"; default train {result['default_train_wall_s']}s, eval loss "
                               f"{result['default_base_eval_loss']} -> {result['default_final_eval_loss']}"
                               if "default_train_wall_s" in result else ""))


if __name__ == "__main__":
    main()
