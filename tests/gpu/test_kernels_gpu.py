"""The pack's Triton kernels compiled for the GPU, fp32 and bf16, against their torch references
(device-only: skipped without CUDA)."""
from __future__ import annotations

import pytest

from kernel_checks import (
    ATTENTION_SCRIPT,
    GEMM_SCRIPT,
    HEAD_SCRIPT,
    LORA_SCRIPT,
    SCRIPT,
    SWIGLU_SCRIPT,
    cuda_or_skip,
    run_checks,
)

pytest.importorskip("triton")


def test_the_same_on_the_gpu_compiled():
    """The kernels as they run in a pack: compiled by Triton for the GPU (where there is one)."""
    cuda_or_skip()
    run_checks(SCRIPT, KERNELS_DEVICE="cuda")


def test_lora_delta_kernels_the_same_on_the_gpu_in_fp32_and_bf16():
    cuda_or_skip()
    run_checks(LORA_SCRIPT, KERNELS_DEVICE="cuda", KERNELS_DTYPES="float32,bfloat16")


def test_the_base_product_with_the_lora_delta_in_its_epilogue_the_same_on_the_gpu_in_bf16_and_fp16():
    cuda_or_skip()
    run_checks(GEMM_SCRIPT, KERNELS_DEVICE="cuda", KERNELS_DTYPES="bfloat16")
    run_checks(GEMM_SCRIPT, KERNELS_DEVICE="cuda", KERNELS_DTYPES="float16")


def test_swiglu_down_projection_op_the_same_on_the_gpu_in_fp32_and_bf16():
    cuda_or_skip()
    run_checks(SWIGLU_SCRIPT, KERNELS_DEVICE="cuda", KERNELS_DTYPES="float32,bfloat16")


def test_causal_attention_kernels_the_same_on_the_gpu_in_fp32_and_bf16():
    cuda_or_skip()
    run_checks(ATTENTION_SCRIPT, KERNELS_DEVICE="cuda", KERNELS_DTYPES="float32,bfloat16", KERNELS_LOW="bfloat16")


def test_head_loss_kernel_the_same_on_the_gpu_in_fp32_and_bf16():
    cuda_or_skip()
    run_checks(HEAD_SCRIPT, KERNELS_DEVICE="cuda", KERNELS_DTYPES="float32,bfloat16")
