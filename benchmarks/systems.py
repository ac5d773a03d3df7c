"""The whole-model systems compared, each on its own LLaMA-architecture model with the same random weights:
``bare``, ``peft_lora`` (PEFT, one LoRA on the 7 projections), ``peft_arrow`` (PEFT's Arrow routing over
N LoRAs, top-k per token), ``meteora`` (:func:`meteora.attach_meteora` with N random adapters) and
``meteora_unstacked`` (the same with ``stack_weights=False``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from meteora import DEFAULT_TARGETS, attach_meteora, random_adapter_bank

from .config import BenchConfig, Shapes

SYSTEMS = ("bare", "peft_lora", "peft_arrow", "meteora", "meteora_unstacked")


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_llama(shapes: Shapes, layers: int, dtype: torch.dtype, device: torch.device, seed: int) -> nn.Module:
    """A LlamaForCausalLM with random weights, built on the device in the given dtype, frozen, eval mode;
    generation never stops early (no EOS token)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=shapes.hidden,
        intermediate_size=shapes.intermediate,
        num_attention_heads=shapes.heads,
        num_key_value_heads=shapes.kv_heads,
        head_dim=shapes.head_dim,
        num_hidden_layers=layers,
        vocab_size=shapes.vocab,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    with _default_dtype(dtype), torch.device(device):
        model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval().requires_grad_(False)


def _lora_config(cfg: BenchConfig, **extra):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        target_modules=list(DEFAULT_TARGETS),
        lora_dropout=0.0,
        init_lora_weights=False,
        **extra,
    )


def build_system(
    name: str, cfg: BenchConfig, shapes: Shapes, layers: int, dtype: torch.dtype, device: torch.device
) -> nn.Module:
    """The system ``name`` on a fresh model; adapters random (seeded), in the model's dtype."""
    from peft import get_peft_model

    model = build_llama(shapes, layers, dtype, device, cfg.seed)
    if name == "bare":
        return model
    torch.manual_seed(cfg.seed + 1)
    if name == "peft_lora":
        return get_peft_model(model, _lora_config(cfg), autocast_adapter_dtype=False).eval()
    if name == "peft_arrow":
        try:
            from peft import ArrowConfig
        except ImportError as err:
            import peft

            raise RuntimeError(f"peft {peft.__version__} has no Arrow routing (ArrowConfig)") from err
        tasks = [f"task_{i}" for i in range(cfg.num_adapters)]
        peft_model = get_peft_model(model, _lora_config(cfg), adapter_name=tasks[0], autocast_adapter_dtype=False)
        for task in tasks[1:]:
            peft_model.add_adapter(task, _lora_config(cfg), autocast_adapter_dtype=False)
        arrow = ArrowConfig(top_k=cfg.top_k, router_temperature=1.0, rng_seed=cfg.seed)
        arrow.task_adapter_names, arrow.gks_adapter_names = tasks, []
        peft_model.add_adapter("arrow_router", _lora_config(cfg, arrow_config=arrow), autocast_adapter_dtype=False)
        peft_model.set_adapter("arrow_router")
        return peft_model.to(dtype).eval()
    if name in ("meteora", "meteora_unstacked"):
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        bank = random_adapter_bank(model, cfg.num_adapters, cfg.rank, cfg.alpha, generator=gen, dtype=dtype)
        return attach_meteora(model, bank, top_k=cfg.top_k, strategy="auto", stack_weights=name == "meteora").eval()
    raise ValueError(f"unknown benchmark system {name!r}; expected one of {SYSTEMS}")
