"""The pack's attention over long rows (`pack.attention`: sdpa with `is_causal` and grouped-query
heads read in place) through each of sdpa's CUDA backends, forward and backward, timed alternately
at a workload's shapes: which one torch picks by itself, and what the others would cost.

    python bench/attention_backends.py                      # Qwen2.5-0.5B at K=64 x 512 positions
    python bench/attention_backends.py --shape 8,9,3,512,64 # slots x batch, heads, key/value heads, positions, head dim

Prints one JSON line: each backend's median ms (forward + backward, one layer) and its largest
difference from the math backend's output and gradients, in bf16.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="64,14,2,512,64", help="rows, heads, key/value heads, positions, head dim")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeat", type=int, default=20)
    args = p.parse_args()

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows, heads, kv, n, d = (int(v) for v in args.shape.split(","))
    torch.manual_seed(0)
    q = torch.randn(rows, heads, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(rows, kv, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(rows, kv, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(rows, heads, n, d, device="cuda", dtype=torch.bfloat16)

    def run(backend):
        q.grad = k.grad = v.grad = None
        with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=heads != kv)
        out.backward(g)
        return out.detach(), q.grad, k.grad, v.grad

    ref = [t.float() for t in run(SDPBackend.MATH)]
    backends = {"torch's pick": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    usable, diffs = {}, {}
    for name, backend in backends.items():
        try:
            got = run(backend)
        except RuntimeError as exc:
            diffs[name] = f"not usable: {str(exc).splitlines()[0][:120]}"
            continue
        usable[name] = backend
        diffs[name] = max((a.float() - b).abs().max().item() for a, b in zip(got, ref))
    times = {name: [] for name in usable}
    for _ in range(args.rounds):
        for name, backend in usable.items():
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.repeat):
                run(backend)
            torch.cuda.synchronize()
            times[name].append((time.perf_counter() - start) / args.repeat * 1e3)
    flops = 4 * rows * heads * n * n * d / 2 * 3.5  # causal: half the scores; backward ~2.5x the forward
    print(json.dumps({"what": "sdpa backends, causal, forward + backward, one layer", "shape": args.shape,
                      "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "ms": {name: round(statistics.median(t), 3) for name, t in times.items()},
                      "tflops": {name: round(flops / statistics.median(t) / 1e9, 1) for name, t in times.items()},
                      "max_abs_diff_vs_math": diffs}), flush=True)


if __name__ == "__main__":
    main()
