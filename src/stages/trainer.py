"""The project's one training loop: the LoRA adapters, LoRA-B, the gates, MoV/MoLoRA and the training
benchmarks all step through :class:`Trainer`.

What trains and on which loss is an :class:`Objective` (``stages.objectives``); the loop owns the rest:
AdamW and a learning-rate schedule (transformers' schedulers), a fixed schedule of example rows per
step (so a resumed run sees the same batches), this rank's share of every step's rows in
``gradient_accumulation`` micro-batches weighted by global token counts (the gradient of the whole
batch, however it is split over ranks and micro-batches), gradient clipping, a check that the loss and
the gradients are finite on every rank before the weights move, atomic checkpoints of full (unsharded)
states that resume on any number of ranks, progress and a metrics callback. It knows nothing of
MLflow or Hydra: a stage passes ``log_fn``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import get_scheduler

from meteora.io import atomic_write
from stages.distributed import (
    all_reduce_sum,
    full_optimizer_state,
    gradient_sync,
    is_main_process,
    load_full_optimizer_state,
    local_value,
    rank,
    shard_indices,
    world_size,
)

IGNORE = -100
CHECKPOINT_FORMAT = 2  # part of every fingerprint: a checkpoint of another layout is never resumed


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradients became NaN or infinite; the weights were not updated and the last good
    state is on disk (when the run keeps checkpoints)."""


class CheckpointMismatchError(RuntimeError):
    """A training checkpoint on disk belongs to another configuration or cannot be read; it is never
    resumed from or overwritten silently."""


@dataclass
class Encoded:
    """One training sequence: input_ids (T,) and labels (T,) with IGNORE where no loss is taken."""

    input_ids: list[int]
    labels: list[int]


def collate(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels, each (B, T)."""
    length = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@dataclass(frozen=True)
class LoopSettings:
    """How the loop optimises. schedule: a transformers scheduler name (``cosine``, ``linear``,
    ``constant``...) or ``warmup_cosine`` (linear warm-up that starts at lr / warmup_steps, where
    transformers' ``cosine`` starts at 0, then cosine decay to 0)."""

    steps: int
    lr: float
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    schedule: str = "cosine"
    warmup_steps: int = 0
    checkpoint_every: int = 0
    log_every: int = 1
    gradient_accumulation: int = 1
    names: Mapping[str, str] = field(default_factory=dict, compare=False)  # setting -> config key, for errors

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"{self.name('steps')}={self.steps}: training needs at least one step")
        if self.gradient_accumulation < 1:
            raise ValueError(f"{self.name('gradient_accumulation')}={self.gradient_accumulation} must be at least 1")
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise ValueError(f"{self.name('lr')}={self.lr} must be a positive number")

    def name(self, setting: str) -> str:
        """The config key that sets `setting` (``steps``, ``lr``, ``batch_size``...), for error messages."""
        return self.names.get(setting, setting)


def warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    """LR factor of step: (step + 1) / warmup during the warm-up, then cosine decay to 0 at `total`."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def make_scheduler(optimizer: torch.optim.Optimizer, settings: LoopSettings) -> torch.optim.lr_scheduler.LRScheduler:
    """The LR schedule of `settings` over `settings.steps` steps."""
    if settings.schedule == "warmup_cosine":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(settings.warmup_steps, settings.steps))
    return get_scheduler(settings.schedule, optimizer, num_warmup_steps=settings.warmup_steps,
                         num_training_steps=settings.steps)


class Objective:
    """What trains and the loss it trains on. Subclasses set `module` (the module forward runs on: put in
    train mode during :meth:`Trainer.fit`, its gradients synchronised by DDP/FSDP) and implement
    :meth:`parameters`, :meth:`state`, :meth:`load_state` and :meth:`loss`."""

    module: nn.Module
    progress: tuple[str, ...] = ("loss",)  # metrics shown on the progress bar

    def parameters(self) -> list[nn.Parameter]:
        """The parameters the optimiser updates."""
        raise NotImplementedError

    def state(self) -> dict[str, torch.Tensor]:
        """The full (unsharded) trained weights on the CPU, for a checkpoint. Collective under FSDP."""
        raise NotImplementedError

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load a :meth:`state` (saved with any number of ranks)."""
        raise NotImplementedError

    def loss(self, batch: dict[str, torch.Tensor], rows: np.ndarray,
             shares: Mapping[str, float]) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss, metrics) of one micro-batch: `batch` as :func:`collate` makes it, on the device; `rows`
        its example indices. shares["tokens"] and shares["answer"] are its fractions of the step's
        non-padding and labelled tokens over all ranks: a mean over tokens times its share makes the
        micro-batch losses of a step (and the metrics, likewise weighted) sum to the step's."""
        raise NotImplementedError

    def training(self) -> contextlib.AbstractContextManager:
        """Context of :meth:`Trainer.fit`: `module` in train mode, back in eval mode after."""
        return _train_mode(self.module)



@contextlib.contextmanager
def _train_mode(module: nn.Module) -> Iterator[None]:
    module.train()
    try:
        yield
    finally:
        module.eval()


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Name -> CPU copy of every parameter that requires a gradient."""
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy a :func:`trainable_state` back; the names must match exactly."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise KeyError(f"checkpoint weights do not match the trainable parameters: missing {missing[:3]}, "
                       f"unexpected {extra[:3]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name].to(device=p.device, dtype=p.dtype))


class Trainer:
    """Trains `objective` on `examples` for `settings.steps` steps; step s uses the rows `schedule[s]`.

    With `checkpoint_path`, every `checkpoint_every` steps and at the end the trained weights, optimiser,
    scheduler, history, counters and RNG state are written atomically (full states, written by rank
    0); :meth:`try_resume` continues from them when their `fingerprint` is this run's. A non-finite loss
    or gradient norm on any rank saves the last good state and raises :class:`NonFiniteLossError`, the
    weights untouched; `hint` ends its message (what setting to change).
    """

    def __init__(
        self,
        objective: Objective,
        examples: Sequence[Encoded],
        schedule: Sequence[Sequence[int]],
        settings: LoopSettings,
        *,
        pad_id: int,
        checkpoint_path: str | Path | None = None,
        fingerprint: str = "",
        log_fn: Callable[[dict, int], None] | None = None,
        desc: str = "train",
        hint: str = "",
    ) -> None:
        if not examples:
            raise ValueError(f"{desc}: no training examples")
        if len(schedule) < settings.steps:
            raise ValueError(f"{desc}: the schedule has {len(schedule)} steps, fewer than "
                             f"{settings.name('steps')}={settings.steps}")
        split = world_size() * settings.gradient_accumulation
        if len(schedule[0]) < split:
            raise ValueError(f"{desc}: a batch of {len(schedule[0])} sequences ({settings.name('batch_size')}) cannot be "
                             f"split over {world_size()} ranks x {settings.gradient_accumulation} micro-batches "
                             f"({settings.name('gradient_accumulation')}): every micro-batch needs one")
        self.objective = objective
        self.examples = list(examples)
        self.schedule = schedule
        self.settings = settings
        self.pad_id = pad_id
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None
        self.fingerprint = fingerprint
        self.log_fn = log_fn or (lambda metrics, step: None)
        self.desc = desc
        self.hint = hint
        self.params = objective.parameters()
        if not self.params:
            raise ValueError(f"{desc}: nothing to train (no parameter requires a gradient)")
        self.optimizer = torch.optim.AdamW(self.params, lr=settings.lr, weight_decay=settings.weight_decay)
        self.scheduler = make_scheduler(self.optimizer, settings)
        self.step = 0
        self.history: list[dict] = []
        self.tokens = 0
        self.seconds = 0.0
        self.resumed_from = 0

    # --- checkpoints ----------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Write the state (gathered from every rank: every rank must call this; rank 0 writes)."""
        if self.checkpoint_path is None:
            return
        state = {
            "format": CHECKPOINT_FORMAT, "fingerprint": self.fingerprint, "step": self.step,
            "history": self.history, "tokens": self.tokens, "seconds": self.seconds,
            "weights": self.objective.state(), "optimizer": full_optimizer_state(self.optimizer),
            "scheduler": self.scheduler.state_dict(), "rng": torch.get_rng_state(),
        }
        if is_main_process():
            atomic_write(self.checkpoint_path, lambda tmp: torch.save(state, tmp))

    def try_resume(self) -> bool:
        """Load the checkpoint if there is one for this very run (same fingerprint); True if resumed."""
        path = self.checkpoint_path
        if path is None or not path.is_file():
            return False
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated or foreign file: torch raises several kinds
            raise CheckpointMismatchError(f"{self.desc}: cannot read the training checkpoint {path} "
                                          f"({type(err).__name__}: {err}); delete it to train from scratch") from err
        if state.get("fingerprint") != self.fingerprint or state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointMismatchError(
                f"{self.desc}: {path} was written under another configuration (fingerprint "
                f"{state.get('fingerprint')!r}, format {state.get('format')!r}; this run {self.fingerprint!r}, "
                f"format {CHECKPOINT_FORMAT}); delete it to train from scratch")
        self.objective.load_state(state["weights"])
        load_full_optimizer_state(self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        self.step, self.history = state["step"], state["history"]
        self.tokens, self.seconds = state["tokens"], state["seconds"]
        self.resumed_from = self.step
        if is_main_process():
            print(f"{self.desc}: resumed from {path} at step {self.step}")
        return True

    def _stop(self, what: str, details: str) -> NonFiniteLossError:
        """Save the last good state; the error to raise for a non-finite `what` at the current step."""
        self.optimizer.zero_grad(set_to_none=True)
        self.save_checkpoint()
        kept = (f"the last good state (step {self.step}) is saved in {self.checkpoint_path}"
                if self.checkpoint_path is not None else f"the weights are those of step {self.step}")
        where = f", rank {rank()}" if world_size() > 1 else ""
        return NonFiniteLossError(f"{self.desc}: non-finite {what} at step {self.step + 1} ({details}){where}; the weights were "
                                  f"not updated and {kept}. {self.hint}".rstrip())

    # --- training -------------------------------------------------------------------------------------
    def train_step(self) -> dict:
        """One optimisation step on the scheduled (global) batch; returns the objective's metrics with
        grad_norm, lr and tokens (non-padding tokens of the step over all ranks)."""
        begin = time.perf_counter()
        world = world_size()
        rows = np.asarray(self.schedule[self.step])
        rows = rows[list(shard_indices(len(rows), rank(), world))]
        tokens, answer = all_reduce_sum([
            sum(len(self.examples[i].input_ids) for i in rows),
            sum(sum(label != IGNORE for label in self.examples[i].labels[1:]) for i in rows),
        ])
        device = self.params[0].device
        micro_batches = np.array_split(rows, self.settings.gradient_accumulation)
        sums: dict[str, float] = {}
        self.optimizer.zero_grad(set_to_none=True)
        for m, micro in enumerate(micro_batches):
            batch = {k: v.to(device) for k, v in collate([self.examples[i] for i in micro], self.pad_id).items()}
            shares = {"tokens": int(batch["attention_mask"].sum()) / tokens,
                      "answer": int((batch["labels"][:, 1:] != IGNORE).sum()) / max(answer, 1)}
            loss, metrics = self.objective.loss(batch, micro, shares)
            loss = world * loss  # DDP and FSDP average the summed gradients over the ranks
            if all_reduce_sum([float(torch.isfinite(loss))])[0] != world:
                values = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if not k.startswith("routing"))
                raise self._stop("loss", values)
            with gradient_sync(self.objective.module, enabled=m == len(micro_batches) - 1):
                loss.backward()
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value
        metrics = dict(zip(sums, all_reduce_sum(list(sums.values()))))
        grad_norm = float(local_value(torch.nn.utils.clip_grad_norm_(self.params, self.settings.max_grad_norm)))
        if all_reduce_sum([float(math.isfinite(grad_norm))])[0] != world:
            raise self._stop("gradient norm", f"{grad_norm}; the loss was finite")
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.tokens += int(tokens)
        self.seconds += time.perf_counter() - begin
        return {**metrics, "grad_norm": grad_norm, "lr": self.scheduler.get_last_lr()[0], "tokens": int(tokens)}

    def fit(self) -> list[dict]:
        """Train until `settings.steps`, logging every `log_every` steps and checkpointing; returns the
        logged history ({"step", **metrics} per logged step)."""
        s = self.settings
        with self.objective.training(), tqdm(total=s.steps, initial=self.step, desc=self.desc,
                                             disable=not is_main_process()) as bar:
            while self.step < s.steps:
                metrics = self.train_step()
                bar.update(1)
                bar.set_postfix({k: f"{metrics[k]:.3f}" for k in self.objective.progress if k in metrics}
                                | {"tok_s": f"{self.tokens / max(self.seconds, 1e-9):.0f}"})
                if self.step % s.log_every == 0 or self.step == s.steps:
                    self.history.append({"step": self.step, **metrics})
                    self.log_fn(metrics, self.step)
                if (s.checkpoint_every and self.step % s.checkpoint_every == 0) or self.step == s.steps:
                    self.save_checkpoint()
        return self.history

    def summary(self) -> dict[str, Any]:
        """{"steps", "tokens", "seconds", "tokens_per_s", "resumed_from"} of the run so far."""
        return {"steps": self.step, "tokens": self.tokens, "seconds": self.seconds,
                "tokens_per_s": self.tokens / max(self.seconds, 1e-9), "resumed_from": self.resumed_from}
