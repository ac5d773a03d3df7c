"""Triton kernels of the mixture-of-LoRA op (see :mod:`meteora.ops`).

* :func:`triton_mixture`: the paper's "Triton" strategy, the chosen adapters read in place per token.
* :func:`fused_moe_lora`: our fused gate + routing + mixture (strategy "fused" on CUDA).
* :func:`kernels_available`: whether a tensor's device and dtype can run them.
"""
from ._common import SUPPORTED_DTYPES, kernels_available
from .fused import fused_moe_lora
from .mixture import triton_mixture

__all__ = ["SUPPORTED_DTYPES", "fused_moe_lora", "kernels_available", "triton_mixture"]
