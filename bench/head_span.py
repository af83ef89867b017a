"""The pack's LM head over each row's scored span (`first`/`span`, as the pack's steps use it) vs
over every position, timed alternately in one process on a workload's real rows: from the last
hidden state to every slot's loss and that state's gradient (`rows.slot_losses`, the head's
loss kernel on CUDA), K slots x batch rows a step, the head's weights random at the model's
shape. The rest of a packed step is the same code either way, so this difference is the step's.

    python bench/head_span.py                          # default (SmolLM2, K=128 x 8) and qwen (K=64 x 1)
    python bench/head_span.py --workloads qwen --rounds 6
    python bench/head_span.py --device cpu --no-compile --rounds 1 --repeat 1 --k 2   # smoke
    python bench/head_span.py --workloads qwen --chunk-rows 1728,512,128   # the span way, by chunk size

`--chunk-rows` times the span way alone with the head's logits made that many rows at a time
(`rows.HEAD_CHUNK_BYTES`; its own value first), alternately, each against the first's results.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: (width, vocabulary, K, batch) of each workload's model and pack, as bench/workloads.py times them
SHAPES = {"default": (576, 49152, 128, 8), "qwen": (896, 151936, 64, 1)}


class _Hidden:
    """Stands in for the base model: `base_model(...)` hands back a given last hidden state."""

    def __init__(self, hidden):
        self.last_hidden_state = hidden

    def base_model(self, **_):
        return self


class _Model:
    """Stands in for the model where `OutputHead` reads its output embeddings."""

    def __init__(self, embed):
        self.embed = embed

    def get_output_embeddings(self):
        return self.embed


def time_workload(name: str, args: argparse.Namespace, tokenizer, tok_path: str) -> dict:
    """Both ways on one workload's rows, alternated: the median ms of each, and their results compared."""
    import torch
    import workloads

    from lora_exp.compose import compose
    from lora_exp.core.data import load_rows, tokenize
    from lora_exp.pack.rows import OutputHead, TokenTable, slot_losses
    from lora_exp.sweep.spec import load_sweep

    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    width, vocab, k, batch = SHAPES[name]
    k = args.k or k
    with tempfile.TemporaryDirectory() as tmp:
        sweep, overrides = workloads.workload(name, tok_path, Path(tmp))
        cfg = compose(list(load_sweep(sweep).base) + overrides)
        data = tokenize(load_rows(cfg.data), cfg.data, tokenizer)
    table = TokenTable.build(data.train, tokenizer.eos_token_id or 0, dev)
    torch.manual_seed(0)
    idx = torch.randint(0, table.empty, (k * batch,), device=dev)
    ids, labels, first = table.ids[idx], table.labels[idx], table.first[idx]
    head = OutputHead(_Model(torch.nn.Linear(width, vocab, bias=False, device=dev)), torch.bfloat16)
    hidden = torch.randn(*ids.shape, width, device=dev, requires_grad=True)
    compile = not args.no_compile

    def step(span: bool) -> torch.Tensor:
        hidden.grad = None
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            losses = slot_losses(_Hidden(hidden), ids, None, labels, k, batch, head, compile,
                                 first if span else None, table.span if span else 0)
        losses.sum().backward()
        return losses.detach()

    if args.chunk_rows:
        return time_chunks(name, args, step, hidden, vocab, k, batch, sync)
    full = step(False)  # warm-up (the head kernel compiles), and the two ways' results compared
    grad_full = hidden.grad.clone()
    spanned = step(True)
    times = alternated({span: functools.partial(step, span) for span in (False, True)}, args, sync)
    every, only = statistics.median(times[False]), statistics.median(times[True])
    positions = ids.shape[1] - 1
    return {"what": "LM head: every position vs each row's scored span", "workload": name, "k": k, "batch": batch,
            "positions": positions, "span": table.span, "head_rows_every": k * batch * positions,
            "head_rows_span": k * batch * min(table.span, positions),
            "ms_every": round(every, 2), "ms_span": round(only, 2), "saved_ms": round(every - only, 2),
            "rounds_ms_every": [round(t, 2) for t in times[False]],
            "rounds_ms_span": [round(t, 2) for t in times[True]],
            "loss_max_rel_diff": ((full - spanned).abs() / full.abs().clamp(min=1e-6)).max().item(),
            "grad_max_abs_diff": (hidden.grad - grad_full).abs().max().item()}


def alternated(ways: dict, args: argparse.Namespace, sync) -> dict:
    """Each way's ms a step, `args.repeat` steps a round, the ways taking turns for `args.rounds`."""
    times: dict = {key: [] for key in ways}
    for _ in range(args.rounds):
        for key, way in ways.items():
            sync()
            start = time.perf_counter()
            for _ in range(args.repeat):
                way()
            sync()
            times[key].append((time.perf_counter() - start) / args.repeat * 1e3)
    return times


def time_chunks(name: str, args: argparse.Namespace, step, hidden, vocab: int, k: int, batch: int, sync) -> dict:
    """The span way with the head's logits made `args.chunk_rows` rows at a time, alternated."""
    from lora_exp.pack import rows

    own = rows.HEAD_CHUNK_BYTES
    sizes = [int(c) for c in args.chunk_rows.split(",")]
    results = {}

    def sized(c: int):
        rows.HEAD_CHUNK_BYTES = c * 4 * vocab
        return step(True)

    try:
        for c in sizes:  # warm-up (each size compiles), results kept to compare
            results[c] = (sized(c), hidden.grad.clone())
        times = alternated({c: functools.partial(sized, c) for c in sizes}, args, sync)
    finally:
        rows.HEAD_CHUNK_BYTES = own
    ref_loss, ref_grad = results[sizes[0]]
    return {"what": "LM head over each row's scored span, by chunk rows", "workload": name, "k": k, "batch": batch,
            "own_chunk_rows": own // (4 * vocab),
            "ms": {c: round(statistics.median(times[c]), 2) for c in sizes},
            "rounds_ms": {c: [round(t, 2) for t in times[c]] for c in sizes},
            "loss_max_rel_diff": {c: ((results[c][0] - ref_loss).abs() / ref_loss.abs().clamp(min=1e-6)).max().item()
                                  for c in sizes},
            "grad_max_abs_diff": {c: (results[c][1] - ref_grad).abs().max().item() for c in sizes}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default="default,qwen")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--k", type=int, default=None, help="slots (default: each workload's)")
    p.add_argument("--rounds", type=int, default=4, help="alternations of the two ways")
    p.add_argument("--repeat", type=int, default=10, help="steps timed per way per round")
    p.add_argument("--device", default="cuda")
    p.add_argument("--no-compile", action="store_true", help="the head's eager path (CPU smoke)")
    p.add_argument("--chunk-rows", default="", help="e.g. 1728,512,128: the span way by the logits' chunk rows")
    args = p.parse_args()

    import workloads
    from transformers import AutoTokenizer

    tok_path = args.tokenizer or workloads.default_tokenizer()
    workloads.require_tokenizer(p, tok_path)
    tokenizer = AutoTokenizer.from_pretrained(tok_path)
    for name in args.workloads.split(","):
        print(json.dumps(time_workload(name, args, tokenizer, tok_path)), flush=True)


if __name__ == "__main__":
    main()
