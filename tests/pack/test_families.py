"""A packed trial trains as it does alone on eighteen model families, each doing something of its
own around its linear layers: biases on q/k/v (Qwen2), q/k norms (Qwen3, OLMo 2),
fused q/k/v and gate/up projections (Phi-3, GPT-NeoX, Falcon), sliding windows shorter than the
rows (Mistral) and no shorter (Gemma 3), soft-capped attention scores and logits (Gemma 2),
scaled embeddings (Gemma) or logits (Granite, Cohere), hidden states scaled before the head and
latent attention (MiniCPM3), parallel attention and MLP (GPT-NeoX, Phi), mixtures of experts
(Mixtral, GPT-OSS), attention sinks (GPT-OSS). Each attends through the pack's attention but
those in OWN_ATTENTION.
Tiny random models of each (`helpers.FAMILIES`), two trials on different modules, CPU. The GPU's
kernels are checked on Gemma 2 and Gemma 3 by bench/gpu_matrix.py."""
from __future__ import annotations

import logging

import pytest
import torch

from lora_exp.compose import compose
from lora_exp.core.data import load_rows, tokenize
from lora_exp.core.models import load_base
from lora_exp.core.recording import NullTracker
from lora_exp.core.status import TrialStatus
from lora_exp.core.training import run_trial
from lora_exp.pack.trainer import train_packed

from helpers import FAMILIES, family_model

COMMON = ["data=seed", "lora=seed", "trainer=seed", "trainer.max_steps=20", "trainer.eval_steps=10",
          "trainer.logging_steps=5", "trainer.generation_metrics=[exact_match]", "trainer.max_new_tokens=8",
          "tracking=none", "trainer.batch_size=2",
          "trainer.eval_batch_size=2"]  # a pack whose model makes its own logits evals a few rows at a time
#: the families a pack leaves their own attention: no attention interface to switch (StableLM,
#: Falcon), attention sinks (GPT-OSS)
OWN_ATTENTION = ("stablelm", "falcon", "gpt_oss")


@pytest.mark.parametrize("name", [*FAMILIES, "minicpm3+head_bias"])
def test_a_packed_trial_trains_as_alone_on_every_family(name, caplog):
    """`minicpm3+head_bias`: MiniCPM3 with a bias on its head, whose logits are then no transform of
    the head's output (`core.loss.logit_transform`): the pack takes the model's own logits."""
    family, _, variant = name.partition("+")
    modules = FAMILIES[family][1]
    every = "[" + ",".join(modules) + "]"
    trials = [["lora.r=4", "lora.lora_alpha=8", "lora.lora_dropout=0.1", "trainer.lr=1e-3",
               f"lora.target_modules={every}"],
              ["lora.r=8", "lora.lora_alpha=16", "lora.lora_dropout=0.0", "trainer.lr=3e-3", "trainer.seed=7",
               f"lora.target_modules=[{modules[0]},{modules[-1]}]"]]
    cfgs = [compose([*family_model(family), *COMMON, *t]) for t in trials]
    base = load_base(cfgs[0].model, torch.device("cpu"))
    assert base.model.config.model_type == family
    if variant == "head_bias":
        head = base.model.lm_head
        torch.manual_seed(0)
        base.model.lm_head = torch.nn.Linear(head.in_features, head.out_features).requires_grad_(False)
        base.model.lm_head.weight = head.weight
    data = tokenize(load_rows(cfgs[0].data), cfgs[0].data, base.tokenizer)
    alone = [run_trial(c, base, data, NullTracker()) for c in cfgs]
    with caplog.at_level(logging.INFO, logger="lora_exp.pack.runtime"):
        packed = train_packed(cfgs, base, data)
    said = [r.getMessage() for r in caplog.records]
    kept = [m for m in said if "keeps its own attention" in m]
    assert bool(kept) == (family in OWN_ATTENTION), kept  # said, with its reason, where it does
    assert any("does more to its LM head's output" in m for m in said) == (variant == "head_bias")
    for a, p in zip(alone, packed):
        assert a.status == p.status == TrialStatus.COMPLETE
        assert a.metrics["trainable_params"] == p.metrics["trainable_params"] > 0
        for curve in ("loss_curve", "eval_curve"):
            ours, theirs = getattr(p, curve), getattr(a, curve)
            assert [s for s, _ in ours] == [s for s, _ in theirs] and ours, curve
            for (step, x), (_, y) in zip(theirs, ours):
                assert abs(x - y) <= 1e-4 * abs(x), (name, curve, step, x, y)
        assert a.generations["adapter_output"] == p.generations["adapter_output"]
    assert packed[0].loss_curve[-1][1] != packed[1].loss_curve[-1][1]
