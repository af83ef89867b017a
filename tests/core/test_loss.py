"""The loss that projects only the scored positions onto the vocabulary equals the model's own."""
from __future__ import annotations

import pytest
import torch

from lora_exp.compose import compose
from lora_exp.core import loss as core_loss
from lora_exp.core.adapters import attach_adapter, detach_adapter, train_mode
from lora_exp.core.data import collate, load_rows, tokenize
from lora_exp.core.loss import LogitTransform, causal_lm_loss, logit_transform
from lora_exp.core.models import load_base

from helpers import TRANSFORMED_LOGITS, family_model


def _trial(overrides):
    cfg = compose(overrides)
    base = load_base(cfg.model, torch.device("cpu"))
    data = tokenize(load_rows(cfg.data), cfg.data, base.tokenizer)
    model = attach_adapter(base, cfg)
    batch = collate(data.train[:6], base.tokenizer.pad_token_id)
    return base, model, batch


def _loss_and_grads(model, fn, batch):
    model.zero_grad(set_to_none=True)
    loss = fn(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("model_name,preset", [("tiny_gpt2", "all"), ("tiny_llama", "all_linear")])
def test_the_answer_positions_loss_and_its_gradients_equal_the_models_own(model_name, preset):
    base, model, batch = _trial([f"model={model_name}", "data=qa_demo", f"lora.preset={preset}",
                                 "lora.lora_dropout=0.0", "data.answer_only_loss=true"])
    assert (batch["labels"] == -100).float().mean() > 0.2, "prompts and padding carry no label"
    train_mode(model, False)
    ours, ours_grads = _loss_and_grads(model, causal_lm_loss, batch)
    theirs, their_grads = _loss_and_grads(model, lambda m, b: m(**b).loss, batch)
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=0), (float(ours), float(theirs))
    assert ours_grads.keys() == their_grads.keys() and ours_grads
    for name, grad in ours_grads.items():
        torch.testing.assert_close(grad, their_grads[name], rtol=1e-4, atol=1e-7, msg=name)
    detach_adapter(model)


def test_a_model_whose_head_is_adapted_computes_its_own_loss():
    """An adapted head's dropout masks depend on each row's positions: only the model's own loss
    keeps them."""
    base, model, batch = _trial(["model=tiny_gpt2", "data=qa_demo", "model.modules=[c_attn,c_proj,c_fc,lm_head]",
                                 "lora.target_modules=[c_attn,lm_head]",
                                 "lora.lora_dropout=0.1"])
    train_mode(model, False)
    with torch.no_grad():
        assert torch.equal(causal_lm_loss(model, batch), model(**batch).loss)
    detach_adapter(model)


@pytest.mark.parametrize("family", [*TRANSFORMED_LOGITS, "qwen2", "gemma", "phi3"])
def test_a_model_that_scales_or_caps_its_heads_output_gets_the_same_from_the_head_alone(family):
    """Gemma 2 soft-caps its logits, Granite and Cohere scale them, MiniCPM3 scales the hidden
    state before its head (a bias-free head: the same as scaling its output): the head's output
    alone would be another loss, so the loss does what the model does. Found by running the model,
    not by its name; the check leaves the random state and each module's train/eval mode as they
    were."""
    base, model, batch = _trial([*family_model(family), "data=qa_demo", "lora.preset=all_linear",
                                 "lora.lora_dropout=0.0"])
    train_mode(model, False)
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    assert logit_transform(model) is not None
    assert torch.equal(torch.get_rng_state(), rng) and [m.training for m in model.modules()] == modes
    rows = []
    hook = base.model.get_output_embeddings().register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    ours, ours_grads = _loss_and_grads(model, causal_lm_loss, batch)
    hook.remove()
    scored = int((batch["labels"][:, 1:] != -100).sum())
    assert rows == [scored]  # the head makes logits at the scored positions only
    theirs, their_grads = _loss_and_grads(model, lambda m, b: m(**b).loss, batch)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    for name, grad in ours_grads.items():
        torch.testing.assert_close(grad, their_grads[name], rtol=1e-4, atol=1e-7, msg=name)
    detach_adapter(model)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_what_a_model_does_to_its_heads_output_is_found_in_either_precision(dtype):
    """The pack's head scales or caps as the model does (pack.rows.OutputHead); on a bf16 base
    the model does it in bf16. MiniCPM3 divides the head's input by hidden_size / dim_model_base
    (64 / 16); with a bias on its head that is no scale of the head's output: None, and the pack
    takes the model's own logits."""
    expected = {"gemma2": LogitTransform(softcap=30.0), "granite": LogitTransform(scale=1 / 8),
                "cohere": LogitTransform(scale=1 / 16), "qwen2": LogitTransform(),
                "minicpm3": LogitTransform(scale=1 / 4)}
    for family, transform in expected.items():
        base = load_base(compose([*family_model(family), f"model.dtype={dtype}"]).model, torch.device("cpu"))
        assert logit_transform(base.model) == transform, family
    head = base.model.lm_head
    base.model.lm_head = torch.nn.Linear(head.in_features, head.out_features, dtype=head.weight.dtype)
    base.model.lm_head.weight = head.weight
    core_loss._TRANSFORMS.clear()  # the model changed under the probe's answer
    assert logit_transform(base.model) is None
