"""The mixture-of-LoRA op: one entry, :func:`moe_lora`, several forward strategies.

For a token x (d_in,), N adapters (A_i: r x d_in, B_i: d_out x r, scaling s_i) and a gate W_g (N x d_in):

    logits = W_g x,   (indices, w) = route(logits),   delta = sum_j w_j s_{i_j} B_{i_j} (A_{i_j} x)

Strategies (all compute in x's dtype with float32 accumulation, float64 stays float64):

* ``"reference"``: every adapter on every token in float32/float64, then the chosen ones picked; for tests.
* ``"loop"``: the paper's loop-original: per adapter, gather its tokens, apply it, index-add back.
* ``"bmm"``: the paper's bmm-torch: a copy of A and B per (token, chosen adapter), two batched matmuls.
* ``"triton"``: the paper's Triton idea: kernels that read the chosen adapters in place.
* ``"fused"``: ours. On CUDA the Triton kernels of :mod:`meteora.kernels` (gate and routing fused, the
  delta accumulated into the base output); elsewhere one GEMM of x against all adapters' A, the routing
  weights scattered onto it, one GEMM against all adapters' B. Both differentiate into the adapters too
  (MoLoRA trains them).
* ``"auto"``: the fastest correct strategy for the device (see :func:`resolve_strategy`).
"""
from __future__ import annotations

import os
from typing import Callable

import torch

from .routing import Routing, check_routing_args, route

STRATEGIES = ("reference", "loop", "bmm", "triton", "fused", "auto")

Mixer = Callable[..., torch.Tensor]


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scaling_tensor(scaling: torch.Tensor | float, num_adapters: int, device: torch.device) -> torch.Tensor:
    if isinstance(scaling, torch.Tensor):
        if scaling.shape != (num_adapters,):
            raise ValueError(f"scaling has shape {tuple(scaling.shape)}, expected ({num_adapters},)")
        return scaling.to(device=device)
    return torch.full((num_adapters,), float(scaling), device=device)


def check_shapes(x: torch.Tensor, gate_weight: torch.Tensor | None, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
    """Raise ValueError naming the first tensor whose shape does not fit the others."""
    if lora_a.dim() != 3 or lora_b.dim() != 3:
        raise ValueError(f"lora_a must be (N, r, d_in) and lora_b (N, d_out, r); got {tuple(lora_a.shape)} and {tuple(lora_b.shape)}")
    num_adapters, rank, d_in = lora_a.shape
    if lora_b.shape[0] != num_adapters or lora_b.shape[2] != rank:
        raise ValueError(f"lora_b has shape {tuple(lora_b.shape)}, expected ({num_adapters}, d_out, {rank}) to match lora_a {tuple(lora_a.shape)}")
    if x.shape[-1] != d_in:
        raise ValueError(f"x has last dimension {x.shape[-1]}, but the adapters take d_in={d_in}")
    if gate_weight is not None and gate_weight.shape != (num_adapters, d_in):
        raise ValueError(f"gate_weight has shape {tuple(gate_weight.shape)}, expected ({num_adapters}, {d_in})")


# ----------------------------------------------------------------------------------------------
# Mixers: (x (T, d_in), indices (T, k), weights (T, k) float, lora_a, lora_b, scaling (N,)) -> (T, d_out)
# ----------------------------------------------------------------------------------------------

def mix_reference(x, indices, weights, lora_a, lora_b, scaling):
    """Every adapter on every token (T x N x d_out), then the chosen ones weighted and summed."""
    acc = _accumulation_dtype(x.dtype)
    per_adapter = torch.einsum("tnr,nor->tno", torch.einsum("td,nrd->tnr", x.to(acc), lora_a.to(acc)), lora_b.to(acc))
    coef = torch.zeros(x.shape[0], lora_a.shape[0], dtype=acc, device=x.device)
    coef = coef.scatter_add(1, indices, weights.to(acc) * scaling.to(acc)[indices])
    return torch.einsum("tn,tno->to", coef, per_adapter).to(x.dtype)


def mix_loop(x, indices, weights, lora_a, lora_b, scaling):
    """Loop over adapters; each gathers its tokens, applies itself and index-adds back."""
    acc = _accumulation_dtype(x.dtype)
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
    acc = _accumulation_dtype(x.dtype)
    a_copies = lora_a[indices].flatten(0, 1)  # (T*k, r, d_in)
    b_copies = lora_b[indices].flatten(0, 1)  # (T*k, d_out, r)
    x_rep = x.repeat_interleave(top_k, dim=0).unsqueeze(-1)  # (T*k, d_in, 1)
    out = torch.bmm(b_copies, torch.bmm(a_copies, x_rep)).squeeze(-1)  # (T*k, d_out)
    coef = (weights.to(acc) * scaling.to(acc)[indices]).reshape(-1, 1)
    return (out.to(acc) * coef).view(num_tokens, top_k, -1).sum(1).to(x.dtype)


def mix_dense(x, indices, weights, lora_a, lora_b, scaling):
    """One GEMM against all adapters' A, routing weights scattered on, one GEMM against all B.

    Extra memory O(T x N x r); differentiable in x, weights, lora_a and lora_b (MoLoRA trains them).
    """
    num_adapters, rank, d_in = lora_a.shape
    acc = _accumulation_dtype(x.dtype)
    hidden = (x @ lora_a.reshape(num_adapters * rank, d_in).T).view(-1, num_adapters, rank)  # (T, N, r)
    coef = torch.zeros(x.shape[0], num_adapters, dtype=acc, device=x.device)
    coef = coef.scatter_add(1, indices, weights.to(acc) * scaling.to(acc)[indices])
    hidden = (hidden.to(acc) * coef[..., None]).to(x.dtype).view(-1, num_adapters * rank)
    return hidden @ lora_b.transpose(1, 2).reshape(num_adapters * rank, -1)


def mix_triton(x, indices, weights, lora_a, lora_b, scaling):
    """The chosen adapters read in place by Triton kernels (see :mod:`meteora.kernels`)."""
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


def resolve_strategy(strategy: str, x: torch.Tensor) -> str:
    """Map ``"auto"`` to a concrete strategy: the fused path everywhere (Triton kernels on CUDA, the
    dense two-GEMM form on CPU, which measures fastest there at every token count)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    return "fused" if strategy == "auto" else strategy


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
    strategy = resolve_strategy(strategy, x)
    leading = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    scale = _scaling_tensor(scaling, lora_a.shape[0], x.device)
    lora_a, lora_b = lora_a.to(x.dtype), lora_b.to(x.dtype)
    idx2 = indices.reshape(x2.shape[0], -1)
    w2 = weights.reshape(x2.shape[0], -1)
    if strategy == "fused" and x.is_cuda and not (lora_a.requires_grad or lora_b.requires_grad):
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
    """The gated mixture of LoRA adapters.

    x: (..., d_in); gate_weight: (N, d_in); lora_a: (N, r, d_in); lora_b: (N, d_out, r);
    scaling: (N,) or a float; gate_input: (..., d_in), what the gate reads if not x (sentence routing).
    Returns delta (..., d_out) in x's dtype and the :class:`Routing` with leading shape x.shape[:-1].
    With ``out`` (..., d_out), e.g. the base layer's output, ``out + delta`` is returned instead; on CUDA
    the kernels add into ``out`` in place (one read-modify-write, no delta tensor).
    """
    check_shapes(x, gate_weight, lora_a, lora_b)
    num_adapters = lora_a.shape[0]
    check_routing_args(num_adapters, top_k, temperature, mode)
    if gate_input is not None and gate_input.shape != x.shape:
        raise ValueError(f"gate_input has shape {tuple(gate_input.shape)}, expected x's {tuple(x.shape)}")
    strategy = resolve_strategy(strategy, x)
    leading = x.shape[:-1]
    d_out = lora_b.shape[1]
    x2 = x.reshape(-1, x.shape[-1])
    if strategy == "fused" and x.is_cuda and gate_input is None:
        from .kernels import fused_moe_lora

        scale = _scaling_tensor(scaling, num_adapters, x.device).float()
        out2 = None if out is None else out.reshape(-1, d_out)
        delta, logits, indices, weights = fused_moe_lora(
            x2, gate_weight.to(x.dtype), lora_a.to(x.dtype), lora_b.to(x.dtype), scale, top_k, temperature, mode, out=out2
        )
        return delta.reshape(*leading, d_out), Routing(logits, indices, weights).reshape(*leading)
    gate_x = x2 if gate_input is None else gate_input.reshape(-1, x.shape[-1])
    routing = route(gate_x @ gate_weight.to(x.dtype).T, top_k, temperature, mode)
    delta = mix_adapters(x2, routing.indices, routing.weights, lora_a, lora_b, scaling, strategy).reshape(*leading, d_out)
    return (delta if out is None else out + delta), routing.reshape(*leading)


def lora_delta(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float | torch.Tensor) -> torch.Tensor:
    """One LoRA: x (..., d_in), lora_a (r, d_in), lora_b (d_out, r) -> scaling * B A x (..., d_out)."""
    return (x @ lora_a.to(x.dtype).T) @ lora_b.to(x.dtype).T * scaling
