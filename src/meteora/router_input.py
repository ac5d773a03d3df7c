"""What a router sees: the token's own activation, or a sentence embedding of the sequence so far.

MoV / MoLoRA route each token on the activation their experts act on ("token" routing). The paper's
ablation routes on a sentence embedding instead ("sentence" routing). In a decoder-only model the
sentence embedding of token t is the mean of the activations of the non-padding tokens 1..t: causal, so
teacher-forced training and cached greedy decoding route identically.

The padding mask reaches the layers through a :class:`SequenceContext` shared by every layer of one
model and filled by a forward pre-hook on the model (:func:`attach_sequence_context`).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

ROUTER_INPUTS = ("token", "sentence")


class SequenceContext:
    """The attention mask (B, T_total) of the model's current forward call, or None (no padding)."""

    def __init__(self) -> None:
        self.attention_mask: torch.Tensor | None = None

    def _capture(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        self.attention_mask = mask if mask is None or mask.dim() == 2 else None


def attach_sequence_context(model: nn.Module) -> SequenceContext:
    """The model's SequenceContext, created and hooked on the first call (one per model)."""
    context = getattr(model, "_meteora_sequence_context", None)
    if context is None:
        context = SequenceContext()
        model.register_forward_pre_hook(context._capture, with_kwargs=True)
        model._meteora_sequence_context = context
    return context


class CausalMean(nn.Module):
    """Running mean of a sequence's activations over its non-padding tokens.

    forward(h (B, T, d)) -> (B, T, d): position t holds the mean of h over the non-padding positions
    <= t (zeros before the first one). When the context's mask is longer than T the call continues the
    previous one (cached decoding: the mask covers past + new tokens), and the running sums are reused;
    a previous batch of one is a prefix shared by every sequence of the new batch (a repeated KV cache).
    """

    def __init__(self, context: SequenceContext) -> None:
        super().__init__()
        self.context = context
        self._sum: torch.Tensor | None = None
        self._count: torch.Tensor | None = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.dim() != 3:
            raise ValueError(f"sentence routing needs activations of shape (batch, seq, dim), got {tuple(h.shape)}")
        batch, steps, _ = h.shape
        mask = self.context.attention_mask
        if mask is None:
            mask = torch.ones(batch, steps, device=h.device)
        if mask.shape[0] != batch or mask.shape[1] < steps:
            raise ValueError(
                f"attention mask of shape {tuple(mask.shape)} does not fit activations of shape {tuple(h.shape)}"
            )
        continuing = mask.shape[1] > steps
        if continuing and (self._sum is None or self._sum.shape[0] not in (1, batch)):
            raise ValueError("cached decoding step without the running sums of a previous call (sentence routing)")
        m = mask[:, -steps:].to(torch.float32).unsqueeze(-1)
        sums = torch.cumsum(h.float() * m, dim=1)
        counts = torch.cumsum(m, dim=1)
        if continuing:
            sums = sums + self._sum.unsqueeze(1)
            counts = counts + self._count.unsqueeze(1)
        self._sum, self._count = sums[:, -1].detach(), counts[:, -1].detach()
        return (sums / counts.clamp_min(1.0)).to(h.dtype)
