"""MeteoRALinear: a frozen nn.Linear plus a gated mixture of N LoRA adapters."""
from __future__ import annotations

import torch
from torch import nn

from .kernels.dense import accumulation_dtype
from .kernels.op import moe_lora_op
from .ops import STRATEGIES, auto_strategy, check_shapes, lora_delta, mix_adapters, moe_lora
from .routing import Routing, check_routing_args, forced_routing


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

    @property
    def num_adapters(self) -> int:
        return self.lora_a.shape[0]

    @property
    def lora_b(self) -> torch.Tensor:
        """The adapters' B as (N, d_out, r): a view of the stored (N, r, d_out) rows (no copy)."""
        return self.lora_b_rows.permute(0, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        i = self.forced_adapter
        if i is not None and self.forced_single:
            return self.base(x) + lora_delta(x, self.lora_a[i], self.lora_b[i], self.scaling[i].to(x.dtype))
        if i is not None:
            routing = forced_routing(x.new_zeros(*x.shape[:-1], self.num_adapters), i)
            out = self.base(x) + mix_adapters(x, routing.indices, routing.weights, self.lora_a, self.lora_b, self.scaling, self.strategy)
            self.last_routing = routing if self.keep_routing else None
            return out
        leading, d_in = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, d_in)
        strategy = self.strategy
        if strategy == "auto":
            grad = torch.is_grad_enabled() and (x.requires_grad or self.gate.weight.requires_grad or self.lora_a.requires_grad)
            strategy = auto_strategy(x.device.type, x.dtype, grad, x2.shape[0])
        if strategy == "fused" and x.dtype == self.lora_a.dtype:
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
        self.last_routing = routing if self.keep_routing else None
        return out

    def extra_repr(self) -> str:
        return (
            f"in_features={self.base.in_features}, out_features={self.base.out_features}, adapters={self.num_adapters}, "
            f"rank={self.lora_a.shape[1]}, top_k={self.top_k}, temperature={self.temperature}, strategy={self.strategy!r}, "
            f"mode={self.mode!r}"
        )
