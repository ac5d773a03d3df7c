"""The mixture as a PyTorch operator, ``torch.ops.meteora.moe_lora``, for torch.compile and autograd.

Registered with ``torch.library.Library`` ``define``/``impl`` (one implementation per device, a fake one
for tracing, an autograd formula through a second operator, ``meteora::moe_lora_backward``), not with
``torch.library.custom_op``: on CPU the dispatcher costs about 8 us a call this way against 12 us through
``custom_op`` (``python -m benchmarks.op_overhead``). Calling the implementation directly costs nothing,
so :func:`moe_lora_op` does that when nothing traces (eager inference; eager training through a plain
``torch.autograd.Function`` with the operator's own context and backward), the operator only under
torch.compile.

``torch.ops.meteora.moe_lora_mix`` is the second half alone: the routing and the chosen B's from a gate-logit
and down-projection block that the caller already computed (one GEMM against the stacked [W; W_g; A] in
:class:`meteora.MeteoRALinear`), with its own autograd formula (``meteora::moe_lora_mix_backward``: the
gradients of the gate logits, of h = x A^T and of B; the caller's product gives those of x and W_g).

Implementations: on CUDA in float16 / bfloat16 / float32, the Triton kernels of :mod:`meteora.kernels.fused`;
everywhere else (CPU, float64, no tokens) the plain torch form of :mod:`meteora.kernels.dense`.
"""
from __future__ import annotations

import torch

from ._common import SUPPORTED_DTYPES
from .dense import accumulation_dtype, dense_backward, dense_forward, dense_mix, dense_mix_backward
from .fused import fused_backward, fused_forward, fused_mix, fused_mix_backward

_LIB = torch.library.Library("meteora", "DEF")
_LIB.define(
    "moe_lora(Tensor x, Tensor? gate_x, Tensor gate_weight, Tensor lora_a, Tensor lora_b, Tensor scaling, Tensor? base, "
    "int top_k, float temperature, str mode) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)
_LIB.define(
    "moe_lora_mix(Tensor gate_logits, Tensor hidden, Tensor lora_b, Tensor scaling, Tensor? base, int top_k, "
    "float temperature, str mode) -> (Tensor, Tensor, Tensor, Tensor)"
)
_LIB.define(
    "moe_lora_backward(Tensor grad_out, Tensor? grad_logits, Tensor? grad_weights, Tensor x, Tensor? gate_x, "
    "Tensor gate_weight, Tensor lora_a, Tensor lora_b, Tensor scaling, Tensor hidden, Tensor logits, Tensor indices, "
    "Tensor weights, int top_k, float temperature, str mode, bool[] needs) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)
_LIB.define(
    "moe_lora_mix_backward(Tensor grad_out, Tensor? grad_logits, Tensor? grad_weights, Tensor hidden, Tensor lora_b, "
    "Tensor scaling, Tensor logits, Tensor indices, Tensor weights, int top_k, float temperature, str mode, bool want_b) "
    "-> (Tensor, Tensor, Tensor)"
)


def _on_kernels(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype in SUPPORTED_DTYPES and x.shape[0] > 0


def moe_lora_impl(x, gate_x, gate_weight, lora_a, lora_b, scaling, base, top_k, temperature, mode):
    """The operator's computation for any device: (out = base + delta, logits, indices, weights, h).

    x (T, d_in) contiguous; gate_x (T, d_in) or None; gate_weight (N, d_in); lora_a (N, r, d_in); lora_b
    (N, d_out, r); base (T, d_out) or None; all in x's dtype; scaling (N,) float32 (float64 for float64 x).
    Returns out (T, d_out), logits (T, N) and weights (T, k) float32 (float64 for float64 x), indices (T, k)
    int64 (k = N for mode soft), h = x A^T (T, N r) in x's dtype (kept for the backward)."""
    if _on_kernels(x):
        return fused_forward(x, gate_x, gate_weight, lora_a, lora_b, scaling, base, top_k, temperature, mode)
    return dense_forward(x, gate_x, gate_weight, lora_a, lora_b, scaling, base, top_k, temperature, mode)


def moe_lora_mix_impl(gate_logits, hidden, lora_b, scaling, base, top_k, temperature, mode):
    """The mixture from products already made: gate_logits (T, N) and
    h = x A^T (T, N r), in x's dtype with unit last stride, e.g. column blocks of one GEMM against the stacked
    [W; W_g; A] (:class:`meteora.MeteoRALinear`); the rest as for :func:`moe_lora_impl`. Returns (out,
    logits, indices, weights)."""
    if _on_kernels(hidden):
        return fused_mix(gate_logits, hidden, lora_b, scaling, base, top_k, temperature, mode)
    return dense_mix(gate_logits, hidden, lora_b, scaling, base, top_k, temperature, mode)


def _fake(x, gate_x, gate_weight, lora_a, lora_b, scaling, base, top_k, temperature, mode):
    num_tokens = x.shape[0]
    num_adapters, rank, _ = lora_a.shape
    k = num_adapters if mode == "soft" else top_k
    acc = accumulation_dtype(x.dtype)
    return (x.new_empty(num_tokens, lora_b.shape[1]), x.new_empty(num_tokens, num_adapters, dtype=acc),
            x.new_empty(num_tokens, k, dtype=torch.int64), x.new_empty(num_tokens, k, dtype=acc),
            x.new_empty(num_tokens, num_adapters * rank))


def _mix_fake(gate_logits, hidden, lora_b, scaling, base, top_k, temperature, mode):
    num_tokens, num_adapters = gate_logits.shape
    k = num_adapters if mode == "soft" else top_k
    acc = accumulation_dtype(hidden.dtype)
    return (hidden.new_empty(num_tokens, lora_b.shape[1]), hidden.new_empty(num_tokens, num_adapters, dtype=acc),
            hidden.new_empty(num_tokens, k, dtype=torch.int64), hidden.new_empty(num_tokens, k, dtype=acc))


def _backward_impl(grad_out, grad_logits, grad_weights, x, gate_x, gate_weight, lora_a, lora_b, scaling, hidden,
                   logits, indices, weights, top_k, temperature, mode, needs):
    grad_out = grad_out.contiguous()
    if _on_kernels(x):
        grads = fused_backward(grad_out, grad_logits, grad_weights, x, gate_x, gate_weight, lora_a, lora_b, scaling, hidden,
                               logits, indices, top_k, temperature, mode, needs)
    else:
        grads = dense_backward(grad_out, grad_logits, grad_weights, x, gate_x, gate_weight, lora_a, lora_b, scaling, hidden,
                               logits, indices, weights, temperature, mode, needs)
    # An operator returns tensors: a gradient not asked for is an empty one.
    return tuple(x.new_empty(0) if g is None else g.contiguous() for g in grads)


def _backward_fake(grad_out, grad_logits, grad_weights, x, gate_x, gate_weight, lora_a, lora_b, scaling, hidden,
                   logits, indices, weights, top_k, temperature, mode, needs):
    shapes = (x.shape, None if gate_x is None else gate_x.shape, gate_weight.shape, lora_a.shape, lora_b.shape)
    return tuple(x.new_empty(shape) if want and shape is not None else x.new_empty(0) for want, shape in zip(needs, shapes))


def _mix_backward_impl(grad_out, grad_logits, grad_weights, hidden, lora_b, scaling, logits, indices, weights, top_k,
                       temperature, mode, want_b):
    grad_out = grad_out.contiguous()
    if _on_kernels(hidden):
        grads = fused_mix_backward(grad_out, grad_logits, grad_weights, hidden, lora_b, scaling, logits, indices, top_k,
                                   temperature, mode, want_b)
    else:
        grads = dense_mix_backward(grad_out, grad_logits, grad_weights, hidden, lora_b, scaling, logits, indices, weights,
                                   temperature, mode, want_b)
    return tuple(hidden.new_empty(0) if g is None else g.contiguous() for g in grads)


def _mix_backward_fake(grad_out, grad_logits, grad_weights, hidden, lora_b, scaling, logits, indices, weights, top_k,
                       temperature, mode, want_b):
    return (hidden.new_empty(logits.shape), hidden.new_empty(hidden.shape),
            hidden.new_empty(lora_b.shape) if want_b else hidden.new_empty(0))


_LIB.impl("moe_lora", moe_lora_impl, "CompositeExplicitAutograd")
_LIB.impl("moe_lora_mix", moe_lora_mix_impl, "CompositeExplicitAutograd")
_LIB.impl("moe_lora_backward", _backward_impl, "CompositeExplicitAutograd")
_LIB.impl("moe_lora_mix_backward", _mix_backward_impl, "CompositeExplicitAutograd")
torch.library.register_fake("meteora::moe_lora", _fake, lib=_LIB)
torch.library.register_fake("meteora::moe_lora_mix", _mix_fake, lib=_LIB)
torch.library.register_fake("meteora::moe_lora_backward", _backward_fake, lib=_LIB)
torch.library.register_fake("meteora::moe_lora_mix_backward", _mix_backward_fake, lib=_LIB)


def _setup_context(ctx, inputs, output):
    x, gate_x, gate_weight, lora_a, lora_b, scaling, base, top_k, temperature, mode = inputs
    _, logits, indices, weights, hidden = output
    ctx.save_for_backward(x, gate_x, gate_weight, lora_a, lora_b, scaling, hidden, logits, indices, weights)
    ctx.routing = (top_k, temperature, mode)
    ctx.has_gate_x = gate_x is not None
    ctx.has_base = base is not None
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_logits, _grad_indices, grad_weights, _grad_hidden):
    """h, the fifth output, is kept for this backward and takes no gradient of its own."""
    return _backward_through(torch.ops.meteora.moe_lora_backward, ctx, grad_out, grad_logits, grad_weights)


def _backward_through(backward_op, ctx, grad_out, grad_logits, grad_weights):
    """The operator's gradients, computed by ``backward_op`` (the registered operator, which torch.compile
    traces, or its implementation, called directly in eager training)."""
    x, gate_x, gate_weight, lora_a, lora_b, scaling, hidden, logits, indices, weights = ctx.saved_tensors
    if not ctx.has_gate_x:
        gate_x = None
    needs = [ctx.needs_input_grad[i] for i in (0, 1, 2, 3, 4)]
    if grad_out is None:
        grad_out = x.new_zeros(x.shape[0], lora_b.shape[1])
    grads = backward_op(
        grad_out, grad_logits, grad_weights, x, gate_x, gate_weight, lora_a, lora_b, scaling, hidden, logits, indices,
        weights, *ctx.routing, needs,
    )
    grad_x, grad_gate_x, grad_gate, grad_a, grad_b = (g if want else None for g, want in zip(grads, needs))
    grad_base = grad_out if ctx.has_base and ctx.needs_input_grad[6] else None
    return grad_x, grad_gate_x, grad_gate, grad_a, grad_b, None, grad_base, None, None, None


torch.library.register_autograd("meteora::moe_lora", _backward, setup_context=_setup_context, lib=_LIB)


class _EagerMoELoRA(torch.autograd.Function):
    """The operator's forward and autograd formula without the dispatcher, for eager training: the same
    implementation, context and backward, minus the Python layers of ``register_autograd`` and two
    dispatcher calls per projection. The context is set up inside ``forward``: with a separate
    ``setup_context``, ``Function.apply`` binds the arguments through ``inspect.signature`` on every call."""

    @staticmethod
    def forward(ctx, x, gate_x, gate_weight, lora_a, lora_b, scaling, base, top_k, temperature, mode):
        inputs = (x, gate_x, gate_weight, lora_a, lora_b, scaling, base, top_k, temperature, mode)
        output = moe_lora_impl(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, grad_out, grad_logits, _grad_indices, grad_weights, _grad_hidden):
        return _backward_through(_backward_impl, ctx, grad_out, grad_logits, grad_weights)


def _mix_setup_context(ctx, inputs, output):
    _, hidden, lora_b, scaling, base, top_k, temperature, mode = inputs
    _, logits, indices, weights = output
    ctx.save_for_backward(hidden, lora_b, scaling, logits, indices, weights)
    ctx.routing = (top_k, temperature, mode)
    ctx.has_base = base is not None
    ctx.set_materialize_grads(False)


def _mix_backward(ctx, grad_out, grad_logits, _grad_indices, grad_weights):
    hidden, lora_b, scaling, logits, indices, weights = ctx.saved_tensors
    if grad_out is None:
        grad_out = hidden.new_zeros(hidden.shape[0], lora_b.shape[1])
    want_b = ctx.needs_input_grad[2]
    grad_gate_logits, grad_hidden, grad_b = torch.ops.meteora.moe_lora_mix_backward(
        grad_out, grad_logits, grad_weights, hidden, lora_b, scaling, logits, indices, weights, *ctx.routing, want_b,
    )
    grad_base = grad_out if ctx.has_base and ctx.needs_input_grad[4] else None
    return grad_gate_logits, grad_hidden, grad_b if want_b else None, None, grad_base, None, None, None


torch.library.register_autograd("meteora::moe_lora_mix", _mix_backward, setup_context=_mix_setup_context, lib=_LIB)


def moe_lora_op(x, gate_x, gate_weight, lora_a, lora_b, scaling, base, top_k: int, temperature: float, mode: str):
    """The operator (see :func:`moe_lora_impl` for the arguments), unchecked: through the dispatcher when
    torch.compile traces, its autograd formula without the dispatcher when autograd records (eager
    training), a direct call of the implementation otherwise."""
    if torch.compiler.is_compiling():
        return torch.ops.meteora.moe_lora(x, gate_x, gate_weight, lora_a, lora_b, scaling, base, top_k, temperature, mode)
    if torch.is_grad_enabled() and (
            x.requires_grad or gate_weight.requires_grad or lora_a.requires_grad or lora_b.requires_grad
            or (gate_x is not None and gate_x.requires_grad) or (base is not None and base.requires_grad)):
        return _EagerMoELoRA.apply(x, gate_x, gate_weight, lora_a, lora_b, scaling, base, top_k, temperature, mode)
    return moe_lora_impl(x, gate_x, gate_weight, lora_a, lora_b, scaling, base, top_k, temperature, mode)


def moe_lora_mix_op(gate_logits, hidden, lora_b, scaling, base, top_k: int, temperature: float, mode: str):
    """``torch.ops.meteora.moe_lora_mix`` (see :func:`moe_lora_mix_impl`), unchecked: through the dispatcher
    when torch.compile traces or autograd records (gradients reach gate_logits, hidden, lora_b and base), a
    direct call otherwise."""
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (
            gate_logits.requires_grad or hidden.requires_grad or lora_b.requires_grad
            or (base is not None and base.requires_grad))):
        return torch.ops.meteora.moe_lora_mix(gate_logits, hidden, lora_b, scaling, base, top_k, temperature, mode)
    return moe_lora_mix_impl(gate_logits, hidden, lora_b, scaling, base, top_k, temperature, mode)
