"""The frozen base's projections as a packed step runs them (one product per module) against
sibling projections that read the same input in one product (q, k and v; gate and up), bf16 on
CUDA, at the workloads' shapes (a pack's rows x the model's widths): the forward (`F.linear`,
with the bias where the model has one) and the input's gradient (each module's product, summed,
as autograd sums them, and the products alone, as a compiled step runs them with the sum fused into
what reads it, against one product over the concatenated output gradients). Each way is timed
alternately over rounds; medians are printed.

    python bench/proj_gemms.py                     # qwen (64 x 512 rows) and default (128 x 8 x 49)
    python bench/proj_gemms.py --workloads qwen --rounds 8
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

#: rows, width, (q, k, v) outputs, MLP width, q/k/v bias, of each workload's packed step
SHAPES = {"qwen": (64 * 512, 896, (896, 128, 128), 4864, True),
          "default": (128 * 8 * 49, 576, (576, 192, 192), 1536, False)}


def timed(fn, repeat: int) -> float:
    """The mean of `repeat` calls in ms, timed by CUDA events after one warm-up call."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeat


def cases(rows: int, width: int, qkv: tuple[int, ...], mlp: int, bias: bool):
    """(name, separate, fused, flops) for the forward and input gradient of each sibling group."""
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(rows, width, device=dev, dtype=dt)
    out = {}
    for group, widths, has_bias in (("qkv", qkv, bias), ("gate_up", (mlp, mlp), False)):
        ws = [torch.randn(n, width, device=dev, dtype=dt) * width ** -0.5 for n in widths]
        bs = [torch.randn(n, device=dev, dtype=dt) if has_bias else None for n in widths]
        wcat = torch.cat(ws)
        bcat = torch.cat(bs) if has_bias else None
        gs = [torch.randn(rows, n, device=dev, dtype=dt) for n in widths]
        gcat = torch.cat(gs, dim=1)
        flops = 2 * rows * width * sum(widths)

        def fwd_sep(ws=ws, bs=bs):
            return [F.linear(x, w, b) for w, b in zip(ws, bs)]

        def fwd_cat(wcat=wcat, bcat=bcat):
            return F.linear(x, wcat, bcat)

        def bwd_sep(ws=ws, gs=gs):
            dx = torch.mm(gs[0], ws[0])
            for g, w in zip(gs[1:], ws[1:]):
                dx = dx + torch.mm(g, w)  # autograd's sum of the modules' input gradients
            return dx

        def bwd_cat(wcat=wcat, gcat=gcat):
            return torch.mm(gcat, wcat)

        def bwd_products(ws=ws, gs=gs):  # the products alone: a compiled step fuses their sum into what follows
            return [torch.mm(g, w) for g, w in zip(gs, ws)]

        sep, cat = torch.cat([y for y in fwd_sep()], dim=1), fwd_cat()
        diff_f = ((sep.float() - cat.float()).abs().max() / cat.float().abs().max()).item()
        diff_b = ((bwd_sep().float() - bwd_cat().float()).abs().max() / bwd_cat().float().abs().max()).item()
        out[f"{group} forward"] = (fwd_sep, fwd_cat, flops, diff_f)
        out[f"{group} input grad"] = (bwd_sep, bwd_cat, flops, diff_b)
        out[f"{group} input grad, no sum"] = (bwd_products, bwd_cat, flops, diff_b)
        for n, w, b in zip(widths, ws, bs):  # each module alone: where the separate time goes
            out.setdefault(f"{group} one product, out {n}", (lambda w=w, b=b: F.linear(x, w, b), None,
                                                              2 * rows * width * n, 0.0))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default="qwen,default")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--repeat", type=int, default=20)
    args = p.parse_args()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    for name in args.workloads.split(","):
        rows, width, qkv, mlp, bias = SHAPES[name]
        print(f"\n{name}: {rows} rows x width {width}, q/k/v {qkv} (bias {bias}), MLP {mlp}", flush=True)
        for case, (sep, cat, flops, diff) in cases(rows, width, qkv, mlp, bias).items():
            times: dict[str, list[float]] = {"separate": [], "one product": []}
            for _ in range(args.rounds):
                times["separate"].append(timed(sep, args.repeat))
                if cat is not None:
                    times["one product"].append(timed(cat, args.repeat))
            a = statistics.median(times["separate"])
            line = f"  {case:32s} separate {a * 1e3:8.1f} us ({flops / a / 1e9:6.1f} TFLOP/s)"
            if cat is not None:
                b = statistics.median(times["one product"])
                line += (f"  one product {b * 1e3:8.1f} us ({flops / b / 1e9:6.1f} TFLOP/s)  saves "
                         f"{(a - b) * 1e3:7.1f} us a layer; largest difference {diff:.1e} of the largest value")
            print(line, flush=True)


if __name__ == "__main__":
    main()
