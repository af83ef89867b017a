"""The pack's attention over long rows (`pack.attention`: sdpa with `is_causal` and grouped-query
heads read in place) through each of sdpa's CUDA backends, forward and backward, timed alternately
at a workload's shapes: which one torch picks by itself, and what the others would cost; and
cuDNN's op called directly on the grouped-query inputs (`cudnn, kv in place`: no repeated key/value
heads, no sums of their gradients) and on key/value heads repeated first (`cudnn, kv repeated`).
q, k and v are laid out as a transformers model hands them over (`--layout bshd`: [rows, positions,
heads, dim] transposed) or contiguous (`bhsd`).

    python bench/attention_backends.py                      # Qwen2.5-0.5B at K=64 x 512 positions
    python bench/attention_backends.py --shape 8,9,3,512,64 # slots x batch, heads, key/value heads, positions, head dim

Prints one JSON line: each backend's median ms (forward + backward, one layer) and its largest
difference from the math backend's output and gradients, in bf16.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics

from timing import alternately


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="64,14,2,512,64", help="rows, heads, key/value heads, positions, head dim")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--layout", choices=["bshd", "bhsd"], default="bshd")
    p.add_argument("--kernels", action="store_true", help="also print each backend's CUDA kernels (us a call)")
    args = p.parse_args()

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows, heads, kv, n, d = (int(v) for v in args.shape.split(","))
    torch.manual_seed(0)

    def leaf(h):
        shape = (rows, n, h, d) if args.layout == "bshd" else (rows, h, n, d)
        t = torch.randn(*shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        return t, (t.transpose(1, 2) if args.layout == "bshd" else t)

    (q0, q), (k0, k), (v0, v) = leaf(heads), leaf(kv), leaf(kv)
    g = torch.randn(rows, heads, n, d, device="cuda", dtype=torch.bfloat16)

    def cudnn(qq, kk, vv):
        return torch.ops.aten._scaled_dot_product_cudnn_attention(qq, kk, vv, None, True, 0.0, True, False)[0]

    def run(backend):
        q0.grad = k0.grad = v0.grad = None
        if backend == "cudnn, kv in place":
            out = cudnn(q, k, v)
        elif backend == "cudnn, kv repeated":
            out = cudnn(q, k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1))
        else:
            with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                       enable_gqa=heads != kv)
        out.backward(g)
        return out.detach(), q0.grad, k0.grad, v0.grad

    ref = [t.float() for t in run(SDPBackend.MATH)]
    backends = {"torch's pick": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn, kv in place": "cudnn, kv in place",
                "cudnn, kv repeated": "cudnn, kv repeated"}
    usable, diffs = {}, {}
    for name, backend in backends.items():
        try:
            got = run(backend)
        except RuntimeError as exc:
            diffs[name] = f"not usable: {str(exc).splitlines()[0][:120]}"
            continue
        usable[name] = backend
        diffs[name] = max((a.float() - b).abs().max().item() for a, b in zip(got, ref))
    times = alternately({name: functools.partial(run, backend) for name, backend in usable.items()}, args.rounds,
                        args.repeat, torch.cuda.synchronize)
    kernels = {}
    if args.kernels:
        from torch.profiler import ProfilerActivity, profile

        for name, backend in usable.items():
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    run(backend)
                torch.cuda.synchronize()
            kernels[name] = {e.key[:90]: round(e.device_time_total / 5, 1) for e in prof.key_averages()
                             if e.device_time_total > 0 and not e.key.startswith(("aten::", "cuda"))}
    flops = 4 * rows * heads * n * n * d / 2 * 3.5  # causal: half the scores; backward ~2.5x the forward
    print(json.dumps({"what": "sdpa backends, causal, forward + backward, one layer", "shape": args.shape,
                      "layout": args.layout,
                      "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "ms": {name: round(statistics.median(t), 3) for name, t in times.items()},
                      "tflops": {name: round(flops / statistics.median(t) / 1e9, 1) for name, t in times.items()},
                      "max_abs_diff_vs_math": diffs, **({"kernels_us": kernels} if kernels else {})}), flush=True)


if __name__ == "__main__":
    main()
