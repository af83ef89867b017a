"""Trials per hour of a packed `lora-exp sweep` on one GPU, against the blog's HF Trainer.

The search is sweeps/seed_gpt2.yaml: the seed's recipe (GPT-2 124M architecture, random weights:
speed does not depend on weight values; 2500 steps at batch 1 on the five texts) with r in
{4, 8, 16}, target presets, lora_alpha, dropout and lr searched. The tokenizer is SmolLM2's
(BPE, 19-26 tokens per text: a little MORE than GPT-2's ~18 that seed_baseline.py uses).

    python bench/sweep_throughput.py baseline --seed-baseline ../shared/bench/seed_baseline.py
    python bench/sweep_throughput.py engine --ks 1,16,64,256,1024 --precision bf16 --profile 1024
    python bench/sweep_throughput.py engine --ks 1024 --mixes uniform,heavy,light --attention rows,model
    python bench/sweep_throughput.py sweep --k 1024 --trials 4096 --timeout 450 --log sweep.log
    python bench/sweep_throughput.py sweep --k 1024 --trials 2048 --workers 2     # two GPUs
    python bench/sweep_throughput.py check --precision fp32 --k 6                 # pack vs alone
    python bench/sweep_throughput.py check --precision fp32 --k 1024 --compare 4 --epochs 4

`engine` times the packed step alone (synchronised, after warm-up), `sweep` the whole command:
Optuna asks and tells, MLflow runs, evals, generations and adapters included. Each prints one
JSON line per measurement; `trials_per_hour` is scaled to 2500-step trials exactly as
seed_baseline.py scales its own (3600 / seconds * steps / 2500).
"""
from __future__ import annotations

import argparse
import bisect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpu_clocks import BF16_PEAK, Clocks
from workloads import default_tokenizer, require_tokenizer, smollm2_arch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SEED_STEPS = 2500


def base_overrides(args: argparse.Namespace, arch: str = "gpt2") -> list[str]:
    out = ["model.tokenizer=" + os.path.abspath(args.tokenizer), f"trainer.precision={args.precision}"]
    if arch == "smollm2":  # SmolLM2-135M's architecture from its config, random weights
        out += ["model=smollm2_135m", "model.source=random", f"model.architecture={smollm2_arch(args.tokenizer)}"]
    return out


# --- the blog's Trainer ---------------------------------------------------------------------------


def cmd_baseline(args: argparse.Namespace) -> None:
    out = subprocess.run([sys.executable, args.seed_baseline, "--mode", "trainer", "--steps", str(args.steps)],
                         check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    print(json.dumps({"what": "seed_baseline --mode trainer", **json.loads(out)}), flush=True)


# --- the packed step alone ----------------------------------------------------------------------------


def mixed_configs(n: int, overrides: list[str], seed: int = 0) -> list:
    """n configs of the searched space (the sweep's own sampling is TPE; here uniform)."""
    import random

    from lora_exp.compose import compose, replace_keys
    from lora_exp.sweep.spec import load_sweep

    spec = load_sweep("seed_gpt2")
    later = [o for o in overrides if o.startswith(("model.architecture=", "model.source="))]
    first = [o for o in overrides if o not in later]
    start = [o for o in spec.base if not (later and o.startswith("model"))]  # another architecture
    base = compose(start + first)
    if later:
        base = replace_keys(base, base.to_dict(), later, start + overrides)
    rng = random.Random(seed)
    cfgs = []
    for _ in range(n):
        r = rng.choice([4, 8, 16])
        ov = [f"lora.r={r}", f"lora.lora_alpha={r * rng.choice([1, 2, 4])}",
              f"lora.lora_dropout={rng.uniform(0, 0.2)}",
              f"lora.preset={rng.choice(sorted(base.model.target_presets))}",
              f"trainer.lr={10 ** rng.uniform(-4.5, -2.5)}"]
        cfgs.append(replace_keys(base, base.to_dict(), ov, start + overrides + ov))
    return cfgs


#: trial mixes `engine --mixes` can time besides the uniform one: every trial at the heaviest
#: (rank 16, every module) or the lightest (rank 4, c_attn only) point of the space
MIXES = {"heavy": ["lora.r=16", "lora.preset=all"], "light": ["lora.r=4", "lora.preset=attn"]}


def fixed(cfgs: list, overrides: list[str], extra: list[str]) -> list:
    """The same configs with `extra` overrides on each (alpha kept as a multiple of the new r)."""
    from lora_exp.compose import replace_keys

    r = int(dict(o.split("=") for o in extra)["lora.r"])
    out = []
    for c in cfgs:
        ov = extra + [f"lora.lora_alpha={int(c.lora.lora_alpha // c.lora.r) * r}"]
        out.append(replace_keys(c, c.to_dict(), ov, overrides + ov))
    return out


def useful_flops(base, data, cfg) -> float:
    """Matmul FLOPs of one trial-step (forward + input gradients; the base is frozen), as the
    seed's mean example has them: what a trial needs, not what padding costs."""
    import torch

    lengths = [len(e.input_ids) for e in data.train]
    t = sum(lengths) / len(lengths)
    head = base.model.get_output_embeddings().weight.numel()
    body = sum(m.weight.numel() for n, m in base.model.named_modules()
               if hasattr(m, "weight") and m.weight is not None and m.weight.dim() == 2
               and not isinstance(m, torch.nn.Embedding) and m is not base.model.get_output_embeddings())
    return 4 * (body * t + head * (t - 1))


def cmd_engine(args: argparse.Namespace) -> None:
    import dataclasses

    import torch

    from lora_exp.core.data import load_rows, tokenize
    from lora_exp.core.models import load_base, pick_device
    from lora_exp.core.recording import NullTracker
    from lora_exp.pack.settings import PackConfig
    from lora_exp.pack.trainer import PackTrainer

    device = pick_device("auto")
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    overrides = base_overrides(args, args.arch)
    cfgs = mixed_configs(max(int(k) for k in args.ks.split(",")), overrides)
    base = load_base(cfgs[0].model, device)
    if args.attn:  # a variant: e.g. eager attention, which the compiled step fuses (T is ~26)
        base.model.set_attn_implementation(args.attn)
    data = tokenize(load_rows(cfgs[0].data), cfgs[0].data, base.tokenizer)
    flops = useful_flops(base, data, cfgs[0])
    # the same pack (shape: largest rank, every module) holding other mixes of trials: how much
    # the step depends on what the search samples (TPE drifts from the uniform start)
    mixes = {name: cfgs if name == "uniform" else fixed(cfgs, overrides, MIXES[name])
             for name in args.mixes.split(",")}
    used = [c for mix in args.mixes.split(",") for c in mixes[mix]]
    max_rank = max(c.lora.r for c in used)
    modules = sorted({m for c in used for m in c.target_modules})
    runs = [(mode, lora, attention, int(k), mix) for mode in args.modes.split(",") for lora in args.lora.split(",")
            for attention in args.attention.split(",") for k in args.ks.split(",") for mix in args.mixes.split(",")]
    profiled = False
    for mode, lora, attention, k, mix in runs:
        pack = PackConfig(compile=mode, lora=lora, attention=attention)
        trials = [dataclasses.replace(c, pack=pack) for c in mixes[mix]]
        try:
            trainer = PackTrainer(base, data, trials[0], k, max_rank, modules)
        except Exception as exc:  # a variant that cannot run here is reported, not fatal
            print(json.dumps({"what": "packed step", "mode": mode, "k": k, "error": repr(exc)[:300]}), flush=True)
            continue
        try:
            for slot in range(k):
                trainer.start(slot, trials[slot], NullTracker())
            sync()
            t0 = time.perf_counter()
            for _ in range(args.warmup):
                trainer.step()
            sync()
            warm_s = time.perf_counter() - t0
            start = time.perf_counter()
            with Clocks() as clocks:
                for _ in range(args.steps):
                    trainer.step()
                sync()
            step_s = (time.perf_counter() - start) / args.steps
            peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
            print(json.dumps({"what": "packed step", "arch": args.arch, "precision": args.precision, "mode": mode,
                              "lora": lora if trainer.pm.groups.kernels or lora == "bmm" else "bmm (kernels unused)",
                              "mix": mix, "attn": base.model.config._attn_implementation, "attention": attention,
                              "k": k, "warmup_s": round(warm_s, 1),
                              "step_ms": round(step_s * 1e3, 2), "trial_steps_per_s": round(k / step_s, 1),
                              "trials_per_hour": round(3600 * k / (step_s * SEED_STEPS), 1),
                              "peak_gib": round(peak, 2),
                              "bf16_peak_fraction": round(k * flops / step_s / BF16_PEAK, 4),
                              "useful_gflop_per_trial_step": round(flops / 1e9, 2), **clocks.summary()}), flush=True)
            if args.kernel_configs:
                from lora_exp.pack.kernels import adamw as pack_kernels

                time_configs(trainer, args, k, sync, pack_kernels, ("GROUPED", "BLOCK", "NUM_WARPS"),
                             args.kernel_configs, "packed step, optimizer launch config", mix=mix)
            if args.lora_configs and trainer.pm.groups.kernels:
                from lora_exp.pack.kernels import lora as pack_lora

                time_configs(trainer, args, k, sync, pack_lora, ("BK", "BN", "NUM_WARPS", "MIN_SPLIT", "BM"),
                             args.lora_configs, "packed step, LoRA kernel config", mix=mix)
            if args.profile and k == args.profile and not profiled:  # the first run at that K
                profile(trainer, args.trace)
                profiled = True
        except Exception as exc:
            print(json.dumps({"what": "packed step", "mode": mode, "k": k, "error": repr(exc)[:300]}), flush=True)
        finally:
            trainer.close()
            del trainer
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()


def time_configs(trainer, args: argparse.Namespace, k: int, sync, module, names: tuple[str, ...], configs: str,
                 what: str, **extra) -> None:
    """The same pack's step with other values of `module`'s launch constants `names`, one
    config per comma-separated item ("AxBx..."), each timed after 3 steps of warm-up."""
    default = tuple(getattr(module, n) for n in names)
    try:
        for config in configs.split(","):
            values = tuple(int(x) for x in config.split("x"))
            for name, value in zip(names, values, strict=True):
                setattr(module, name, value)
            for _ in range(3):
                trainer.step()
            sync()
            start = time.perf_counter()
            for _ in range(args.steps):
                trainer.step()
            sync()
            step_s = (time.perf_counter() - start) / args.steps
            print(json.dumps({"what": what, "k": k, **extra, **{n.lower(): v for n, v in zip(names, values)},
                              "step_ms": round(step_s * 1e3, 2),
                              "trials_per_hour": round(3600 * k / (step_s * SEED_STEPS), 1)}), flush=True)
    finally:
        for name, value in zip(names, default):
            setattr(module, name, value)


def profile(trainer, trace: str = "", kernels: str = "") -> None:
    """Where a packed step's time goes: top CUDA kernels over 3 steps, and GPU busy vs wall (and
    the whole timeline as a Chrome trace, gzipped, where `trace` names a file; every kernel's GPU
    time and launches a step, as tab-separated lines, where `kernels` does)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        start = time.perf_counter()
        for _ in range(3):
            trainer.step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / 3
    events = prof.key_averages()
    # kernels only, as torch's own table totals them: an op's or a range's device time is its kernels' again
    gpu = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA
              and not getattr(e, "is_user_annotation", False)) / 3 / 1e3
    print(f"profile: wall {wall * 1e3:.1f} ms/step, GPU busy {gpu:.1f} ms/step "
          f"({100 * gpu / (wall * 1e3):.0f}%)", flush=True)
    print(events.table(sort_by="self_cuda_time_total", row_limit=45, max_name_column_width=70), flush=True)
    if kernels:
        rows = sorted(((e.self_device_time_total / 3 / 1e3, e.count / 3, e.key) for e in events
                       if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)),
                      reverse=True)
        with open(kernels, "w") as f:
            f.write("ms_per_step\tlaunches_per_step\tkernel\n")
            f.writelines(f"{ms:.3f}\t{n:g}\t{name}\n" for ms, n, name in rows)
    phases = {e.key: e.device_time_total / 3 / 1e3 for e in events if e.key.startswith("pack.")}
    print("profile phases (GPU ms/step): " + json.dumps({k: round(v, 1) for k, v in phases.items()}), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(raw)
        with open(raw) as f:
            print_gaps(json.load(f), steps=3)
        if trace:
            import gzip

            with open(raw, "rb") as src, gzip.open(trace.removesuffix(".gz") + ".gz", "wb") as dst:
                shutil.copyfileobj(src, dst)
    shaped = prof.key_averages(group_by_input_shape=True)
    print(shaped.table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=30,
                       max_shapes_column_width=70), flush=True)


def print_gaps(trace: dict, steps: int, top: int = 12) -> None:
    """Where the GPU waits for the host: the idle time between consecutive kernels, charged to
    what the host was doing when it launched the kernel that ended the wait (the innermost
    `pack.*` range and op around that launch), largest first."""
    events = trace.get("traceEvents", [])
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    launches = {e["args"].get("correlation"): e for e in events
                if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    spans = [e for e in events if e.get("cat") in ("cpu_op", "user_annotation") and "dur" in e]
    ranges = [e for e in spans if e["name"].startswith("pack.")]
    ops = sorted((e for e in spans if not e["name"].startswith("pack.")), key=lambda e: e["ts"])
    starts = [e["ts"] for e in ops]

    def around(launch: dict) -> str:
        t, tid = launch["ts"], launch.get("tid")
        inside = [e["name"] for e in ranges if e["ts"] <= t <= e["ts"] + e["dur"] and e.get("tid") == tid]
        op = launch["name"]
        i = bisect.bisect_right(starts, t)
        for e in reversed(ops[max(0, i - 200):i]):  # the innermost op: the latest started that still runs
            if e["ts"] + e["dur"] >= t and e.get("tid") == tid:
                op = e["name"]
                break
        return f"{inside[-1] if inside else '-'} / {op[:60]}"

    gaps: dict[str, list[float]] = {}
    idle, end = 0.0, None
    for k in kernels:
        if end is not None and k["ts"] - end > 5:  # us: more than a launch's own latency
            gap = k["ts"] - end
            idle += gap
            launch = launches.get(k["args"].get("correlation"))
            where = around(launch) if launch is not None else "?"
            gaps.setdefault(where, []).append(gap)
        end = max(end or 0.0, k["ts"] + k["dur"])
    print(f"profile gaps: GPU idle between kernels {idle / steps / 1e3:.1f} ms/step", flush=True)
    for where, g in sorted(gaps.items(), key=lambda kv: -sum(kv[1]))[:top]:
        print(f"  {sum(g) / steps / 1e3:7.2f} ms/step  {len(g) / steps:6.1f} gaps/step  "
              f"before a kernel launched in {where}", flush=True)


def _keep_adapter(into: str):
    """A tracker that records nothing but the adapter a trial alone writes (into `into`)."""
    from lora_exp.core.recording import NullTracker

    class KeepAdapter(NullTracker):
        run_id = "check"

        def log_dir(self, local_dir: str, artifact_path: str) -> None:
            shutil.copytree(local_dir, into)

    return KeepAdapter()


def _adapter_diff(alone: str, packed: str) -> float:
    """How far the adapter exported from a pack's slot is from the one peft saved for the trial
    trained alone: the largest over their tensors (same names required) of |packed - alone| /
    |alone| (Frobenius norms). Another slot's weights, or a slot zeroed before its copy, give ~1."""
    from safetensors.torch import load_file

    a, p = load_file(f"{alone}/adapter_model.safetensors"), load_file(f"{packed}/adapter_model.safetensors")
    if sorted(a) != sorted(p):
        raise SystemExit(f"exported adapter's tensors differ in names: {sorted(set(a) ^ set(p))[:4]}")
    return max(float((a[k] - p[k]).norm() / a[k].norm().clamp_min(1e-30)) for k in a)


def cmd_check(args: argparse.Namespace) -> None:
    """Each of K mixed trials trained in one pack vs the same trial trained alone (run_trial)."""
    import torch

    from lora_exp.core.data import load_rows, tokenize
    from lora_exp.core.models import load_base, pick_device
    from lora_exp.core.recording import NullTracker
    from lora_exp.core.training import run_trial
    from lora_exp.pack.trainer import train_packed

    overrides = base_overrides(args, args.arch) + [f"trainer.epochs={args.epochs}", "trainer.eval_steps=50",
                                                   "trainer.base_dropout=false"]
    cfgs = mixed_configs(args.k, overrides, seed=1)
    device = pick_device("auto")
    base = load_base(cfgs[0].model, device)
    data = tokenize(load_rows(cfgs[0].data), cfgs[0].data, base.tokenizer)
    # which slots to compare with the trial alone: all of a small pack; of a large one, spread
    # out to its last slot (where 32-bit offsets overflow first)
    chosen = list(range(args.k)) if args.compare <= 0 or args.compare >= args.k else \
        sorted({round(i * (args.k - 1) / (args.compare - 1)) for i in range(args.compare)})
    with tempfile.TemporaryDirectory(prefix="lora-exp-check-") as tmp:
        alone = [run_trial(cfgs[i], base, data, _keep_adapter(f"{tmp}/alone-{i}")) for i in chosen]
        start = time.perf_counter()
        packed_all = train_packed(cfgs, base, data, adapters_to=[f"{tmp}/packed-{i}" for i in range(args.k)])
        packed_s = round(time.perf_counter() - start, 2)
        adapter_diff = max(_adapter_diff(f"{tmp}/alone-{i}", f"{tmp}/packed-{i}") for i in chosen)
    packed = [packed_all[i] for i in chosen]
    worst = max(abs(a[1] - b[1]) / abs(a[1]) for x, y in zip(alone, packed) for a, b in zip(x.loss_curve, y.loss_curve))
    # per compared slot: where its largest difference is, and the trial alone again against itself
    # (how far the GPU's own run-to-run differences go for this trial)
    per_slot = []
    for i, x, y in zip(chosen, alone, packed):
        diffs = [(abs(a[1] - b[1]) / abs(a[1]), a[0], a[1], b[1]) for a, b in zip(x.loss_curve, y.loss_curve)]
        rel, step, a_loss, p_loss = max(diffs)
        per_slot.append({"slot": i, "max_rel_diff": rel, "at_step": step, "alone": a_loss, "packed": p_loss})
    # the slot furthest from alone, trained alone again: as is (the GPU's run-to-run difference),
    # and with one weight of the frozen base one ulp up (how far this trial's own curve moves for
    # a rounding-sized change; any other order of summation, as a pack's batched GEMMs have, is one)
    top = max(range(len(chosen)), key=lambda j: per_slot[j]["max_rel_diff"])

    def max_rel(curve: list) -> float:
        return max(abs(a[1] - b[1]) / abs(a[1]) for a, b in zip(alone[top].loss_curve, curve))

    repeat = max_rel(run_trial(cfgs[chosen[top]], base, data, NullTracker()).loss_curve)
    weight = next(p for p in base.model.parameters() if p.dim() == 1)  # a norm's weight
    kept = weight.detach().clone()
    with torch.no_grad():
        weight[0] = torch.nextafter(weight[0], weight[0] + 1)
    ulp = max_rel(run_trial(cfgs[chosen[top]], base, data, NullTracker()).loss_curve)
    with torch.no_grad():
        weight.copy_(kept)
    same_steps = all([s for s, _ in x.loss_curve] == [s for s, _ in y.loss_curve] for x, y in zip(alone, packed))
    evals = max(abs(x.eval_curve[-1][1] - y.eval_curve[-1][1]) / x.eval_curve[-1][1] for x, y in zip(alone, packed))
    same_text = sum(x.generations["adapter_output"] == y.generations["adapter_output"] for x, y in zip(alone, packed))
    print(json.dumps({"what": "pack vs alone", "device": str(device), "precision": args.precision, "k": args.k,
                      "compared_slots": chosen, "steps": cfgs[0].trainer.epochs * 5, "same_logged_steps": same_steps,
                      "max_rel_diff_train_loss": worst, "max_rel_diff_final_eval": evals,
                      "max_rel_diff_exported_adapter": adapter_diff,
                      "trials_with_identical_generations": f"{same_text}/{len(chosen)}",
                      "packed_s": packed_s, "per_slot": per_slot,
                      "furthest_slot_alone_again": {"slot": chosen[top], "as_is_max_rel_diff": repeat,
                                                    "one_ulp_in_base_max_rel_diff": ulp},
                      "configs": [" ".join(cfgs[i].overrides[-5:]) for i in chosen[:8]]}), flush=True)


# --- the whole command ------------------------------------------------------------------------------


def cmd_sweep(args: argparse.Namespace) -> None:
    overrides = base_overrides(args, args.arch)
    if args.epochs:
        overrides.append(f"trainer.epochs={args.epochs}")
    if args.attn:
        overrides.append(f"model.attn_implementation={args.attn}")
    with tempfile.TemporaryDirectory(prefix="lora-exp-bench-") as tmp:
        command = [sys.executable, "-m", "lora_exp.cli", "sweep", "-v", "sweep=seed_gpt2", f"pack={args.k}",
                   f"n_trials={args.trials}", f"workers={args.workers}", f"storage=sqlite:///{tmp}/optuna.db",
                   f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"tracking.artifact_root={tmp}/artifacts", *overrides]
        env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
        start = time.time()
        # streamed, each line stamped with seconds since the start (to --log), so a run cut off
        # by --timeout still shows how far it got
        proc = subprocess.Popen(command, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines: list[str] = []
        stamps: list[float] = []
        if args.log:
            Path(args.log).resolve().parent.mkdir(parents=True, exist_ok=True)
        log = open(args.log, "w") if args.log else None
        timer = None
        if args.timeout:
            import threading

            timer = threading.Timer(args.timeout, proc.kill)
            timer.start()
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            stamps.append(time.time() - start)
            if log:
                log.write(f"{stamps[-1]:8.1f} {line}")
                log.flush()
        proc.wait()
        cut = bool(timer and not timer.is_alive() and proc.returncode != 0)  # stopped by --timeout
        if timer:
            timer.cancel()
        wall = time.time() - start
        text = "\n".join(lines)
        steps = SEED_STEPS if not args.epochs else args.epochs * 5
        closed = [t for t, line in zip(stamps, lines) if re.match(r"^\[\d+(?:/\d+)?\] trial", line)]
        figures = sustained(stamps, lines, closed, steps)
        if proc.returncode != 0 and not cut:
            print("\n".join(lines[-30:]))
            print(json.dumps({"what": "lora-exp sweep", "k": args.k, "trials": args.trials, "exit": proc.returncode,
                              "wall_s": round(wall, 1), "finished_lines": len(closed), **figures}), flush=True)
            raise SystemExit(f"sweep failed with exit code {proc.returncode}")
        packs = [json.loads(m) for m in re.findall(r"pack summary: (\{.*\})", text)]
        counts = re.search(r"(\d+) trials -- (\d+) completed, (\d+) pruned, (\d+) failed", text)
        first = re.search(r"^\[1(?:/\d+)?\] trial.*", text, flags=re.M)
        whole = {} if cut else {"trials_per_hour": round(3600 * args.trials / wall * steps / SEED_STEPS, 1)}
        print(json.dumps({"what": "lora-exp sweep", "arch": args.arch, "precision": args.precision, "k": args.k,
                          "attn": args.attn or "default",
                          "workers": args.workers, "trials": args.trials, "steps_per_trial": steps,
                          "wall_s": round(wall, 1), "stopped_by_timeout": cut, "finished_lines": len(closed),
                          "completed_pruned_failed": [int(counts.group(i)) for i in (2, 3, 4)] if counts else None,
                          **whole, **figures,
                          "packs": packs}), flush=True)
        if args.show:
            print("\n".join(text.splitlines()[:6] + ["..."] + text.splitlines()[-8:]))
        if first:
            print(first.group(0))


def sustained(stamps: list[float], lines: list[str], closed: list[float], steps: int) -> dict:
    """Figures of a sweep once running, from its stamped output: when the first trial's line
    came, and the trials per hour (trial-steps a second, scaled to 2500-step trials) from the last
    progress line before the pack's step count reached a trial's length (no trial can have ended
    before it) to the last line: the first wave's end (evals, generations, adapters, the next
    trials' sampling and start) and the second wave inside it; compile and start-up outside. A
    trial's line comes after its adapter is written and its run closed, seconds to a minute after
    its training ended, so a window opened there would leave out the wave's end."""
    progress: dict[str, list[tuple[float, int, int]]] = {}  # by worker: (time, pack step, trial-steps)
    for t, line in zip(stamps, lines):
        m = re.search(r"(\[w\d+\] )?pack: .*?step (\d+) at .*?(\d+) trial-steps", line)
        if m:
            progress.setdefault(m.group(1) or "", []).append((t, int(m.group(2)), int(m.group(3))))
    out: dict = {"first_closed_s": round(closed[0], 1) if closed else None}
    rate, window = 0.0, [float("inf"), 0.0]
    for points in progress.values():
        before = [p for p in points if p[1] < steps]
        a, b = (before[-1] if before else points[0]), points[-1]
        if len(before) < len(points) and b[0] > a[0]:  # the pack got past a trial's length
            rate += (b[2] - a[2]) / (b[0] - a[0])  # trial-steps a second of this worker's pack
            window = [min(window[0], a[0]), max(window[1], b[0])]
    if rate:
        out.update({"sustained_window_s": [round(window[0], 1), round(window[1], 1)],
                    "sustained_trials_per_hour": round(3600 * rate / SEED_STEPS, 1)})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("baseline")
    b.add_argument("--seed-baseline", default=str(ROOT.parent / "shared" / "bench" / "seed_baseline.py"))
    b.add_argument("--steps", type=int, default=SEED_STEPS)
    for name in ("engine", "sweep", "check"):
        s = sub.add_parser(name)
        s.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
        s.add_argument("--tokenizer", default=default_tokenizer())
        s.add_argument("--arch", default="gpt2", choices=["gpt2", "smollm2"])
    e = sub.choices["engine"]
    e.add_argument("--ks", default="1,16,64,256,1024")
    e.add_argument("--attn", default="", help="the base model's attention implementation (sdpa, eager)")
    e.add_argument("--modes", default="full", help="compile modes to time, of lora_exp.pack.compile.COMPILE_MODES")
    e.add_argument("--steps", type=int, default=20)
    e.add_argument("--warmup", type=int, default=5)
    e.add_argument("--profile", type=int, default=0, help="profile the step at this K")
    e.add_argument("--trace", default="", help="with --profile: write the profiled steps' Chrome trace here (gzipped)")
    e.add_argument("--kernel-configs", default="", help="also time the optimizer's kernels at these "
                   "GROUPEDxBLOCKxWARPS (GROUPED 2: one launch over "
                   "the blocks slots train, 1: over every tensor's blocks, 0: one per tensor), e.g. 2x1024x4,1x1024x4")
    e.add_argument("--lora", default="kernels",
                   help="how the step computes the LoRA deltas: kernels (kernels.lora), bmm, or both")
    e.add_argument("--lora-configs", default="",
                   help="also time the LoRA kernels at these BKxBNxWARPSxMIN_SPLITxBM, e.g. 128x128x4x2x64")
    e.add_argument("--attention", default="rows", help="the pack's attention: rows (kernels.attention on CUDA), "
                   "model (the model's own implementation, --attn), or both")
    e.add_argument("--mixes", default="uniform",
                   help=f"trial mixes to time: uniform (the sampled space), {', '.join(MIXES)}")
    c = sub.choices["check"]
    c.add_argument("--k", type=int, default=6)
    c.add_argument("--epochs", type=int, default=40)
    c.add_argument("--compare", type=int, default=0,
                   help="compare this many slots (spread to the last) with the trial alone; 0 = all")
    s = sub.choices["sweep"]
    s.add_argument("--k", type=int, default=1024)
    s.add_argument("--trials", type=int, default=1024)
    s.add_argument("--workers", type=int, default=1)
    s.add_argument("--epochs", type=int, default=0, help="shorter trials (0 = the seed's 500 epochs)")
    s.add_argument("--show", action="store_true")
    s.add_argument("--attn", default="", help="model.attn_implementation for the sweep (e.g. eager)")
    s.add_argument("--log", default="", help="write the sweep's output here, each line stamped with seconds")
    s.add_argument("--timeout", type=float, default=0, help="stop the sweep after this many seconds")
    args = p.parse_args()
    if args.cmd != "baseline":
        require_tokenizer(sub.choices[args.cmd], args.tokenizer)
    {"baseline": cmd_baseline, "engine": cmd_engine, "sweep": cmd_sweep, "check": cmd_check}[args.cmd](args)


if __name__ == "__main__":
    main()
