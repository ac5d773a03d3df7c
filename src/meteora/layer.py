"""MeteoRALinear: a frozen nn.Linear plus a gated mixture of N LoRA adapters."""
from __future__ import annotations

import torch
from torch import nn

from .ops import lora_delta, mix_adapters, moe_lora
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
        num_adapters = lora_a.shape[0]
        if lora_a.shape[2] != base.in_features or lora_b.shape[1] != base.out_features:
            raise ValueError(
                f"adapters are {lora_a.shape[2]} -> {lora_b.shape[1]} but the base linear is {base.in_features} -> {base.out_features}"
            )
        check_routing_args(num_adapters, top_k, temperature, mode)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.base = base
        self.lora_a = nn.Parameter(lora_a.to(**factory), requires_grad=train_adapters)
        self.lora_b = nn.Parameter(lora_b.to(**factory), requires_grad=train_adapters)
        self.register_buffer("scaling", scaling.to(device=base.weight.device, dtype=torch.float32))
        self.gate = nn.Linear(base.in_features, num_adapters, bias=False, **factory)
        self.top_k = top_k
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        i = self.forced_adapter
        if i is not None and self.forced_single:
            return out + lora_delta(x, self.lora_a[i], self.lora_b[i], self.scaling[i].to(x.dtype))
        if i is not None:
            routing = forced_routing(x.new_zeros(*x.shape[:-1], self.num_adapters), i)
            out = out + mix_adapters(x, routing.indices, routing.weights, self.lora_a, self.lora_b, self.scaling, self.strategy)
        else:
            out, routing = moe_lora(
                x, self.gate.weight, self.lora_a, self.lora_b, self.scaling,
                self.top_k, self.temperature, self.strategy, mode=self.mode, out=out,
            )
        self.last_routing = routing if self.keep_routing else None
        return out

    def extra_repr(self) -> str:
        return (
            f"in_features={self.base.in_features}, out_features={self.base.out_features}, adapters={self.num_adapters}, "
            f"rank={self.lora_a.shape[1]}, top_k={self.top_k}, temperature={self.temperature}, strategy={self.strategy!r}, mode={self.mode!r}"
        )
