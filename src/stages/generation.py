"""Batched greedy decoding with left padding."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from stages.distributed import map_sharded


def prepare_tokenizer(tokenizer):
    """Left padding (decoder-only batching) and a pad token (the EOS token when the model has none)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int | Sequence[int],
    batch_size: int = 16,
    max_prompt_tokens: int | None = None,
    on_batch: Callable[[list[int]], None] | None = None,
) -> list[str]:
    """Greedy continuations of `prompts`, decoded without special tokens, in the input order.

    `max_new_tokens`: one budget for all prompts or one per prompt. Prompts are grouped by budget and
    sorted by length within it, so that each batch of `batch_size` shares a budget and pads little; prompts longer than
    `max_prompt_tokens` keep their last tokens (the end holds the question and "[/INST]").
    `on_batch(indices)` is called before each batch with the indices (into `prompts`) of its rows.
    """
    prepare_tokenizer(tokenizer)
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    if max_prompt_tokens:
        encoded = [ids[-max_prompt_tokens:] for ids in encoded]
    budgets = [int(max_new_tokens)] * len(prompts) if isinstance(max_new_tokens, int) else [int(b) for b in max_new_tokens]
    if len(budgets) != len(prompts):
        raise ValueError(f"{len(budgets)} decoding budgets for {len(prompts)} prompts")
    batches = []
    for budget in sorted(set(budgets)):
        group = sorted((i for i in range(len(prompts)) if budgets[i] == budget), key=lambda i: -len(encoded[i]))
        batches += [group[s:s + batch_size] for s in range(0, len(group), batch_size)]
    outputs: list[str] = [""] * len(prompts)
    device = next(model.parameters()).device
    for chunk in batches:
        if on_batch is not None:
            on_batch(chunk)
        batch = tokenizer.pad({"input_ids": [encoded[i] for i in chunk]}, return_tensors="pt")
        batch = {k: v.to(device) for k, v in batch.items()}
        generated = model.generate(
            **batch,
            max_new_tokens=budgets[chunk[0]],
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new_tokens = generated[:, batch["input_ids"].shape[1]:]
        for i, text in zip(chunk, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
            outputs[i] = text
    return outputs


def sharded_generate(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *args,
    on_batch: Callable[[list[int]], None] | None = None,
) -> list[str]:
    """:func:`greedy_generate` with the prompts shared out over the ranks of a process group (every
    rank decodes its share on its own replica of the model; see `python -m stages.launch`). `on_batch`
    gets indices into `prompts`; the texts come back on every rank, in prompt order. Without a process
    group this is greedy_generate."""

    def run(part: list[tuple[int, str]]) -> list[str]:
        rows = [i for i, _ in part]
        local_on_batch = None if on_batch is None else (lambda chunk: on_batch([rows[j] for j in chunk]))
        budget, *rest = args
        budget = budget if isinstance(budget, int) else [budget[i] for i in rows]
        return greedy_generate(model, tokenizer, [p for _, p in part], budget, *rest, on_batch=local_on_batch)

    return map_sharded(run, list(enumerate(prompts)))


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists -> (input_ids (B, T) int64, attention_mask (B, T) int64)."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask
