"""Gate routing: from gate logits to the chosen adapters and their mixing weights.

Three modes share one entry, :func:`route`:

* ``"topk"`` (MeteoRA): keep the k largest logits, ``w = softmax(top-k logits / T)``.
* ``"soft"`` (MoV / MoLoRA default): every expert, ``w = softmax(logits / T)``.
* ``"topk_unnormalized"`` (MoV / MoLoRA top-k ablation): ``softmax(logits / T)`` over all
  experts, then keep the k largest probabilities without renormalising them.

Ties: among equal logits the lower adapter index wins, in every strategy and kernel.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

ROUTING_MODES = ("topk", "soft", "topk_unnormalized")


@dataclass
class Routing:
    """What the gates decided for a batch of tokens.

    logits:  (..., N) float32 (float64 for float64 inputs), the raw gate outputs (for the gate loss).
    indices: (..., k) int64, the chosen adapters, best first.
    weights: (..., k) float32 (float64 for float64 inputs), their mixing weights.
    """

    logits: torch.Tensor
    indices: torch.Tensor
    weights: torch.Tensor

    def reshape(self, *leading: int) -> Routing:
        """The same routing with new leading dimensions (the last one is kept)."""
        return Routing(
            self.logits.reshape(*leading, self.logits.shape[-1]),
            self.indices.reshape(*leading, self.indices.shape[-1]),
            self.weights.reshape(*leading, self.weights.shape[-1]),
        )


def check_routing_args(num_adapters: int, top_k: int, temperature: float, mode: str) -> None:
    """Raise TypeError for a top_k that is no integer, ValueError for a routing setting that cannot work."""
    if mode not in ROUTING_MODES:
        raise ValueError(f"unknown routing mode {mode!r}; expected one of {ROUTING_MODES}")
    if isinstance(top_k, bool) or not hasattr(type(top_k), "__index__"):
        raise TypeError(f"top_k must be an integer, got {top_k!r} ({type(top_k).__name__})")
    if mode != "soft" and not 1 <= top_k <= num_adapters:
        raise ValueError(f"top_k={top_k} must be between 1 and the number of adapters ({num_adapters})")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")


def topk_lowest_index(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest values along the last dim, ties broken towards the lower index.

    values: (..., N) -> (top values (..., k), indices (..., k) int64), best first.
    """
    sorted_values, order = torch.sort(values, dim=-1, descending=True, stable=True)
    return sorted_values[..., :k], order[..., :k]


def route(logits: torch.Tensor, top_k: int, temperature: float = 1.0, mode: str = "topk") -> Routing:
    """Turn gate logits (..., N) into a :class:`Routing` (float32 weights, float64 for float64 logits)."""
    check_routing_args(logits.shape[-1], top_k, temperature, mode)
    return route_unchecked(logits, top_k, temperature, mode)


def scaled_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature; the logits themselves at temperature 1 (the same values, one operation fewer)."""
    return logits if temperature == 1 else logits / temperature


def route_unchecked(logits: torch.Tensor, top_k: int, temperature: float, mode: str) -> Routing:
    """:func:`route` without checking its settings (the hot path, settings checked once at attach time)."""
    num_adapters = logits.shape[-1]
    logits = logits if logits.dtype == torch.float64 else logits.float()
    if mode == "soft":
        weights = torch.softmax(scaled_logits(logits, temperature), dim=-1)
        indices = torch.arange(num_adapters, device=logits.device).expand(logits.shape)
        return Routing(logits, indices, weights)
    top_logits, indices = topk_lowest_index(logits, top_k)
    if mode == "topk":
        weights = torch.softmax(scaled_logits(top_logits, temperature), dim=-1)
    else:
        weights = torch.softmax(scaled_logits(logits, temperature), dim=-1).gather(-1, indices)
    return Routing(logits, indices, weights)


def forced_routing(logits: torch.Tensor, adapter: int) -> Routing:
    """Every token to one adapter with weight 1 (single-adapter and oracle modes). logits: (..., N)."""
    leading = logits.shape[:-1]
    indices = torch.full((*leading, 1), adapter, dtype=torch.long, device=logits.device)
    weights = torch.ones((*leading, 1), dtype=torch.float32, device=logits.device)
    return Routing(logits.float(), indices, weights)
