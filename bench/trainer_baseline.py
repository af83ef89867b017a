"""The baseline a packed sweep is compared with: its trials one at a time through HF Trainer + peft.

    python bench/trainer_baseline.py --workload qwen --trials 2 [--batch 4]
    python bench/trainer_baseline.py --workload default --trials 4

The seed's way, generalised: for each trial (sampled from the workload's search space as
bench/workloads.py samples them), peft's LoRA with the trial's r, alpha, dropout and target
modules on the same base model (built once, as a user loading it once would; each trial wraps it
and unloads it), a `Trainer` with the trial's lr, schedule, warmup, weight decay and clipping,
the same rows, batch size, steps, logging and eval steps, `bf16=True` where the sweep runs bf16,
no checkpoints saved; then greedy generations of the same prompts with the adapter. A fair
baseline, as a user would configure the Trainer: padding to the batch's longest row, no
artificial slowness. Prints one JSON line per trial and a summary (trials/hour, step time,
memory, the fraction of the bf16 rate its training steps reach, counted as workloads.py counts).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from workloads import ARCHS, BF16_PEAK, counted_flops, default_tokenizer, require_tokenizer, sampled_configs, workload  # noqa: E402

CUDA = torch.cuda.is_available()
sync = torch.cuda.synchronize if CUDA else (lambda: None)


class Rows(torch.utils.data.Dataset):
    def __init__(self, examples):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        e = self.examples[i]
        return {"input_ids": e.input_ids, "labels": e.labels}


def collator(pad_id: int):
    def collate(batch: list[dict]) -> dict:
        n = max(len(x["input_ids"]) for x in batch)
        ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), n), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, x in enumerate(batch):
            k = len(x["input_ids"])
            ids[i, :k], labels[i, :k], mask[i, :k] = torch.tensor(x["input_ids"]), torch.tensor(x["labels"]), 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return collate


def run_one(cfg, base, data, tmp: str) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    t = cfg.trainer
    start = time.perf_counter()
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.lora_alpha, lora_dropout=cfg.lora.lora_dropout,
                      target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(base.model, lora)
    args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=t.batch_size, max_steps=t.max_steps,
                             learning_rate=t.lr, lr_scheduler_type=t.lr_scheduler,
                             warmup_steps=t.warmup_steps, weight_decay=t.weight_decay,
                             max_grad_norm=t.max_grad_norm or 0.0, bf16=t.precision == "bf16",
                             logging_strategy="steps", logging_steps=t.logging_steps,
                             eval_strategy="steps" if t.eval_steps else "no", eval_steps=t.eval_steps,
                             per_device_eval_batch_size=t.eval_batch_size, save_strategy="no", report_to=[],
                             seed=t.seed, disable_tqdm=True, dataloader_pin_memory=True)

    class StepClock(TrainerCallback):
        """The training steps' own time (evals left out), for the rate the steps reach."""
        def __init__(self) -> None:
            self.step_s, self.t0 = 0.0, 0.0

        def on_step_begin(self, *a, **k) -> None:
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k) -> None:
            sync()
            self.step_s += time.perf_counter() - self.t0

    clock = StepClock()
    trainer = Trainer(model=model, args=args, train_dataset=Rows(data.train), eval_dataset=Rows(data.validation),
                      data_collator=collator(base.tokenizer.pad_token_id), callbacks=[clock])
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    # the adapter's greedy generations of the same prompts, left-padded as a batch
    tok = base.tokenizer
    tok.padding_side = "left"
    model.eval()
    bf16 = CUDA and t.precision == "bf16"
    with torch.no_grad(), torch.autocast(base.device.type, dtype=torch.bfloat16, enabled=bf16):
        enc = tok([p.text for p in data.prompts], return_tensors="pt", padding=True).to(base.device)
        model.generate(**enc, max_new_tokens=t.max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    sync()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if CUDA else 0.0
    model.unload()  # the base back, for the next trial
    flops = counted_flops(base, data, cfg)
    return {"what": "trainer trial", "r": cfg.lora.r, "targets": len(cfg.target_modules), "seconds": round(seconds, 2),
            "step_ms": round(1e3 * clock.step_s / t.max_steps, 1),
            "bf16_peak_fraction": round(flops * t.max_steps / clock.step_s / BF16_PEAK, 4), "peak_gib": round(peak, 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", choices=["default", *ARCHS], default="default")
    parser.add_argument("--tokenizer", default=default_tokenizer())
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--override", action="append", default=[])
    args = parser.parse_args()
    require_tokenizer(parser, args.tokenizer)
    from lora_exp.core.data import load_rows, tokenize
    from lora_exp.core.models import load_base, pick_device

    with tempfile.TemporaryDirectory(prefix="trainer-baseline-") as tmp:
        sweep, overrides = workload(args.workload, args.tokenizer, Path(tmp), args.batch)
        cfgs = sampled_configs(sweep, overrides + args.override, args.trials)
        base = load_base(cfgs[0].model, pick_device("auto"))
        data = tokenize(load_rows(cfgs[0].data), cfgs[0].data, base.tokenizer)
        runs = []
        for cfg in cfgs:
            runs.append(run_one(cfg, base, data, tmp))
            print(json.dumps(runs[-1]), flush=True)
    mean = sum(r["seconds"] for r in runs) / len(runs)
    print(json.dumps({"what": "trainer baseline", "workload": args.workload, "trials": len(runs),
                      "s_per_trial": round(mean, 2), "trials_per_hour": round(3600 / mean, 1),
                      "step_ms": round(sum(r["step_ms"] for r in runs) / len(runs), 1),
                      "bf16_peak_fraction": round(sum(r["bf16_peak_fraction"] for r in runs) / len(runs), 4),
                      "peak_gib": max(r["peak_gib"] for r in runs)}), flush=True)


if __name__ == "__main__":
    main()
