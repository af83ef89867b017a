"""The pack's Triton kernels against their torch references, run by Triton's interpreter on the
CPU (TRITON_INTERPRET=1, set before triton is imported). Skipped where triton is not installed:
CPU builds of torch do not bring it; `make setup` installs it (the test extra)."""
from __future__ import annotations

import pytest

from kernel_checks import (
    ATTENTION_SCRIPT,
    GEMM_SCRIPT,
    HEAD_SCRIPT,
    LLAMA_AUTOCAST_SCRIPT,
    LORA_SCRIPT,
    PACK_LORA_SCRIPT,
    PACK_SCRIPT,
    SCRIPT,
    SWIGLU_SCRIPT,
    run_checks,
)

pytest.importorskip("triton")  # installed by `make setup` on x86-64 Linux (pyproject test extra)

#: the interpreter's cost is per program, so its runs take row groups past a MAX_M of 128 (256 on
#: the GPU): the scripts' long groups follow MAX_M, and the tiled kernels run fewer tiles
INTERPRETER_MAX_M = "MAX_M=128"


def test_triton_adamw_and_norms_match_torch_on_each_slots_live_prefix_whatever_the_gradients_layout():
    run_checks(SCRIPT, TRITON_INTERPRET="1", KERNELS_DEVICE="cpu")


def test_lora_delta_kernels_match_the_bmms_forward_and_backward_skipping_what_a_slot_does_not_train():
    """fp32, and fp16 with an fp32 output gradient (fp16 stands for bf16: the interpreter's bf16 dots
    are wrong; tests/gpu runs bf16)."""
    run_checks(LORA_SCRIPT, TRITON_INTERPRET="1", KERNELS_DEVICE="cpu", KERNELS_DTYPES="float32,float16",
               KERNELS_CONSTANTS=INTERPRETER_MAX_M)   # its long group: 146 positions a slot, 5 tiles (9 at 256)


def test_the_base_product_with_the_lora_delta_in_its_epilogue_matches_the_product_then_the_delta():
    """fp16 (for bf16: the interpreter's bf16 dots are wrong; tests/gpu runs bf16 at the kernel's
    own tiles). Tiles of 64 x 64 x 32 here, and widths past a MIN_WIDTH of 64: the same cases
    (3 row tiles a slot, 2 column tiles, 3 steps of the product's sum, ragged edges) at a quarter
    of the interpreter's time (row groups past a MAX_M of 128: the tiled LoRA kernels)."""
    run_checks(GEMM_SCRIPT, TRITON_INTERPRET="1", KERNELS_DEVICE="cpu", KERNELS_DTYPES="float16",
               KERNELS_CONSTANTS=INTERPRETER_MAX_M
               + ",lora_gemm.BM=64,lora_gemm.BN=64,lora_gemm.BK=32,lora_gemm.MIN_WIDTH=64")


def test_swiglu_activation_fused_with_down_projections_lora_matches_torchs_ops_forward_and_backward():
    """fp32, and fp16 (for bf16) with an fp32 output gradient; dropout on and off, a slot that
    does not target down_proj, short and long row groups."""
    run_checks(SWIGLU_SCRIPT, TRITON_INTERPRET="1", KERNELS_DEVICE="cpu", KERNELS_DTYPES="float32,float16",
               KERNELS_CONSTANTS=INTERPRETER_MAX_M)   # its long groups: 146 positions a slot (274 at 256)


def test_head_loss_kernel_matches_the_compiled_chunk_loss_and_its_gradient():
    """Each position's loss and the logits' gradient (softmax minus one-hot) over a padded
    vocabulary wider than a block, unlabelled positions zero; fp32 and fp16 (for bf16)."""
    run_checks(HEAD_SCRIPT, TRITON_INTERPRET="1", KERNELS_DEVICE="cpu", KERNELS_DTYPES="float32,float16")


def test_causal_attention_kernels_match_softmax_attention_with_the_same_dropout_forward_and_backward():
    """fp32 and fp16 under the interpreter, GQA, and the dtype mixes autocast hands over (its bf16
    dots are wrong: fp16 stands for bf16 here, and bf16 is run for its dtypes; the GPU test checks
    bf16)."""
    run_checks(ATTENTION_SCRIPT, TRITON_INTERPRET="1", KERNELS_DEVICE="cpu", KERNELS_DTYPES="float32,float16")


def test_a_pack_with_the_kernel_optimizer_trains_as_with_torchs_through_slot_reuse_and_held_slots():
    """The optimizer's list of live blocks follows the slots as trials start, hold for evals,
    resume and leave (5 trials through 2 slots), under Triton's interpreter."""
    run_checks(PACK_SCRIPT, TRITON_INTERPRET="1")


def test_packed_trials_train_the_same_through_the_lora_kernels_as_through_the_bmms_short_and_long_row_groups():
    """fp32 with dropout: the kernels' deltas (the base output added in the same pass, each
    slot's own rank and modules) against the bmm's, in a pack that trains and evaluates, for
    row groups one program holds (1 row) and for tiled ones (2 rows, past a MAX_M of 128)."""
    run_checks(PACK_LORA_SCRIPT, TRITON_INTERPRET="1", KERNELS_CONSTANTS=INTERPRETER_MAX_M)


def test_a_llama_pack_steps_under_bf16_autocast_through_every_kernel():
    """The crash a bf16 SmolLM2-sized pack met on its first backward ("Both operands must be same
    dtype"), reproduced on the CPU: tiny Llama (GQA), bf16 autocast, the optimizer, LoRA and
    attention kernels under the interpreter."""
    run_checks(LLAMA_AUTOCAST_SCRIPT, TRITON_INTERPRET="1")


CONSTANTS_SCRIPT = """
import torch
from lora_exp.compose import compose
from lora_exp.core.data import load_rows, tokenize
from lora_exp.core.models import load_base
from lora_exp.pack.kernels import lora, swiglu
from lora_exp.pack.trainer import PackTrainer

cfg = compose(["model=tiny_llama", "data=seed", "tracking=none"])   # the constants from the environment
assert cfg.pack.kernel_constants == "BN=64,swiglu.NUM_WARPS=8", cfg.pack.kernel_constants
base = load_base(cfg.model, torch.device("cpu"))
data = tokenize(load_rows(cfg.data), cfg.data, base.tokenizer)
defaults = lora.BN, swiglu.NUM_WARPS
trainer = PackTrainer(base, data, cfg, 2, cfg.lora.r, cfg.target_modules)
assert (lora.BN, swiglu.NUM_WARPS) == (64, 8)      # set while the pack runs
trainer.close()
assert (lora.BN, swiglu.NUM_WARPS) == defaults, (lora.BN, swiglu.NUM_WARPS)
print("constants ok")
"""


def test_the_kernels_constants_are_set_from_the_benches_syntax_and_for_a_whole_pack():
    """`set_constants` (the benches' `NAME=VALUE,...`): the values set and put back, a wrong item
    refused with nothing set; `pack.kernel_constants` (from LORA_EXP_PACK_KERNEL_CONSTANTS, as the
    GPU matrix hands it to its sweeps) checked with the config and set while a pack runs."""
    import os
    import subprocess
    import sys

    from lora_exp.compose import compose
    from lora_exp.errors import ConfigError
    from lora_exp.pack.kernels import lora, lora_gemm, restore_constants, set_constants, swiglu

    defaults = lora.BN, lora.BM, swiglu.BM, lora_gemm.BN
    saved = set_constants("BN=64, BM=64,swiglu.BM=32,lora_gemm.BN=128")
    try:
        assert (lora.BN, lora.BM, swiglu.BM, lora_gemm.BN) == (64, 64, 32, 128)
    finally:
        restore_constants(saved)
    assert (lora.BN, lora.BM, swiglu.BM, lora_gemm.BN) == defaults
    for bad in ("BN=64,NOPE=2", "BM", "BM=x", "adamw.BLOCK=4", "swiglu.SWIGLU=1", "lora_gemm.GEMM=1"):
        with pytest.raises(ValueError, match="not NAME=INTEGER"):
            set_constants(bad)
        assert (lora.BN, lora.BM, swiglu.BM, lora_gemm.BN) == defaults, bad   # nothing set
        with pytest.raises(ConfigError, match="pack.kernel_constants: .*not NAME=INTEGER"):
            compose(["model=tiny_llama", f"pack.kernel_constants='{bad}'"])
    env = {**os.environ, "LORA_EXP_PACK_KERNEL_CONSTANTS": "BN=64,swiglu.NUM_WARPS=8", "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", CONSTANTS_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and "constants ok" in done.stdout, done.stderr[-2000:]
