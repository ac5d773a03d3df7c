"""The adapter bank: N PEFT LoRA adapters stacked, per adapted module, into contiguous tensors.

A PEFT LoRA folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``.bin``) with keys
``base_model.model.<module>.lora_A.weight`` (r x d_in) and ``...lora_B.weight`` (d_out x r). The bank
stacks them in the given order into ``lora_a`` (N, r_max, d_in), ``lora_b`` (N, d_out, r_max) and
``scaling`` (N,); smaller ranks are zero-padded, which changes nothing (the padded rows of A meet
zero columns of B). An adapter that does not touch a module contributes zeros there.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .io import complete_interrupted_swap

PEFT_PREFIX = "base_model.model."
A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"


class AdapterError(ValueError):
    """An adapter folder that cannot be used; the message names the folder and, where known, the module."""


@dataclass
class LoraAdapter:
    """One PEFT LoRA adapter read from disk: per module (A (r, d_in), B (d_out, r)) and its scaling."""

    name: str
    path: Path
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scaling: dict[str, float]


@dataclass
class StackedLoRA:
    """All adapters of one module: lora_a (N, r, d_in), lora_b (N, d_out, r), scaling (N,) float32."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: torch.Tensor


@dataclass
class AdapterBank:
    """N adapters in a fixed order (gate output i means ``names[i]``), stacked per module."""

    names: list[str]
    modules: dict[str, StackedLoRA] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.names)


def _pattern_value(pattern: Mapping[str, float], module: str, default: float) -> float:
    """PEFT's rank/alpha patterns: a key matches a module name or a dotted suffix of it (as a regex)."""
    for key, value in pattern.items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def _read_config(path: Path) -> dict:
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise AdapterError(f"adapter {path}: missing adapter_config.json")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise AdapterError(f"adapter {path}: adapter_config.json is not valid JSON ({err})") from err
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"adapter {path}: peft_type is {config.get('peft_type')!r}, only LORA adapters can be mixed")
    if config.get("use_dora"):
        raise AdapterError(f"adapter {path}: DoRA adapters are not supported (use_dora=true)")
    return config


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    safetensors_file = path / "adapter_model.safetensors"
    bin_file = path / "adapter_model.bin"
    if safetensors_file.is_file():
        from safetensors.torch import load_file

        try:
            return load_file(str(safetensors_file))
        except Exception as err:  # safetensors raises several types for a damaged file
            raise AdapterError(f"adapter {path}: adapter_model.safetensors is not a readable safetensors file ({err})") from err
    if bin_file.is_file():
        try:
            return torch.load(bin_file, map_location="cpu", weights_only=True)
        except Exception as err:
            raise AdapterError(f"adapter {path}: adapter_model.bin cannot be read ({err})") from err
    raise AdapterError(f"adapter {path}: missing adapter_model.safetensors (or adapter_model.bin)")


def read_adapter(path: str | os.PathLike, name: str | None = None) -> LoraAdapter:
    """Read one PEFT LoRA folder; raise :class:`AdapterError` for anything missing or malformed."""
    path = Path(path)
    complete_interrupted_swap(path)
    if not path.is_dir():
        raise AdapterError(f"adapter {path}: not a directory")
    config = _read_config(path)
    state = _read_state_dict(path)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        bare = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        bare = re.sub(r"\.lora_([AB])\.[^.]+\.weight$", r".lora_\1.weight", bare)  # keys saved with the adapter name
        for suffix, part in ((A_SUFFIX, "A"), (B_SUFFIX, "B")):
            if bare.endswith(suffix):
                modules.setdefault(bare[: -len(suffix)], {})[part] = tensor
                break
        else:
            raise AdapterError(f"adapter {path}: unsupported tensor {key!r} (only lora_A / lora_B weights can be mixed)")
    if not modules:
        raise AdapterError(f"adapter {path}: no LoRA weights found")
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    scaling: dict[str, float] = {}
    for module, parts in modules.items():
        if set(parts) != {"A", "B"}:
            raise AdapterError(f"adapter {path}, module {module}: has lora_{''.join(parts)} but not both lora_A and lora_B")
        lora_a, lora_b = parts["A"], parts["B"]
        if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_a.shape[0] != lora_b.shape[1]:
            raise AdapterError(
                f"adapter {path}, module {module}: lora_A {tuple(lora_a.shape)} and lora_B {tuple(lora_b.shape)} "
                "are not (r, d_in) and (d_out, r)"
            )
        rank = lora_a.shape[0]
        config_rank = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", rank))
        if rank != config_rank:
            raise AdapterError(
                f"adapter {path}/adapter_model.safetensors, module {module}: weights of rank {rank}, but adapter_config.json "
                f"gives r = {config_rank} (its scaling would be wrong); fix r / rank_pattern or re-save the adapter"
            )
        for part, tensor in (("lora_A", lora_a), ("lora_B", lora_b)):
            bad = int((~torch.isfinite(tensor)).sum()) if tensor.is_floating_point() else 0
            if bad:
                raise AdapterError(
                    f"adapter {path}/adapter_model.safetensors, module {module}: {part} has {bad} non-finite (NaN or inf) "
                    "values; retrain or re-export the adapter"
                )
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", rank))
        weights[module] = (lora_a, lora_b)
        scaling[module] = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return LoraAdapter(name or path.name, path, weights, scaling)


def _check_against_model(adapter: LoraAdapter, model: nn.Module) -> None:
    for module, (lora_a, lora_b) in adapter.weights.items():
        try:
            target = model.get_submodule(module)
        except AttributeError:
            raise AdapterError(f"adapter {adapter.path}: target module {module!r} does not exist in the base model") from None
        if not isinstance(target, nn.Linear):
            raise AdapterError(f"adapter {adapter.path}, module {module}: the base module is a {type(target).__name__}, not nn.Linear")
        expected = (target.in_features, target.out_features)
        found = (lora_a.shape[1], lora_b.shape[0])
        if found != expected:
            raise AdapterError(
                f"adapter {adapter.path}, module {module}: made for d_in x d_out = {found[0]} x {found[1]}, "
                f"but the base model's module is {expected[0]} x {expected[1]} (an adapter for another model size?)"
            )


def validate_adapter(path: str | os.PathLike, base_model: nn.Module) -> LoraAdapter:
    """Read a PEFT LoRA folder and check every module against ``base_model``; returns the adapter."""
    adapter = read_adapter(path)
    _check_against_model(adapter, base_model)
    return adapter


def _named_paths(adapter_dirs: Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike]) -> list[tuple[str, Path]]:
    if isinstance(adapter_dirs, Mapping):
        named = [(str(name), Path(path)) for name, path in adapter_dirs.items()]
    else:
        named = [(Path(path).name, Path(path)) for path in adapter_dirs]
    if not named:
        raise AdapterError("no adapters given")
    seen: dict[str, Path] = {}
    for name, path in named:
        if name in seen:
            raise AdapterError(f"duplicate adapter name {name!r}: {seen[name]} and {path}")
        seen[name] = path
    return named


def stack_adapters(adapters: Sequence[LoraAdapter], dtype: torch.dtype | None = None) -> AdapterBank:
    """Stack adapters (in order) per module, zero-padding ranks to the largest one."""
    modules = sorted({m for adapter in adapters for m in adapter.weights})
    bank = AdapterBank([a.name for a in adapters])
    for module in modules:
        present = [a.weights[module] for a in adapters if module in a.weights]
        d_in, d_out = present[0][0].shape[1], present[0][1].shape[0]
        for adapter in adapters:
            if module in adapter.weights and (adapter.weights[module][0].shape[1], adapter.weights[module][1].shape[0]) != (d_in, d_out):
                raise AdapterError(f"adapter {adapter.path}, module {module}: shape differs from the other adapters'")
        rank = max(a.shape[0] for a, _ in present)
        out_dtype = dtype or present[0][0].dtype
        lora_a = torch.zeros(len(adapters), rank, d_in, dtype=out_dtype)
        lora_b = torch.zeros(len(adapters), d_out, rank, dtype=out_dtype)
        scaling = torch.zeros(len(adapters), dtype=torch.float32)
        for i, adapter in enumerate(adapters):
            if module not in adapter.weights:
                continue
            a, b = adapter.weights[module]
            lora_a[i, : a.shape[0]] = a
            lora_b[i, :, : b.shape[1]] = b
            scaling[i] = adapter.scaling[module]
        bank.modules[module] = StackedLoRA(lora_a, lora_b, scaling)
    return bank


def load_adapter_bank(
    adapter_dirs: Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike],
    base_model: nn.Module | None = None,
    dtype: torch.dtype | None = None,
) -> AdapterBank:
    """Read N PEFT LoRA folders (a list, named by folder, or a name -> folder mapping), in order.

    With ``base_model`` every module is checked to exist as an nn.Linear of matching shape.
    """
    adapters = [read_adapter(path, name) for name, path in _named_paths(adapter_dirs)]
    if base_model is not None:
        for adapter in adapters:
            _check_against_model(adapter, base_model)
    return stack_adapters(adapters, dtype)


def random_adapter_bank(
    model: nn.Module,
    num_adapters: int,
    rank: int = 8,
    alpha: float = 16.0,
    target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
) -> AdapterBank:
    """Random adapters for every matching nn.Linear (benchmarks, tests): A and B ~ N(0, 1/d)."""
    bank = AdapterBank([f"adapter_{i}" for i in range(num_adapters)])
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.split(".")[-1] in target_modules:
            lora_a = torch.randn(num_adapters, rank, module.in_features, generator=generator) / math.sqrt(module.in_features)
            lora_b = torch.randn(num_adapters, module.out_features, rank, generator=generator) / math.sqrt(rank)
            bank.modules[name] = StackedLoRA(
                lora_a.to(dtype or module.weight.dtype),
                lora_b.to(dtype or module.weight.dtype),
                torch.full((num_adapters,), alpha / rank),
            )
    if not bank.modules:
        raise AdapterError(f"no nn.Linear named one of {tuple(target_modules)} in the model")
    return bank
