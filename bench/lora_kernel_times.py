"""The packed LoRA op (`kernels.lora.lora_linear`) timed alone at one layer's module shapes,
forward + backward, against the frozen base layer alone (cuBLAS: forward and input gradient) in
the same process: what the LoRA part costs per module, with and without dropout, and the memory
traffic it would take at the GPU's bandwidth (x read once, the output's and the input's gradient
read and written once: the bound a fused delta cannot beat).

    python bench/lora_kernel_times.py                            # Qwen2.5-0.5B's shapes, K=64, 512 positions
    python bench/lora_kernel_times.py --k 16 --m 2048 --rank 16
    TRITON_INTERPRET=1 python bench/lora_kernel_times.py --device cpu --k 2 --m 260 --rank 8   # smoke
    python bench/lora_kernel_times.py --configs "BM=32;BK=64;NUM_WARPS=8"   # other kernel constants
    python bench/lora_kernel_times.py --swiglu "NUM_WARPS=8;BM=32;lora.BK=64"   # the MLP's down side

`--swiglu` times a SwiGLU MLP's down side (silu(g) * u into down_proj with its LoRA delta, forward +
backward to g, u, A, B) as the pack ran it before (the activation compiled by torch.compile, then
`lora_linear`) and as `kernels.swiglu` runs it, under its default constants and each ';'-separated
setting of them, with each kernel's GPU time per call.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: Qwen2.5-0.5B's modules (in, out): q, k, v, o, gate, up, down
QWEN = {"q": (896, 896), "k": (896, 128), "v": (896, 128), "o": (896, 896), "gate": (896, 4864),
        "up": (896, 4864), "down": (4864, 896)}
#: H200 HBM3e bandwidth (datasheet)
HBM = 4.8e12


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, default=64, help="slots")
    p.add_argument("--m", type=int, default=512, help="positions per slot (rows x tokens)")
    p.add_argument("--rank", type=int, default=32, help="the pack's rank (slots get 8/16/32 below it)")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--device", default="cuda", help="cpu: a smoke run under TRITON_INTERPRET=1 (times meaningless)")
    p.add_argument("--configs", default="", help="';'-separated NAME=VALUE,... settings of kernels.lora's constants")
    p.add_argument("--swiglu", default=None,
                   help="time the MLP's down side instead, unfused vs kernels.swiglu under these ';'-separated "
                        "settings of its constants ('' = its defaults only)")
    p.add_argument("--kernels", action="store_true",
                   help="also each kernel's GPU time per call (torch.profiler), with dropout: host time left out")
    args = p.parse_args()

    import torch

    from lora_exp.core.randomness import module_keys, row_keys
    from lora_exp.pack.kernels import lora as pack_lora
    from lora_exp.pack.kernels import restore_constants, set_constants

    torch.manual_seed(0)
    dev, dtype, k, m, rank = args.device, torch.bfloat16, args.k, args.m, args.rank
    ranks = torch.tensor([8, 16, 32], device=dev)[torch.randint(0, 3, (k,), device=dev)].clamp(max=rank)
    ranks = ranks.to(torch.int32)
    keys = module_keys(row_keys(torch.arange(k, device=dev) * 7 + 3, torch.full((k,), 11, device=dev),
                                torch.zeros(k, device=dev, dtype=torch.long)), 12345)
    p_drop = torch.rand(k, device=dev) * 0.1
    scale = torch.full((k,), 2.0, device=dev)
    split = pack_lora.split_for(k, torch.device(dev))

    def timed(fn) -> float:
        if dev != "cuda":
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        for _ in range(3):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(args.repeat):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / args.repeat

    def module_times(fin: int, fout: int) -> dict:
        w = torch.randn(fout, fin, device=dev, dtype=dtype) * 0.02
        a = torch.nn.Parameter(torch.randn(k, rank, fin, device=dev, dtype=dtype) * 0.02)
        b = torch.nn.Parameter(torch.randn(k, rank, fout, device=dev, dtype=dtype) * 0.02)
        x = torch.randn(k, m, fin, device=dev, dtype=dtype, requires_grad=True)
        g = torch.randn(k, m, fout, device=dev, dtype=dtype)
        drop = pack_lora.dropout_args(keys, p_drop, dtype)

        def base() -> None:
            torch.autograd.grad(torch.nn.functional.linear(x, w), [x], g)

        def lora(dropout) -> None:
            y = pack_lora.lora_linear(x, w, None, False, a, b, scale, ranks, dropout, 1, split)
            torch.autograd.grad(y, [x, a, b], g)

        # the delta's own traffic: x read (forward, backward), y and dx read and written, g read
        bound = 2 * k * m * (4 * fin + 3 * fout) / HBM * 1e3
        if args.kernels and dev == "cuda":
            kernel_times(lambda: lora(drop), f"{fin}x{fout}")
            kernel_times(lambda: lora(None), f"{fin}x{fout} no dropout")
        return {"base": timed(base), "lora": timed(lambda: lora(drop)), "lora_nodrop": timed(lambda: lora(None)),
                "bound": bound}

    def kernel_times(fn, shape: str) -> None:
        """GPU time per call of each kernel fn launches (fn's forward and backward)."""
        from torch.profiler import ProfilerActivity, profile

        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.repeat):
                fn()
            torch.cuda.synchronize()
        times = {}
        for ev in prof.key_averages():
            if ev.device_time_total > 0:
                times[ev.key[:60]] = round(ev.device_time_total / args.repeat, 1)
        print(json.dumps({"what": "kernels, us a call", "shape": shape, "times": times}), flush=True)

    def run_config(label: str) -> None:
        totals = {"base": 0.0, "lora": 0.0, "lora_nodrop": 0.0, "bound": 0.0}
        for name, (fin, fout) in QWEN.items():
            row = module_times(fin, fout)
            for key in totals:
                totals[key] += row[key]
            print(json.dumps({"what": "lora_linear fwd+bwd", "config": label, "module": name, "in_out": [fin, fout],
                              "k": k, "m": m, "base_ms": round(row["base"], 3),
                              "lora_extra_ms": round(row["lora"] - row["base"], 3),
                              "lora_extra_nodrop_ms": round(row["lora_nodrop"] - row["base"], 3),
                              "delta_traffic_bound_ms": round(row["bound"], 3)}), flush=True)
        print(json.dumps({"what": "one layer", "config": label, "base_ms": round(totals["base"], 2),
                          "lora_extra_ms": round(totals["lora"] - totals["base"], 2),
                          "lora_extra_nodrop_ms": round(totals["lora_nodrop"] - totals["base"], 2),
                          "delta_traffic_bound_ms": round(totals["bound"], 2)}), flush=True)

    def swiglu_times(configs: str) -> None:
        from lora_exp.pack.kernels import swiglu

        width, fout = QWEN["down"]
        w = torch.randn(fout, width, device=dev, dtype=dtype) * 0.02
        a = torch.nn.Parameter(torch.randn(k, rank, width, device=dev, dtype=dtype) * 0.02)
        b = torch.nn.Parameter(torch.randn(k, rank, fout, device=dev, dtype=dtype) * 0.02)
        g, u = [torch.randn(k, m, width, device=dev, dtype=dtype, requires_grad=True) for _ in range(2)]
        go = torch.randn(k, m, fout, device=dev, dtype=dtype)
        drop = pack_lora.dropout_args(keys, p_drop, dtype)
        act = torch.compile(lambda g, u: torch.nn.functional.silu(g) * u) if dev == "cuda" else (
            lambda g, u: torch.nn.functional.silu(g) * u)

        def base() -> None:
            torch.autograd.grad(torch.nn.functional.linear(act(g, u), w), [g, u], go)

        def unfused() -> None:
            y = pack_lora.lora_linear(act(g, u), w, None, False, a, b, scale, ranks, drop, 1, split)
            torch.autograd.grad(y, [g, u, a, b], go)

        def fused() -> None:
            y = swiglu.swiglu_lora_linear(g, u, w, None, a, b, scale, ranks, drop, 1, split)
            torch.autograd.grad(y, [g, u, a, b], go)

        # g, u read twice, h written and read, h's gradient written and read, g's and u's written
        bound = 10 * k * m * width * 2 / HBM * 1e3
        print(json.dumps({"what": "swiglu + down_proj fwd+bwd", "k": k, "m": m, "width": width,
                          "base_ms": round(timed(base), 3), "unfused_ms": round(timed(unfused), 3),
                          "traffic_bound_ms": round(bound, 3)}), flush=True)
        if dev == "cuda":
            kernel_times(unfused, "unfused")
        for config in [""] + [c for c in configs.split(";") if c]:
            # a bare NAME is kernels.swiglu's; lora.NAME and head.NAME the other kernels'
            saved = set_constants(",".join(i if "." in i else f"swiglu.{i}" for i in filter(None, config.split(","))))
            try:
                print(json.dumps({"what": "swiglu fused", "config": config or "default",
                                  "fused_ms": round(timed(fused), 3)}), flush=True)
                if dev == "cuda":
                    kernel_times(fused, f"fused {config or 'default'}")
            except Exception as exc:  # noqa: BLE001 - a setting the GPU cannot run is reported
                print(json.dumps({"what": "config", "config": config, "error": repr(exc)[:300]}), flush=True)
            finally:
                restore_constants(saved)

    if args.swiglu is not None:
        swiglu_times(args.swiglu)
        return
    run_config("default")
    for config in filter(None, args.configs.split(";")):
        saved = set_constants(config)
        try:
            run_config(config)
        except Exception as exc:  # noqa: BLE001 - a setting the GPU cannot run is reported
            print(json.dumps({"what": "config", "config": config, "error": repr(exc)[:300]}), flush=True)
        finally:
            restore_constants(saved)


if __name__ == "__main__":
    main()
