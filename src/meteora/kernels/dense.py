"""The mixture in plain torch operations (CPU, and float64 anywhere): the forward and its backward formula.

Forward for T tokens, N adapters of rank r (everything in x's dtype, routing in float32, float64 for float64):

    h = x A_flat^T (T, N r),  logits = g W_g^T (T, N),  coef = w s scattered onto (T, N),
    out = base + (coef * h) B_flat                       (B_flat (N r, d_out): row e r + q = B_e[:, q])

where g is the gate's input (x itself, or a sentence summary). The backward gives x, g, W_g, A and B
their gradients (MoLoRA trains the adapters) from the saved h and the routing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..routing import route_unchecked, scaled_logits
from . import cpu


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for every other floating dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def flat_b(lora_b: torch.Tensor) -> torch.Tensor:
    """B (N, d_out, r) as (N r, d_out); a view when B is stored that way (see :class:`meteora.MeteoRALinear`)."""
    num_adapters, d_out, rank = lora_b.shape
    return lora_b.permute(0, 2, 1).reshape(num_adapters * rank, d_out)


def routing_coef(indices: torch.Tensor, weights: torch.Tensor, scaling: torch.Tensor, num_adapters: int, soft: bool) -> torch.Tensor:
    """(T, N) w s of every adapter (0 where not chosen), in the weights' dtype."""
    scaling = scaling.to(weights.dtype)
    if soft:
        return weights * scaling
    # scattering w, then scaling every column: the products w s of gathering s first, one op fewer
    return weights.new_zeros(weights.shape[0], num_adapters).scatter_(1, indices, weights).mul_(scaling)


def dense_forward(x, gate_x, gate_weight, lora_a, lora_b, scaling, base, top_k: int, temperature: float, mode: str):
    """x (T, d_in); gate_x (T, d_in) or None (the gate reads x); gate_weight (N, d_in); lora_a (N, r, d_in);
    lora_b (N, d_out, r); scaling (N,); base (T, d_out) or None. Returns out (T, d_out) = base + delta,
    logits (T, N), indices (T, k) int64, weights (T, k) (k = N for mode soft), h (T, N r)."""
    num_adapters, rank, d_in = lora_a.shape
    hidden = F.linear(x, lora_a.reshape(num_adapters * rank, d_in))
    gate_logits = F.linear(x if gate_x is None else gate_x, gate_weight)
    return (*dense_mix(gate_logits, hidden, lora_b, scaling, base, top_k, temperature, mode), hidden)


def dense_mix(gate_logits, hidden, lora_b, scaling, base, top_k: int, temperature: float, mode: str):
    """Routing and the mixture from the products already made: gate_logits (T, N) and h = x A^T (T, N r)
    in x's dtype with unit last stride (views into one stacked GEMM's output, or plain tensors); the
    rest as for :func:`dense_forward`. Returns (out, logits, indices, weights). On a CPU the C++ form of
    :mod:`meteora.kernels.cpu` where it could be built (the same routing, the output within rounding)."""
    if hidden.device.type == "cpu" and (ext := cpu.extension()) is not None:
        return cpu.routed_mix(ext, gate_logits, hidden, lora_b, scaling, base, top_k, temperature, mode)
    acc = accumulation_dtype(hidden.dtype)
    routing = route_unchecked(gate_logits.to(acc, copy=True), top_k, temperature, mode)  # never an alias of the input
    indices = routing.indices.contiguous()
    out = _mixture(hidden, indices, routing.weights, scaling, flat_b(lora_b), base, mode == "soft")
    return out, routing.logits, indices, routing.weights


def dense_stacked_mix(y: torch.Tensor, lora_b_rows: torch.Tensor, scaling: torch.Tensor, top_k: int, temperature: float,
                      mode: str) -> torch.Tensor:
    """:func:`dense_mix`'s out, the same bits, from :class:`meteora.MeteoRALinear`'s one stacked product, for
    inference with the routing not kept (CPU): y (T, S) = x [W; A_flat; W_g; 0]^T, columns [0, d_out) the base
    output, [d_out, d_out + N r) h, then the N gate logits; lora_b_rows (N, r, d_out) contiguous (B_flat);
    scaling (N,) in the accumulation dtype. Returns out (T, d_out) in y's dtype.

    The same operations as :func:`dense_mix` on the same values, and no others: the logits are read in
    place, no routing is returned, and the per-call Python work is kept to the operations themselves. On a
    CPU, as in :func:`dense_mix`, the C++ form of :mod:`meteora.kernels.cpu` where it could be built (the
    same routing, the output within rounding)."""
    if y.device.type == "cpu" and (ext := cpu.extension()) is not None:
        return cpu.stacked_mix(ext, y, lora_b_rows, scaling, top_k, float(temperature), mode)
    num_adapters, rank, d_out = lora_b_rows.shape
    num_tokens, nr = y.shape[0], num_adapters * rank
    start = d_out + nr
    logits = y[:, start:start + num_adapters]
    if logits.dtype != torch.float64:
        logits = logits.float()
    if mode == "soft":
        coef = scaled_logits(logits, temperature).softmax(-1).mul_(scaling.to(logits.dtype))
    else:
        top, order = logits.sort(dim=-1, descending=True, stable=True)
        if mode == "topk":
            weights = scaled_logits(top[:, :top_k], temperature).softmax(-1)
        else:
            weights = scaled_logits(logits, temperature).softmax(-1).gather(1, order[:, :top_k])
        coef = logits.new_zeros(num_tokens, num_adapters).scatter_(1, order[:, :top_k], weights)
        coef = coef.mul_(scaling.to(logits.dtype))
    mixed = (y[:, d_out:start].view(num_tokens, num_adapters, rank) * coef.unsqueeze(-1)).to(y.dtype)
    return torch.addmm(y[:, :d_out], mixed.view(num_tokens, nr), lora_b_rows.view(nr, d_out))


def _mixture(hidden, indices, weights, scaling, b_flat, base, soft: bool) -> torch.Tensor:
    """base + (coef * h) B_flat: hidden (T, N r) with unit last stride, indices / weights (T, k), b_flat (N r,
    d_out), base (T, d_out) or None."""
    num_tokens, nr = hidden.shape
    num_adapters = scaling.shape[0]
    coef = routing_coef(indices, weights, scaling, num_adapters, soft)
    mixed = (hidden.view(num_tokens, num_adapters, nr // num_adapters) * coef.unsqueeze(-1)).to(hidden.dtype)
    mixed = mixed.view(num_tokens, nr)
    return mixed @ b_flat if base is None else torch.addmm(base, mixed, b_flat)


def routing_backward(dweights: torch.Tensor, logits: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                     temperature: float, mode: str) -> torch.Tensor:
    """Gradient of the logits (T, N) from that of the mixing weights (T, k) through the routing softmax."""
    if mode == "soft":
        return weights * (dweights - (weights * dweights).sum(-1, keepdim=True)) / temperature
    if mode == "topk":
        selected = weights * (dweights - (weights * dweights).sum(-1, keepdim=True)) / temperature
        return torch.zeros_like(logits).scatter_(1, indices, selected)
    probs = torch.softmax(logits / temperature, dim=-1)  # topk_unnormalized: w = softmax(logits)[indices]
    dprobs = torch.zeros_like(logits).scatter_(1, indices, dweights)
    return probs * (dprobs - (probs * dprobs).sum(-1, keepdim=True)) / temperature


def dense_mix_backward(grad_out, grad_logits, grad_weights, hidden, lora_b, scaling, logits, indices, weights,
                       temperature: float, mode: str, want_b: bool):
    """Gradients of :func:`dense_mix`'s out, logits and weights (grad_logits / grad_weights may be None) with
    respect to its inputs: (gate_logits (T, N), hidden (T, N r), lora_b (N, d_out, r) or None unless
    ``want_b``), in hidden's dtype; the base's gradient is grad_out itself."""
    num_tokens, nr = hidden.shape
    num_adapters, rank = logits.shape[1], lora_b.shape[2]
    u = (grad_out @ flat_b(lora_b).T).view(num_tokens, num_adapters, rank)  # u[t, e, q] = <g_t, B_e[:, q]>
    h = hidden.reshape(num_tokens, num_adapters, rank)
    dw_all = (u.to(weights.dtype) * h.to(weights.dtype)).sum(-1) * scaling.to(weights.dtype)  # (T, N)
    dweights = dw_all if mode == "soft" else dw_all.gather(1, indices)
    if grad_weights is not None:
        dweights = dweights + grad_weights
    dlogits = routing_backward(dweights, logits, indices, weights, temperature, mode)
    if grad_logits is not None:
        dlogits = dlogits + grad_logits
    coef = routing_coef(indices, weights, scaling, num_adapters, mode == "soft").unsqueeze(-1)
    coef_u = (u * coef).to(hidden.dtype).view(num_tokens, nr)
    grad_b = None
    if want_b:
        coef_h = (h * coef).to(hidden.dtype).view(num_tokens, nr)
        grad_b = (grad_out.T @ coef_h).view(-1, num_adapters, rank).permute(1, 0, 2)
    return dlogits.to(hidden.dtype), coef_u, grad_b


def dense_backward(grad_out, grad_logits, grad_weights, x, gate_x, gate_weight, lora_a, lora_b, scaling, hidden,
                   logits, indices, weights, temperature: float, mode: str, needs: list[bool]):
    """Gradients (x, gate_x, gate_weight, lora_a, lora_b) of :func:`dense_forward`'s outputs out, logits and
    weights (grad_logits / grad_weights may be None); entries of ``needs`` that are False give None."""
    dlogits, coef_u, grad_b = dense_mix_backward(grad_out, grad_logits, grad_weights, hidden, lora_b, scaling, logits,
                                                 indices, weights, temperature, mode, needs[4])
    return (*input_grads(x, gate_x, gate_weight, lora_a, dlogits, coef_u, needs), grad_b)


def input_grads(x, gate_x, gate_weight, lora_a, dlogits, coef_u, needs: list[bool]):
    """Gradients (x, gate_x, gate_weight, lora_a) of the mixture from the mix operator's backward:
    dlogits (T, E), the gradient of the gate logits, and coef_u (T, E*r), that of every adapter's
    down-projection A_e x_t. The gate reads gate_x (T, d_in) when given, else x (T, d_in); entries of
    ``needs`` (x, gate_x, gate_weight, lora_a, ...) that are False give None."""
    d_in = x.shape[1]
    num_adapters, rank, _ = lora_a.shape
    gate_in = x if gate_x is None else gate_x
    grad_x = grad_gate_x = grad_gate = grad_a = None
    if needs[0]:
        grad_x = coef_u @ lora_a.reshape(-1, d_in)
        if gate_x is None:
            grad_x = grad_x.addmm_(dlogits, gate_weight)
    if needs[1] and gate_x is not None:
        grad_gate_x = dlogits @ gate_weight
    if needs[2]:
        grad_gate = dlogits.T @ gate_in
    if needs[3]:
        grad_a = (coef_u.T @ x).view(num_adapters, rank, d_in)
    return grad_x, grad_gate_x, grad_gate, grad_a
