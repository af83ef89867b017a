"""What `pack.compile=auto` compiles, which step `pack=auto`'s probes measure, how many of the
slots that fit it takes, where a pack's compiled graphs are kept, and that another version of
lora-exp's kernels never loads them."""
from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import torch

from lora_exp.compose import compose
from lora_exp.pack import sizing
from lora_exp.pack.sizing import (
    SlotMemory,
    balanced,
    choose_compile,
    choose_pack,
    choose_slots,
    sources_digest,
    use_project_compile_cache,
)


def test_pack_compile_auto_records_short_steps_as_cuda_graphs_and_compiles_only_what_pays():
    cfg, cuda = compose(["model=tiny_gpt2", "data=seed"]), torch.device("cuda")
    # the seed's sweep: 26-token rows, batch 1, 2,500 steps a trial, K=1024
    assert choose_compile(cfg, cuda, 1024, 4096, 2500, 26)[0] == "graphs"
    # the default sweep (batch 8 x 50 tokens) and 512-token rows: recorded too; 1,024 positions a
    # slot's step, where the GPU is the bound: the layers compiled, not recorded
    mode, why = choose_compile(cfg, cuda, 143, 256, 40, 400)
    assert mode == "graphs" and "80 pack steps ahead" in why, why
    assert choose_compile(cfg, cuda, 64, 64, 300, 512)[0] == "graphs"
    assert choose_compile(cfg, cuda, 32, 64, 300, 1024)[0] == "layers"
    assert choose_compile(cfg, cuda, 64, 64, 40, 26)[0] == "parts"        # too few steps ahead to compile
    assert choose_compile(cfg, torch.device("cpu"), 4, 8, 2500, 26)[0] == "off"
    as_set = compose(["model=tiny_gpt2", "data=seed", "pack.compile=layers"])
    assert choose_compile(as_set, cuda, 1024, 4096, 2500, 26) == ("layers", "pack.compile=layers (as set)")


def test_pack_auto_probes_the_step_the_pack_will_run(monkeypatch):
    """For `auto`, the bmm step (`parts`) is probed first: where its K takes every trial, the mode
    is decided at that K and the LoRA kernels' step is never probed (their compiles spared);
    else the kernels' step (`layers`) sizes the pack, or, where the steps ahead at its K leave
    `parts`, the bmm step's K does. A mode set by hand is probed as set, once."""
    probed = []

    def probe(base, data, cfg, max_rank, modules, trials, compile):
        probed.append((compile, max_rank))
        return min(trials, {"layers": 40, "full": 40, "off": 10, "parts": 10}[compile]), f"K for {compile}"

    monkeypatch.setattr(sizing, "choose_slots", probe)
    cuda = SimpleNamespace(device=torch.device("cuda"))
    cfg = compose(["model=tiny_gpt2", "data=seed"])
    # 512-token rows, 300 steps a trial: 64 trials at the kernels' K=40 have 600 steps ahead: graphs
    assert choose_pack(cuda, None, cfg, 32, ["c_attn"], 64, 300, 512)[:3] == (40, "K for layers", "graphs")
    assert probed == [("parts", 32), ("layers", 32)]
    # 10 trials of 40 steps: the bmm step's K takes all 10, one wave of 40 steps, too few to
    # compile: parts, and no probe of the kernels
    probed.clear()
    slots, why, mode, mode_why = choose_pack(cuda, None, cfg, 32, ["c_attn"], 10, 40, 400)
    assert (slots, why, mode) == (10, "K for parts", "parts") and "40 pack steps ahead" in mode_why, mode_why
    assert probed == [("parts", 32)]
    # 8 trials of 300 steps: all 8 on the bmm step's K, 300 steps ahead: graphs at K=8, which the
    # compiled step (keeping less) holds too; one probe
    probed.clear()
    assert choose_pack(cuda, None, cfg, 32, ["c_attn"], 8, 300, 400)[:3] == (8, "K for parts", "graphs")
    assert probed == [("parts", 32)]
    # 40 trials of 40 steps: parts at the kernels' K=40 (40 steps ahead), but at the K=10 the
    # bmm's allow, 160 steps ahead: compiled (and recorded) at that K
    probed.clear()
    slots, why, mode, mode_why = choose_pack(cuda, None, cfg, 32, ["c_attn"], 40, 40, 400)
    assert (slots, why, mode) == (10, "K for parts", "graphs") and "160 pack steps ahead" in mode_why, mode_why
    assert probed == [("parts", 32), ("layers", 32)]
    # ranks over 64 go through bmm's in any mode: one probe
    probed.clear()
    assert choose_pack(cuda, None, cfg, 128, ["c_attn"], 40, 40, 400)[:3] == (40, "K for layers", "parts")
    assert probed == [("layers", 128)]
    # as set: that mode's step, once
    probed.clear()
    full = compose(["model=tiny_gpt2", "data=seed", "pack.compile=full"])
    assert choose_pack(cuda, None, full, 32, ["c_attn"], 40, 40, 400)[:3] == (40, "K for full", "full")
    assert probed == [("full", 32)]


def test_pack_auto_runs_the_trials_on_the_fewest_slots_that_take_as_few_waves(monkeypatch):
    """Every slot of a pack computes, a trial in it or not: of the K that fit, `pack=auto` takes
    the fewest that run the trials in as many waves (the default sweep on an H100: 199 fit, 256
    trials; 128 run them in the same two waves), and says so. The measurement is the GPU test's
    (tests/gpu/test_pack_gpu.py); here it is given, as the H100 measured it."""
    gib = 1024 ** 3
    memory = SlotMemory(per_slot=0.330 * gib, fixed=0.34 * gib, free=77.8 * gib, kernels=True)
    assert memory.holds() == 199
    monkeypatch.setattr(sizing, "measure_slot_memory", lambda *args: memory)
    cuda = SimpleNamespace(device=torch.device("cuda"))
    data = SimpleNamespace(train=[SimpleNamespace(input_ids=[0] * 50)])
    cfg = compose(["model=tiny_llama", "data=seed"])

    def slots(trials):
        return choose_slots(cuda, data, cfg, 16, ["q_proj", "v_proj"], trials, "layers")

    k, why = slots(256)
    assert k == 128, why
    assert why.startswith("pack=auto: 128 slots (199 fit, limited by GPU memory; 128 run the 256 trials in the "
                          "same 2 waves"), why
    assert "a slot needs 0.330 GiB" in why and "77.8 GiB free holds 199" in why, why
    assert slots(398) == (199, slots(398)[1]) and "(limited by GPU memory)" in slots(398)[1]  # two full waves
    assert slots(400)[0] == 134                                                             # three waves
    assert slots(150)[0] == 150 and "(limited by the trials to run)" in slots(150)[1]
    assert [balanced(t, f) for t, f in [(256, 199), (32, 25), (5, 5), (7, 1), (3000, 1024), (10 ** 9, 700)]] == [
        (128, 2), (16, 2), (5, 1), (1, 7), (1000, 3), (700, 1428572)]


def test_the_digest_of_the_sources_changes_with_any_source_and_only_with_them(tmp_path):
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "lora.py").write_text("SCHEMA = '(Tensor x) -> (Tensor, Tensor)'\n")
    (tmp_path / "notes.txt").write_text("not a source")
    first = sources_digest(tmp_path)
    assert sources_digest(tmp_path) == first
    (tmp_path / "notes.txt").write_text("still not a source")
    assert sources_digest(tmp_path) == first
    (tmp_path / "kernels" / "lora.py").write_text("SCHEMA = '(Tensor x) -> (Tensor, Tensor, Tensor)'\n")
    assert sources_digest(tmp_path) != first


def test_compiled_graphs_go_to_the_project_cache_keyed_by_this_versions_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_EXP_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "restored-after-the-test")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    # set and put back by hand: monkeypatch's undo left torch's config module without the key, and
    # every compile after this test in the same process failed
    before = torch.compiler.config.cache_key_tag
    torch.compiler.config.cache_key_tag = "the-users-tag"
    try:
        folder = use_project_compile_cache()
        use_project_compile_cache()   # once per pack: the tag is not added twice
        tag = torch.compiler.config.cache_key_tag
    finally:
        torch.compiler.config.cache_key_tag = before

    assert folder == str(tmp_path / "torch-compile") and os.path.isdir(folder)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == folder
    assert tag == f"the-users-tag+lora-exp-{sources_digest()}"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert use_project_compile_cache() == str(tmp_path / "mine")   # the user's folder stands


UPGRADE_SCRIPT = '''
import sys
from pathlib import Path

import torch

from lora_exp.pack import sizing

version, root = int(sys.argv[1]), Path(sys.argv[2])
sizing.PACKAGE = root / f"v{version}"          # this version's sources: the cache keys' tag
sizing.PACKAGE.mkdir(parents=True, exist_ok=True)
(sizing.PACKAGE / "kernels.py").write_text(f"VERSION = {version}\\n")
sizing.use_project_compile_cache()
# an op whose backward op loses an argument from version 1 to 2, as lora_delta_backward did
schema = "(Tensor g, Tensor x, Tensor s) -> Tensor" if version == 1 else "(Tensor g, Tensor x) -> Tensor"


@torch.library.custom_op("upgrade_demo::fwd", mutates_args=())
def fwd(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@fwd.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op("upgrade_demo::bwd", mutates_args=(), schema=schema)
def bwd(g, x, s=None):
    return g * 2


@bwd.register_fake
def _(g, x, s=None):
    return torch.empty_like(g)


def setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def backward(ctx, g):
    (x,) = ctx.saved_tensors
    return bwd(g, x, x) if version == 1 else bwd(g, x)


fwd.register_autograd(backward, setup_context=setup)
x = torch.randn(8, requires_grad=True)
torch.compile(lambda x: (fwd(x) + 1).sin().sum())(x).backward()
print("trained", version)
'''


def test_a_new_version_of_the_kernels_compiles_afresh_instead_of_loading_the_old_ones_graphs(tmp_path):
    """Inductor's cache keys name a custom op, not its signature: without the sources' tag, the
    second run loads the first one's backward graph and fails ("expected at most 2 argument(s)
    but received 3"), as a sweep did after lora_delta_backward's arguments changed."""
    env = {**os.environ, "LORA_EXP_CACHE": str(tmp_path / "cache")}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    env.pop("TORCH_COMPILE_CACHE_KEY_TAG", None)
    for version in (1, 2):
        done = subprocess.run([sys.executable, "-c", UPGRADE_SCRIPT, str(version), str(tmp_path)], env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0 and f"trained {version}" in done.stdout, done.stderr[-2000:]
    assert any((tmp_path / "cache" / "torch-compile").rglob("*.py"))   # the graphs were cached there
