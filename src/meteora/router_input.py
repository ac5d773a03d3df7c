"""What a router sees (the token, or a sentence embedding of the sequence so far) and how it is regularised.

MoV / MoLoRA route each token on the activation their experts act on ("token" routing). The paper's
ablation routes on a sentence embedding instead ("sentence" routing). In a decoder-only model the
sentence embedding of token t is the mean of the activations of the non-padding tokens 1..t: causal, so
teacher-forced training and cached greedy decoding route identically.

The padding mask reaches the layers through a :class:`SequenceContext` shared by every layer of one
model and filled by a forward pre-hook on the model (:func:`attach_sequence_context`).

Against router collapse (every token sent to one expert) a router may add auxiliary losses while
training (:class:`RouterLoss`): the router z-loss of ST-MoE (Zoph et al. 2022), mean over tokens of
logsumexp(logits)^2, which keeps the logits small, and the load-balancing loss of the Switch
Transformer (Fedus et al. 2021), E * sum_e f_e P_e with f_e the fraction of tokens whose best expert
is e and P_e the mean routing probability of e, which is 1 for a uniform load and E for a collapse.
Each routed layer adds its own terms (so the totals are sums over layers, as in both papers); they
reach the optimiser through the backward pass of the layer's output, without changing the training loop.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

ROUTER_INPUTS = ("token", "sentence")


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """logits (..., E) -> mean over tokens of logsumexp(logits)^2, a scalar (float32)."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


def load_balancing_loss(logits: torch.Tensor) -> torch.Tensor:
    """logits (..., E) -> E * sum_e f_e P_e (f_e: share of tokens whose argmax is e, no gradient;
    P_e: mean softmax probability of e), a scalar (float32): 1 when balanced, up to E when collapsed."""
    probs = torch.softmax(logits.float(), dim=-1).reshape(-1, logits.shape[-1])
    num_experts = probs.shape[-1]
    share = torch.bincount(probs.argmax(-1), minlength=num_experts).to(probs.dtype) / max(probs.shape[0], 1)
    return num_experts * (share * probs.mean(0)).sum()


class _AttachLoss(torch.autograd.Function):
    """Identity on `out` whose backward also sends gradient 1 into `loss` (a scalar): the loss joins
    the training objective without being returned to the training loop."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.loss_meta = (loss.dtype, loss.device)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype, device = ctx.loss_meta
        return grad_out, torch.ones((), dtype=dtype, device=device)


class RouterLoss:
    """The auxiliary router losses of one layer: z_loss * router_z_loss + balance * load_balancing_loss.

    `attach(out, logits)` returns `out` unchanged, with the weighted losses added to what its backward
    differentiates (only when some coefficient is positive and gradients flow); `last` holds the last
    attached value (a detached scalar tensor, for logging; no host sync).
    """

    def __init__(self, z_loss: float = 0.0, balance: float = 0.0) -> None:
        if z_loss < 0 or balance < 0:
            raise ValueError(f"router loss coefficients must be >= 0, got z_loss={z_loss}, balance={balance}")
        self.z_loss = z_loss
        self.balance = balance
        self.last: torch.Tensor | None = None

    @property
    def active(self) -> bool:
        return self.z_loss > 0 or self.balance > 0

    def value(self, logits: torch.Tensor) -> torch.Tensor:
        """The weighted auxiliary loss of logits (..., E), a scalar."""
        total = logits.new_zeros((), dtype=torch.float32)
        if self.z_loss > 0:
            total = total + self.z_loss * router_z_loss(logits)
        if self.balance > 0:
            total = total + self.balance * load_balancing_loss(logits)
        return total

    def attach(self, out: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if not self.active or not torch.is_grad_enabled() or not logits.requires_grad:
            return out
        loss = self.value(logits)
        self.last = loss.detach()
        return _AttachLoss.apply(out, loss)


class SequenceContext:
    """The attention mask (B, T_total) of the model's current forward call, or None (no padding)."""

    def __init__(self) -> None:
        self.attention_mask: torch.Tensor | None = None

    def _capture(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        self.attention_mask = mask if mask is None or mask.dim() == 2 else None


def attach_sequence_context(model: nn.Module) -> SequenceContext:
    """The model's SequenceContext, created and hooked on the first call (one per model). The hook sits
    on the model's decoder when it has one (Hugging Face `get_decoder`), so that calling the decoder
    alone, without the LM head, also routes with the right padding mask."""
    context = getattr(model, "_meteora_sequence_context", None)
    if context is None:
        context = SequenceContext()
        decoder = model.get_decoder() if callable(getattr(model, "get_decoder", None)) else model
        decoder.register_forward_pre_hook(context._capture, with_kwargs=True)
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
