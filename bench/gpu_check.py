"""The training engine on a GPU: bf16, run-to-run tolerance, and step time against the seed's way.

    python bench/gpu_check.py [--steps 500]

The seed's recipe (GPT-2 124M architecture, random weights, LoRA r=8 on c_attn, batch 1, the
blog's five texts) through `run_trial` on CUDA, nothing tracked: fp32 twice with the same seed
(the largest relative difference between the two loss curves is the rerun tolerance on GPU), then
bf16 autocast. Run `../shared/bench/seed_baseline.py` in the same command for the Trainer's time.
Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("LORA_EXP_CONFIG_DIR", str(Path(__file__).resolve().parent.parent / "conf"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=500)
    args = parser.parse_args()
    from lora_exp.compose import compose
    from lora_exp.core.data import load_rows, tokenize
    from lora_exp.core.models import load_base, pick_device
    from lora_exp.core.recording import NullTracker
    from lora_exp.core.training import run_trial

    common = ["model=gpt2", "model.source=random", "model.tokenizer=byte", "lora=seed", "trainer=seed", "data=seed",
              f"trainer.max_steps={args.steps}", "trainer.eval_steps=null", "tracking=none", "trainer.max_new_tokens=8"]
    cfg = compose(common)
    device = pick_device("auto")
    base = load_base(cfg.model, device)
    data = tokenize(load_rows(cfg.data), cfg.data, base.tokenizer)
    out = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "steps": args.steps}
    runs = {}
    for name, extra in (("fp32_a", []), ("fp32_b", []), ("bf16", ["trainer.precision=bf16"])):
        result = run_trial(compose(common + extra), base, data, NullTracker())
        runs[name] = result
        out[f"{name}_step_ms"] = round(1000 * result.metrics["train_step_s"], 2)
        out[f"{name}_final_train_loss"] = round(result.metrics["final_train_loss"], 5)
    a, b = [v for _, v in runs["fp32_a"].loss_curve], [v for _, v in runs["fp32_b"].loss_curve]
    out["fp32_rerun_max_rel_diff"] = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b))
    out["fp32_rerun_identical"] = a == b
    bf = [v for _, v in runs["bf16"].loss_curve]
    out["bf16_vs_fp32_max_rel_diff"] = round(max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, bf)), 5)
    out["trials_per_hour_at_2500_steps_fp32"] = round(3600 / (runs["fp32_a"].metrics["train_step_s"] * 2500), 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
