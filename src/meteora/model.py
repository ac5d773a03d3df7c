"""Attaching MeteoRA to a Hugging Face causal LM, and what the pipeline asks of the attached model:
forced-adapter modes, routing traces, the gate loss, routing accuracy, saving and loading gates."""
from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import AdapterBank, load_adapter_bank
from .checkpoint import load_gate_state, save_gate_state
from .layer import MeteoRALinear
from .routing import check_routing_args

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


class MeteoRAModel(nn.Module):
    """A causal LM whose adapted linears are :class:`MeteoRALinear`; calls and attributes reach the LM."""

    def __init__(self, model: nn.Module, adapter_names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.adapter_names = list(adapter_names)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)

    # --- the layers and their settings -------------------------------------------------------
    def meteora_layers(self) -> dict[str, MeteoRALinear]:
        """Module name (as in the LM, e.g. ``model.layers.0.self_attn.q_proj``) -> layer."""
        return {name: m for name, m in self.model.named_modules() if isinstance(m, MeteoRALinear)}

    def gate_parameters(self) -> list[nn.Parameter]:
        return [layer.gate.weight for layer in self.meteora_layers().values()]

    @property
    def base_model_name(self) -> str:
        config = getattr(self.model, "config", None)
        return str(getattr(config, "_name_or_path", "") or getattr(config, "model_type", "unknown"))

    @property
    def top_k(self) -> int:
        return next(iter(self.meteora_layers().values())).top_k

    @property
    def temperature(self) -> float:
        return next(iter(self.meteora_layers().values())).temperature

    def set_top_k(self, top_k: int) -> None:
        for layer in self.meteora_layers().values():
            check_routing_args(layer.num_adapters, top_k, layer.temperature, layer.mode)
            layer.top_k = top_k

    def set_temperature(self, temperature: float) -> None:
        for layer in self.meteora_layers().values():
            check_routing_args(layer.num_adapters, layer.top_k, temperature, layer.mode)
            layer.temperature = temperature

    def set_strategy(self, strategy: str) -> None:
        for layer in self.meteora_layers().values():
            layer.strategy = strategy

    def adapter_index(self, adapter: int | str) -> int:
        if isinstance(adapter, str):
            if adapter not in self.adapter_names:
                raise KeyError(f"unknown adapter {adapter!r}; this model has {self.adapter_names}")
            return self.adapter_names.index(adapter)
        if not 0 <= adapter < len(self.adapter_names):
            raise IndexError(f"adapter index {adapter} out of range for {len(self.adapter_names)} adapters")
        return adapter

    @contextlib.contextmanager
    def _forced(self, adapter: int | str, single: bool) -> Iterator[None]:
        index = self.adapter_index(adapter)
        layers = list(self.meteora_layers().values())
        found = [(layer.forced_adapter, layer.forced_single) for layer in layers]
        for layer in layers:
            layer.forced_adapter, layer.forced_single = index, single
        try:
            yield
        finally:  # restore what was there: contexts nest (an oracle inside single_adapter returns to it)
            for layer, (forced, was_single) in zip(layers, found):
                layer.forced_adapter, layer.forced_single = forced, was_single

    def single_adapter(self, adapter: int | str):
        """Context: the model with just this adapter, no gate (equals PEFT with that adapter)."""
        return self._forced(adapter, single=True)

    def oracle(self, adapter: int | str):
        """Context: every token routed to this adapter with weight 1, through the mixture strategy."""
        return self._forced(adapter, single=False)

    # --- routing: traces, gate loss, accuracy -------------------------------------------------
    def keep_routing(self, keep: bool = True) -> None:
        """Keep each layer's last routing (needed by gate_loss, routing_accuracy and routing_trace)."""
        for layer in self.meteora_layers().values():
            layer.keep_routing = keep
            if not keep:
                layer.last_routing = None

    def _routings(self):
        routings = {name: layer.last_routing for name, layer in self.meteora_layers().items()}
        if any(r is None for r in routings.values()):
            raise RuntimeError("no routing kept from the last forward: call keep_routing(True) before it")
        return routings

    def routing_trace(self) -> dict[str, torch.Tensor]:
        """Module name -> chosen adapter indices (B, T, k) of the last forward."""
        return {name: r.indices.detach().cpu() for name, r in self._routings().items()}

    @staticmethod
    def _gate_targets(logits: torch.Tensor, task_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Each token's task id (its sample's), -100 on padding: (B, T) -> flattened (B*T,)."""
        targets = task_ids.to(logits.device)[:, None].expand(logits.shape[:2])
        if attention_mask is not None:
            targets = targets.masked_fill(attention_mask.to(logits.device) == 0, -100)
        return targets.flatten()

    def gate_loss(self, task_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The paper's gate objective: ONE cross-entropy over the logits of all gates concatenated, against
        each token's task id (its sample's), i.e. the mean over gates and non-padding tokens.
        task_ids: (B,); attention_mask: (B, T); returns a float32 scalar."""
        routings = list(self._routings().values())
        logits = torch.cat([r.logits.flatten(0, 1).float() for r in routings])  # (G*B*T, N)
        targets = torch.cat([self._gate_targets(r.logits, task_ids, attention_mask) for r in routings])
        return F.cross_entropy(logits, targets, ignore_index=-100)

    def gate_loss_per_gate(self, task_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Module name -> that gate's own cross-entropy (mean over non-padding tokens), for logging;
        their mean is :meth:`gate_loss`."""
        return {
            name: F.cross_entropy(r.logits.flatten(0, 1).float(), self._gate_targets(r.logits, task_ids, attention_mask), ignore_index=-100)
            for name, r in self._routings().items()
        }

    def routing_accuracy(self, task_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict:
        """Share of tokens whose top-1 adapter (the lower index on ties) is their task's: overall, per decoder
        layer, per module. Counted on the device, read back once."""
        routings = self._routings()
        counts = []  # hits per module, then the number of valid tokens
        valid = None
        for routing in routings.values():
            top1 = routing.logits.detach().argmax(-1)  # (B, T): the first maximum, as topk_lowest_index
            hit = top1 == task_ids.to(top1.device)[:, None]
            if valid is None:
                valid = torch.ones_like(hit) if attention_mask is None else attention_mask.to(top1.device).bool()
            counts.append((hit & valid).sum())
        if valid is None:
            return {"overall": 0.0, "per_layer": {}, "per_module": {}}
        *correct, count = torch.stack([*counts, valid.sum()]).tolist()
        per_module = {name: c / max(count, 1.0) for name, c in zip(routings, correct)}
        per_layer: dict[int, list[float]] = {}
        for name, share in per_module.items():
            match = _LAYER_INDEX.search(f".{name}.")
            if match:
                per_layer.setdefault(int(match.group(1)), []).append(share)
        return {
            "overall": sum(correct) / max(count * len(correct), 1.0),
            "per_layer": {layer: sum(v) / len(v) for layer, v in sorted(per_layer.items())},
            "per_module": per_module,
        }

    # --- gates on disk ---------------------------------------------------------------------------
    def save_gates(self, directory: str | os.PathLike) -> None:
        """Write gates.safetensors and manifest.json (adapter order, base model, top_k, temperature)."""
        state = {name: layer.gate.weight for name, layer in self.meteora_layers().items()}
        save_gate_state(directory, state, self.adapter_names, self.base_model_name, self.top_k, self.temperature)

    def load_gates(self, directory: str | os.PathLike, use_manifest_settings: bool = True, allow_other_base: bool = False,
                   cast: bool = False) -> dict:
        """Load gates saved by :meth:`save_gates`, completely or not at all: everything is checked before
        anything is copied, and :class:`~meteora.GateManifestError` (naming the file and module) is raised
        for a damaged file, a manifest without a key, other adapters or another order, a missing or extra
        module, a wrong shape or dtype, NaN values, or gates trained on another base model (the manifest's
        ``base_model`` against :attr:`base_model_name`; ``allow_other_base=True`` loads them with a
        warning, e.g. for the same model saved under another path). ``cast=True`` loads gates saved in
        another floating dtype into this model's (e.g. float32 gates into a bfloat16 model for inference).
        Returns the manifest; with ``use_manifest_settings`` its top_k and temperature are applied."""
        layers = self.meteora_layers()
        expected = {name: layer.gate.weight for name, layer in layers.items()}
        state, manifest = load_gate_state(directory, self.adapter_names, expected, self.base_model_name, allow_other_base, cast)
        if use_manifest_settings:
            for layer in layers.values():
                check_routing_args(layer.num_adapters, int(manifest["top_k"]), float(manifest["temperature"]), layer.mode)
        with torch.no_grad():
            for name, weight in state.items():
                layers[name].gate.weight.copy_(weight)
        if use_manifest_settings:
            self.set_top_k(int(manifest["top_k"]))
            self.set_temperature(float(manifest["temperature"]))
        return manifest


def attach_meteora(
    model: nn.Module,
    adapters: AdapterBank | Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike],
    top_k: int = 2,
    temperature: float = 1.0,
    strategy: str = "auto",
    target_modules: Sequence[str] = DEFAULT_TARGETS,
    mode: str = "topk",
    stack_weights: bool = True,
) -> MeteoRAModel:
    """Embed N LoRA adapters (PEFT folders, a name -> folder mapping, or an :class:`AdapterBank`) into a
    Hugging Face LLaMA-architecture causal LM, in place: every target nn.Linear becomes a
    :class:`MeteoRALinear` with its own gate. Everything but the gates is frozen. With ``stack_weights``
    each base weight becomes a view into one buffer with its gate and A's (see :class:`MeteoRALinear`)."""
    attached = [name for name, m in model.named_modules() if isinstance(m, MeteoRALinear)]
    if attached:
        raise ValueError(
            f"the model already has MeteoRA attached ({len(attached)} layers, e.g. {attached[0]}): attach_meteora "
            "takes a plain base model; load a fresh one (or deep-copy it before the first attach)"
        )
    bank = adapters if isinstance(adapters, AdapterBank) else load_adapter_bank(adapters, model)
    for param in model.parameters():
        param.requires_grad_(False)
    targets = {name: stacked for name, stacked in bank.modules.items() if name.split(".")[-1] in target_modules}
    if not targets:
        raise ValueError(f"none of the adapters' modules is among the target modules {tuple(target_modules)}")
    for name, stacked in targets.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        if isinstance(base, MeteoRALinear):
            raise ValueError(f"module {name} already carries MeteoRA; attach once")
        layer = MeteoRALinear(base, stacked.lora_a, stacked.lora_b, stacked.scaling, top_k, temperature, strategy, mode,
                              stack_weights=stack_weights)
        setattr(parent, child, layer)
    return MeteoRAModel(model, bank.names)
