"""MeteoRA: many task LoRA adapters in one LLM, chosen per token by trained gates; and the shared
mixture-of-LoRA op that MoV / MoLoRA build on."""
from .adapters import AdapterBank, AdapterError, StackedLoRA, load_adapter_bank, random_adapter_bank, read_adapter, validate_adapter
from .checkpoint import GateManifestError
from .layer import MeteoRALinear
from .model import DEFAULT_TARGETS, MeteoRAModel, attach_meteora
from .ops import STRATEGIES, lora_delta, mix_adapters, moe_lora
from .routing import ROUTING_MODES, Routing, route

__all__ = [
    "DEFAULT_TARGETS",
    "ROUTING_MODES",
    "STRATEGIES",
    "AdapterBank",
    "AdapterError",
    "GateManifestError",
    "MeteoRALinear",
    "MeteoRAModel",
    "Routing",
    "StackedLoRA",
    "attach_meteora",
    "load_adapter_bank",
    "lora_delta",
    "mix_adapters",
    "moe_lora",
    "random_adapter_bank",
    "read_adapter",
    "route",
    "validate_adapter",
]
