"""MeteoRALinear: a frozen nn.Linear plus a gated mixture of N LoRA adapters."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .kernels._common import SUPPORTED_DTYPES
from .kernels.dense import accumulation_dtype, dense_stacked_mix
from .kernels.fused import StackedMix
from .kernels.op import moe_lora_mix_op, moe_lora_op
from .ops import STRATEGIES, auto_strategy, check_shapes, lora_delta, mix_adapters, moe_lora
from .routing import Routing, check_routing_args, forced_routing

# The stacked weight's rows are padded to a multiple of this: the GEMM's output rows stay 16-byte aligned
# in every floating dtype (an unaligned row stride takes cuBLAS off its tensor-core kernels).
STACK_ROWS = 16

class MeteoRALinear(nn.Module):
    """y = base(x) + sum over the gate's top-k adapters of w_i s_i B_i A_i x.

    base: the wrapped nn.Linear (d_in -> d_out), frozen.
    lora_a (N, r, d_in), lora_b (N, d_out, r): the adapters, frozen unless ``train_adapters``.
    scaling (N,): each adapter's alpha / r (or rsLoRA's alpha / sqrt(r)).
    gate: nn.Linear(d_in, N, bias=False), trainable.

    ``forced_adapter`` = i sends every token to adapter i with weight 1 and skips the gate (the
    single-adapter and oracle modes); ``keep_routing`` keeps the last forward's :class:`Routing` in
    ``last_routing`` (for the gate loss and routing traces).

    Everything that depends only on the weights is done here, once: the adapters cast to the base's dtype
    and laid out as the operator reads them (A contiguous; B stored as B_flat (N r, d_out), row e r + q =
    B_e[:, q], with ``lora_b`` a (N, d_out, r) view of it), the scaling in the accumulation dtype, the
    shapes and settings checked. ``forward`` checks nothing and calls the operator
    ``torch.ops.meteora.moe_lora`` (:mod:`meteora.kernels.op`) for the fused strategy.

    The base weight W, every A and the gate W_g are one buffer of (d_out + N r + N, d_in) rows (padded), the
    three parameters views into it (no extra memory; see :meth:`restack`): inference with the fused strategy
    makes ONE GEMM x [W; A; W_g]^T for the base output, the gate logits and every down-projection, then one launch
    (``torch.ops.meteora.moe_lora_mix``) for the routing and the chosen B's, added to the base output.
    Gradients (gate training) go through the operator ``moe_lora``, which differentiates the three products
    apart: a stacked GEMM with its own backward was measured no faster on an H200 (README, Speed).
    ``stack_weights=False`` leaves the base weight's tensor alone (three products per call). Eager
    inference on CUDA (StackedMix) at ``LARGE_TOKENS`` (64) tokens and more returns a row-strided view of
    the stacked product (the chosen B's are added in place into its base block), not a contiguous tensor.
    """

    def __init__(
        self,
        base: nn.Linear,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: torch.Tensor,
        top_k: int = 2,
        temperature: float = 1.0,
        strategy: str = "auto",
        mode: str = "topk",
        train_adapters: bool = False,
        stack_weights: bool = True,
    ) -> None:
        super().__init__()
        check_shapes(base.weight.new_empty(0, base.in_features), None, lora_a, lora_b)
        num_adapters, rank, _ = lora_a.shape
        if lora_a.shape[2] != base.in_features or lora_b.shape[1] != base.out_features:
            raise ValueError(
                f"adapters are {lora_a.shape[2]} -> {lora_b.shape[1]} but the base linear is {base.in_features} -> {base.out_features}"
            )
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
        check_routing_args(num_adapters, top_k, temperature, mode)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        b_flat = lora_b.to(**factory).permute(0, 2, 1).reshape(num_adapters * rank, base.out_features).contiguous()
        self.base = base
        self.lora_a = nn.Parameter(lora_a.to(**factory).contiguous(), requires_grad=train_adapters)
        # Stored contiguous as (N, r, d_out) (FSDP flattens contiguous parameters only); `lora_b` is its view.
        self.lora_b_rows = nn.Parameter(b_flat.view(num_adapters, rank, base.out_features), requires_grad=train_adapters)
        acc = accumulation_dtype(base.weight.dtype)
        self.register_buffer("scaling", scaling.to(device=base.weight.device, dtype=acc).contiguous())
        self.gate = nn.Linear(base.in_features, num_adapters, bias=False, **factory)
        self.top_k = int(top_k)
        self.temperature = temperature
        self.strategy = strategy
        self.mode = mode
        self.forced_adapter: int | None = None
        self.forced_single = False
        self.keep_routing = False
        self.last_routing: Routing | None = None
        self._stack: torch.Tensor | None = None  # [W; A_flat; W_g; 0], see restack (not a buffer: not saved twice)
        self._stack_bias: torch.Tensor | None = None
        self._stack_ptrs: tuple[int, int, int, int | None] | None = None  # W, A, W_g and bias data pointers in it
        self._stacked_mix = StackedMix(base.out_features, num_adapters, rank)
        self.stack_weights = stack_weights
        self.restack()

    def restack(self) -> None:
        """Make W, A and W_g views into one buffer [W; A_flat; W_g; 0] of (d_out + N r + N, d_in) rows padded
        with zero rows to a multiple of STACK_ROWS (so that the product's rows stay aligned for the GEMM),
        and the base bias, if any, a view into [b; 0]; a no-op when they already are. Runs at construction,
        after ``.to()``, ``.half()`` and the like, and after ``copy.deepcopy`` or unpickling (which give
        every parameter a tensor of its own); call it after replacing one of the three tensors by other
        means (``load_state_dict(assign=True)``). Until then, and for parameters that cannot share a buffer
        (other dtypes or devices, quantised or sharded weights), the forward makes the three products
        apart: slower, the same result."""
        if self._stack_is_live():
            return
        self._stack = self._stack_bias = None
        weight, gate, lora_a, bias = self.base.weight, self.gate.weight, self.lora_a, self.base.bias
        params = (weight, gate, lora_a) if bias is None else (weight, gate, lora_a, bias)
        if (not self.stack_weights or type(self.base) is not nn.Linear
                or any(type(p) is not nn.Parameter or type(p.data) is not torch.Tensor for p in params)
                or len({(p.dtype, p.device) for p in params}) != 1 or not weight.is_floating_point()):
            return
        (d_out, d_in), nr, n = weight.shape, lora_a.shape[0] * lora_a.shape[1], gate.shape[0]
        rows = d_out + nr + n
        with torch.no_grad():
            pad = weight.new_zeros(-rows % STACK_ROWS, d_in)
            stack = torch.cat([weight.detach(), lora_a.detach().reshape(nr, d_in), gate.detach(), pad])
            weight.data = stack[:d_out]
            lora_a.data = stack[d_out:d_out + nr].view(lora_a.shape)
            gate.data = stack[d_out + nr:rows]
            if bias is not None:
                stack_bias = torch.cat([bias.detach(), bias.new_zeros(stack.shape[0] - d_out)])
                bias.data = stack_bias[:d_out]
                self._stack_bias = stack_bias
        self._stack = stack
        self._stack_ptrs = self._data_ptrs()

    def _data_ptrs(self) -> tuple[int, int, int, int | None]:
        # read through the modules' dictionaries: nn.Module attribute lookups cost about 1 us each on a CPU
        modules = self._modules
        base, gate = modules["base"]._parameters, modules["gate"]._parameters
        bias = base.get("bias")
        return (base["weight"].data_ptr(), self._parameters["lora_a"].data_ptr(), gate["weight"].data_ptr(),
                None if bias is None else bias.data_ptr())

    def _stack_is_live(self) -> bool:
        """Whether W, A and W_g (and the bias) are still the views :meth:`restack` made (their data pointers
        those it recorded; asked on every inference call, so kept to four pointer reads)."""
        return self._stack is not None and self._data_ptrs() == self._stack_ptrs

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self._stacked_mix.clear()  # its plans hold kernels compiled for the old device and dtype
        self.restack()
        return self

    def __setstate__(self, state: dict) -> None:  # copy.deepcopy and unpickling copy the three views apart
        super().__setstate__(state)
        self.restack()

    @property
    def num_adapters(self) -> int:
        return self.lora_a.shape[0]

    @property
    def lora_b(self) -> torch.Tensor:
        """The adapters' B as (N, d_out, r): a view of the stored (N, r, d_out) rows (no copy)."""
        return self.lora_b_rows.permute(0, 2, 1)

    def _records_grad(self, x: torch.Tensor) -> bool:
        """Whether autograd records this call (x, the gate or the adapters require gradients)."""
        return torch.is_grad_enabled() and (x.requires_grad or self.gate.weight.requires_grad or self.lora_a.requires_grad
                                            or self.lora_b_rows.requires_grad)

    def _fast_inference(self, x: torch.Tensor) -> bool:
        """Whether this eager call (the caller rules out tracing) takes the inference path: stacked weights in
        x's dtype, no gradients, the routing not kept, and the fused strategy (itself or what "auto" picks)."""
        if (self.forced_adapter is not None or self.keep_routing or self._stack is None or x.dtype != self._stack.dtype
                or self._records_grad(x)):
            return False
        strategy = self.strategy
        if strategy == "auto":
            strategy = auto_strategy(x.device.type, x.dtype, False, x.numel() // x.shape[-1])
        return strategy == "fused" and x.numel() > 0 and self._stack_is_live()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under torch.compile each attribute read below is a guard checked on every call of the compiled
        # model, so the traced path reads few (no helper methods, no lora_a, no base): see test_compile.
        compiling = torch.compiler.is_compiling()
        if not compiling and self._fast_inference(x):  # one GEMM, then the mixture read from it
            y = F.linear(x.reshape(-1, x.shape[-1]), self._stack, self._stack_bias)
            # B and the scaling read through the dictionaries (an nn.Module attribute lookup is ~1 us on a CPU)
            lora_b_rows, scaling = self._parameters["lora_b_rows"], self._buffers["scaling"]
            if x.is_cuda and x.dtype in SUPPORTED_DTYPES:  # one launch (StackedMix)
                out = self._stacked_mix(y, lora_b_rows, scaling, self.top_k, float(self.temperature), self.mode)
            else:  # CPU: one C++ call where it could be built; float64 on CUDA: the operator's dense form
                out = dense_stacked_mix(y, lora_b_rows, scaling, self.top_k, self.temperature, self.mode)
            if self.last_routing is not None:  # keep_routing is off on this path; a write costs about 1 us
                self.last_routing = None
            return out.view(*x.shape[:-1], out.shape[-1])
        i = self.forced_adapter
        if i is not None and self.forced_single:
            return self.base(x) + lora_delta(x, self.lora_a[i], self.lora_b[i], self.scaling[i].to(x.dtype))
        if i is not None:
            routing = forced_routing(x.new_zeros(*x.shape[:-1], self.num_adapters), i)
            out = self.base(x) + mix_adapters(x, routing.indices, routing.weights, self.lora_a, self.lora_b, self.scaling, self.strategy)
            self._keep(routing)
            return out
        leading, d_in = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, d_in)
        strategy = self.strategy
        grad = torch.is_grad_enabled() and self._records_grad(x)
        if strategy == "auto":
            strategy = auto_strategy(x.device.type, x.dtype, grad, x2.shape[0])
        stack = self._stack
        live = stack is not None if compiling else self._stack_is_live()
        if strategy == "fused" and live and not grad and x.dtype == stack.dtype:
            # one GEMM for the base output, every A and the gate logits, then one launch
            lora_b_rows = self.lora_b_rows
            num_adapters, rank, d_out = lora_b_rows.shape
            nr = num_adapters * rank
            y = F.linear(x2, stack, self._stack_bias)
            base, hidden, gate_logits = y[:, :d_out], y[:, d_out:d_out + nr], y[:, d_out + nr:d_out + nr + num_adapters]
            out, logits, indices, weights = moe_lora_mix_op(
                gate_logits, hidden, lora_b_rows.permute(0, 2, 1), self.scaling, base, self.top_k, float(self.temperature),
                self.mode,
            )
            out = out.reshape(*leading, out.shape[-1])
            routing = Routing(logits, indices, weights).reshape(*leading) if self.keep_routing else None
        elif strategy == "fused" and x.dtype == self.lora_a.dtype:
            out, logits, indices, weights, _ = moe_lora_op(
                x2.contiguous(), None, self.gate.weight, self.lora_a, self.lora_b, self.scaling, self.base(x2),
                self.top_k, float(self.temperature), self.mode,
            )
            out = out.reshape(*leading, out.shape[-1])
            routing = Routing(logits, indices, weights).reshape(*leading) if self.keep_routing else None
        else:  # another strategy, or x in another dtype than the weights: the checked op, which casts
            out, routing = moe_lora(
                x, self.gate.weight, self.lora_a, self.lora_b, self.scaling,
                self.top_k, self.temperature, strategy, mode=self.mode, out=self.base(x),
            )
        if self.keep_routing or self.last_routing is not None:
            self._keep(routing)
        return out

    def _keep(self, routing: Routing | None) -> None:
        """``last_routing`` = routing if ``keep_routing``, else None, written only when it changes: a write
        costs about 1 us in eager (nn.Module.__setattr__), and under torch.compile it is a side effect that
        the compiled frame replays on every call and that voids the module's cheap dict-tag guards."""
        if self.keep_routing:
            self.last_routing = routing
        elif self.last_routing is not None:
            self.last_routing = None

    def extra_repr(self) -> str:
        return (
            f"in_features={self.base.in_features}, out_features={self.base.out_features}, adapters={self.num_adapters}, "
            f"rank={self.lora_a.shape[1]}, top_k={self.top_k}, temperature={self.temperature}, strategy={self.strategy!r}, "
            f"mode={self.mode!r}"
        )
