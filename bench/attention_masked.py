"""Attention the pack cannot hand to sdpa's `is_causal`: soft-capped scores (Gemma 2) and sliding
windows shorter than the rows (Gemma 3 1B's 512 on 1,024-token rows). Forward and backward of one
layer at a workload's shapes, timed alternately, in bf16:

- `eager`: transformers' eager attention with the additive mask a model builds from the padding
  (what an uncompiled step ran before the pack computed these scores itself);
- `eager, compiled`: the same formula compiled by torch.compile (what a compiled step runs);
- `sdpa, mask`: sdpa with that mask tensor (what a model with sdpa builds for its sliding layers);
- `flex`: torch's FlexAttention, compiled, with the causal (and window) mask as a block mask and the
  cap as a score modification (what an uncompiled step runs for rows of 128 positions or more);
- `sdpa, is_causal`: the pack's attention on plain causal rows, the floor (it neither caps nor
  windows: its output is not compared).

    python bench/attention_masked.py --case gemma2      # Gemma 2 2B: K=32 x 512 positions, cap 50
    python bench/attention_masked.py --case gemma3      # Gemma 3 1B: K=32 x 1,024 positions, window 512
    python bench/attention_masked.py --shape 32,8,4,512,256 --softcap 50 --window 0

Prints one JSON line: each way's median ms and its largest difference from an fp32 reference.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics

from timing import alternately

CASES = {"gemma2": ("32,8,4,512,256", 50.0, 0), "gemma2-9b": ("32,16,8,512,256", 50.0, 0),
         "gemma3": ("32,4,1,1024,256", 0.0, 512)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", choices=sorted(CASES), default="gemma2")
    p.add_argument("--shape", help="rows, heads, key/value heads, positions, head dim (overrides the case's)")
    p.add_argument("--softcap", type=float, help="attention scores' cap (0: none)")
    p.add_argument("--window", type=int, help="sliding window (0: none)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeat", type=int, default=10)
    args = p.parse_args()

    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    shape, softcap, window = CASES[args.case]
    shape = args.shape or shape
    softcap = args.softcap if args.softcap is not None else softcap
    window = args.window if args.window is not None else window
    rows, heads, kv, n, d = (int(v) for v in shape.split(","))
    scale = d ** -0.5
    dev = "cuda"
    torch.manual_seed(0)

    def leaf(h):  # as a transformers model hands them over: [rows, positions, heads, dim] transposed
        t = torch.randn(rows, n, h, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
        return t, t.transpose(1, 2)

    (q0, q), (k0, k), (v0, v) = leaf(heads), leaf(kv), leaf(kv)
    g = torch.randn(rows, heads, n, d, device=dev, dtype=torch.bfloat16)
    i = torch.arange(n, device=dev)
    allowed = i[:, None] >= i[None, :]
    if window:
        allowed &= i[:, None] - i[None, :] < window
    additive = torch.zeros(n, n, device=dev, dtype=torch.bfloat16)
    additive = additive.masked_fill(~allowed, torch.finfo(torch.bfloat16).min)
    additive = additive[None, None].expand(rows, 1, n, n)

    def causal(b, h, qi, ki):
        return qi >= ki

    def windowed(b, h, qi, ki):
        return (qi >= ki) & (qi - ki < window)

    def capped(score, b, h, qi, ki):
        return softcap * torch.tanh(score / softcap)

    block_mask = create_block_mask(windowed if window else causal, None, None, n, n, device=dev)
    flex = torch.compile(flex_attention, dynamic=False)

    def eager(qq, kk, vv):
        kk, vv = kk.repeat_interleave(heads // kv, 1), vv.repeat_interleave(heads // kv, 1)
        s = torch.matmul(qq, kk.transpose(2, 3)) * scale
        if softcap:
            s = torch.tanh(s / softcap) * softcap
        s = s + additive.to(s.dtype)
        w = torch.softmax(s, dim=-1, dtype=torch.float32).to(qq.dtype)
        return torch.matmul(w, vv)

    eager_compiled = torch.compile(eager, dynamic=False)

    def run(way):
        q0.grad = k0.grad = v0.grad = None
        if way == "eager":
            out = eager(q, k, v)
        elif way == "eager, compiled":
            out = eager_compiled(q, k, v)
        elif way == "sdpa, mask":
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=additive, scale=scale,
                                                                   enable_gqa=heads != kv)
        elif way == "flex":
            out = flex(q, k, v, score_mod=capped if softcap else None, block_mask=block_mask, scale=scale,
                       enable_gqa=heads != kv)
        else:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                                   enable_gqa=heads != kv)
        out.backward(g)
        return out.detach(), q0.grad, k0.grad, v0.grad

    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q0, k0, v0))
    out = eager(qf.transpose(1, 2), kf.transpose(1, 2), vf.transpose(1, 2))
    out.backward(g.float())
    ref = [out.detach(), qf.grad, kf.grad, vf.grad]
    ways = ["eager", "eager, compiled", "flex", "sdpa, is_causal"] + ([] if softcap else ["sdpa, mask"])
    diffs, usable = {}, []
    for way in ways:
        try:
            got = run(way)
        except Exception as exc:  # noqa: BLE001 - a way that does not run here is reported, not fatal
            diffs[way] = f"not usable: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            continue
        usable.append(way)
        if way != "sdpa, is_causal":
            diffs[way] = max(((a.float() - b).abs().max() / b.abs().max()).item() for a, b in zip(got, ref))
    times = alternately({way: functools.partial(run, way) for way in usable}, args.rounds, args.repeat,
                        torch.cuda.synchronize)
    peak = {}
    for way in usable:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run(way)
        torch.cuda.synchronize()
        peak[way] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
    print(json.dumps({"what": "masked attention, forward + backward, one layer, bf16", "case": args.case,
                      "shape": shape, "softcap": softcap, "window": window,
                      "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "ms": {w: round(statistics.median(t), 3) for w, t in times.items()},
                      "extra_mib": peak, "max_rel_diff_vs_fp32": diffs}), flush=True)


if __name__ == "__main__":
    main()
