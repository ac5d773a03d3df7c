"""(IA)3 and MoV: learned rescaling vectors on a linear layer's input or output, alone or as a mixture.

(IA)3 (Liu et al. 2022) rescales the attention keys and values (the outputs of k_proj and v_proj) and
the FFN intermediate activation (the input of down_proj) by learned vectors initialised to ones.
MoV (Zadouri et al. 2023) holds E such vectors per site and mixes them per token with a router, a
bias-free linear on the activation being rescaled followed by softmax: y = x * sum_e p_e(x) l_e.
"""
from __future__ import annotations

import torch
from torch import nn

from meteora.router_input import ROUTER_INPUTS, CausalMean, RouterLoss, SequenceContext
from meteora.routing import Routing, route

SITES = ("input", "output")


def _site_dim(base: nn.Linear, site: str) -> int:
    if site not in SITES:
        raise ValueError(f"unknown (IA)3 site {site!r}; expected one of {SITES}")
    return base.in_features if site == "input" else base.out_features


class IA3Linear(nn.Module):
    """(IA)3 on one linear layer: base(x * l) for site "input", base(x) * l for site "output".

    x: (..., in_features) -> (..., out_features). l: (in_features,) or (out_features,), init ones.
    """

    def __init__(self, base: nn.Linear, site: str) -> None:
        super().__init__()
        self.base = base
        self.site = site
        self.ia3_l = nn.Parameter(torch.ones(_site_dim(base, site), dtype=base.weight.dtype, device=base.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.site == "input":
            return self.base(x * self.ia3_l)
        return self.base(x) * self.ia3_l


class MoVLinear(nn.Module):
    """A mixture of E (IA)3 vectors on one linear layer, mixed per token by a router.

    vectors: (E, dim) init ones; router: Linear(dim, E, bias=False) on the rescaled activation h (the
    layer's input for site "input", its output for "output"), or on h's causal sentence mean.
    mode: "soft" (all experts, softmax) or "topk_unnormalized" (softmax, keep the top_k probabilities).
    router_init_scale multiplies the router's default (Kaiming-uniform) initial weights; router_loss adds
    the auxiliary router losses while training. With keep_routing set, `last_routing` holds the routing
    of the last forward (logits (..., E)).
    """

    def __init__(
        self,
        base: nn.Linear,
        site: str,
        num_experts: int,
        mode: str = "soft",
        top_k: int = 1,
        router_input: str = "token",
        context: SequenceContext | None = None,
        router_init_scale: float = 1.0,
        router_loss: RouterLoss | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("soft", "topk_unnormalized"):
            raise ValueError(f"MoV routing mode must be 'soft' or 'topk_unnormalized', got {mode!r}")
        if router_input not in ROUTER_INPUTS:
            raise ValueError(f"unknown router_input {router_input!r}; expected one of {ROUTER_INPUTS}")
        if router_input == "sentence" and context is None:
            raise ValueError("sentence routing needs the model's SequenceContext (see attach_sequence_context)")
        dim = _site_dim(base, site)
        factory = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.base = base
        self.site = site
        self.mode = mode
        self.top_k = top_k
        self.router_input = router_input
        self.vectors = nn.Parameter(torch.ones(num_experts, dim, **factory))
        self.router = nn.Linear(dim, num_experts, bias=False, **factory)
        with torch.no_grad():
            self.router.weight.mul_(router_init_scale)
        self.router_loss = router_loss or RouterLoss()
        self.sentence_mean = CausalMean(context) if router_input == "sentence" else None
        self.keep_routing = False
        self.last_routing: Routing | None = None

    @property
    def num_experts(self) -> int:
        return self.vectors.shape[0]

    def mix(self, h: torch.Tensor) -> torch.Tensor:
        """h: (..., dim) -> h * sum_e p_e l_e, (..., dim)."""
        gate_input = h if self.sentence_mean is None else self.sentence_mean(h)
        routing = route(self.router(gate_input), self.top_k, mode=self.mode)
        if self.keep_routing:
            self.last_routing = routing
        dense = routing.weights if self.mode == "soft" else \
            torch.zeros_like(routing.logits).scatter(-1, routing.indices, routing.weights)
        out = h * (dense.to(h.dtype) @ self.vectors)
        return self.router_loss.attach(out, routing.logits) if self.training else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.site == "input":
            return self.base(self.mix(x))
        return self.mix(self.base(x))
