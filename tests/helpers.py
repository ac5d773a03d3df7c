"""Shared builders for the tests: a tiny LLaMA from a config and PEFT adapters saved as real folders."""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed: int = 0, hidden: int = 32, layers: int = 2, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A 2-layer LLaMA with random weights (d_in != d_out for k, v, gate, up, down)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=96, hidden_size=hidden, intermediate_size=hidden * 3 // 2 + 8, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def save_peft_adapter(
    base: LlamaForCausalLM, path: Path, rank: int = 4, alpha: float = 8.0, seed: int = 0,
    targets: list[str] | None = None, use_rslora: bool = False,
) -> Path:
    """Train-free PEFT LoRA folder: PEFT's own init for A, random (non-zero) B, saved by PEFT."""
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets or ALL_PROJECTIONS, lora_dropout=0.0, use_rslora=use_rslora)
    peft_model = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    peft_model.save_pretrained(str(path))
    return path


def meteora_with_random_gates(base, adapters, seed: int, top_k: int = 2):
    """MeteoRA on a copy of `base` whose gates hold seeded standard-normal weights (no training)."""
    from meteora import attach_meteora

    model = attach_meteora(copy.deepcopy(base), adapters, top_k=top_k)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in model.gate_parameters():
            gate.copy_(torch.randn(gate.shape, generator=generator))
    return model


WORDS = [f"w{i}" for i in range(80)]


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["<unk>", "<pad>", "</s>", *WORDS]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")


@torch.no_grad()
def reference_greedy_ids(model, ids: list[int], budget: int, eos_token_id: int, **kwargs) -> list[int]:
    """One sequence, no padding, no KV cache: argmax of the full forward at every step; the new ids
    (ending with EOS when it came). `kwargs` go to every forward (e.g. PEFT's adapter_names)."""
    new: list[int] = []
    for _ in range(budget):
        logits = model(input_ids=torch.tensor([ids + new]), **kwargs).logits[0, -1]
        new.append(int(logits.argmax()))
        if new[-1] == eos_token_id:
            break
    return new


def reference_greedy(model, tokenizer, prompt: str, budget: int) -> str:
    """:func:`reference_greedy_ids` of one prompt, decoded."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(reference_greedy_ids(model, ids, budget, tokenizer.eos_token_id), skip_special_tokens=True)
