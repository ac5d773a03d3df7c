"""The mixture-of-LoRA op: one entry, :func:`moe_lora`, several forward strategies.

For a token x (d_in,), N adapters (A_i: r x d_in, B_i: d_out x r, scaling s_i) and a gate W_g (N x d_in):

    logits = W_g x,   (indices, w) = route(logits),   delta = sum_j w_j s_{i_j} B_{i_j} (A_{i_j} x)

Strategies (all compute in x's dtype with float32 accumulation, float64 stays float64; every one takes any
number of tokens, zero included):

* ``"reference"``: every adapter on every token in float32/float64, then the chosen ones picked; for tests.
* ``"loop"``: the paper's loop-original: per adapter, gather its tokens, apply it, index-add back.
* ``"bmm"``: the paper's bmm-torch: a copy of A and B per (token, chosen adapter), two batched matmuls.
* ``"triton"``: the paper's Triton idea: kernels that read the chosen adapters in place (CUDA; float64
  takes the dense form).
* ``"fused"``: ours, the operator ``torch.ops.meteora.moe_lora`` (:mod:`meteora.kernels.op`): on CUDA the
  Triton kernels of :mod:`meteora.kernels.fused` (gate and routing fused, the delta written into the base
  output), elsewhere and for float64 one GEMM of x against all adapters' A, the routing weights scattered
  on, one GEMM against all adapters' B. Differentiable into x, the gate and the adapters (MoLoRA trains
  them), traced by torch.compile without graph breaks.
* ``"auto"``: the strategy :data:`AUTO_TABLE` gives for the device, dtype, gradients and token count.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import NamedTuple

import torch

from .kernels.dense import accumulation_dtype
from .kernels.op import moe_lora_op
from .routing import Routing, check_routing_args, route_unchecked

STRATEGIES = ("reference", "loop", "bmm", "triton", "fused", "auto")

Mixer = Callable[..., torch.Tensor]


class AutoRule(NamedTuple):
    """One row of :data:`AUTO_TABLE`: where it applies (None: any) and the strategy it picks."""

    device: str | None
    dtypes: tuple[torch.dtype, ...] | None
    grad: bool | None
    min_tokens: int
    max_tokens: int | None
    strategy: str


# What "auto" picks, the first matching row winning; from side-by-side measurements of the 7 projections of a
# decoder layer (reports/benchmark/: benchmarks/, layer section). On CUDA the operator's Triton kernels at every
# token count, its dense form for float64. On CPU (SmolLM2-135M shapes, 10 adapters, r=8, float32, 2 cores)
# the operator's CPU form (the C++ mixture of kernels/cpu_mix.cpp) is the fastest strategy measured at every
# token count: called on its own, 1.24x / 1.33x / 1.21x a single LoRA at 1 / 16 / 256 tokens, against
# 1.70x / 2.66x / 5.45x for bmm and 2.03x / 3.40x / 1.87x for loop (random routing, reports/benchmark/cpu.json).
# Rows for other strategies go here when a measurement favours them somewhere.
AUTO_TABLE: tuple[AutoRule, ...] = (
    AutoRule("cuda", None, None, 0, None, "fused"),
    AutoRule("cpu", None, None, 0, None, "fused"),
    AutoRule(None, None, None, 0, None, "fused"),
)


@functools.lru_cache(maxsize=4096)
def auto_strategy(device: str, dtype: torch.dtype, grad: bool, num_tokens: int, table: tuple[AutoRule, ...] = AUTO_TABLE) -> str:
    """The strategy of the first row of ``table`` matching a device type, dtype, whether gradients are
    recorded and a token count (cached: the layers ask on every call)."""
    for rule in table:
        if ((rule.device is None or rule.device == device) and (rule.dtypes is None or dtype in rule.dtypes)
                and (rule.grad is None or rule.grad == grad) and rule.min_tokens <= num_tokens
                and (rule.max_tokens is None or num_tokens <= rule.max_tokens)):
            return rule.strategy
    raise LookupError(f"no strategy for device {device!r}, {dtype}, grad={grad}, {num_tokens} tokens in the table")


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records an operation on these tensors."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _scaling_tensor(scaling: torch.Tensor | float, num_adapters: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(N,) scaling in the accumulation dtype of ``dtype`` (x's)."""
    acc = accumulation_dtype(dtype)
    if isinstance(scaling, torch.Tensor):
        if scaling.shape != (num_adapters,):
            raise ValueError(f"scaling has shape {tuple(scaling.shape)}, expected ({num_adapters},)")
        return scaling.to(device=device, dtype=acc)
    return torch.full((num_adapters,), float(scaling), device=device, dtype=acc)


def check_shapes(
    x: torch.Tensor,
    gate_weight: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    gate_input: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> None:
    """Raise TypeError naming a tensor that is not floating point, ValueError naming the first tensor whose
    shape does not fit the others (x (..., d_in), gate_weight (N, d_in), lora_a (N, r, d_in), lora_b
    (N, d_out, r), gate_input like x, out (..., d_out))."""
    named = {"x": x, "gate_weight": gate_weight, "lora_a": lora_a, "lora_b": lora_b, "gate_input": gate_input, "out": out}
    for name, tensor in named.items():
        if tensor is not None and not tensor.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")
    if x.dim() < 1:
        raise ValueError(f"x must be (..., d_in), got a {x.dim()}-dimensional tensor")
    if lora_a.dim() != 3 or lora_b.dim() != 3:
        raise ValueError(f"lora_a must be (N, r, d_in) and lora_b (N, d_out, r); got {tuple(lora_a.shape)} and {tuple(lora_b.shape)}")
    num_adapters, rank, d_in = lora_a.shape
    if lora_b.shape[0] != num_adapters or lora_b.shape[2] != rank:
        raise ValueError(
            f"lora_b has shape {tuple(lora_b.shape)}, expected ({num_adapters}, d_out, {rank}) to match lora_a {tuple(lora_a.shape)}"
        )
    if x.shape[-1] != d_in:
        raise ValueError(f"x has last dimension {x.shape[-1]}, but the adapters take d_in={d_in}")
    if gate_weight is not None and gate_weight.shape != (num_adapters, d_in):
        raise ValueError(f"gate_weight has shape {tuple(gate_weight.shape)}, expected ({num_adapters}, {d_in})")
    if gate_input is not None and gate_input.shape != x.shape:
        raise ValueError(f"gate_input has shape {tuple(gate_input.shape)}, expected x's {tuple(x.shape)}")
    if out is not None and out.shape != (*x.shape[:-1], lora_b.shape[1]):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {(*x.shape[:-1], lora_b.shape[1])}")


# ----------------------------------------------------------------------------------------------
# Mixers: (x (T, d_in), indices (T, k), weights (T, k) float, lora_a, lora_b, scaling (N,)) -> (T, d_out)
# ----------------------------------------------------------------------------------------------

def mix_reference(x, indices, weights, lora_a, lora_b, scaling):
    """Every adapter on every token (T x N x d_out), then the chosen ones weighted and summed."""
    acc = accumulation_dtype(x.dtype)
    per_adapter = torch.einsum("tnr,nor->tno", torch.einsum("td,nrd->tnr", x.to(acc), lora_a.to(acc)), lora_b.to(acc))
    coef = torch.zeros(x.shape[0], lora_a.shape[0], dtype=acc, device=x.device)
    coef = coef.scatter_add(1, indices, weights.to(acc) * scaling.to(acc)[indices])
    return torch.einsum("tn,tno->to", coef, per_adapter).to(x.dtype)


def mix_loop(x, indices, weights, lora_a, lora_b, scaling):
    """Loop over adapters; each gathers its tokens, applies itself and index-adds back."""
    acc = accumulation_dtype(x.dtype)
    delta = torch.zeros(x.shape[0], lora_b.shape[1], dtype=acc, device=x.device)
    for i in range(lora_a.shape[0]):
        tokens, slots = torch.nonzero(indices == i, as_tuple=True)
        if tokens.numel() == 0:
            continue
        out = (x[tokens] @ lora_a[i].T) @ lora_b[i].T
        coef = weights[tokens, slots].to(acc) * scaling[i].to(acc)
        delta = delta.index_add(0, tokens, out.to(acc) * coef[:, None])
    return delta.to(x.dtype)


def mix_bmm(x, indices, weights, lora_a, lora_b, scaling):
    """Copies of A and B for every (token, chosen adapter) pair, then two batched matmuls."""
    num_tokens, top_k = indices.shape
    acc = accumulation_dtype(x.dtype)
    a_copies = lora_a[indices].flatten(0, 1)  # (T*k, r, d_in)
    b_copies = lora_b[indices].flatten(0, 1)  # (T*k, d_out, r)
    x_rep = x.repeat_interleave(top_k, dim=0).unsqueeze(-1)  # (T*k, d_in, 1)
    out = torch.bmm(b_copies, torch.bmm(a_copies, x_rep)).squeeze(-1)  # (T*k, d_out)
    coef = (weights.to(acc) * scaling.to(acc)[indices]).reshape(-1, 1)
    return (out.to(acc) * coef).view(num_tokens, top_k, lora_b.shape[1]).sum(1).to(x.dtype)


def mix_dense(x, indices, weights, lora_a, lora_b, scaling):
    """One GEMM against all adapters' A, routing weights scattered on, one GEMM against all B.

    Extra memory O(T x N x r); differentiable in x, weights, lora_a and lora_b (MoLoRA trains them).
    """
    num_adapters, rank, d_in = lora_a.shape
    acc = accumulation_dtype(x.dtype)
    hidden = (x @ lora_a.reshape(num_adapters * rank, d_in).T).view(x.shape[0], num_adapters, rank)  # (T, N, r)
    coef = torch.zeros(x.shape[0], num_adapters, dtype=acc, device=x.device)
    coef = coef.scatter_add(1, indices, weights.to(acc) * scaling.to(acc)[indices])
    hidden = (hidden.to(acc) * coef[..., None]).to(x.dtype).view(-1, num_adapters * rank)
    return hidden @ lora_b.transpose(1, 2).reshape(num_adapters * rank, -1)


def mix_triton(x, indices, weights, lora_a, lora_b, scaling):
    """The chosen adapters read in place by Triton kernels (see :mod:`meteora.kernels`); float64, which the
    kernels do not take, goes through :func:`mix_dense`."""
    if x.dtype == torch.float64:
        return mix_dense(x, indices, weights, lora_a, lora_b, scaling)
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("strategy='triton' needs a CUDA device (or TRITON_INTERPRET=1 to test the kernels on CPU)")
    if lora_a.requires_grad or lora_b.requires_grad:
        raise NotImplementedError("strategy='triton' has no gradient for the adapters themselves; use 'fused' to train them")
    from .kernels import triton_mixture

    return triton_mixture(x, indices, weights.float(), lora_a, lora_b, scaling.float())


MIXERS: dict[str, Mixer] = {
    "reference": mix_reference,
    "loop": mix_loop,
    "bmm": mix_bmm,
    "triton": mix_triton,
    "fused": mix_dense,
}


def resolve_strategy(strategy: str, x: torch.Tensor, grad: bool = False) -> str:
    """A concrete strategy: ``strategy`` itself, or for ``"auto"`` the :data:`AUTO_TABLE` row for x's device,
    dtype and token count and whether gradients are recorded."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    if strategy != "auto":
        return strategy
    return auto_strategy(x.device.type, x.dtype, grad, x.numel() // max(x.shape[-1], 1))


def mix_adapters(
    x: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: torch.Tensor | float,
    strategy: str = "auto",
) -> torch.Tensor:
    """Apply given routing: x (..., d_in), indices/weights (..., k) -> delta (..., d_out) in x's dtype."""
    check_shapes(x, None, lora_a, lora_b)
    strategy = resolve_strategy(strategy, x, needs_grad(x, weights, lora_a, lora_b))
    leading = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    scale = _scaling_tensor(scaling, lora_a.shape[0], x.device, x.dtype)
    lora_a, lora_b = lora_a.to(x.dtype), lora_b.to(x.dtype)
    idx2 = indices.reshape(x2.shape[0], indices.shape[-1])
    w2 = weights.reshape(x2.shape[0], weights.shape[-1])
    if strategy == "fused" and x.is_cuda and x.dtype != torch.float64 and not (lora_a.requires_grad or lora_b.requires_grad):
        delta = mix_triton(x2, idx2, w2, lora_a, lora_b, scale)
    else:
        delta = MIXERS[strategy](x2, idx2, w2, lora_a, lora_b, scale)
    return delta.reshape(*leading, lora_b.shape[1])


def moe_lora(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: torch.Tensor | float,
    top_k: int,
    temperature: float = 1.0,
    strategy: str = "auto",
    *,
    mode: str = "topk",
    gate_input: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Routing]:
    """The gated mixture of LoRA adapters, checked (the layer calls the unchecked operator).

    x: (..., d_in); gate_weight: (N, d_in); lora_a: (N, r, d_in); lora_b: (N, d_out, r);
    scaling: (N,) or a float; gate_input: (..., d_in), what the gate reads if not x (sentence routing).
    Returns delta (..., d_out) in x's dtype and the :class:`Routing` with leading shape x.shape[:-1].
    With ``out`` (..., d_out), e.g. the base layer's output, ``out + delta`` is returned instead (``out``
    itself is left as it is; the fused strategy adds it in the kernel's epilogue, with no delta tensor).
    """
    check_shapes(x, gate_weight, lora_a, lora_b, gate_input, out)
    num_adapters = lora_a.shape[0]
    check_routing_args(num_adapters, top_k, temperature, mode)
    top_k = int(top_k)
    grad = needs_grad(x, gate_weight, lora_a, lora_b, gate_input, out)
    strategy = resolve_strategy(strategy, x, grad)
    leading = x.shape[:-1]
    d_in, d_out = x.shape[-1], lora_b.shape[1]
    dtype = x.dtype
    x2 = x.reshape(-1, d_in)
    gate_x = None if gate_input is None else gate_input.reshape(-1, d_in).to(dtype)
    if strategy == "fused":
        scale = _scaling_tensor(scaling, num_adapters, x.device, dtype)
        base = None if out is None else out.reshape(-1, d_out).to(dtype)
        result, logits, indices, weights, _ = moe_lora_op(
            x2.contiguous(), gate_x, gate_weight.to(dtype), lora_a.to(dtype), lora_b.to(dtype), scale, base,
            top_k, float(temperature), mode,
        )
        return result.reshape(*leading, d_out), Routing(logits, indices, weights).reshape(*leading)
    gate_x = x2 if gate_x is None else gate_x
    routing = route_unchecked((gate_x @ gate_weight.to(dtype).T).to(accumulation_dtype(dtype)), top_k, temperature, mode)
    delta = mix_adapters(x2, routing.indices, routing.weights, lora_a, lora_b, scaling, strategy).reshape(*leading, d_out)
    return (delta if out is None else out + delta), routing.reshape(*leading)


def lora_delta(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float | torch.Tensor) -> torch.Tensor:
    """One LoRA: x (..., d_in), lora_a (r, d_in), lora_b (d_out, r) -> scaling * B A x (..., d_out)."""
    return (x @ lora_a.to(x.dtype).T) @ lora_b.to(x.dtype).T * scaling
