"""The LoRA delta added in the base layer's product (a Triton GEMM whose epilogue adds each slot's
h B x scale before the output is written) against what a packed step runs now (cuBLAS's product,
then the LoRA kernel that reads it back, adds the delta and writes it again), bf16 on CUDA, at a
Qwen2.5-0.5B pack's shapes (K=64 slots of 512 positions): the forward of each module of a layer,
and its input gradient (the base layer's product plus each slot's dh A, which the LoRA kernel now
adds in place). Also the Triton product alone against cuBLAS's, which bounds what fusing can gain.
(A step runs down_proj's forward through kernels.swiglu, not as timed here.)

Each way is timed alternately over rounds (CUDA events); medians are printed, and how far the
fused output is from now's (the products' sums are in another order: last-bit differences).

    python bench/lora_gemm.py
    python bench/lora_gemm.py --rounds 8 --configs "128,256,64,8,3;128,128,64,4,4"

It times the package's kernel (`lora_exp/pack/kernels/lora_gemm.py`) with its tile settings set
per config; the kernel's own are the best of these on an H100.
"""
from __future__ import annotations

import argparse
import statistics

import torch
import triton

from lora_exp.pack.kernels import lora, lora_gemm, lora_slot, lora_tiled, restore_constants, set_constants

#: (name, in, out) of a Qwen2.5-0.5B layer's linear modules
MODULES = (("q", 896, 896), ("k", 896, 128), ("v", 896, 128), ("o", 896, 896),
           ("gate", 896, 4864), ("up", 896, 4864), ("down", 4864, 896))


def gemm_lora(x, w, bias, h, b, scale, rank, slot_m, config, w_t=False):
    """The package's kernel (`kernels.lora_gemm`) with its tiles set to `config` (BM, BN, BK,
    warps, stages): x [M, K] W^T (+ bias) + each slot's delta (h [M, R] B[slot]); with w_t,
    x W (W [K, N]) + dh [M, BR] A[slot] (no scale: dh has it). Ranks of 0: the product alone."""
    names = ("BM", "BN", "BK", "NUM_WARPS", "NUM_STAGES")
    saved = set_constants(",".join(f"lora_gemm.{n}={v}" for n, v in zip(names, config)))
    try:
        return lora_gemm.gemm_lora(x, w, w_t, bias, h, b, None if w_t else scale, rank, slot_m)
    finally:
        restore_constants(saved)


def shrink(xs, a, scale, rank, b):
    """h = x A^T per slot (kernels.lora's forward kernel with no outputs: h only)."""
    k, m, fin = xs.shape
    rmax = a.shape[1]
    h = torch.empty(k, m, rmax, device=xs.device, dtype=xs.dtype)
    dummy = torch.empty(1, device=xs.device, dtype=xs.dtype)
    lora_slot.delta_kernel[(k, 1, triton.cdiv(m, lora.BM))](
        xs, a, b, dummy, h, scale, rank, xs, xs, xs, m, m, fin, 0, 1, xs.stride(0), a.stride(0), a.stride(1),
        b.stride(0), b.stride(1), rmax, SPLIT=1, DROPOUT=False, ADD=True, BM=lora.BM, BR=lora.block_r(rmax),
        BK=lora.BK, BN=lora.BN, PREC=lora.precision(xs.dtype), **lora.launch_options())
    return h


def timed(fn, repeat: int) -> float:
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeat * 1000.0


def ways_for(direction, name, fin, fout, kslots, sm, rmax, ranks, scale, configs):
    """(now, cuBLAS's product alone, {tiles: (fused, Triton's product alone)}) for one module's
    forward or input gradient."""
    dev, dt = "cuda", torch.bfloat16
    rows = kslots * sm
    w = torch.randn(fout, fin, device=dev, dtype=dt) * fin ** -0.5
    a = torch.randn(kslots, rmax, fin, device=dev, dtype=dt) * fin ** -0.5
    b = torch.randn(kslots, rmax, fout, device=dev, dtype=dt) * 0.05
    br = lora.block_r(rmax)
    none = torch.zeros_like(ranks)  # no slot's delta: the kernel's product alone
    if direction == "forward":
        bias = torch.randn(fout, device=dev, dtype=dt) if name in "qkv" else None
        x = torch.randn(kslots, sm, fin, device=dev, dtype=dt)
        x2 = x.view(rows, fin)
        h = shrink(x, a, scale, ranks, b).view(rows, rmax)

        def now():
            out = lora.base_linear(x2, w, bias, False).view(kslots, sm, fout)
            lora.delta_forward(x, a, b, scale, ranks, None, None, None, 1, 1, out, True)
            return out.view(rows, fout)

        def cublas():
            return lora.base_linear(x2, w, bias, False)

        def fused(c):  # the shrink (h) is the step's now as well, inside delta_forward
            shrink(x, a, scale, ranks, b)
            return gemm_lora(x2, w, bias, h, b, scale, ranks, sm, c)

        def alone(c):
            return gemm_lora(x2, w, bias, h, b, scale, none, sm, c)
    else:  # the input's gradient: g [rows, out] W [out, in] + dh A, dh as the backward makes it
        g = torch.randn(rows, fout, device=dev, dtype=dt)
        dh = torch.randn(kslots, sm, br, device=dev, dtype=torch.float32) * 0.1

        def now():
            dx = torch.mm(g, w).view(kslots, sm, fin)
            lora_tiled.input_grad(a, dh.view(kslots, 1, sm, br), 1, dx, ranks, None, None, None, 1, True,
                                  bm=lora.BM, br=br, bk=lora.BK, prec=lora.precision(dt),
                                  launch=lora.launch_options())
            return dx.view(rows, fin)

        def cublas():
            return torch.mm(g, w)

        def fused(c):
            return gemm_lora(g, w, None, dh.view(rows, br), a, scale, ranks, sm, c, w_t=True)

        def alone(c):
            return gemm_lora(g, w, None, dh.view(rows, br), a, scale, none, sm, c, w_t=True)
    tiled = {c: ((lambda c=c: fused(c)), (lambda c=c: alone(c))) for c in configs if sm % c[0] == 0}
    return now, cublas, tiled


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slots", type=int, default=64)
    p.add_argument("--slot-m", type=int, default=512)
    p.add_argument("--rank", type=int, default=32, help="the pack's rank (slots get 8, 16 or this)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--configs", default="128,256,64,8,3;128,128,64,4,4;128,128,64,8,3",
                   help="Triton tiles: BM,BN,BK,warps,stages;...")
    args = p.parse_args()
    dev = "cuda"
    torch.manual_seed(0)
    kslots, sm, rmax = args.slots, args.slot_m, args.rank
    rows = kslots * sm
    configs = [tuple(int(v) for v in c.split(",")) for c in args.configs.split(";") if c]
    ranks = torch.tensor([(8, 16, rmax)[i % 3] for i in range(kslots)], device=dev, dtype=torch.int32)
    scale = torch.full((kslots,), 2.0, device=dev)
    print(f"{torch.cuda.get_device_name()}, triton {triton.__version__}; {kslots} slots x {sm} positions, "
          f"ranks 8/16/{rmax}, bf16; medians of {args.rounds} rounds of {args.repeat} calls, us")
    for direction in ("forward", "input gradient"):
        total_now = total_fused = total_cublas = 0.0
        print(f"== {direction}")
        for name, fin, fout in MODULES:
            now, cublas, tiled = ways_for(direction, name, fin, fout, kslots, sm, rmax, ranks, scale, configs)
            ref = now().float()
            diffs = {}
            for c, (fused, alone) in list(tiled.items()):
                try:
                    got = fused().float()
                    alone()
                except triton.runtime.errors.OutOfResources as err:  # tiles too large for this GPU
                    print(f"      tiles {c}: {err}")
                    del tiled[c]
                    continue
                diffs[c] = (float((got - ref).abs().max()), float((got != ref).float().mean()))
            ways = {"now": now, "cublas": cublas}
            for c, (fused, alone) in tiled.items():
                ways[("fused", c)], ways[("alone", c)] = fused, alone
            times = {key: [] for key in ways}
            for _ in range(args.rounds):
                for key, fn in ways.items():
                    times[key].append(timed(fn, args.repeat))
            med = {key: statistics.median(v) for key, v in times.items()}
            flops = 2 * rows * fin * fout
            best = min(tiled, key=lambda c: med[("fused", c)]) if tiled else None
            total_now += med["now"]
            total_cublas += med["cublas"]
            total_fused += med[("fused", best)] if best else med["now"]
            print(f"{name:5s} [{rows}, {fin if direction == 'forward' else fout}] -> "
                  f"{fout if direction == 'forward' else fin}: now {med['now']:7.1f}; cuBLAS's product alone "
                  f"{med['cublas']:7.1f} ({flops / med['cublas'] / 1e6:4.0f} TFLOP/s)")
            for c in tiled:
                print(f"      tiles {c}: fused {med[('fused', c)]:7.1f}, its product alone {med[('alone', c)]:7.1f} "
                      f"({flops / med[('alone', c)] / 1e6:4.0f} TFLOP/s); against now: largest difference "
                      f"{diffs[c][0]:.2g} (outputs up to {float(ref.abs().max()):.2g}), {diffs[c][1]:.1%} differ")
        print(f"a layer's 7 modules, {direction}: now {total_now:.1f} us, fused (each module's best tiles) "
              f"{total_fused:.1f} us, cuBLAS's products alone {total_cublas:.1f} us: "
              f"{(total_now - total_fused) * 24 / 1000:+.2f} ms a step saved over 24 layers")


if __name__ == "__main__":
    main()
