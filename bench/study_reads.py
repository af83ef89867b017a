"""How long a packed search's repeated reads of its study take, as the study grows.

The pruner's view of a pack (every 5 s) and the sampling process (once per batch of 64) read
the study's trials. A full read loads every finished trial (params, values, attributes,
intermediate values); `search.TrialReader` loads each finished trial once and afterwards only the
ids of the finished ones and those finished since. This builds SQLite studies of N finished
trials shaped like the seed_gpt2 search's (5 params, 5 evals, the overrides attribute), then
times a full read against the reader's read once 64 more have finished.

    python bench/study_reads.py --sizes 500,1500,3000
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def finished_trial(rng: random.Random):
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    dists = {"lora.r": CategoricalDistribution([4, 8, 16]), "lora.lora_alpha": CategoricalDistribution([1, 2, 4]),
             "lora.lora_dropout": FloatDistribution(0.0, 0.2),
             "lora.preset": CategoricalDistribution(["attn", "attn_proj", "all"]),
             "trainer.lr": FloatDistribution(3e-5, 3e-3, log=True)}
    params = {"lora.r": rng.choice([4, 8, 16]), "lora.lora_alpha": rng.choice([1, 2, 4]),
              "lora.lora_dropout": rng.uniform(0, 0.2), "lora.preset": rng.choice(["attn", "attn_proj", "all"]),
              "trainer.lr": 10 ** rng.uniform(-4.5, -2.55)}
    return optuna.trial.create_trial(
        params=params, distributions=dists, value=rng.uniform(2, 11),
        intermediate_values={s: rng.uniform(2, 11) for s in (500, 1000, 1500, 2000, 2500)},
        user_attrs={"overrides": [f"{k}={v}" for k, v in params.items()]})


def main() -> None:
    import optuna
    from optuna.trial import TrialState

    from lora_exp.sweep.storage import TrialReader, stored_trials

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="500,1500,3000")
    ap.add_argument("--new", type=int, default=64, help="trials finished between two reads")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rng = random.Random(0)
    states = (TrialState.COMPLETE, TrialState.PRUNED)
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(x) for x in args.sizes.split(",")):
            study = optuna.create_study(storage=f"sqlite:///{tmp}/s{n}.db", study_name="s")
            study.add_trials([finished_trial(rng) for _ in range(n)])
            reader = TrialReader(study)
            reader.read(states)
            study.add_trials([finished_trial(rng) for _ in range(args.new)])
            t0 = time.perf_counter()
            full = stored_trials(study, states)
            full_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            got = reader.read(states)
            reader_s = time.perf_counter() - t0
            assert [t.number for t in got] == [t.number for t in full]
            print(json.dumps({"what": "read a study's finished trials", "finished": n + args.new,
                              "new_since_last_read": args.new, "full_read_s": round(full_s, 3),
                              "reader_s": round(reader_s, 3), "ratio": round(full_s / reader_s, 1)}), flush=True)


if __name__ == "__main__":
    main()
