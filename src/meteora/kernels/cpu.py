"""MeteoRA's mixture on the CPU in one C++ call (``cpu_mix.cpp``), built on first use with torch's extension
builder and cached by it (``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``).

A CPU spends microseconds on each small tensor operation, and the routing of the torch-operation form
(:mod:`meteora.kernels.dense`) takes about ten per projection: at few tokens they cost as much as the
products. The extension routes each token in a loop over its logits and adds its k chosen B's alone (k r
terms, not the N r of the dense product; tokens in chunks over torch's intra-op threads; each token on its
own, so a token's output does not depend on the batch it came in, as sharded evaluation needs): the forward
of the operator's CPU form (:func:`routed_mix`, which returns the routing) and the layer's inference read from
its stacked product (:func:`stacked_mix`), called by :func:`meteora.kernels.dense.dense_mix` and
:func:`~meteora.kernels.dense.dense_stacked_mix` on CPU tensors.
It needs a C++ compiler (the build takes about 15 s, once); where it cannot be built those keep the
torch-operation form (the same routing, the output within rounding) and a warning says why, once.
``METEORA_CPU_EXTENSION=0`` turns it off.
"""
from __future__ import annotations

import functools
import os
import shutil
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch

MODES = {"topk": 0, "soft": 1, "topk_unnormalized": 2}


@functools.lru_cache(maxsize=1)
def extension() -> ModuleType | None:
    """The built extension, or None where it is turned off or cannot be built (a warning says why)."""
    if os.environ.get("METEORA_CPU_EXTENSION", "1") == "0":
        return None
    source = Path(__file__).with_name("cpu_mix.cpp")
    try:
        from torch.utils.cpp_extension import load

        if shutil.which("ninja") is None:  # the pinned ninja package's binary, when its bin/ is not on PATH
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        # OpenMP on Linux, where torch's own libgomp.so.1 is the one the extension then uses (at::parallel_for)
        openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
        return load("meteora_cpu_mix", [str(source)], extra_cflags=["-O3", *openmp], extra_ldflags=openmp, verbose=False)
    except Exception as err:  # no compiler, no ninja, a failed build: the torch-operation form instead
        warnings.warn(f"meteora: the CPU mixture extension ({source.name}) could not be built, so the CPU layers "
                      f"use torch operations (the same routing, slower at few tokens): {err}", stacklevel=2)
        return None


def stacked_mix(ext: ModuleType, y: torch.Tensor, lora_b_rows: torch.Tensor, scaling: torch.Tensor, top_k: int,
                temperature: float, mode: str) -> torch.Tensor:
    """:func:`meteora.kernels.dense.dense_stacked_mix` in one call of the extension ``ext``: y (T, S) on the CPU
    with unit last stride, lora_b_rows (N, r, d_out) in y's dtype, scaling (N,) (used in the accumulation
    dtype; shapes checked in C++, ValueError). The same routing; the output within rounding (the softmax's
    exponentials, and a sum over the k r chosen terms instead of N r)."""
    return ext.stacked_mix(y, lora_b_rows, scaling, top_k, temperature, MODES[mode])


def routed_mix(ext: ModuleType, gate_logits: torch.Tensor, hidden: torch.Tensor, lora_b: torch.Tensor, scaling: torch.Tensor,
               base: torch.Tensor | None, top_k: int, temperature: float, mode: str):
    """:func:`meteora.kernels.dense.dense_mix` in one call of the extension: gate_logits (T, N) and hidden (T, N r)
    on the CPU in one dtype, lora_b (N, d_out, r), base (T, d_out) or None. Returns (out, logits, indices,
    weights) as it does: the same routing, the output within rounding."""
    return tuple(ext.routed_mix(gate_logits, hidden, base, lora_b.permute(0, 2, 1), scaling, top_k, temperature, MODES[mode]))
