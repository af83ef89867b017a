"""DoRA and peft's inits as search dimensions, end to end: in a packed sweep the trials the pack
trains (gaussian init) train in it, the others (DoRA, PiSSA) run alone after it, said in the log;
every trial is recorded with its variant and an adapter that loads on the original base."""
from __future__ import annotations

import json
from pathlib import Path

from lora_exp.pack.worker import run_packed_worker
from lora_exp.sweep.command import cmd_sweep

from helpers import load_study, sweep_runs

SWEEP = """study: variants
objective: {metric: eval_loss, direction: minimize}
n_trials: 4
sampler: {name: random, seed: 1}
pruner: {name: none}
base: [model=tiny_llama, data=seed, trainer.max_steps=10, trainer.eval_steps=5, trainer.batch_size=5,
       trainer.max_new_tokens=4, "trainer.generation_metrics=[exact_match]"]
space:
  lora.r: {type: categorical, choices: [2, 4]}
  lora.use_dora: {type: categorical, choices: [false, true]}
  lora.init_lora_weights: {type: categorical, choices: [default, gaussian, pissa]}
"""


def test_variants_in_a_packed_sweep_train_in_the_pack_or_alone_after_it(workdir, store, caplog):
    caplog.set_level("INFO", logger="lora_exp")
    (workdir / "variants.yaml").write_text(SWEEP)
    (workdir / "first.yaml").write_text("- {lora.use_dora: true, lora.init_lora_weights: default}\n"
                                        "- {lora.use_dora: false, lora.init_lora_weights: pissa}\n"
                                        "- {lora.use_dora: false, lora.init_lora_weights: gaussian}\n"
                                        "- {lora.use_dora: false, lora.init_lora_weights: default}\n")
    assert cmd_sweep(["sweep=variants.yaml", "pack=2", "enqueue=first.yaml"], packed=run_packed_worker) == 0
    study = load_study(f"sqlite:///{workdir}/mlruns/optuna.db", "variants")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    assert "trial 0 runs alone after the pack: lora.use_dora=true (DoRA) is not trained in a pack" in caplog.text
    assert "trial 1 runs alone after the pack: lora.init_lora_weights=pissa is not trained in a pack" in caplog.text
    assert "trial 2 runs alone" not in caplog.text and "trial 3 runs alone" not in caplog.text

    client, _, children = sweep_runs(store)
    runs = {int(r.data.tags["trial_number"]): r for r in children}
    assert [runs[n].data.params["lora.use_dora"] for n in range(4)] == ["True", "False", "False", "False"]
    assert [runs[n].data.params["lora.init_lora_weights"] for n in range(4)] == ["default", "pissa", "gaussian",
                                                                                "default"]
    # the pack's trials and those run alone saw the same base model
    assert len({runs[n].data.metrics["base_eval_loss"] for n in range(4)}) == 1
    for n in range(4):
        folder = Path(client.download_artifacts(runs[n].info.run_id, "adapter"))
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["use_dora"] is (n == 0)
        assert config["init_lora_weights"] is not None and not str(config["init_lora_weights"]).startswith("pissa")
