"""The paper's "Triton" strategy: kernels that read each token's chosen adapters in place (no copies).

Given routing (indices, weights) for T tokens, two per-token kernels compute

    h[t, j]  = A_{i_tj} x_t                                   (gather-shrink, (T, k, r) float32)
    delta[t] = sum_j w_tj s_{i_tj} B_{i_tj} h[t, j]           (gather-expand, (T, d_out))

Both kernels take the adapter tensor through explicit strides, so the backward reuses them on the
transposed adapters: u[t, j] = B_{i_tj}^T g_t (shrink on B^T), dx_t = sum_j w s A^T u (expand on A^T),
dw_tj = s <u[t, j], h[t, j]>. Accumulation is float32 throughout; extra memory O(T k r).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import one_config_under_interpreter, pow2, tl_dtype


@triton.autotune(
    configs=[
        triton.Config({"BD": 256}, num_warps=4),
        triton.Config({"BD": 512}, num_warps=4),
        triton.Config({"BD": 128}, num_warps=2),
    ],
    key=["D", "R"],
    prune_configs_by={"early_config_prune": one_config_under_interpreter},
)
@triton.jit
def _gather_shrink_kernel(
    in_ptr, w_ptr, idx_ptr, h_ptr,
    D, R,
    stride_in_t, stride_w_e, stride_w_r, stride_w_d,
    K: tl.constexpr, RP: tl.constexpr, BD: tl.constexpr,
):
    """h[t, j, :] = W[idx[t, j]] (R x D) @ in[t, :] (D,), one program per (token, slot)."""
    t = tl.program_id(0)
    j = tl.program_id(1)
    e = tl.load(idx_ptr + t * K + j)
    q = tl.arange(0, RP)
    acc = tl.zeros((RP,), dtype=tl.float32)
    w_rows = w_ptr + e * stride_w_e + q[:, None] * stride_w_r
    for d0 in range(0, D, BD):
        d = d0 + tl.arange(0, BD)
        dmask = d < D
        v = tl.load(in_ptr + t * stride_in_t + d, mask=dmask, other=0.0).to(tl.float32)
        w = tl.load(w_rows + d[None, :] * stride_w_d, mask=(q[:, None] < R) & dmask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w * v[None, :], axis=1)
    tl.store(h_ptr + (t * K + j) * R + q, acc, mask=q < R)


@triton.autotune(
    configs=[
        triton.Config({"BN": 256}, num_warps=4),
        triton.Config({"BN": 128}, num_warps=4),
        triton.Config({"BN": 512}, num_warps=8),
    ],
    key=["DOUT", "R"],
    prune_configs_by={"early_config_prune": one_config_under_interpreter},
)
@triton.jit
def _gather_expand_kernel(
    h_ptr, coef_ptr, idx_ptr, w_ptr, out_ptr,
    DOUT, R,
    stride_w_e, stride_w_n, stride_w_r, stride_out_t,
    K: tl.constexpr, RP: tl.constexpr, BN: tl.constexpr, DTYPE: tl.constexpr,
):
    """out[t, n] = sum_j coef[t, j] * W[idx[t, j]][n, :] @ h[t, j, :], one program per (token, block of n)."""
    t = tl.program_id(0)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    nmask = n < DOUT
    q = tl.arange(0, RP)
    qmask = q < R
    acc = tl.zeros((BN,), dtype=tl.float32)
    for j in tl.static_range(K):
        e = tl.load(idx_ptr + t * K + j)
        c = tl.load(coef_ptr + t * K + j)
        h = tl.load(h_ptr + (t * K + j) * R + q, mask=qmask, other=0.0)
        w = tl.load(
            w_ptr + e * stride_w_e + n[:, None] * stride_w_n + q[None, :] * stride_w_r,
            mask=nmask[:, None] & qmask[None, :], other=0.0,
        ).to(tl.float32)
        acc += c * tl.sum(w * h[None, :], axis=1)
    tl.store(out_ptr + t * stride_out_t + n, acc.to(DTYPE), mask=nmask)


def gather_shrink(inp: torch.Tensor, indices: torch.Tensor, weight: torch.Tensor, strides: tuple[int, int, int], rank: int) -> torch.Tensor:
    """h (T, k, rank) float32 = W_e @ inp_t for every chosen e. inp: (T, D) with unit last stride;
    weight: any tensor whose element (e, q, d) sits at e*strides[0] + q*strides[1] + d*strides[2]."""
    num_tokens, top_k = indices.shape
    h = torch.empty(num_tokens, top_k, rank, device=inp.device, dtype=torch.float32)
    _gather_shrink_kernel[(num_tokens, top_k)](
        inp, weight, indices, h, inp.shape[1], rank, inp.stride(0), *strides, K=top_k, RP=pow2(rank),
    )
    return h


def gather_expand(
    h: torch.Tensor, coef: torch.Tensor, indices: torch.Tensor, weight: torch.Tensor, strides: tuple[int, int, int], d_out: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """out (T, d_out) = sum_j coef[t, j] W_e h[t, j]; weight element (e, n, q) at e*s0 + n*s1 + q*s2."""
    num_tokens, top_k, rank = h.shape
    out = torch.empty(num_tokens, d_out, device=h.device, dtype=dtype)
    grid = lambda meta: (num_tokens, triton.cdiv(d_out, meta["BN"]))
    _gather_expand_kernel[grid](
        h, coef, indices, weight, out, d_out, rank, *strides, out.stride(0), K=top_k, RP=pow2(rank), DTYPE=tl_dtype(dtype),
    )
    return out


class _TritonMixture(torch.autograd.Function):
    """delta = sum_j w_j s_j B_j A_j x with the chosen adapters read in place; gradients for x and w."""

    @staticmethod
    def forward(ctx, x, indices, weights, lora_a, lora_b, scaling):
        rank = lora_a.shape[1]
        d_out = lora_b.shape[1]
        coef = (weights * scaling[indices]).contiguous()
        h = gather_shrink(x, indices, lora_a, (lora_a.stride(0), lora_a.stride(1), lora_a.stride(2)), rank)
        delta = gather_expand(h, coef, indices, lora_b, (lora_b.stride(0), lora_b.stride(1), lora_b.stride(2)), d_out, x.dtype)
        ctx.save_for_backward(indices, coef, h, lora_a, lora_b, scaling)
        ctx.mark_non_differentiable(indices)
        return delta

    @staticmethod
    def backward(ctx, grad_delta):
        indices, coef, h, lora_a, lora_b, scaling = ctx.saved_tensors
        rank, d_in = lora_a.shape[1], lora_a.shape[2]
        grad_delta = grad_delta.contiguous()
        # u[t, j] = B_e^T g_t: B (N, d_out, r) read as (N, r, d_out).
        u = gather_shrink(grad_delta, indices, lora_b, (lora_b.stride(0), lora_b.stride(2), lora_b.stride(1)), rank)
        grad_weights = None
        if ctx.needs_input_grad[2]:
            grad_weights = scaling[indices] * (u * h).sum(-1)
        grad_x = None
        if ctx.needs_input_grad[0]:
            # dx_t = sum_j coef A_e^T u[t, j]: A (N, r, d_in) read as (N, d_in, r).
            strides = (lora_a.stride(0), lora_a.stride(2), lora_a.stride(1))
            grad_x = gather_expand(u, coef, indices, lora_a, strides, d_in, grad_delta.dtype)
        return grad_x, None, grad_weights, None, None, None


def triton_mixture(
    x2d: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: torch.Tensor,
) -> torch.Tensor:
    """The paper's Triton strategy for given routing.

    x2d (T, d_in); indices (T, k) int64; weights (T, k) float32; lora_a (N, r, d_in); lora_b (N, d_out, r);
    scaling (N,) float32 -> delta (T, d_out) in x's dtype. Differentiable in x2d and weights (the gate's
    gradient flows through weights); adapters that require grad raise NotImplementedError.
    """
    if lora_a.requires_grad or lora_b.requires_grad:
        raise NotImplementedError(
            "triton_mixture has no gradient for lora_a / lora_b; train the adapters with the 'fused' strategy"
        )
    if x2d.dim() != 2 or indices.shape != weights.shape or indices.shape[0] != x2d.shape[0]:
        raise ValueError(
            f"triton_mixture expects x2d (T, d_in) and indices/weights (T, k); got {tuple(x2d.shape)}, "
            f"{tuple(indices.shape)}, {tuple(weights.shape)}"
        )
    tl_dtype(x2d.dtype)
    if x2d.shape[0] == 0:
        return x2d.new_zeros(0, lora_b.shape[1])
    return _TritonMixture.apply(
        x2d.contiguous(), indices.contiguous(), weights.float().contiguous(), lora_a, lora_b, scaling.float(),
    )
