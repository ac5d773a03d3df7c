"""MeteoRA's routing recorded while it generates: routing accuracy on the prompts, and per-token traces
of the answers (Figure 4), at no extra forward passes."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from meteora import MeteoRAModel
from stages.distributed import gather_objects, world_size

_LAYER = re.compile(r"\.layers\.(\d+)\.")
_ITEM_START = re.compile(r"\s*(\d{1,2})[.)](\s|$)")


class Top1RoutingRecorder:
    """A forward hook on the LM inside a :class:`MeteoRAModel`, used as a context manager around
    :func:`stages.generation.greedy_generate` (pass ``on_batch=recorder.set_rows``).

    Prefill forwards (more than one input token): per prompt and decoder layer, how many of the prompt's
    non-padding tokens have as top-1 adapter the prompt's label (mean over the layer's modules), and per
    prompt and adapter, how many of its tokens chose that adapter as top-1 (mean over all modules; the
    rows of the routing confusion matrix).
    Decode forwards (one token): per prompt, each fed answer token's id and the share of modules whose
    top-1 is each adapter, shape (N,).
    labels[i] is the adapter index that prompt i should use (None: not scored).
    """

    def __init__(self, model: MeteoRAModel, labels: Sequence[int | None]) -> None:
        self.model = model
        self.labels = torch.tensor([-1 if lab is None else lab for lab in labels])
        names = list(model.meteora_layers())
        layers = [_LAYER.search(f".{n}.") for n in names]
        self.layer_of = torch.tensor([int(m.group(1)) if m else 0 for m in layers])
        self.modules_per_layer = torch.bincount(self.layer_of).clamp(min=1).float()
        self.rows: list[int] = []
        self.correct: dict[int, torch.Tensor] = {}  # prompt -> (layers,) correct prompt tokens
        self.count: dict[int, float] = {}  # prompt -> non-padding prompt tokens
        self.chosen: dict[int, torch.Tensor] = {}  # prompt -> (N,) prompt tokens whose top-1 is each adapter
        self.answer_ids: dict[int, list[int]] = {}
        self.answer_share: dict[int, list[torch.Tensor]] = {}
        self._handle = None

    def set_rows(self, rows: Sequence[int]) -> None:
        self.rows = list(rows)

    def __enter__(self) -> Top1RoutingRecorder:
        self.model.keep_routing(True)
        self._handle = self.model.model.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
        self.model.keep_routing(False)
        if exc[0] is None and world_size() > 1:
            self._gather()

    def _gather(self) -> None:
        """After :func:`stages.generation.sharded_generate` every rank holds its own prompts' records:
        give every rank all of them."""
        records = (self.correct, self.count, self.chosen, self.answer_ids, self.answer_share)
        for theirs in gather_objects([records]):
            for mine, their in zip(records, theirs):
                mine.update(their)

    @torch.no_grad()
    def _hook(self, module, args, kwargs, output) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        top1 = torch.stack([idx[..., 0] for idx in self.model.routing_trace().values()])  # (M, B, T)
        if ids.shape[1] > 1:
            mask = kwargs.get("attention_mask")
            mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask[:, -ids.shape[1]:].bool()
            labels = self.labels[self.rows]
            hits = ((top1 == labels[None, :, None]) & mask.cpu()[None]).sum(-1).float()  # (M, B)
            per_layer = torch.zeros(len(self.modules_per_layer), hits.shape[1]).index_add_(0, self.layer_of, hits)
            per_layer /= self.modules_per_layer[:, None]
            picked = F.one_hot(top1, len(self.model.adapter_names)).float().mul_(mask.cpu()[None, :, :, None])
            chosen = picked.sum(2).mean(0)  # (B, N)
            for b, row in enumerate(self.rows):
                self.correct[row] = per_layer[:, b]
                self.count[row] = float(mask[b].sum())
                self.chosen[row] = chosen[b]
        else:
            share = F.one_hot(top1[:, :, 0], len(self.model.adapter_names)).float().mean(0)  # (B, N)
            for b, row in enumerate(self.rows):
                self.answer_ids.setdefault(row, []).append(int(ids[b, 0]))
                self.answer_share.setdefault(row, []).append(share[b])


def item_starts(answer: str, n: int) -> list[int | None]:
    """Character offset where each numbered item "k." of the answer starts (None if absent)."""
    starts: list[int | None] = [None] * n
    offset = 0
    for line in answer.splitlines(keepends=True):
        m = _ITEM_START.match(line)
        if m and 1 <= int(m.group(1)) <= n and starts[int(m.group(1)) - 1] is None:
            starts[int(m.group(1)) - 1] = offset + m.start(1)
        offset += len(line)
    return starts


def answer_trace(
    tokenizer, token_ids: Sequence[int], shares: Sequence[torch.Tensor], tasks: Sequence[str],
    adapter_names: Sequence[str],
) -> dict:
    """The routing of one generated numbered answer, per fed token: the share of modules whose top-1 is
    each adapter, the majority adapter, where each sub-answer starts, and per sub-task the share of its
    tokens whose majority adapter is that sub-task's.

    token_ids/shares: as recorded by :class:`Top1RoutingRecorder` (cut at the first EOS or padding here).
    """
    stop = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    length = next((i for i, t in enumerate(token_ids) if t in stop), len(token_ids))
    token_ids, shares = list(token_ids[:length]), list(shares[:length])
    if not token_ids:
        return {}
    share = torch.stack(shares)  # (T, N)
    majority = share.argmax(1)
    ends = [len(tokenizer.decode(token_ids[: i + 1], skip_special_tokens=True)) for i in range(len(token_ids))]
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    boundaries, segment_of = [], torch.full((len(token_ids),), -1)
    for i, (task, char) in enumerate(zip(tasks, item_starts(text, len(tasks)))):
        if char is None:
            continue
        position = next((j for j, end in enumerate(ends) if end > char), len(token_ids))
        boundaries.append({"position": position, "task": task})
        segment_of[position:] = i
    segments = {}
    for i, task in enumerate(tasks):
        inside = segment_of == i
        if inside.any() and task in adapter_names:
            segments[task] = float((majority[inside] == list(adapter_names).index(task)).float().mean())
    return {
        "adapters": list(adapter_names),
        "tokens": tokenizer.convert_ids_to_tokens(token_ids),
        "answer": text,
        "share": [[round(v, 4) for v in row] for row in share.tolist()],
        "top1": majority.tolist(),
        "boundaries": boundaries,
        "segment_accuracy": segments,
    }
