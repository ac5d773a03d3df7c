"""Helpers shared by the Triton kernels: dtype mapping, where the kernels can run, autotune pruning."""
from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl

# Under TRITON_INTERPRET=1 the kernels run on CPU tensors through Triton's interpreter (tests only).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
SUPPORTED_DTYPES = tuple(_TL_DTYPES)


def tl_dtype(dtype: torch.dtype) -> Any:
    """The Triton dtype of a supported torch dtype; ValueError names any other."""
    if dtype not in _TL_DTYPES:
        raise ValueError(f"the Triton kernels take float16, bfloat16 or float32 inputs, got {dtype}")
    return _TL_DTYPES[dtype]


def use_ieee_dot(dtype: torch.dtype) -> bool:
    """float32 inputs get exact float32 products (not tf32); the interpreter's bf16 dot is unreliable, so
    there the operands (already rounded to the input dtype) are multiplied in float32 too."""
    return dtype == torch.float32 or INTERPRET


def kernels_available(tensor: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on this tensor's device and dtype."""
    on_device = tensor.is_cuda or (INTERPRET and tensor.device.type == "cpu")
    return on_device and tensor.dtype in SUPPORTED_DTYPES


def pow2(n: int, floor: int = 2) -> int:
    """The next power of two >= max(n, floor) (Triton block dimensions must be powers of two)."""
    return max(floor, triton.next_power_of_2(max(int(n), 1)))


def token_bucket(num_tokens: int) -> int:
    """Autotune key for a token count: its power-of-two bucket, capped, so that decode and prefill
    shapes tune once each instead of once per length."""
    return min(pow2(num_tokens, 1), 8192)


def one_config_under_interpreter(configs, named_args, **kwargs):
    """An ``early_config_prune``: every config on a GPU, the first alone under the interpreter."""
    return configs[:1] if INTERPRET else configs


def prune_by_tokens(small_block_m: int = 16, small_limit: int = 32):
    """An ``early_config_prune`` keeping configs with BM = small_block_m for few tokens and larger BM
    otherwise; under the interpreter only the first kept config (no benchmarking on CPU)."""

    def prune(configs, named_args, **kwargs):
        few = named_args["T_BUCKET"] <= small_limit
        kept = [c for c in configs if (c.kwargs["BM"] == small_block_m) == few] or configs[:1]
        return kept[:1] if INTERPRET else kept

    return prune
