"""How big a pack is and how it runs, decided before its first step: `pack=auto` (the slots the
GPU's memory holds) and `pack.compile=auto` (compile the step only where it pays).

Slots: one slot's memory is measured, not guessed. Two small probe packs (PROBE slots) train two
steps each at the heaviest point of the search (the pack's rank on every module it wraps,
dropout on), with the pack's real rows; the difference of their peaks is one slot's memory (its
LoRA weights, gradients and AdamW moments plus its rows' activations), the rest is what the pack
needs whatever its size. The probes run the step the pack will run, uncompiled: where its
compiled step goes through the LoRA kernels (`model.kernel_deltas`), through them, its layers
eager (compiling them keeps less, as tests/gpu/test_pack_gpu.py checks, and probing compiled
would cost a compile for each probe's shape); else through bmm's, as `off` and `parts` run.
K is what the free memory holds with HEADROOM to spare, never more than the trials there are to
run, and of that the fewest slots that run them in as many waves (`balanced`): an empty slot
still computes, the step's shapes being fixed.

Compile: a compiled step is faster, but compiling costs a fixed time up front (seconds for a
2-layer model; for a 30-layer one ~30 s for `layers`, minutes for `full`) that a short sweep never earns back. `auto`
compiles the model's layers (`layers`: one graph shared by every decoder layer, compiled once)
when the pack has at least COMPILE_PAYS_STEPS steps ahead; else only the small parts (`parts`:
the Triton optimizer, the dropout masks, the loss chunks). Compiled graphs are kept
in the project's cache folder, so the next sweep of the same shapes loads them in seconds.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from pathlib import Path
from typing import Sequence

import torch

from lora_exp.config import RunConfig
from lora_exp.core.data import PreparedData
from lora_exp.core.models import BaseModel, cache_dir
from lora_exp.pack.compile import compile_mode
from lora_exp.pack.model import kernel_deltas

#: slots of the two probe packs (their difference is one slot's memory)
PROBE = (2, 6)
#: share of the free GPU memory a pack may plan to use (the allocator's fragmentation, generation)
HEADROOM = 0.85
#: never more slots than this, whatever the memory (the step's time grows with K beyond it anyway)
MAX_SLOTS = 1024
#: pack steps ahead from which `pack.compile=auto` compiles the layers: on the H200, making the pack
#: and compiling them takes ~27-35 s, and at Qwen2.5-0.5B's 512-token rows (K=64) a step with them
#: takes ~0.2 s against 0.53 s with `parts` (docs/benchmarks.md): it pays from ~64-100 steps
COMPILE_PAYS_STEPS = 64
#: a slot's positions a step (batch x longest row) up to which `auto` also records the step as a
#: CUDA graph (`graphs`). Such a step is ~1,500 small kernels, which the host takes about as long
#: to launch as the GPU to run, or longer: the seed's GPT-2 at K=1024 (26 positions) 62.0 ms a
#: step, 51.6 replayed (H200); the default sweep's SmolLM2 at K=128 (8 x 50) 239.0 ms, 135.0
#: replayed (H100). At 512 (Qwen2.5-0.5B, K=64) the GPU is the bound: replayed, the same within
#: the noise. Beyond that the graph would gain nothing, and no model's recorded step was checked
#: against the trial alone on the GPU there (docs/benchmarks.md)
GRAPHS_MAX_POSITIONS = 512


@dataclasses.dataclass
class SlotMemory:
    """A pack's memory: `fixed` + `per_slot` x K bytes (measured), and what was free."""

    per_slot: float
    fixed: float
    free: float
    #: measured on the LoRA kernels' step (else the eager step's bmm's)
    kernels: bool = False

    def holds(self) -> int:
        return max(0, int((self.free * HEADROOM - self.fixed) // max(self.per_slot, 1.0)))


def heaviest(cfg: RunConfig, max_rank: int, modules: Sequence[str]) -> RunConfig:
    """The trial of the search that needs the most memory: the pack's rank on every module, dropout on."""
    lora = dataclasses.replace(cfg.lora, r=max_rank, lora_alpha=float(max_rank), target_modules=list(modules),
                               preset=None, lora_dropout=max(cfg.lora.lora_dropout, 0.1))
    return dataclasses.replace(cfg, lora=lora)


def pack_peak(base: BaseModel, data: PreparedData, cfg: RunConfig, k: int, max_rank: int, modules: Sequence[str],
              compile: str, compile_layers: bool = True) -> float:
    """Bytes a pack of `k` slots, each holding `cfg`'s trial, allocates at its peak over two steps
    (the second has AdamW's moments and every gradient buffer) beyond what was allocated before
    it (CUDA only); without `compile_layers`, its layers run eagerly whatever `compile` says."""
    from lora_exp.core.recording import NullTracker
    from lora_exp.pack.trainer import PackTrainer

    device = base.device
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    trainer = PackTrainer(base, data, cfg, k, max_rank, modules, compile=compile)
    if not compile_layers:
        trainer.stepper.layers = None
    try:
        for slot in range(k):
            trainer.start(slot, cfg, NullTracker())
        for _ in range(2):
            trainer.train_step()
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - start)
    finally:
        trainer.close()
        del trainer


def measure_slot_memory(base: BaseModel, data: PreparedData, cfg: RunConfig, max_rank: int,
                        modules: Sequence[str], compile: str = "off") -> SlotMemory:
    """One slot's memory and the pack's fixed part, from two probe packs' peaks (CUDA only), for
    a pack compiled in `compile` (`pack.compile`, resolved): its step through the LoRA kernels,
    uncompiled, where that one's goes through them; else the eager step."""
    device = base.device
    heavy = heaviest(cfg, max_rank, modules)
    kernels = kernel_deltas(compile, device, cfg.pack.lora, max_rank)
    # the layers eager: no compile for the probes' shapes
    peaks = [pack_peak(base, data, heavy, k, max_rank, modules, "layers" if kernels else "off", compile_layers=False)
             for k in PROBE]
    torch.cuda.empty_cache()
    per_slot = max(1.0, (peaks[1] - peaks[0]) / (PROBE[1] - PROBE[0]))
    fixed = max(0.0, peaks[0] - PROBE[0] * per_slot)
    return SlotMemory(per_slot=per_slot, fixed=fixed, free=float(torch.cuda.mem_get_info(device)[0]),
                      kernels=kernels)


def choose_slots(base: BaseModel, data: PreparedData, cfg: RunConfig, max_rank: int, modules: Sequence[str],
                 trials: int, compile: str = "off") -> tuple[int, str]:
    """`pack=auto`: the slots for `trials` trials to run on a pack compiled in `compile`
    (`pack.compile`, resolved), and a line that says why."""
    if base.device.type != "cuda":
        return 1, f"pack=auto: one trial at a time on {base.device} (packing pays on a GPU)"
    memory = measure_slot_memory(base, data, cfg, max_rank, modules, compile)
    holds = memory.holds()
    fit = max(1, min(trials, holds, MAX_SLOTS))
    k, waves = balanced(trials, fit)
    gib = 1024 ** 3
    bound = ("the trials to run" if fit == trials else f"the {MAX_SLOTS}-slot cap" if fit == MAX_SLOTS
             else "GPU memory")
    limit = (f"limited by {bound}" if k == fit else
             f"{fit} fit, limited by {bound}; {k} run the {trials} trials in the same {waves} waves, and a "
             f"step costs less: a slot without a trial computes all the same")
    step = "the LoRA kernels' step, layers uncompiled" if memory.kernels else "an eager step"
    why = (f"pack=auto: {k} slots ({limit}): a slot needs {memory.per_slot / gib:.3f} GiB at the "
           f"heaviest point of the search (rank {max_rank} on {len(modules)} modules, batch "
           f"{cfg.trainer.batch_size} x {max(len(e.input_ids) for e in data.train)} positions; {step}), the pack "
           f"{memory.fixed / gib:.2f} GiB more; {memory.free / gib:.1f} GiB free holds {holds} at "
           f"{HEADROOM:.0%}; {trials} trials to run")
    if k == 0 or holds == 0:
        raise MemoryError(f"pack=auto: not even one slot fits: {why}")
    return k, why


def balanced(trials: int, fit: int) -> tuple[int, int]:
    """The fewest slots that run `trials` trials in as few waves as `fit` slots do, and that
    number of waves: a pack's step computes every slot, held or empty (its shapes are fixed), so
    256 trials on the 199 slots that fit would run a second wave of 57 at the cost of 199; 128
    slots run the same two waves with 71 fewer slots a step. (Pruned trials free their slots
    for the trials queued either way.)"""
    waves = -(-trials // fit)
    return -(-trials // waves), waves


def choose_pack(base: BaseModel, data: PreparedData, cfg: RunConfig, max_rank: int, modules: Sequence[str],
                trials: int, steps: int, positions: int) -> tuple[int, str, str, str]:
    """`pack=auto`: the slots and the compile mode together, and the lines that say why. The
    probes measure the step of the mode `pack.compile` names. For `auto`, where a compiled step
    would go through the LoRA kernels, the bmm step (`parts`, which keeps the most) is probed
    first: if the K it allows takes every trial, so does the compiled step's, and the mode is
    decided at that K without probing the kernels (whose Triton kernels compile for 11-20 s on
    an H100, in vain where a short sweep then runs `parts`). Else `layers` is probed; where the
    steps ahead at its K leave `parts`, the bmm step's K sizes the pack, and the mode is decided
    again at that K: with fewer slots, compiling may pay after all (a compiled step keeps less
    than the bmm's)."""
    device = base.device
    guess = compile_mode(cfg.pack.compile, device)
    kernels = kernel_deltas(guess, device, cfg.pack.lora, max_rank)
    bmm = None
    if cfg.pack.compile == "auto" and kernels:
        bmm = choose_slots(base, data, cfg, max_rank, modules, trials, "parts")
        if bmm[0] >= trials:
            return *bmm, *choose_compile(cfg, device, bmm[0], trials, steps, positions)
    slots, why = choose_slots(base, data, cfg, max_rank, modules, trials, guess)
    compile, compile_why = choose_compile(cfg, device, slots, trials, steps, positions)
    if kernels != kernel_deltas(compile, device, cfg.pack.lora, max_rank):
        slots, why = bmm or choose_slots(base, data, cfg, max_rank, modules, trials, compile)
        compile, compile_why = choose_compile(cfg, device, slots, trials, steps, positions)
    return slots, why, compile, compile_why


def choose_compile(cfg: RunConfig, device: torch.device, slots: int, trials: int, steps: int,
                   positions: int = 0) -> tuple[str, str]:
    """`pack.compile=auto` on CUDA: `layers` when the pack has COMPILE_PAYS_STEPS steps ahead or
    more (its trials' steps over its slots), `graphs` then where a slot's step has at most
    GRAPHS_MAX_POSITIONS `positions` (batch x longest row), else `parts`. Elsewhere `off`."""
    setting = cfg.pack.compile
    if setting != "auto":
        return setting, f"pack.compile={setting} (as set)"
    if device.type != "cuda":
        return "off", "pack.compile=auto: off on the CPU"
    ahead = math.ceil(trials / max(1, slots)) * steps
    if ahead >= COMPILE_PAYS_STEPS:
        why = f"{ahead} pack steps ahead; compiling the layers pays from {COMPILE_PAYS_STEPS}"
        if 0 < positions <= GRAPHS_MAX_POSITIONS:
            return "graphs", (f"pack.compile=auto: graphs ({why}; {positions} positions a slot's step, short "
                              f"enough that launching the step would bound it)")
        return "layers", f"pack.compile=auto: layers ({why})"
    return "parts", (f"pack.compile=auto: parts ({ahead} pack steps ahead: compiling the layers pays from "
                     f"{COMPILE_PAYS_STEPS}; `pack.compile=layers` compiles them anyway)")


#: lora-exp's package folder, whose sources key the compile cache
PACKAGE = Path(__file__).resolve().parents[1]


def sources_digest(root: Path | None = None) -> str:
    """A digest of lora-exp's own sources (every .py under `root`, by default the package)."""
    digest = hashlib.sha256()
    root = root or PACKAGE
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def use_project_compile_cache() -> str:
    """torch.compile's caches (Inductor's graphs and Triton's kernels) in the project's cache
    folder, kept across runs, unless TORCHINDUCTOR_CACHE_DIR already says where; their keys
    tagged with this version of lora-exp's sources (`sources_digest`): Inductor's keys name the
    pack's custom ops, not what they take or return, so a graph compiled against other kernels
    would be loaded and fail."""
    folder = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not folder:
        folder = str(cache_dir() / "torch-compile")
        os.makedirs(folder, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
    tag = f"lora-exp-{sources_digest()}"
    config = torch.compiler.config
    if tag not in config.cache_key_tag.split("+"):
        config.cache_key_tag = "+".join(t for t in (config.cache_key_tag, tag) if t)
    return folder
