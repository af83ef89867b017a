"""Can a warp-specialized CuTe-DSL GEMM (QuACK, `quack-kernels`) carry the pack's LoRA delta in its
epilogue at cuBLAS's speed? The question `kernels/lora_gemm.py` left open: its Triton product
is 10-23% slower than cuBLAS's, which ate what the fused delta saved.

On Qwen2.5-0.5B's MLP shape (K=64 slots x 512 positions, [32768, 896] x [896, 4864], bf16), each
timed alternately in rounds, medians:

- `cublas`: torch.mm, the product alone (what the step runs now);
- `cublas+delta`: torch.mm, then each slot's `h B` added in place (baddbmm_, beta=1: one read and
  one write of the output, as the pack's LoRA kernel's pass does);
- `quack`: QuACK's product alone (batched over the slots, the weight shared);
- `quack+delta rR`: QuACK's product with `sum_j h[:, j] B[j, :]` (each slot's own h and B, the
  scale folded into B) added in its epilogue, r columns and r rows broadcast per slot.

`--products`: QuACK's product against cuBLAS's on each of the packed Qwen step's shapes, and a C
added in the epilogue (`gemm_add`) against torch.mm then add_. `--mlp`: a SwiGLU MLP's gate/up
side as the step runs it against QuACK's gated product (the deltas as its C) and gated gradient.

QuACK is not a dependency of lora-exp: install its wheels where this runs (`quack-kernels` 0.6.5,
`nvidia-cutlass-dsl` 4.8.1 with its `libs-core`, `libs-base` and `libs-cu13`, `apache-tvm-ffi`,
`torch-c-dlpack-ext`; with `pip --target`, put `nvidia_cutlass_dsl/dsl_packages` on PYTHONPATH, as
its .pth file would). That pair of versions needs the patch in `mlp` for QuACK's activation
epilogues (its cache key cannot fingerprint two objects of this cutlass-dsl).

    python bench/quack_epilogue.py [--ranks 8,16,32] [--rounds 5] [--reps 20]
    python bench/quack_epilogue.py --products [--tuned]
    python bench/quack_epilogue.py --mlp [--tuned]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

#: QuACK's autotuner picks each product's tiles (`--tuned`: minutes of compiling); else its defaults
TUNED = False


def timed(fn, reps: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps * 1e3  # us a call


def lora_mod(r: int):
    """The epilogue acc + sum_j h_j * b_j, h_j a column (per slot and position), b_j a row (per
    slot and output)."""
    from quack.epilogue.frontend import gemm_epilogue
    from quack.epilogue.ops import ColVecLoad, RowVecLoad

    hs, bs = [f"h{j}" for j in range(r)], [f"b{j}" for j in range(r)]
    src = "\n".join([f"def lora_epi({', '.join(['acc', *hs, *bs])}):", "    d = acc"]
                     + [f"    d = d + {h} * {b}" for h, b in zip(hs, bs)] + ['    return {"D": d}'])
    ns: dict = {"__name__": "quack_epilogue_generated"}
    exec(compile(src, f"<lora-epilogue:r{r}>", "exec"), ns)  # a def per rank: the fn's parameters are its operands
    fn = ns["lora_epi"]
    ops = {**{h: ColVecLoad(h) for h in hs}, **{b: RowVecLoad(b) for b in bs}}
    return gemm_epilogue(ops=ops)(fn)


#: the packed Qwen step's products: (name, M, K, N, weight layout): "t" is the forward's x W^T
#: (W [N, K], read K-major), "n" the input gradient's g W (W [K, N], read N-major)
PRODUCTS = [("q/o forward", 32768, 896, 896, "t"), ("k/v forward", 32768, 896, 128, "t"),
            ("gate/up forward", 32768, 896, 4864, "t"), ("down forward", 32768, 4864, 896, "t"),
            ("gate/up input grad", 32768, 4864, 896, "n"), ("down input grad", 32768, 896, 4864, "n"),
            ("q/o input grad", 32768, 896, 896, "n"), ("head forward", 28672, 896, 151936, "t"),
            ("head input grad", 28672, 151936, 896, "n")]


def products(rounds: int, reps: int) -> None:
    """QuACK's product against cuBLAS's on each of the step's shapes, and QuACK's product with a
    C added in its epilogue (gemm_add) against torch.mm then an in-place add."""
    from quack.gemm_interface import gemm as quack_gemm
    from quack.gemm_interface import gemm_add as quack_gemm_add

    dev = torch.device("cuda")
    print(f"\n{'product':20} {'shape':26} {'cuBLAS us':>10} {'QuACK us':>10} {'ratio':>6} "
          f"{'cuBLAS TF':>9} {'QuACK TF':>9}")
    for name, m, k, n, layout in PRODUCTS:
        if TUNED and max(k, n) > 10000:
            continue  # the LM head's shapes: too long to tune here
        a = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        w = (torch.randn(n, k, device=dev) / k ** 0.5).to(torch.bfloat16)
        b = w.t() if layout == "t" else w.t().contiguous()  # [k, n]: K-major (a view) or N-major (dense)
        out = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
        try:
            quack_gemm(a, b, out=out, tuned=TUNED)
        except Exception as exc:  # noqa: BLE001 - report the shape and go on
            print(f"{name:20} QuACK failed: {type(exc).__name__}: {str(exc)[:300]}")
            continue
        ts = {"cublas": [], "quack": []}
        for _ in range(rounds):
            ts["cublas"].append(timed(lambda a=a, b=b, out=out: torch.mm(a, b, out=out), reps))
            ts["quack"].append(timed(lambda a=a, b=b, out=out: quack_gemm(a, b, out=out, tuned=TUNED), reps))
        cu, qu = statistics.median(ts["cublas"]), statistics.median(ts["quack"])
        f = 2 * m * k * n
        print(f"{name:20} {f'[{m}, {k}] x [{k}, {n}] {layout}':26} {cu:10.1f} {qu:10.1f} {qu / cu:6.3f} "
              f"{f / cu / 1e6:9.1f} {f / qu / 1e6:9.1f}", flush=True)
        del a, w, b, out
    m, k, n = 32768, 896, 4864
    a = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    b = (torch.randn(n, k, device=dev) / k ** 0.5).to(torch.bfloat16).t()
    c = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
    out = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
    quack_gemm_add(a, b, c, out=out, tuned=TUNED)
    ts = {"mm+add_": [], "gemm_add": []}
    for _ in range(rounds):
        ts["mm+add_"].append(timed(lambda: torch.mm(a, b, out=out).add_(c), reps))
        ts["gemm_add"].append(timed(lambda: quack_gemm_add(a, b, c, out=out, tuned=TUNED), reps))
    print(f"gate's product plus a [{m}, {n}] C: torch.mm then add_ {statistics.median(ts['mm+add_']):.1f} us, "
          f"QuACK gemm_add {statistics.median(ts['gemm_add']):.1f} us", flush=True)


def mlp(rounds: int, reps: int, r: int = 16) -> None:
    """A SwiGLU MLP's gate and up side, forward, and the activation's backward at the down
    projection's input gradient: as the step runs them (cuBLAS's products, the pack's LoRA kernel
    adding each delta in place, the activation compiled) against QuACK's gated product (gate and
    up as one product with the delta as its C, the activation in its epilogue) and its gated
    gradient (the activation's backward in the epilogue of dY x W_down)."""
    import contextvars

    import torch.nn.functional as F
    from quack.gemm_runtime import identity

    plain_key = identity.semantic_value_key

    def key(value, *args, **kwargs):  # this cutlass-dsl's helpers hold objects QuACK 0.6.5 cannot key
        if isinstance(value, contextvars.ContextVar):
            return ("ContextVar", value.name)
        try:
            return plain_key(value, *args, **kwargs)
        except TypeError:
            return ("opaque", type(value).__qualname__, getattr(value, "__qualname__", ""))
    identity.semantic_value_key = key
    from quack.gemm_interface import gemm_act, gemm_dact

    from lora_exp.pack.kernels.lora import delta_forward

    dev, bf = torch.device("cuda"), torch.bfloat16
    slots, pos, hid, inter = 64, 512, 896, 4864
    m = slots * pos
    x = torch.randn(m, hid, device=dev, dtype=bf)
    wg, wu = [(torch.randn(inter, hid, device=dev) / hid ** 0.5).to(bf) for _ in range(2)]
    wgu = torch.stack([wg, wu], 1).reshape(2 * inter, hid)  # gate and up interleaved by output
    wd = (torch.randn(hid, inter, device=dev) / inter ** 0.5).to(bf)
    dy = torch.randn(m, hid, device=dev, dtype=bf)
    a = [(torch.randn(slots, r, hid, device=dev) * 0.05).to(bf) for _ in range(2)]
    b = [(torch.randn(slots, r, n, device=dev) * 0.05).to(bf) for n in (inter, inter, 2 * inter)]
    scale = torch.full((slots,), 2.0, device=dev)
    rank = torch.full((slots,), r, device=dev, dtype=torch.int32)
    x3 = x.view(slots, pos, hid)
    g, u = torch.empty(m, inter, device=dev, dtype=bf), torch.empty(m, inter, device=dev, dtype=bf)
    c = torch.empty(slots, pos, 2 * inter, device=dev, dtype=bf)
    act = torch.compile(lambda g, u: (F.silu(g.float()) * u.float()).to(bf))

    def act_bwd(dh, g, u):
        gf, uf, dhf = g.float(), u.float(), dh.float()
        sig = torch.sigmoid(gf)
        return (dhf * uf * sig * (1 + gf * (1 - sig))).to(bf), (dhf * gf * sig).to(bf)
    act_bwd = torch.compile(act_bwd)

    def step_fwd():
        torch.mm(x, wg.t(), out=g)
        delta_forward(x3, a[0], b[0], scale, rank, None, None, None, pos, 1, g.view(slots, pos, inter), True)
        torch.mm(x, wu.t(), out=u)
        delta_forward(x3, a[1], b[1], scale, rank, None, None, None, pos, 1, u.view(slots, pos, inter), True)
        return act(g, u)

    def quack_fwd():
        delta_forward(x3, a[0], b[2], scale, rank, None, None, None, pos, 1, c, False)
        return gemm_act(x, wgu.t(), C=c.view(m, 2 * inter), activation="swiglu", tuned=TUNED)

    def step_bwd():
        return act_bwd(torch.mm(dy, wd), g, u)

    preact = torch.randn(m, 2 * inter, device=dev, dtype=bf)

    def quack_bwd():
        return gemm_dact(dy, wd, preact, activation="swiglu", tuned=TUNED)

    cases = {"step's forward": step_fwd, "QuACK forward": quack_fwd, "step's backward": step_bwd,
             "QuACK backward": quack_bwd}
    for name, fn in cases.items():
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        print(f"{name}: first call {time.perf_counter() - t0:.1f} s", flush=True)
    ts: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            ts[name].append(timed(fn, reps))
    print(f"\nSwiGLU MLP's gate/up side, [{m}, {hid}] -> 2 x [{m}, {inter}], rank {r} deltas (us a call, medians):")
    for name, t in ts.items():
        print(f"  {name:18} {statistics.median(t):9.1f}")
    print("  (the QuACK backward leaves out down's LoRA input-gradient delta: gemm_dact takes no C)")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--positions", type=int, default=512)
    parser.add_argument("--inputs", type=int, default=896)
    parser.add_argument("--outputs", type=int, default=4864)
    parser.add_argument("--ranks", default="8,16,32")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--products", action="store_true", help="time the step's products alone instead")
    parser.add_argument("--mlp", action="store_true", help="time the SwiGLU MLP's gate/up side instead")
    parser.add_argument("--tuned", action="store_true", help="QuACK's autotuner picks its tiles")
    args = parser.parse_args()
    global TUNED
    TUNED = args.tuned
    try:
        import quack  # noqa: F401
    except ImportError as exc:
        print(f"quack_epilogue: error: QuACK is not installed ({exc}); see this script's docstring", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    if args.products:
        print(f"device: {torch.cuda.get_device_name()}", flush=True)
        products(args.rounds, args.reps)
        return 0
    if args.mlp:
        print(f"device: {torch.cuda.get_device_name()}", flush=True)
        mlp(args.rounds, args.reps)
        return 0
    dev = torch.device("cuda")
    L, M, K, N = args.slots, args.positions, args.inputs, args.outputs
    x = torch.randn(L * M, K, device=dev, dtype=torch.bfloat16)
    w = (torch.randn(N, K, device=dev) / K ** 0.5).to(torch.bfloat16)  # nn.Linear's [out, in]
    wt = w.t()  # [K, N], column-major: the product's B as torch.mm sees it
    y = torch.empty(L * M, N, device=dev, dtype=torch.bfloat16)
    flops = 2 * L * M * K * N
    print(f"device: {torch.cuda.get_device_name()}; product [{L * M}, {K}] x [{K}, {N}] bf16 "
          f"({L} slots x {M} positions)", flush=True)

    cases: dict[str, object] = {"cublas": lambda: torch.mm(x, wt, out=y)}
    inputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for r in [int(v) for v in args.ranks.split(",")]:
        h = (torch.randn(L, M, r, device=dev) * 0.1).to(torch.bfloat16)
        b = (torch.randn(L, r, N, device=dev) * 0.1).to(torch.bfloat16)
        inputs[r] = (h, b)
        y3 = y.view(L, M, N)
        cases[f"cublas+delta r{r}"] = (lambda y3=y3, h=h, b=b: (torch.mm(x, wt, out=y), y3.baddbmm_(h, b)))

    from quack.gemm_interface import gemm as quack_gemm

    x3 = x.view(L, M, K)
    wt3 = wt.unsqueeze(0).expand(L, K, N)  # the weight shared by every slot (batch stride 0)
    quack_cases: dict[str, object] = {}
    quack_cases["quack"] = lambda: quack_gemm(x3, wt3, out=y.view(L, M, N), tuned=TUNED)
    for r, (h, b) in inputs.items():
        mod = lora_mod(r)
        hcols = h.permute(2, 0, 1).contiguous()  # [r, L, M]: column j of every slot's h, dense
        operands = {**{f"h{j}": hcols[j] for j in range(r)}, **{f"b{j}": b[:, j, :] for j in range(r)}}
        quack_cases[f"quack+delta r{r}"] = (lambda mod=mod, operands=operands:
                                            mod(x3, wt3, out={"D": y.view(L, M, N)}, tuned=TUNED, **operands))
    for name, fn in quack_cases.items():
        t0 = time.perf_counter()
        try:
            fn()
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - report the case and go on with the others
            print(f"{name}: failed: {type(exc).__name__}: {str(exc)[:600]}", flush=True)
            continue
        print(f"{name}: compiled and ran in {time.perf_counter() - t0:.1f} s", flush=True)
        cases[name] = fn

    # correctness of the fused epilogue against fp32 torch
    ref_base = (x.float() @ wt.float())
    for r, (h, b) in inputs.items():
        name = f"quack+delta r{r}"
        if name not in cases:
            continue
        cases[name]()
        ref = (ref_base.view(L, M, N) + torch.bmm(h.float(), b.float())).view(L * M, N)
        err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
        print(f"{name}: largest difference from fp32 {err:.2e} of the largest output", flush=True)
    if "quack" in cases:
        cases["quack"]()
        err = ((y.float() - ref_base).abs().max() / ref_base.abs().max()).item()
        print(f"quack: largest difference from fp32 {err:.2e} of the largest output", flush=True)

    for fn in cases.values():  # warm
        fn()
    torch.cuda.synchronize()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, fn in cases.items():
            times[name].append(timed(fn, args.reps))
    print(f"\n{'case':24} {'us a call':>10} {'TFLOP/s (product)':>18}")
    for name, ts in times.items():
        us = statistics.median(ts)
        print(f"{name:24} {us:10.1f} {flops / us / 1e6:18.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
