"""What :class:`stages.trainer.Trainer` trains: the answer loss of a model's trainable parameters (PEFT
LoRA, LoRA-B, MoV, MoLoRA) and MeteoRA's gate objective (LM + lambda x gate cross-entropy)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from meteora import MeteoRAModel
from stages.distributed import full_gate_state, load_full_gate_state, world_size
from stages.trainer import IGNORE, Objective, load_trainable_state, trainable_state


def answer_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (answer) tokens, the model's LM head applied
    only at the positions that predict one (a prompt is mostly unlabelled: this skips most of the
    vocabulary projection). Equals the HF `labels=` loss."""
    targets = batch["labels"][:, 1:]
    positions = torch.nonzero((targets != IGNORE).any(dim=0)).squeeze(1)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   logits_to_keep=positions).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), targets[:, positions].flatten(), ignore_index=IGNORE)


class AnswerObjective(Objective):
    """Every parameter of `model` that requires a gradient, on :func:`answer_loss`."""

    def __init__(self, model: nn.Module) -> None:
        self.module = model

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def state(self) -> dict[str, torch.Tensor]:
        return trainable_state(self.module)

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        load_trainable_state(self.module, state)

    def loss(self, batch, rows, shares):
        lm = answer_loss(self.module, batch)
        return lm * shares["answer"], {"loss": lm.item() * shares["answer"]}


def local_gate_loss(model: MeteoRAModel, inputs: dict[str, torch.Tensor], task_ids: torch.Tensor,
                    attention_mask: torch.Tensor) -> torch.Tensor:
    """The gate objective of `model.gate_loss` (one cross-entropy over all gates' logits concatenated: the
    mean over gates and non-padding tokens), with every gate's logits recomputed from its recorded,
    detached input: gradients reach each gate from its own cross-entropy only.
    inputs: module name -> (B, T, d_in); task_ids (B,); attention_mask (B, T)."""
    targets = task_ids[:, None].expand(attention_mask.shape).masked_fill(attention_mask == 0, IGNORE).flatten()
    layers = model.meteora_layers()
    logits = torch.cat([(x @ layers[name].gate.weight.to(x.dtype).T).flatten(0, 1).float() for name, x in inputs.items()])
    return F.cross_entropy(logits, targets.repeat(len(inputs)), ignore_index=IGNORE)


class GateObjective(Objective):
    """MeteoRA's gates on LM + `lambda_gate` x gate cross-entropy, every non-padding token labelled with
    its sample's task (`task_ids[row]`).

    gradient = "full" (the paper): back-propagated through the frozen model, forward on `forward_module`
    (the model or its DDP wrapper). "local": the forward runs without autograd and each gate learns from
    its own cross-entropy on its recorded input (no backward through the model, about half the cost of a
    step; the LM term is logged but gives no gradient); single process only.
    `unlabelled[i]`: positions of example i left out of the gate cross-entropy (the prompt template's
    tokens with `gate.label_template=false`); they are still routed, and counted in the routing accuracy.
    """

    progress = ("lm_loss", "gate_loss", "routing_accuracy")

    def __init__(self, model: MeteoRAModel, task_ids: Sequence[int], lambda_gate: float, gradient: str = "full",
                 forward_module: nn.Module | None = None, unlabelled: Sequence[Sequence[int]] | None = None) -> None:
        if gradient not in ("full", "local"):
            raise ValueError(f"gate.gradient={gradient!r} must be 'full' or 'local'")
        if gradient == "local" and (world_size() > 1 or forward_module not in (None, model)):
            raise ValueError("gate.gradient=local trains in a single process only (trainer=single); "
                             "with trainer=ddp or fsdp set gate.gradient=full (the paper's objective)")
        self.model = model
        self.module = forward_module if forward_module is not None else model
        self.task_ids = torch.tensor(list(task_ids), dtype=torch.long)
        self.lambda_gate = lambda_gate
        self.gradient = gradient
        if unlabelled is not None and len(unlabelled) != len(self.task_ids):
            raise ValueError(f"unlabelled positions for {len(unlabelled)} examples, task ids for {len(self.task_ids)}")
        self.unlabelled = unlabelled

    def parameters(self) -> list[nn.Parameter]:
        return self.model.gate_parameters()

    def state(self) -> dict[str, torch.Tensor]:
        return full_gate_state(self.model)

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        load_full_gate_state(self.model, state)

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        self.model.train()
        self.model.keep_routing(True)
        try:
            yield
        finally:
            self.model.keep_routing(False)
            self.model.eval()

    def loss(self, batch, rows: np.ndarray, shares):
        mask = batch["attention_mask"]
        task_ids = self.task_ids[rows].to(mask.device)
        labelled = self._labelled(mask, rows)
        if self.gradient == "local":
            lm, gate = self._local_losses(batch, task_ids, labelled)
        else:
            lm = answer_loss(self.module, batch)
            gate = self.model.gate_loss(task_ids, labelled)
        with torch.no_grad():
            accuracy = self.model.routing_accuracy(task_ids, mask)
        answer, tokens = shares["answer"], shares["tokens"]
        lm_value, gate_value = lm.item(), gate.item()  # one device sync each
        metrics = {"loss": lm_value * answer + self.lambda_gate * gate_value * tokens,
                   "lm_loss": lm_value * answer, "gate_loss": gate_value * tokens,
                   "routing_accuracy": accuracy["overall"] * tokens,
                   **{f"routing_accuracy_layer_{layer:02d}": acc * tokens for layer, acc in accuracy["per_layer"].items()}}
        return lm * answer + self.lambda_gate * gate * tokens, metrics

    def _labelled(self, mask: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        """The tokens of the gate cross-entropy: `mask` (B, T) without each row's unlabelled positions."""
        if self.unlabelled is None:
            return mask
        labelled = mask.clone()
        for j, row in enumerate(rows):
            labelled[j, list(self.unlabelled[row])] = 0
        return labelled

    def _local_losses(self, batch, task_ids: torch.Tensor, labelled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(LM loss without gradient, gate loss with gradients into the gates only) for gradient=local."""
        inputs: dict[str, torch.Tensor] = {}
        hooks = [layer.register_forward_pre_hook(lambda module, args, name=name: inputs.__setitem__(name, args[0]))
                 for name, layer in self.model.meteora_layers().items()]
        try:
            with torch.no_grad():
                lm = answer_loss(self.model, batch)
        finally:
            for hook in hooks:
                hook.remove()
        return lm, local_gate_loss(self.model, inputs, task_ids, labelled)
