"""One configuration space for every parameter-efficient method of the two papers.

A :class:`MixtureConfig` names the expert kind ("ia3" vectors or "lora" adapters), how many experts,
how they are routed and where they sit; :func:`apply_method` puts them into a Hugging Face causal LM
with its base weights frozen. The corners of the space:

=====================  =======  ============  =================  ==============================
method                 kind     num_experts   routing            experts
=====================  =======  ============  =================  ==============================
(IA)3                  ia3      1             (none)             trained from scratch
MoV-E                  ia3      E             soft / topK        trained from scratch
LoRA                   lora     1             (none)             trained from scratch
MoLoRA-E               lora     E             soft / topK        trained from scratch
MeteoRA                lora     len(adapters) topK, renormalised  pre-trained LoRAs, frozen
full fine-tuning       full     1             (none)             every weight of the model
=====================  =======  ============  =================  ==============================

Routed methods may fight router collapse with a smaller router initialisation (`router_init_scale`)
and the auxiliary router losses of :class:`meteora.router_input.RouterLoss` (`router_z_loss`,
`router_balance`).

MoLoRA and MeteoRA share one layer (:class:`meteora.layer.MeteoRALinear`) and one op
(:func:`meteora.ops.moe_lora`).
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from torch import nn

from meteora.ia3 import IA3Linear, MoVLinear
from meteora.layer import MeteoRALinear
from meteora.molora import molora_linear
from meteora.router_input import ROUTER_INPUTS, RouterLoss, attach_sequence_context

KINDS = ("ia3", "lora", "full")
IA3_TARGETS = ("k_proj", "v_proj", "down_proj")
IA3_FEEDFORWARD = ("down_proj",)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_TOPK = re.compile(r"^top(\d+)$")


@dataclass(frozen=True)
class MixtureConfig:
    """Which experts, how many, how routed, where.

    kind: "ia3" (rescaling vectors), "lora" (low-rank adapters) or "full" (every weight trained, no expert).
    num_experts: experts per adapted module; 1 = the plain method, no router.
    rank, alpha: LoRA experts' rank and alpha (scaling alpha / rank); ignored for "ia3".
    routing: "soft" (softmax over all experts) or "top<k>" (keep the k best).
    renormalize: top-k weights renormalised over the k (MeteoRA) or not (MoV / MoLoRA paper).
    router_input: "token" (the token's own activation) or "sentence" (causal mean over the sequence).
    targets: module-name suffixes to adapt (None: k/v/down for "ia3", all 7 projections for "lora").
    feedforward: (IA)3 targets rescaled on their input (the FFN intermediate), others on their output.
    adapters: pre-trained PEFT LoRA folders (frozen experts, MeteoRA); None trains experts from scratch.
    temperature, strategy: MeteoRA's gate temperature and the op's forward strategy.
    router_init_scale: factor on the routers' default initial weights (< 1: nearer-uniform routing at start).
    router_z_loss, router_balance: coefficients of the router z-loss and load-balancing loss, per routed layer.
    """

    kind: str = "ia3"
    num_experts: int = 1
    rank: int = 4
    alpha: float = 16.0
    routing: str = "soft"
    renormalize: bool = False
    router_input: str = "token"
    targets: tuple[str, ...] | None = None
    feedforward: tuple[str, ...] = IA3_FEEDFORWARD
    adapters: tuple[str, ...] | None = None
    temperature: float = 1.0
    strategy: str = "auto"
    router_init_scale: float = 1.0
    router_z_loss: float = 0.0
    router_balance: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"MixtureConfig.kind={self.kind!r}; expected one of {KINDS}")
        if self.router_input not in ROUTER_INPUTS:
            raise ValueError(f"MixtureConfig.router_input={self.router_input!r}; expected one of {ROUTER_INPUTS}")
        if self.routing != "soft" and not _TOPK.match(self.routing):
            raise ValueError(f"MixtureConfig.routing={self.routing!r}; expected 'soft' or 'top<k>' (top1, top2, ...)")
        if self.adapters is not None:
            if self.kind != "lora":
                raise ValueError("MixtureConfig.adapters (pre-trained experts) needs kind='lora'")
            object.__setattr__(self, "num_experts", len(self.adapters))
        if self.num_experts < 1:
            raise ValueError(f"MixtureConfig.num_experts={self.num_experts} must be at least 1")
        if self.top_k > self.num_experts:
            raise ValueError(f"MixtureConfig.routing={self.routing!r} picks more experts than num_experts={self.num_experts}")
        if self.kind == "full" and (self.num_experts != 1 or self.adapters is not None):
            raise ValueError("MixtureConfig kind='full' (full fine-tuning) has no experts: set num_experts=1")
        if self.router_init_scale < 0 or self.router_z_loss < 0 or self.router_balance < 0:
            raise ValueError(f"MixtureConfig router_init_scale={self.router_init_scale}, router_z_loss={self.router_z_loss}, "
                             f"router_balance={self.router_balance}: need values >= 0")
        if self.kind == "lora" and (self.rank < 1 or self.alpha <= 0):
            raise ValueError(f"MixtureConfig rank={self.rank}, alpha={self.alpha}: need rank >= 1 and alpha > 0")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> MixtureConfig:
        """Build from a plain mapping (e.g. a Hydra node); unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown MixtureConfig keys {unknown}; expected some of {sorted(known)}")
        values = dict(values)
        for key in ("targets", "feedforward", "adapters"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @property
    def top_k(self) -> int:
        """Experts kept per token (num_experts for soft routing)."""
        match = _TOPK.match(self.routing)
        return int(match.group(1)) if match else self.num_experts

    @property
    def mode(self) -> str:
        """The :func:`meteora.routing.route` mode."""
        if self.routing == "soft":
            return "soft"
        return "topk" if self.renormalize else "topk_unnormalized"

    @property
    def target_modules(self) -> tuple[str, ...]:
        if self.targets is not None:
            return self.targets
        return IA3_TARGETS if self.kind == "ia3" else LORA_TARGETS

    @property
    def label(self) -> str:
        """A short human name: "(IA)3", "MoV-10", "LoRA (r=4)", "MoLoRA-5 top-2, sentence", "MeteoRA top-2",
        "MoV-10 z-loss", "Full fine-tuning"."""
        if self.kind == "full":
            return "Full fine-tuning"
        if self.adapters is not None:
            name = "MeteoRA"
        elif self.num_experts == 1:
            return "(IA)3" if self.kind == "ia3" else f"LoRA (r={self.rank})"
        else:
            name = f"{'MoV' if self.kind == 'ia3' else 'MoLoRA'}-{self.num_experts}"
        extras = [] if self.routing == "soft" else [f"top-{self.top_k}"]
        if self.router_input == "sentence":
            extras.append("sentence")
        if self.router_init_scale != 1.0:
            extras.append(f"router init x{self.router_init_scale:g}")
        if self.router_z_loss > 0:
            extras.append(f"z-loss {self.router_z_loss:g}")
        if self.router_balance > 0:
            extras.append(f"balance {self.router_balance:g}")
        return name + (" " + ", ".join(extras) if extras else "")


def _matches(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def apply_method(model: nn.Module, config: MixtureConfig) -> nn.Module:
    """Freeze the model and add the configured experts (and routers) in place; returns the model.

    With pre-trained `adapters` this is MeteoRA (:func:`meteora.model.attach_meteora`, which returns
    its wrapper); otherwise every nn.Linear whose name ends with one of the targets is wrapped.
    """
    if config.adapters is not None:
        return _apply_meteora(model, config)
    if config.kind == "full":
        return model.requires_grad_(True)
    for param in model.parameters():
        param.requires_grad_(False)
    context = attach_sequence_context(model) if config.router_input == "sentence" else None
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _matches(n, config.target_modules)]
    if not names:
        raise ValueError(f"no nn.Linear module of {type(model).__name__} matches targets {config.target_modules}")
    for name in names:
        base = model.get_submodule(name)
        _replace(model, name, _expert_layer(base, name, config, context))
    return model


def _expert_layer(base: nn.Linear, name: str, config: MixtureConfig, context) -> nn.Module:
    router = {"router_init_scale": config.router_init_scale,
              "router_loss": RouterLoss(config.router_z_loss, config.router_balance)}
    if config.kind == "ia3":
        site = "input" if _matches(name, config.feedforward) else "output"
        if config.num_experts == 1:
            return IA3Linear(base, site)
        return MoVLinear(base, site, config.num_experts, config.mode, config.top_k, config.router_input, context, **router)
    return molora_linear(
        base, config.num_experts, config.rank, config.alpha, config.mode, config.top_k, config.router_input, context,
        **router,
    )


def _apply_meteora(model: nn.Module, config: MixtureConfig) -> nn.Module:
    from meteora.model import attach_meteora

    if config.router_input != "token":
        raise ValueError("pre-trained adapters (MeteoRA) are routed per token: set router_input='token'")
    return attach_meteora(
        model, list(config.adapters), top_k=config.top_k, temperature=config.temperature,
        strategy=config.strategy, target_modules=config.target_modules, mode=config.mode,
    )


def count_trainable(model: nn.Module) -> dict[str, float]:
    """{"trainable": n, "total": n, "percent": 100 * trainable / total} over the model's parameters."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / max(total, 1)}


def expert_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The routed layers of a model (MoV and MoLoRA / MeteoRA layers), by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (MoVLinear, MeteoRALinear))}
