"""The packed LoRA kernels (lora_exp/pack_lora.py) against torch's bmm's at a pack's real shapes:
K slots, GPT-2's four module shapes (the last layer's: the largest offsets), A and B as views of
one buffer holding every layer (K=1024: 4.8 GB in bf16, offsets past 2^31), ranks 4/8/16 with
about half the slots not targeting each module, dropout on. Prints each module's relative
difference of the delta, the input's gradient and A's and B's (where each slot trains).

    python bench/pack_lora_check.py --k 1024                                   # on the GPU
    TRITON_INTERPRET=1 python bench/pack_lora_check.py --k 4 --device cpu --dtype float32
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--splits", default="1,4", help="programs per slot to check")
    args = p.parse_args()

    import torch

    from lora_exp.core.randomness import dropout_mask, module_keys, row_keys
    from lora_exp.pack.kernels import lora as pack_lora

    torch.manual_seed(0)
    dev, dtype, k, rows, t, rank = args.device, getattr(torch, args.dtype), args.k, 1, 26, 16
    m = rows * t
    shapes = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]
    per_layer = rank * sum(i + o for i, o in shapes)
    flat = torch.zeros(k, 12 * per_layer, dtype=dtype, device=dev)
    ranks_all = torch.tensor([4, 8, 16], device=dev)[torch.randint(0, 3, (k,), device=dev)].to(torch.int32)
    keys = module_keys(row_keys(torch.arange(k, device=dev) * 7 + 3, torch.full((k,), 11, device=dev),
                                torch.zeros(k, device=dev, dtype=torch.long)), 12345)
    p_drop = torch.rand(k, device=dev) * 0.2
    offset = 11 * per_layer
    for fin, fout in shapes:
        ranks = torch.where(torch.rand(k, device=dev) < 0.5, ranks_all, 0).to(torch.int32)
        live = torch.arange(rank, device=dev).view(1, rank) < ranks.view(k, 1)
        a = flat[:, offset:offset + rank * fin].view(k, rank, fin)
        b = flat[:, offset + rank * fin:offset + rank * (fin + fout)].view(k, rank, fout)
        offset += rank * (fin + fout)
        with torch.no_grad():  # zero where a slot does not train, as in a pack
            a.copy_(torch.randn(k, rank, fin, device=dev) * live[:, :, None] * 0.1)
            b.copy_(torch.randn(k, rank, fout, device=dev) * live[:, :, None] * 0.1)
        a, b = torch.nn.Parameter(a), torch.nn.Parameter(b)
        scale = torch.where(ranks > 0, 2.0, 0.0)
        x = torch.randn(k, m, fin, device=dev, dtype=dtype, requires_grad=True)
        g = torch.randn(k, m, fout, device=dev, dtype=dtype)
        mask = dropout_mask(x.detach().reshape(k, -1), keys, p_drop).view_as(x)
        xr = (x.detach() * mask).requires_grad_()
        ar, br = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        ref = torch.bmm(torch.bmm(xr, ar.transpose(1, 2)), br) * scale.to(dtype).view(-1, 1, 1)
        rx, ra, rb = torch.autograd.grad(ref, [xr, ar, br], g)
        rx = rx * mask

        def rel(u: torch.Tensor, v: torch.Tensor) -> float:
            return ((u.float() - v.float()).norm() / v.float().norm().clamp(min=1e-30)).item()

        for split in (int(s) for s in args.splits.split(",")):
            out = pack_lora.lora_delta(x, a, b, scale, ranks, pack_lora.dropout_args(keys, p_drop, dtype), rows, split)
            dx, ga, gb = torch.autograd.grad(out, [x, a, b], g)
            ga, gb = (torch.where(live[:, :, None], w.float(), 0.0) for w in (ga, gb))
            print(json.dumps({"what": "pack_lora vs bmm", "k": k, "dtype": args.dtype, "module": [fin, fout],
                              "split": split, "rel_diff_delta": rel(out, ref), "rel_diff_dx": rel(dx, rx),
                              "rel_diff_dA": rel(ga, ra), "rel_diff_dB": rel(gb, rb)}), flush=True)


if __name__ == "__main__":
    main()
