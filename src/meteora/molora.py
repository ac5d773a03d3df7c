"""MoLoRA: E LoRA experts per linear layer, trained from scratch jointly with a soft router.

A MoLoRA layer is a :class:`meteora.layer.MeteoRALinear` whose adapters are trainable and freshly
initialised (A as PEFT does, Kaiming-uniform; B zero, so the model starts as the base) and whose gate
routes "soft" (all experts) or top-k without renormalisation. The mixture itself is the shared op
:func:`meteora.ops.moe_lora`: all experts' A as one GEMM, the routing weights scaled on, one GEMM with
all B, never a tokens x E x d_out tensor.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from meteora.layer import MeteoRALinear
from meteora.ops import moe_lora
from meteora.router_input import ROUTER_INPUTS, CausalMean, RouterLoss, SequenceContext


class MoLoRALinear(MeteoRALinear):
    """A MeteoRALinear whose gate may read the causal sentence mean of its input instead of the token,
    and whose router may add auxiliary losses while training (:class:`meteora.router_input.RouterLoss`).

    x: (B, T, d_in) -> (B, T, d_out). `sentence_mean` is None for token routing. Token routing is the
    parent's forward (on CUDA the kernels add the mixture into the base output in place); sentence
    routing passes the base output to the same op as `out`.
    """

    def __init__(self, *args, sentence_mean: CausalMean | None = None, router_loss: RouterLoss | None = None,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sentence_mean = sentence_mean
        self.router_loss = router_loss or RouterLoss()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.forced_adapter is not None:
            return super().forward(x)
        keep = self.keep_routing
        regularise = self.training and self.router_loss.active
        if self.sentence_mean is None:
            if regularise and not keep:  # the router loss needs the routing for this call only
                self.keep_routing = True
                try:
                    out = super().forward(x)
                finally:
                    self.keep_routing = False
            else:
                out = super().forward(x)
            routing = self.last_routing
        else:
            out, routing = moe_lora(
                x, self.gate.weight, self.lora_a, self.lora_b, self.scaling, self.top_k, self.temperature,
                self.strategy, mode=self.mode, gate_input=self.sentence_mean(x), out=self.base(x),
            )
        self._keep(routing)
        return self.router_loss.attach(out, routing.logits) if regularise else out


def init_lora_experts(num_experts: int, rank: int, d_in: int, d_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh experts: A (E, r, d_in) Kaiming-uniform per expert (PEFT's init), B (E, d_out, r) zero."""
    lora_a = torch.empty(num_experts, rank, d_in)
    for a in lora_a:
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    return lora_a, torch.zeros(num_experts, d_out, rank)


def molora_linear(
    base: nn.Linear,
    num_experts: int,
    rank: int = 4,
    alpha: float = 16.0,
    mode: str = "soft",
    top_k: int = 1,
    router_input: str = "token",
    context: SequenceContext | None = None,
    router_init_scale: float = 1.0,
    router_loss: RouterLoss | None = None,
) -> MoLoRALinear:
    """Wrap `base` with E trainable LoRA experts (scaling alpha / rank) and a trainable router (its
    default initial weights times `router_init_scale`, its auxiliary losses `router_loss`).

    One expert is plain LoRA: its router is frozen (softmax over one logit is always 1) and unregularised.
    """
    if router_input not in ROUTER_INPUTS:
        raise ValueError(f"unknown router_input {router_input!r}; expected one of {ROUTER_INPUTS}")
    if router_input == "sentence" and context is None:
        raise ValueError("sentence routing needs the model's SequenceContext (see attach_sequence_context)")
    lora_a, lora_b = init_lora_experts(num_experts, rank, base.in_features, base.out_features)
    layer = MoLoRALinear(
        base, lora_a, lora_b, torch.full((num_experts,), alpha / rank),
        top_k=num_experts if mode == "soft" else top_k, mode=mode, train_adapters=True,
        sentence_mean=CausalMean(context) if router_input == "sentence" and num_experts > 1 else None,
        router_loss=router_loss if num_experts > 1 else None,
    )
    with torch.no_grad():
        layer.gate.weight.mul_(router_init_scale)
    layer.gate.weight.requires_grad_(num_experts > 1)
    return layer
