"""The fused mixture-of-LoRA forward and backward (strategy "fused" on CUDA).

Forward, with no host synchronisation anywhere (CUDA-graph capturable):

1. two cuBLAS GEMMs: the gate logits x W_g^T (T, N) and every adapter's down-projection h = x A^T (T, N r),
   both in x's dtype, the same products as the reference's (so the routing is the reference's);
2. one Triton kernel per regime:
   * a handful of tokens (<= GATHER_TOKENS) in a top-k mode: ``_route_gather_kernel``: per token, its top-k
     and softmax, then the rows of the k chosen adapters' B gathered (k loads, no branch between them) and
     added to the base output: decode's regime, where the kernel's latency is the cost;
   * few tokens (< LARGE_TOKENS): ``_route_expand_kernel``: per block of tokens, top-k (the lower index wins
     ties) and softmax of the logits, then the chosen adapters' B as one tensor-core product over the
     adapter axis in which chunks of adapters that no token of the block chose are skipped, added to the
     base output (read in the epilogue) and written in x's dtype;
   * many tokens: ``_route_mix_kernel`` (routing, then H = w s h scattered onto the adapter axis) and one
     cuBLAS GEMM out = base + H B_flat, because re-reading h per output block would cost more than the GEMM.

B is read as B_flat (N r, d_out), row e r + q = B_e[:, q]: :class:`meteora.MeteoRALinear` stores it so, and
its (N, d_out, r) ``lora_b`` is a view. The operator ``torch.ops.meteora.moe_lora`` (:mod:`.op`) calls
:func:`fused_forward` and :func:`fused_backward`; :func:`fused_moe_lora` is the kernels' own checked entry.

The A side is dense: N r d_in multiply-adds per token (4% of a LLaMA3-8B layer at N=28, r=8); the B side
reads only chosen adapters (few tokens) or is one K = N r GEMM (many tokens). Extra memory: h (T, N r),
logits (T, N), and for many tokens H (T, N r).

Backward (gate training): u = g B (cuBLAS), one Triton kernel for the routing backward (dw = s <u, h>, the
top-k softmax Jacobian, the logits' and weights' own gradients), cuBLAS for dx = dlogits W_g + (w s u) A
and dW_g = dlogits^T x; with adapters trained (MoLoRA) also dA = (w s u)^T x and dB = g^T (w s h).

Launch overhead decides the speed at few tokens, so every kernel is compiled without specialising on its
runtime arguments' values and, after its first launch per configuration, launched straight through the
compiled kernel (see :func:`_launch`).
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import INTERPRET, one_config_under_interpreter, pow2, prune_by_tokens, tl_dtype, token_bucket, use_ieee_dot
from .dense import flat_b, input_grads

MODES = {"topk": 0, "soft": 1, "topk_unnormalized": 2}
# From this many tokens on, the forward takes the many-token regime (see the module docstring); measured on
# an H100 at LLaMA3-8B shapes, the few-token kernel's per-block routing and chunk loop already cost more
# than the cuBLAS product at 256 tokens.
LARGE_TOKENS = 64
# Up to this many tokens, top-k modes take the per-token gather kernel: its k loads of R x BN rows of B are
# independent, where the block kernel's chunk loop waits on one load (and one branch) per chunk of adapters.
# Measured with ``python -m benchmarks.few_tokens`` (H200, LLaMA3-8B shapes, graph-replayed layer): the gather
# kernel led at every count timed, 1-48 tokens (0.17-0.19 ms a layer against 0.19-0.25 ms).
GATHER_TOKENS = 48
_COMPILED: dict[tuple, tuple[Any, tuple, dict]] = {}


def _jit(int_args: list[str], ptr_args: list[str]):
    """triton.jit compiled once for all values of the runtime arguments (no specialisation on their
    values or alignment), which is what makes :func:`_launch`'s direct launches valid."""
    try:
        return triton.jit(do_not_specialize=int_args, do_not_specialize_on_alignment=ptr_args)
    except TypeError:  # a Triton without alignment specialisation control
        return triton.jit(do_not_specialize=int_args)


def _first_launch(kernel, grid: Callable[[dict], tuple], args: tuple, constexprs: dict) -> tuple | None:
    """Launch a kernel (a JITFunction, or an Autotuner over one) through Triton (autotuning, compiling).

    Returns (compiled kernel, its constexpr arguments in order, meta) for direct launches of the same
    configuration, or None where there is nothing to reuse (the interpreter, or no compiled kernel came
    back): the next launch then goes through Triton again, so a failed first launch never poisons later ones.
    """
    tuned = isinstance(kernel, triton.runtime.Autotuner)
    jit = kernel.fn if tuned else kernel
    if tuned:
        kernel[grid](*args, **constexprs)
        meta = {**constexprs, **kernel.best_config.all_kwargs()}
        compiled = None if INTERPRET else jit.warmup(*args, grid=grid, **meta)
    else:
        meta = constexprs
        compiled = kernel[grid](*args, **meta)
    if INTERPRET or compiled is None:
        return None
    return compiled, tuple(meta[p.name] for p in jit.params if p.is_constexpr), meta


def _launch(kernel, grid: Callable[[dict], tuple], key: tuple, args: tuple, constexprs: dict) -> None:
    """Launch a kernel with runtime ``args`` and ``constexprs``.

    The first launch per ``key`` goes through Triton (:func:`_first_launch`); later ones call the compiled
    kernel directly, skipping Triton's per-launch argument binding and cache lookup (tens of microseconds
    a launch, the larger part of a decode step's mixture). ``key`` must name everything that selects the
    compiled kernel: dtypes of the tensor arguments and every constexpr; the current device is added here.
    """
    key = (torch.cuda.current_device() if torch.cuda.is_initialized() else -1, *key)
    hit = _COMPILED.get(key)
    if hit is not None:
        compiled, tail, meta = hit
        dims = tuple(grid(meta)) + (1, 1)
        compiled[dims[:3]](*args, *tail)
        return
    entry = _first_launch(kernel, grid, args, constexprs)
    if entry is not None:
        _COMPILED[key] = entry


@triton.jit
def _mma(a, b, acc, DTYPE: tl.constexpr, IEEE: tl.constexpr):
    """acc + a @ b with both operands rounded to DTYPE (tensor cores), or in exact float32 if IEEE."""
    a = a.to(DTYPE)
    b = b.to(DTYPE)
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _route(logits, gcols, N, inv_temp, K: tl.constexpr, KP: tl.constexpr, MODE: tl.constexpr):
    """Routing of a (BM, NP) logits tile (-inf past N); a row with NaN logits still picks adapters below N.

    Returns coef (BM, NP): each adapter's mixing weight (0 if not chosen); probs (BM, NP): softmax over all
    adapters; chosen (BM, NP) bool; idx (BM, KP) int32 and w (BM, KP): the top-k, best first (lower index
    wins ties). For MODE soft every adapter is chosen and idx/w are unused.
    """
    scaled = logits * inv_temp
    row_max = tl.max(scaled, axis=1)
    ex = tl.exp(scaled - row_max[:, None])
    den = tl.sum(ex, axis=1)
    probs = ex / den[:, None]
    kcols = tl.arange(0, KP)
    idx = tl.zeros((logits.shape[0], KP), dtype=tl.int32)
    w = tl.zeros((logits.shape[0], KP), dtype=tl.float32)
    if MODE == 1:
        chosen = logits > float("-inf")
        coef = probs
    else:
        chosen = logits != logits  # all False
        work = logits
        for j in tl.static_range(K):
            best = tl.max(work, axis=1)
            pick = tl.min(tl.where(work == best[:, None], gcols[None, :], gcols.shape[0]), axis=1)
            pick = tl.minimum(pick, N - 1)  # NaN logits match no maximum
            hit = gcols[None, :] == pick[:, None]
            idx = tl.where(kcols[None, :] == j, pick[:, None], idx)
            w = tl.where(kcols[None, :] == j, tl.sum(tl.where(hit, ex, 0.0), axis=1)[:, None], w)
            chosen = chosen | hit
            work = tl.where(hit, float("-inf"), work)
        if MODE == 0:
            kept = tl.where(chosen, ex, 0.0)
            norm = tl.sum(kept, axis=1)
        else:
            norm = den
        coef = tl.where(chosen, ex, 0.0) / norm[:, None]
        w = w / norm[:, None]
    return coef, probs, chosen, idx, w


@triton.jit
def _column_coef(idx, w, adapter, kcols, K: tl.constexpr):
    """(BM, BK) mixing weight of each column's adapter: sum over the k chosen of w where idx matches."""
    col = tl.zeros((idx.shape[0], adapter.shape[0]), dtype=tl.float32)
    for j in tl.static_range(K):
        idx_j = tl.sum(tl.where(kcols[None, :] == j, idx, 0), axis=1)
        w_j = tl.sum(tl.where(kcols[None, :] == j, w, 0.0), axis=1)
        col += tl.where(adapter[None, :] == idx_j[:, None], w_j[:, None], 0.0)
    return col


@triton.jit
def _load_logits(gl_ptr, rows, rmask, gcols, N, stride_t):
    """(BM, NP) float32 gate logits (row stride stride_t); -inf past N."""
    gmask = gcols < N
    logits = tl.load(gl_ptr + rows[:, None] * stride_t + gcols[None, :], mask=rmask[:, None] & gmask[None, :], other=0.0)
    return tl.where(gmask[None, :], logits.to(tl.float32), float("-inf"))


@triton.jit
def _columns_coef(gl_ptr, stride_gl_t, scale_ptr, rows, rmask, cols, cmask, logits, idx, w, kcols, N, R, inv_temp,
                  MODE: tl.constexpr, K: tl.constexpr):
    """(BM, BK) w s of the adapter of each column e r + q of the adapter axis (0 where not chosen)."""
    adapter = cols // R
    if MODE == 1:  # every adapter: its softmax weight, from the logits reloaded per column
        scaled = logits * inv_temp
        row_max = tl.max(scaled, axis=1)
        row_den = tl.sum(tl.exp(scaled - row_max[:, None]), axis=1)
        col_logits = tl.load(gl_ptr + rows[:, None] * stride_gl_t + adapter[None, :], mask=rmask[:, None] & cmask[None, :],
                             other=0.0)
        coef = tl.exp(col_logits.to(tl.float32) * inv_temp - row_max[:, None]) / row_den[:, None]
    else:
        coef = _column_coef(idx, w, adapter, kcols, K)
    return coef * tl.load(scale_ptr + adapter, mask=cmask, other=0.0)[None, :]


@triton.jit
def _store_routing(logits_ptr, idx_ptr, w_ptr, rows, rmask, gcols, kcols, logits, coef, idx, w, N,
                   MODE: tl.constexpr, K: tl.constexpr):
    gmask = rmask[:, None] & (gcols < N)[None, :]
    tl.store(logits_ptr + rows[:, None] * N + gcols[None, :], logits, mask=gmask)
    if MODE == 1:
        tl.store(w_ptr + rows[:, None] * N + gcols[None, :], coef, mask=gmask)
    else:
        kmask = rmask[:, None] & (kcols < K)[None, :]
        tl.store(idx_ptr + rows[:, None] * K + kcols[None, :], idx.to(tl.int64), mask=kmask)
        tl.store(w_ptr + rows[:, None] * K + kcols[None, :], w, mask=kmask)


_EXPAND_PTRS = ["gl_ptr", "h_ptr", "b_ptr", "scale_ptr", "base_ptr", "out_ptr", "logits_ptr", "idx_ptr", "w_ptr"]
_EXPAND_INTS = ["T", "N", "R", "NR", "DOUT", "T_BUCKET", "stride_gl_t", "stride_h_t", "stride_base_t", "col_gl", "col_h",
                "col_base"]
_EXPAND_CONFIGS = [
    triton.Config({"BM": 16, "BN": 128, "BK": 32}, num_warps=4, num_stages=2),
    triton.Config({"BM": 16, "BN": 64, "BK": 32}, num_warps=4, num_stages=2),
    triton.Config({"BM": 16, "BN": 256, "BK": 32}, num_warps=4, num_stages=2),
    triton.Config({"BM": 16, "BN": 128, "BK": 64}, num_warps=4, num_stages=2),
    triton.Config({"BM": 64, "BN": 128, "BK": 32}, num_warps=4, num_stages=2),
    triton.Config({"BM": 64, "BN": 64, "BK": 32}, num_warps=4, num_stages=2),
    triton.Config({"BM": 32, "BN": 128, "BK": 32}, num_warps=4, num_stages=2),
    triton.Config({"BM": 64, "BN": 128, "BK": 64}, num_warps=4, num_stages=2),
]


@triton.autotune(configs=_EXPAND_CONFIGS, key=["T_BUCKET", "DOUT", "NR"],
                 prune_configs_by={"early_config_prune": prune_by_tokens()})
@_jit(_EXPAND_INTS, _EXPAND_PTRS)
def _route_expand_kernel(
    gl_ptr, h_ptr, b_ptr, scale_ptr, base_ptr, out_ptr, logits_ptr, idx_ptr, w_ptr,
    T, N, R, NR, DOUT, T_BUCKET, stride_gl_t, stride_h_t, stride_base_t, col_gl, col_h, col_base, inv_temp,
    MODE: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, NP: tl.constexpr,
    HAS_BASE: tl.constexpr, STORE_ROUTING: tl.constexpr, DTYPE: tl.constexpr, IEEE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """Route a block of tokens and write (base +) sum_e w_te s_e B_e h_te for a block of output columns.
    gl (T, N), h (T, N r) and base (T, DOUT) in x's dtype, starting at columns col_gl, col_h and col_base of
    rows with strides stride_gl_t, stride_h_t and stride_base_t (column blocks of one stacked product, or
    contiguous tensors); B_flat (N r, DOUT) and out (T, DOUT) contiguous. The routing (logits, indices,
    weights) is written only if STORE_ROUTING."""
    gl_ptr += col_gl
    h_ptr += col_h
    base_ptr += col_base
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < T
    gcols = tl.arange(0, NP)
    kcols = tl.arange(0, KP)
    logits = _load_logits(gl_ptr, rows, rmask, gcols, N, stride_gl_t)
    coef, _probs, _chosen, idx, w = _route(logits, gcols, N, inv_temp, K, KP, MODE)
    if STORE_ROUTING and pid_n == 0:
        _store_routing(logits_ptr, idx_ptr, w_ptr, rows, rmask, gcols, kcols, logits, coef, idx, w, N, MODE, K)

    ncols = pid_n * BN + tl.arange(0, BN)
    nmask = ncols < DOUT
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for c0 in range(0, NR, BK):
        cols = c0 + tl.arange(0, BK)
        cmask = cols < NR
        col_coef = _columns_coef(gl_ptr, stride_gl_t, scale_ptr, rows, rmask, cols, cmask, logits, idx, w, kcols, N, R,
                                 inv_temp, MODE, K)
        if tl.max(tl.abs(col_coef)) > 0:  # some token of the block chose an adapter of this chunk
            h = tl.load(h_ptr + rows[:, None] * stride_h_t + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
            b = tl.load(b_ptr + cols[:, None] * DOUT + ncols[None, :], mask=cmask[:, None] & nmask[None, :], other=0.0)
            acc = _mma(h.to(tl.float32) * col_coef, b, acc, DTYPE, IEEE)
    omask = rmask[:, None] & nmask[None, :]
    if HAS_BASE:
        acc += tl.load(base_ptr + rows[:, None] * stride_base_t + ncols[None, :], mask=omask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * DOUT + ncols[None, :], acc.to(DTYPE), mask=omask)


_GATHER_CONFIGS = [
    triton.Config({"BN": 256}, num_warps=4),
    triton.Config({"BN": 128}, num_warps=4),
    triton.Config({"BN": 512}, num_warps=4),
    triton.Config({"BN": 1024}, num_warps=8),
]


@triton.autotune(configs=_GATHER_CONFIGS, key=["T_BUCKET", "DOUT", "NR"],
                 prune_configs_by={"early_config_prune": one_config_under_interpreter})
@_jit(_EXPAND_INTS, _EXPAND_PTRS)
def _route_gather_kernel(
    gl_ptr, h_ptr, b_ptr, scale_ptr, base_ptr, out_ptr, logits_ptr, idx_ptr, w_ptr,
    T, N, R, NR, DOUT, T_BUCKET, stride_gl_t, stride_h_t, stride_base_t, col_gl, col_h, col_base, inv_temp,
    MODE: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, NP: tl.constexpr, RP: tl.constexpr,
    HAS_BASE: tl.constexpr, STORE_ROUTING: tl.constexpr, DTYPE: tl.constexpr, BN: tl.constexpr,
):
    """Route one token (a top-k mode) and write (base +) sum_j w_j s_e B_e h_te over its k chosen adapters e
    for a block of output columns, reading only those adapters' R rows of B_flat; one program per (token,
    block of columns). Arguments as for ``_route_expand_kernel``. The products w s h are rounded to DTYPE
    before they meet B, as in the other regimes."""
    gl_ptr += col_gl
    h_ptr += col_h
    base_ptr += col_base
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = t + tl.arange(0, 1)
    rmask = rows < T
    gcols = tl.arange(0, NP)
    kcols = tl.arange(0, KP)
    logits = _load_logits(gl_ptr, rows, rmask, gcols, N, stride_gl_t)
    coef, _probs, _chosen, idx, w = _route(logits, gcols, N, inv_temp, K, KP, MODE)
    if STORE_ROUTING and pid_n == 0:
        _store_routing(logits_ptr, idx_ptr, w_ptr, rows, rmask, gcols, kcols, logits, coef, idx, w, N, MODE, K)

    ncols = pid_n * BN + tl.arange(0, BN)
    nmask = ncols < DOUT
    q = tl.arange(0, RP)
    qmask = q < R
    acc = tl.zeros((BN,), dtype=tl.float32)
    for j in tl.static_range(K):
        e = tl.sum(tl.where(kcols[None, :] == j, idx, 0))
        c = tl.sum(tl.where(kcols[None, :] == j, w, 0.0)) * tl.load(scale_ptr + e)
        h = tl.load(h_ptr + t * stride_h_t + e * R + q, mask=qmask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + (e * R + q)[:, None] * DOUT + ncols[None, :], mask=qmask[:, None] & nmask[None, :], other=0.0)
        acc += tl.sum((c * h).to(DTYPE).to(tl.float32)[:, None] * b.to(tl.float32), axis=0)
    if HAS_BASE:
        acc += tl.load(base_ptr + t * stride_base_t + ncols, mask=nmask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * DOUT + ncols, acc.to(DTYPE), mask=nmask)


@_jit(["T", "N", "R", "NR", "stride_gl_t", "stride_h_t", "col_gl", "col_h"],
      ["gl_ptr", "h_ptr", "scale_ptr", "mix_ptr", "logits_ptr", "idx_ptr", "w_ptr"])
def _route_mix_kernel(
    gl_ptr, h_ptr, scale_ptr, mix_ptr, logits_ptr, idx_ptr, w_ptr,
    T, N, R, NR, stride_gl_t, stride_h_t, col_gl, col_h, inv_temp,
    MODE: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, NP: tl.constexpr, STORE_ROUTING: tl.constexpr,
    DTYPE: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
):
    """Route a block of tokens and write mix[t, e r + q] = w_te s_e h_te[q] (0 for adapters not chosen);
    gl and h from columns col_gl and col_h of rows with strides stride_gl_t and stride_h_t, mix contiguous;
    the routing written only if STORE_ROUTING."""
    gl_ptr += col_gl
    h_ptr += col_h
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = rows < T
    gcols = tl.arange(0, NP)
    kcols = tl.arange(0, KP)
    logits = _load_logits(gl_ptr, rows, rmask, gcols, N, stride_gl_t)
    coef, _probs, _chosen, idx, w = _route(logits, gcols, N, inv_temp, K, KP, MODE)
    if STORE_ROUTING:
        _store_routing(logits_ptr, idx_ptr, w_ptr, rows, rmask, gcols, kcols, logits, coef, idx, w, N, MODE, K)
    for c0 in range(0, NR, BK):
        cols = c0 + tl.arange(0, BK)
        cmask = cols < NR
        mask = rmask[:, None] & cmask[None, :]
        col_coef = _columns_coef(gl_ptr, stride_gl_t, scale_ptr, rows, rmask, cols, cmask, logits, idx, w, kcols, N, R,
                                 inv_temp, MODE, K)
        h = tl.load(h_ptr + rows[:, None] * stride_h_t + cols[None, :], mask=mask & (col_coef != 0), other=0.0).to(tl.float32)
        tl.store(mix_ptr + rows[:, None] * NR + cols[None, :], (h * col_coef).to(DTYPE), mask=mask)


@_jit(["T", "N", "R", "NR"], ["logits_ptr", "h_ptr", "u_ptr", "scale_ptr", "grad_logits_ptr", "grad_w_ptr",
                              "dlogits_ptr", "coef_u_ptr", "coef_h_ptr"])
def _route_backward_kernel(
    logits_ptr, h_ptr, u_ptr, scale_ptr, grad_logits_ptr, grad_w_ptr,
    dlogits_ptr, coef_u_ptr, coef_h_ptr,
    T, N, R, NR, inv_temp,
    MODE: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, NP: tl.constexpr, RP: tl.constexpr,
    HAS_GRAD_LOGITS: tl.constexpr, HAS_GRAD_W: tl.constexpr, WRITE_COEF_H: tl.constexpr,
    DTYPE: tl.constexpr, BM: tl.constexpr,
):
    """Routing backward for a block of tokens.

    dw[t, e] = s_e <u[t, e], h[t, e]> (+ the weights' own gradient) for chosen e; through the routing
    softmax, dlogits = P (dw - sum_e coef dw) / T (+ the logits' own gradient), P = coef, or the full
    softmax for top-k without renormalisation. Also writes coef_u = coef s u (and coef_h = coef s h).
    """
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = rows < T
    gcols = tl.arange(0, NP)
    gmask = rmask[:, None] & (gcols < N)[None, :]
    logits = _load_logits(logits_ptr, rows, rmask, gcols, N, N)
    coef, probs, chosen, _idx, _w = _route(logits, gcols, N, inv_temp, K, KP, MODE)

    q = tl.arange(0, RP)
    qmask = rmask[:, None] & (q < R)[None, :]
    dw = tl.zeros((BM, NP), dtype=tl.float32)
    for e in range(N):
        sel = gcols[None, :] == e
        scale = tl.load(scale_ptr + e)
        coef_e = tl.sum(tl.where(sel, coef, 0.0), axis=1) * scale
        offs = rows[:, None] * NR + e * R + q[None, :]
        if tl.sum(tl.where(sel & chosen, 1, 0)) > 0:
            u = tl.load(u_ptr + offs, mask=qmask, other=0.0).to(tl.float32)
            h = tl.load(h_ptr + offs, mask=qmask, other=0.0).to(tl.float32)
            dw = tl.where(sel, scale * tl.sum(u * h, axis=1)[:, None], dw)
            tl.store(coef_u_ptr + offs, (coef_e[:, None] * u).to(DTYPE), mask=qmask)
            if WRITE_COEF_H:
                tl.store(coef_h_ptr + offs, (coef_e[:, None] * h).to(DTYPE), mask=qmask)
        else:
            tl.store(coef_u_ptr + offs, tl.zeros((BM, RP), dtype=DTYPE), mask=qmask)
            if WRITE_COEF_H:
                tl.store(coef_h_ptr + offs, tl.zeros((BM, RP), dtype=DTYPE), mask=qmask)
    if HAS_GRAD_W:
        dw += tl.load(grad_w_ptr + rows[:, None] * N + gcols[None, :], mask=gmask, other=0.0)
    dw = tl.where(chosen, dw, 0.0)
    weighted = tl.sum(coef * dw, axis=1)
    if MODE == 2:
        dlogits = probs * (dw - weighted[:, None]) * inv_temp
    else:
        dlogits = coef * (dw - weighted[:, None]) * inv_temp
    if HAS_GRAD_LOGITS:
        dlogits += tl.load(grad_logits_ptr + rows[:, None] * N + gcols[None, :], mask=gmask, other=0.0)
    tl.store(dlogits_ptr + rows[:, None] * N + gcols[None, :], dlogits.to(DTYPE), mask=gmask)


def _routing_constexprs(num_adapters: int, top_k: int, mode: str) -> dict:
    k = 1 if mode == "soft" else top_k
    return {"MODE": MODES[mode], "K": k, "KP": pow2(k), "NP": pow2(num_adapters)}


def _gathers(num_tokens: int, mode: str) -> bool:
    """Whether a few-token launch takes the per-token gather kernel (else the block kernel)."""
    return num_tokens <= GATHER_TOKENS and mode != "soft"


@functools.lru_cache(maxsize=4096)
def _expand_plan(num_tokens: int, num_adapters: int, rank: int, d_out: int, dtype: torch.dtype, top_k: int,
                 mode: str, has_base: bool, store_routing: bool = True, gather: bool = False,
                 ) -> tuple[Any, dict, tuple, Callable, int]:
    """Everything about a few-token launch that depends only on shapes and settings, computed once: the
    kernel (``gather``: the per-token one), its constexprs, cache key, grid and token bucket."""
    bucket = token_bucket(num_tokens)
    constexprs = {**_routing_constexprs(num_adapters, top_k, mode), "HAS_BASE": has_base,
                  "STORE_ROUTING": store_routing, "DTYPE": tl_dtype(dtype)}
    if gather:
        constexprs["RP"] = pow2(rank)
        key = ("gather", dtype, bucket, d_out, num_adapters * rank, *constexprs.values())
        grid = lambda meta: (num_tokens, triton.cdiv(d_out, meta["BN"]))
        return _route_gather_kernel, constexprs, key, grid, bucket
    constexprs["IEEE"] = use_ieee_dot(dtype)
    key = ("expand", dtype, bucket, d_out, num_adapters * rank, *constexprs.values())
    grid = lambda meta: (triton.cdiv(num_tokens, meta["BM"]), triton.cdiv(d_out, meta["BN"]))
    return _route_expand_kernel, constexprs, key, grid, bucket


@functools.lru_cache(maxsize=4096)
def _row_plan(kind: str, num_tokens: int, num_adapters: int, rank: int, dtype: torch.dtype, top_k: int, mode: str,
              **extra) -> tuple[dict, tuple, Callable]:
    """The same for the one-dimensional (row block) kernels: mix and backward."""
    constexprs = {**_routing_constexprs(num_adapters, top_k, mode), **extra, "DTYPE": tl_dtype(dtype), "BM": 32}
    grid = lambda meta: (triton.cdiv(num_tokens, meta["BM"]),)
    return constexprs, (kind, dtype, *constexprs.values()), grid


def fused_forward(x, gate_x, gate_weight, lora_a, lora_b, scaling, base, top_k: int, temperature: float, mode: str):
    """The kernels' forward. x (T, d_in) contiguous, T > 0; gate_x (T, d_in) or None (the gate reads x);
    gate_weight (N, d_in), lora_a (N, r, d_in), lora_b (N, d_out, r), base (T, d_out) with unit last stride
    or None, all in x's dtype; scaling (N,) float32. Returns out (T, d_out) = base + delta, logits (T, N)
    float32, indices (T, k) int64, weights (T, k) float32 (k = N for mode soft) and h (T, N r)."""
    num_adapters, rank, d_in = lora_a.shape
    gate_logits = F.linear(x if gate_x is None else gate_x, gate_weight)
    hidden = F.linear(x, lora_a.reshape(num_adapters * rank, d_in))
    return (*fused_mix(gate_logits, hidden, lora_b, scaling, base, top_k, temperature, mode), hidden)


def fused_mix(gate_logits, hidden, lora_b, scaling, base, top_k: int, temperature: float, mode: str):
    """Routing and the chosen adapters' B from the products already made: gate_logits (T, N) and
    h = x A^T (T, N r) in x's dtype with unit last stride (views into one stacked GEMM's output, see
    :class:`meteora.MeteoRALinear`, or plain tensors); lora_b, scaling and base as for
    :func:`fused_forward`. Returns (out, logits, indices, weights)."""
    num_tokens, num_adapters = gate_logits.shape
    d_out, rank = lora_b.shape[1], lora_b.shape[2]
    nr = num_adapters * rank
    device, dtype = hidden.device, hidden.dtype
    soft = mode == "soft"
    k = num_adapters if soft else top_k
    logits = torch.empty(num_tokens, num_adapters, device=device, dtype=torch.float32)
    weights = torch.empty(num_tokens, k, device=device, dtype=torch.float32)
    indices = (torch.arange(num_adapters, device=device).expand(num_tokens, num_adapters).contiguous() if soft
               else torch.empty(num_tokens, k, device=device, dtype=torch.int64))
    b_flat = lora_b.permute(0, 2, 1).reshape(nr, d_out)  # row e r + q = B_e[:, q]; a view for the layer's B
    strides = (gate_logits.stride(0), hidden.stride(0))
    if num_tokens < LARGE_TOKENS:
        kernel, constexprs, key, grid, bucket = _expand_plan(num_tokens, num_adapters, rank, d_out, dtype, top_k, mode,
                                                             base is not None, True, _gathers(num_tokens, mode))
        out = torch.empty(num_tokens, d_out, device=device, dtype=dtype)
        _launch(
            kernel, grid, key,
            (gate_logits, hidden, b_flat, scaling, out if base is None else base, out, logits, indices, weights,
             num_tokens, num_adapters, rank, nr, d_out, bucket, *strides, d_out if base is None else base.stride(0),
             0, 0, 0, 1.0 / temperature),
            constexprs,
        )
        return out, logits, indices, weights
    mix = torch.empty(num_tokens, nr, device=device, dtype=dtype)
    constexprs, key, grid = _row_plan("mix", num_tokens, num_adapters, rank, dtype, top_k, mode, STORE_ROUTING=True, BK=64)
    _launch(
        _route_mix_kernel, grid, key,
        (gate_logits, hidden, scaling, mix, logits, indices, weights, num_tokens, num_adapters, rank, nr, *strides,
         0, 0, 1.0 / temperature),
        constexprs,
    )
    out = mix @ b_flat if base is None else torch.addmm(base, mix, b_flat)
    return out, logits, indices, weights


class StackedMix:
    """The mixture of :class:`meteora.MeteoRALinear`'s one stacked product, for eager inference on CUDA,
    with the routing not kept: per call, the output's allocation and one launch (many tokens: the mix
    buffer, one launch and cuBLAS's addmm in place into the base block of y), nothing else. The kernels read the gate
    logits, h and the base output in place as column offsets of the product, and skip writing the routing;
    everything else about a launch (constexprs, grid, the compiled kernel) is planned once per token count,
    routing setting and dtype.

    y (T, S) contiguous: x [W; A_flat; W_g; 0]^T, columns [0, d_out) the base output, [d_out, d_out + N r)
    h, then the N gate logits; lora_b_rows (N, r, d_out) contiguous (B_flat); scaling (N,) float32.
    Returns out (T, d_out) = base + delta in y's dtype: few tokens a new contiguous tensor, many tokens
    (>= LARGE_TOKENS) y's base block itself, a view with row stride S (y is overwritten there and kept
    alive by it). Plans hold compiled kernels of one device:
    :meth:`clear` them when the weights move.
    """

    def __init__(self, d_out: int, num_adapters: int, rank: int) -> None:
        self.d_out, self.num_adapters, self.rank = d_out, num_adapters, rank
        self._plans: dict[tuple, Callable] = {}

    def clear(self) -> None:
        self._plans.clear()

    def __getstate__(self) -> dict:  # compiled kernels are neither copied nor pickled
        return {**self.__dict__, "_plans": {}}

    def __call__(self, y: torch.Tensor, lora_b_rows: torch.Tensor, scaling: torch.Tensor, top_k: int,
                 temperature: float, mode: str) -> torch.Tensor:
        plan = self._plans.get((y.shape[0], top_k, mode, y.dtype))
        if plan is not None:
            return plan(y, lora_b_rows, scaling, 1.0 / temperature)
        return self._first_call(y, lora_b_rows, scaling, top_k, temperature, mode)

    def _first_call(self, y, lora_b_rows, scaling, top_k: int, temperature: float, mode: str) -> torch.Tensor:
        """Launch through Triton and keep a plan of direct launches for later calls of this shape: the plan is
        the same ``mix`` with the compiled kernel as its launch."""
        num_tokens, stride = y.shape[0], y.stride(0)
        d_out, num_adapters, rank = self.d_out, self.num_adapters, self.rank
        nr = num_adapters * rank
        col_h, col_gl = d_out, d_out + nr
        if num_tokens < LARGE_TOKENS:
            kernel, constexprs, _, grid, bucket = _expand_plan(num_tokens, num_adapters, rank, d_out, y.dtype, top_k, mode,
                                                               True, False, _gathers(num_tokens, mode))
            ints = (num_tokens, num_adapters, rank, nr, d_out, bucket, stride, stride, stride, col_gl, col_h, 0)

            def mix(launch, y, lora_b_rows, scaling, inv_temp):
                out = y.new_empty((num_tokens, d_out))
                launch(y, y, lora_b_rows, scaling, y, out, out, out, out, *ints, inv_temp)
                return out
        else:
            kernel = _route_mix_kernel
            constexprs, _, grid = _row_plan("mix", num_tokens, num_adapters, rank, y.dtype, top_k, mode, STORE_ROUTING=False,
                                            BK=64)
            ints = (num_tokens, num_adapters, rank, nr, stride, stride, col_gl, col_h)

            def mix(launch, y, lora_b_rows, scaling, inv_temp):
                buf = y.new_empty((num_tokens, nr))
                launch(y, y, scaling, buf, buf, buf, buf, *ints, inv_temp)
                # in place into the base block: one GEMM, no copy of the base output to a new tensor
                return y[:, :d_out].addmm_(buf, lora_b_rows.view(nr, d_out))

        entries = []
        out = mix(lambda *args: entries.append(_first_launch(kernel, grid, args, constexprs)), y, lora_b_rows, scaling,
                  1.0 / temperature)
        if entries[0] is not None:
            compiled, tail, meta = entries[0]
            run = compiled[(tuple(grid(meta)) + (1, 1))[:3]]
            self._plans[(num_tokens, top_k, mode, y.dtype)] = functools.partial(mix, lambda *args: run(*args, *tail))
        return out


def fused_mix_backward(grad_out, grad_logits, grad_weights, hidden, lora_b, scaling, logits, indices, top_k: int,
                       temperature: float, mode: str, want_b: bool):
    """Gradients of :func:`fused_mix`'s out, logits and weights (grad_logits / grad_weights may be None) with
    respect to its inputs: (gate_logits (T, N), hidden (T, N r), lora_b (N, d_out, r) or None unless
    ``want_b``), in hidden's dtype; the base's gradient is grad_out itself. grad_out (T, d_out) contiguous."""
    num_tokens, nr = hidden.shape
    num_adapters, rank = logits.shape[1], lora_b.shape[2]
    u = grad_out @ flat_b(lora_b).T  # u[t, e r + q] = <g_t, B_e[:, q]>
    if grad_weights is not None and mode != "soft":
        grad_weights = torch.zeros_like(logits).scatter_add_(1, indices, grad_weights.float())
    dlogits = torch.empty(num_tokens, num_adapters, device=hidden.device, dtype=hidden.dtype)
    coef_u = torch.empty(num_tokens, nr, device=hidden.device, dtype=hidden.dtype)
    coef_h = torch.empty(num_tokens, nr, device=hidden.device, dtype=hidden.dtype) if want_b else coef_u
    constexprs, key, grid = _row_plan(
        "backward", num_tokens, num_adapters, rank, hidden.dtype, top_k, mode, RP=pow2(rank),
        HAS_GRAD_LOGITS=grad_logits is not None, HAS_GRAD_W=grad_weights is not None, WRITE_COEF_H=want_b,
    )
    _launch(
        _route_backward_kernel, grid, key,
        (logits, hidden.contiguous(), u, scaling,
         grad_logits.float().contiguous() if grad_logits is not None else logits,
         grad_weights.float().contiguous() if grad_weights is not None else logits,
         dlogits, coef_u, coef_h, num_tokens, num_adapters, rank, nr, 1.0 / temperature),
        constexprs,
    )
    grad_b = (grad_out.T @ coef_h).view(-1, num_adapters, rank).permute(1, 0, 2) if want_b else None
    return dlogits, coef_u, grad_b


def fused_backward(grad_out, grad_logits, grad_weights, x, gate_x, gate_weight, lora_a, lora_b, scaling, hidden,
                   logits, indices, top_k: int, temperature: float, mode: str, needs: list[bool]):
    """Gradients (x, gate_x, gate_weight, lora_a, lora_b) of :func:`fused_forward`'s out, logits and weights
    (grad_logits / grad_weights may be None); entries of ``needs`` that are False give None."""
    dlogits, coef_u, grad_b = fused_mix_backward(grad_out, grad_logits, grad_weights, hidden, lora_b, scaling, logits,
                                                 indices, top_k, temperature, mode, needs[4])
    return (*input_grads(x, gate_x, gate_weight, lora_a, dlogits, coef_u, needs), grad_b)


class _FusedMoELoRA(torch.autograd.Function):
    """:func:`fused_forward` differentiable in x, gate_weight, lora_a and lora_b (and through the returned
    logits and weights: the gate loss reads the logits)."""

    @staticmethod
    def forward(ctx, x, gate_weight, lora_a, lora_b, scaling, base, top_k, temperature, mode):
        out, logits, indices, weights, hidden = fused_forward(x, None, gate_weight, lora_a, lora_b, scaling, base, top_k, temperature, mode)
        ctx.save_for_backward(x, gate_weight, lora_a, lora_b, scaling, hidden, logits, indices)
        ctx.routing = (top_k, temperature, mode)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(indices)
        return out, logits, indices, weights

    @staticmethod
    def backward(ctx, grad_out, grad_logits, _grad_indices, grad_weights):
        x, gate_weight, lora_a, lora_b, scaling, hidden, logits, indices = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros(x.shape[0], lora_b.shape[1], device=x.device, dtype=x.dtype)
        needs = list(ctx.needs_input_grad[:4])
        grad_x, _, grad_gate, grad_a, grad_b = fused_backward(
            grad_out.contiguous(), grad_logits, grad_weights, x, None, gate_weight, lora_a, lora_b, scaling, hidden, logits,
            indices, *ctx.routing, [needs[0], False, needs[1], needs[2], needs[3]],
        )
        grad_base = grad_out if ctx.needs_input_grad[5] else None
        return grad_x, grad_gate, grad_a, grad_b, None, grad_base, None, None, None


def fused_moe_lora(
    x2d: torch.Tensor,
    gate_weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: torch.Tensor,
    top_k: int,
    temperature: float = 1.0,
    mode: str = "topk",
    *,
    base: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gate, routing and mixture of LoRA adapters in two kernels (the kernels' own entry, checked; the
    model calls :func:`meteora.kernels.op.moe_lora_op`).

    x2d (T, d_in); gate_weight (N, d_in); lora_a (N, r, d_in); lora_b (N, d_out, r); scaling (N,) float32.
    Returns (out (T, d_out) in x's dtype, logits (T, N) float32, indices (T, k) int64, weights (T, k)
    float32); for mode "soft" indices = arange(N) and weights (T, N). out is delta, or base + delta with
    ``base`` (T, d_out), e.g. the base layer's output, added in the kernel's epilogue (no separate add).
    Differentiable in x2d, gate_weight, lora_a, lora_b and base (and through the returned logits and
    weights); scaling is a constant.
    """
    if mode not in MODES:
        raise ValueError(f"unknown routing mode {mode!r}; expected one of {tuple(MODES)}")
    if x2d.dim() != 2 or lora_a.dim() != 3 or lora_b.dim() != 3:
        raise ValueError(f"fused_moe_lora expects x2d (T, d_in), lora_a (N, r, d_in), lora_b (N, d_out, r); got "
                         f"{tuple(x2d.shape)}, {tuple(lora_a.shape)}, {tuple(lora_b.shape)}")
    num_adapters = lora_a.shape[0]
    if mode != "soft" and not 1 <= top_k <= num_adapters:
        raise ValueError(f"top_k={top_k} must be between 1 and the number of adapters ({num_adapters})")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    tl_dtype(x2d.dtype)
    if base is not None and (base.shape != (x2d.shape[0], lora_b.shape[1]) or base.dtype != x2d.dtype or base.stride(1) != 1):
        raise ValueError(f"base must be a ({x2d.shape[0]}, {lora_b.shape[1]}) {x2d.dtype} tensor with unit last stride")
    dtype = x2d.dtype
    x2d, gate_weight = x2d.contiguous(), gate_weight.to(dtype).contiguous()
    lora_a, lora_b, scaling = lora_a.to(dtype).contiguous(), lora_b.to(dtype), scaling.float().contiguous()
    if x2d.shape[0] == 0:
        k = num_adapters if mode == "soft" else top_k
        empty = x2d.new_zeros(0, lora_b.shape[1])
        return (empty, x2d.new_zeros(0, num_adapters, dtype=torch.float32),
                torch.zeros(0, k, dtype=torch.int64, device=x2d.device), x2d.new_zeros(0, k, dtype=torch.float32))
    differentiable = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x2d, gate_weight, lora_a, lora_b, base))
    if not differentiable:
        return fused_forward(x2d, None, gate_weight, lora_a, lora_b, scaling, base, top_k, temperature, mode)[:4]
    return _FusedMoELoRA.apply(x2d, gate_weight, lora_a, lora_b, scaling, base, top_k, temperature, mode)
