"""The model side of a pack: the packed model and its precision, the data as device tables, and
the passes over many slots at once (evals, generations) and over the base model alone.

`PackTrainer` (trainer.py) runs the steps; `HostDrain` (drain.py) and `Finisher` (finish.py)
read results back and close trials; all three share this."""
from __future__ import annotations

import contextlib
import logging
from collections import Counter
from typing import Any, Iterator, Sequence

import torch

from lora_exp.config import RunConfig
from lora_exp.core.adapters import train_mode
from lora_exp.core.data import IGNORE, PreparedData
from lora_exp.core.evaluation import (
    autocast,
    encode_prompts,
    eval_loss,
    generate,
    new_tokens,
    prompt_budget,
    score_outputs,
)
from lora_exp.core.loss import logit_transform
from lora_exp.core.models import BaseModel
from lora_exp.pack.attention import own_attention_reason, padded_attention, switch_attention
from lora_exp.pack.model import PackedModel
from lora_exp.pack.rows import OutputHead, TokenTable, slot_losses

log = logging.getLogger(__name__)

#: rows per forward when evaluating or generating many slots at once
MAX_EVAL_ROWS = 2048
#: prompts per generation batch (left-padded, as `generate` batches them for one adapter)
PROMPTS_PER_BATCH = 16


class FrozenWeights:
    """bf16 copies of the frozen base's matmul weights, made once: autocast would cast the same
    fp32 weights to the same bf16 values at every call (frozen weights are not in its cache).
    Embeddings and norms stay fp32, as autocast keeps them; `use_fp32` swaps the originals back
    (for fp32 generation, and when the pack closes)."""

    def __init__(self, model: Any):
        skip = {id(model.get_output_embeddings())}
        self.pairs: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]] = []
        for module in model.modules():
            if id(module) in skip or not (isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"):
                continue
            for param in (module.weight, getattr(module, "bias", None)):
                if param is not None and param.dtype == torch.float32:
                    self.pairs.append((param, param.data, param.data.to(torch.bfloat16)))
        self.use_bf16()

    def use_bf16(self) -> None:
        for param, _, low in self.pairs:
            param.data = low

    def use_fp32(self) -> None:
        for param, full, _ in self.pairs:
            param.data = full


class PackRuntime:
    """One frozen base, K slots, the pack's data on the device."""

    def __init__(self, base: BaseModel, data: PreparedData, cfg: RunConfig, slots: int, max_rank: int,
                 modules: Sequence[str], compile: str | None = None):
        t = cfg.trainer
        self.base, self.data, self.k = base, data, slots
        self.batch, self.logging_steps, self.eval_steps = t.batch_size, t.logging_steps, t.eval_steps
        self.precision, self.base_dropout, self.eval_batch_size = t.precision, t.base_dropout, t.eval_batch_size
        self.max_new_tokens, self.metrics = t.max_new_tokens, tuple(t.generation_metrics)
        self.checkpoint_seconds = cfg.pack.checkpoint_seconds
        self.device = base.device
        self.pad = base.tokenizer.pad_token_id
        self.base_params = sum(p.numel() for p in base.model.parameters())
        bf16 = self.precision == "bf16" and self.device.type == "cuda"
        #: what the model does to its head's output (checked before the pack wraps the model): the
        #: identity, a scale or a soft cap (`OutputHead` does it too); None: the loss takes the
        #: model's own logits
        transform = logit_transform(base.model)
        self.train_table = TokenTable.build(data.train, self.pad, self.device)
        self.eval_table = (TokenTable.build(data.validation, self.pad, self.device, "answer_labels")
                           if data.validation else None)
        # the pack's rows are padded on the right: their attention needs no mask (generation's
        # does). Checked, like the head, before the pack wraps the model; switched at the end.
        longest = max(t.ids.shape[1] for t in (self.train_table, self.eval_table) if t is not None)
        kept = own_attention_reason(base.model, cfg.pack.attention, longest)
        rows_attention = kept is None
        if kept is not None:
            log.info("pack: %s keeps its own attention (%s, with masks): %s", type(base.model).__name__,
                     base.model.config._attn_implementation, kept)
        self.pm = PackedModel(base, slots, max_rank, modules, compile=compile or cfg.pack.compile, low_precision=bf16,
                              lora=cfg.pack.lora)
        # the head in the compute dtype: bf16 under autocast, else the base's own (a bf16 base's bf16)
        head_dtype = torch.bfloat16 if bf16 else base.model.get_output_embeddings().weight.dtype
        self.head = OutputHead(base.model, head_dtype, transform) if transform is not None else None
        if transform is None:
            log.info("pack: %s does more to its LM head's output than a scale or a soft cap: the loss takes the "
                     "model's own logits at every position, and evals run %d rows a forward",
                     type(base.model).__name__, self.eval_batch_size)
        self.weights = FrozenWeights(base.model) if bf16 else None
        #: seconds of host work since the last progress line, by what (and `starts`: a count)
        self.host_s: Counter[str] = Counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.train_mode()
        #: the model's own attention implementation, to restore, where the pack switched it
        self.own_attention = switch_attention(base.model) if rows_attention else None

    def train_mode(self) -> None:
        train_mode(self.base.model, self.base_dropout)

    @contextlib.contextmanager
    def fp32(self) -> Iterator[None]:
        """The base's fp32 weights for a while (generation runs in fp32, as for one adapter)."""
        if self.weights is not None:
            self.weights.use_fp32()
        try:
            yield
        finally:
            if self.weights is not None:
                self.weights.use_bf16()

    @torch.no_grad()
    def slot_eval(self, slots: list[int]) -> torch.Tensor:
        """Each slot's eval loss [len(slots)], on the device (queued: nothing here waits for the GPU)."""
        table = self.eval_table
        assert table is not None
        n_val = table.empty
        self.base.model.eval()
        out: list[torch.Tensor] = []
        per = max(1, MAX_EVAL_ROWS // n_val)
        g = self.pm.groups
        try:
            if self.head is None:  # the model's own logits: a slot's rows a few at a time
                return torch.stack([self._slot_eval_own_logits(slot) for slot in slots])
            for i in range(0, len(slots), per):
                chunk = slots[i:i + per]
                g.slots, g.rows, g.enabled = self.pm.to_device(torch.tensor(chunk)), n_val, True
                ids, mask, labels = (x[:n_val].repeat(len(chunk), 1) for x in (table.ids, table.mask, table.labels))
                with autocast(self.device, self.precision):
                    out.append(slot_losses(self.base.model, ids, mask, labels, len(chunk), n_val, self.head,
                                           first=table.first[:n_val].repeat(len(chunk)), span=table.span))
        finally:
            g.slots, g.rows = None, self.batch
            self.train_mode()
        return torch.cat(out)

    def _slot_eval_own_logits(self, slot: int) -> torch.Tensor:
        """One slot's eval loss where the model makes its own logits (at every position, over the
        whole vocabulary): `eval_batch_size` rows a forward, as a trial alone evaluates, the mean
        weighted by each forward's scored tokens."""
        table, g = self.eval_table, self.pm.groups
        assert table is not None
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        count = torch.zeros((), dtype=torch.long, device=self.device)
        for start in range(0, table.empty, self.eval_batch_size):
            ids, mask, labels = (x[start:min(start + self.eval_batch_size, table.empty)]
                                 for x in (table.ids, table.mask, table.labels))
            g.slots, g.rows, g.enabled = self.pm.to_device(torch.tensor([slot])), ids.shape[0], True
            with autocast(self.device, self.precision):
                mean = slot_losses(self.base.model, ids, mask, labels, 1, ids.shape[0])[0]
            n = (labels[:, 1:] != IGNORE).sum()
            total, count = total + mean * n, count + n
        return total / count.clamp(min=1)

    def base_results(self) -> tuple[float | None, list[str], dict[str, list[float]]]:
        """Base-model eval loss, generations and scores: once per base (as a trial alone computes
        them, with the adapters switched off)."""
        g, model, data = self.pm.groups, self.base.model, self.data
        g.enabled = False
        try:
            with self.fp32(), padded_attention(model, self.own_attention):
                base_loss = self.base.cached(("eval_loss", data.key, self.precision),
                                             lambda: eval_loss(model, data.validation, self.pad, self.device,
                                                               self.eval_batch_size, self.precision))
                outputs = self.base.cached(("generations", data.key, self.max_new_tokens),
                                           lambda: generate(model, self.base.tokenizer, data.prompts, self.device,
                                                            self.max_new_tokens))
        finally:
            g.enabled = True
            self.train_mode()
        scores = self.base.cached(("base_scores", data.key, self.max_new_tokens, self.metrics),
                                  lambda: score_outputs(data.prompts, outputs, self.metrics))
        return base_loss, outputs, scores

    @torch.no_grad()
    def generate(self, slots: list[int]) -> tuple[list[list[str]], list[int]]:
        """Greedy generations of every prompt for each slot, batched across slots (left-padded
        batches of prompts, as `generate` makes them for one adapter), and each slot's new tokens."""
        tok, prompts = self.base.tokenizer, self.data.prompts
        outs: list[list[str]] = [[] for _ in slots]
        n_new = [0] * len(slots)
        if not prompts:
            return outs, n_new
        model, g = self.base.model, self.pm.groups
        model.eval()
        side = tok.padding_side
        tok.padding_side = "left"
        try:
            with self.fp32(), padded_attention(model, self.own_attention):  # left-padded prompts need their masks
                for start in range(0, len(prompts), PROMPTS_PER_BATCH):
                    texts = [p.text for p in prompts[start:start + PROMPTS_PER_BATCH]]
                    enc = encode_prompts(tok, texts, prompt_budget(model, self.max_new_tokens)).to(self.device)
                    per = max(1, MAX_EVAL_ROWS // len(texts))
                    for i in range(0, len(slots), per):
                        chunk = slots[i:i + per]
                        g.slots, g.rows, g.enabled = torch.tensor(chunk, device=self.device), len(texts), True
                        # greedy generation runs in fp32, as `generate` runs it for one adapter
                        out = model.generate(input_ids=enc["input_ids"].repeat(len(chunk), 1),
                                             attention_mask=enc["attention_mask"].repeat(len(chunk), 1),
                                             max_new_tokens=self.max_new_tokens, do_sample=False,
                                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
                        new = out[:, enc["input_ids"].shape[1]:]
                        counted = new_tokens(new, tok.eos_token_id).view(len(chunk), -1).sum(dim=1)
                        decoded = [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
                        for j, slot in enumerate(chunk):
                            pos = slots.index(slot)
                            outs[pos] += decoded[j * len(texts):(j + 1) * len(texts)]
                            n_new[pos] += int(counted[j])
        finally:
            tok.padding_side = side
            g.slots, g.rows = None, self.batch
            self.train_mode()
        return outs, n_new

    def close(self) -> None:
        """Give the base model back exactly as it was."""
        if self.weights is not None:
            self.weights.use_fp32()
        if self.own_attention is not None:
            self.base.model.set_attn_implementation(self.own_attention)
        self.pm.close()
        self.base.model.eval()
