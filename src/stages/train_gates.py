"""Stage train_gates: train MeteoRA's gates on the mixture of the tasks' training data.

loss = LM cross-entropy + lambda x gate cross-entropy (every gate of every layer, every non-padding
token labelled with the task its sample came from). The LM term is on the answer tokens, as the
adapters were trained (`stages.training.encode`). Base model and adapters stay frozen. Checkpoints
every `gate.checkpoint_every` steps and resumes from them; a NaN/inf loss stops the run with an error
after saving the last good state. Run: `python -m stages.train_gates [gate.steps=50 ...]`.

Several devices (`trainer=ddp|fsdp trainer.devices=N`, launched by `python -m stages.launch
train_gates`): every rank trains on its share of each global batch of `gate.batch_size` sequences,
in `trainer.gradient_accumulation` micro-batches; losses are weighted by global token counts so the
gates match a single-process run; checkpoints hold full (unsharded) gate and optimizer states, so a
run resumes on any number of devices; only rank 0 logs to MLflow and writes files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm
from transformers import get_scheduler

from meteora import MeteoRAModel
from meteora.distributed import (
    DistInfo,
    all_reduce_sum,
    destroy_distributed,
    full_gate_state,
    full_optimizer_state,
    gradient_sync,
    is_main_process,
    load_full_gate_state,
    load_full_optimizer_state,
    local_value,
    rank,
    save_gates,
    shard_indices,
    world_size,
    wrap_for_training,
)
from meteora.io import atomic_write
from stages.common import load_config, seed_everything, set_threads, stage_run
from stages.launch import TrainerSettings, setup_distributed, trainer_summary
from stages.setup import build_meteora, load_task_split, selected_tasks
from stages.training import IGNORE, CheckpointMismatchError, Encoded, collate, encode

CHECKPOINT_FILE = "checkpoint.pt"


class NonFiniteLossError(FloatingPointError):
    """The training loss or the gradients became NaN or infinite; the last good state is on disk."""


@dataclass
class GateSettings:
    """What `conf/gate/` sets for the training loop."""

    steps: int = 200
    batch_size: int = 8
    lr: float = 5e-3
    schedule: str = "cosine"
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    max_grad_norm: float = 0.3
    lambda_gate: float = 50.0
    gradient: str = "full"
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 50

    @classmethod
    def from_config(cls, gate: DictConfig, seed: int) -> GateSettings:
        names = cls.__dataclass_fields__
        values = {k: v for k, v in OmegaConf.to_container(gate, resolve=True).items() if k in names and k != "seed"}
        return cls(**values, seed=seed)


def batch_schedule(
    task_ids: Sequence[int], steps: int, batch_size: int, seed: int, balance: bool = True
) -> np.ndarray:
    """Example indices for every step, (steps, batch_size), fixed by the seed (so a resumed run sees
    the same batches). balance=True draws the task uniformly then walks that task's own shuffled
    examples; otherwise it walks one shuffled stream over all examples."""
    rng = np.random.default_rng(seed)
    total = steps * batch_size
    task_ids = np.asarray(task_ids)
    if not balance:
        order = np.concatenate([rng.permutation(len(task_ids)) for _ in range(math.ceil(total / len(task_ids)))])
        return order[:total].reshape(steps, batch_size)
    pools = {t: np.flatnonzero(task_ids == t) for t in np.unique(task_ids)}
    streams = {t: np.concatenate([rng.permutation(p) for _ in range(math.ceil(total / len(p)))]) for t, p in pools.items()}
    tasks = np.unique(task_ids)[rng.integers(len(pools), size=total)]
    cursor = {t: 0 for t in pools}
    picks = np.empty(total, dtype=np.int64)
    for i, t in enumerate(tasks):
        picks[i] = streams[t][cursor[t]]
        cursor[t] += 1
    return picks.reshape(steps, batch_size)


def predicted_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose next token is labelled in some row: the only logits the LM loss needs
    (passed to the model as `logits_to_keep`). labels: (B, T) -> (P,) int64."""
    return torch.nonzero((labels[:, 1:] != IGNORE).any(0)).flatten()


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on the labelled (answer) tokens. logits (B, P, V) at `positions`;
    labels (B, T) with IGNORE on prompt and padding."""
    targets = labels[:, positions + 1]
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)


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


class GateTrainer:
    """Trains the gates of a :class:`MeteoRAModel` on encoded (prompt + answer, task id) examples.

    settings.gradient = "full" (the paper): LM + lambda x gate cross-entropy back-propagated through the
    frozen model. "local": the forward runs without autograd and each gate learns from its own
    cross-entropy on its recorded input (no backward through the model, about half the cost of a step;
    the LM term is logged but gives no gradient); single process only.
    """

    def __init__(
        self,
        model: MeteoRAModel,
        examples: Sequence[Encoded],
        task_ids: Sequence[int],
        settings: GateSettings,
        checkpoint_dir: str | os.PathLike,
        pad_id: int,
        balance: bool = True,
        fingerprint: str = "",
        log_fn: Callable[[dict, int], None] | None = None,
        forward_module: torch.nn.Module | None = None,
        gradient_accumulation: int = 1,
    ) -> None:
        if settings.gradient not in ("full", "local"):
            raise ValueError(f"gate.gradient={settings.gradient!r} must be 'full' or 'local'")
        if settings.gradient == "local" and (world_size() > 1 or forward_module not in (None, model)):
            raise ValueError("gate.gradient=local trains in a single process only (trainer=single); "
                             "with trainer=ddp or fsdp set gate.gradient=full (the paper's objective)")
        if settings.batch_size < world_size() * gradient_accumulation:
            raise ValueError(
                f"gate.batch_size={settings.batch_size} is smaller than {world_size()} ranks x "
                f"trainer.gradient_accumulation={gradient_accumulation}: every micro-batch needs a sequence"
            )
        self.model = model
        self.forward_module = forward_module if forward_module is not None else model
        self.gradient_accumulation = gradient_accumulation
        self.examples = list(examples)
        self.task_ids = torch.tensor(list(task_ids), dtype=torch.long)
        self.settings = settings
        self.checkpoint_path = Path(checkpoint_dir) / CHECKPOINT_FILE
        self.pad_id = pad_id
        self.fingerprint = fingerprint
        self.log_fn = log_fn or (lambda metrics, step: None)
        self.schedule = batch_schedule(task_ids, settings.steps, settings.batch_size, settings.seed, balance)
        self.params = model.gate_parameters()
        self.optimizer = torch.optim.AdamW(self.params, lr=settings.lr, weight_decay=settings.weight_decay)
        self.scheduler = get_scheduler(
            settings.schedule, self.optimizer,
            num_warmup_steps=int(settings.warmup_ratio * settings.steps), num_training_steps=settings.steps,
        )
        self.step = 0
        self.history: list[dict] = []

    # --- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Atomically write gates, optimizer, scheduler, step and history (full, unsharded states,
        gathered from every rank and written by rank 0)."""
        state = {
            "step": self.step,
            "fingerprint": self.fingerprint,
            "gates": full_gate_state(self.model),
            "optimizer": full_optimizer_state(self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "history": self.history,
        }
        if not is_main_process():
            return
        atomic_write(self.checkpoint_path, lambda tmp: torch.save(state, tmp))

    def try_resume(self) -> bool:
        """Load the checkpoint if there is one for this very run (same fingerprint); True if resumed."""
        if not self.checkpoint_path.is_file():
            return False
        try:
            state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated or foreign file: torch raises several kinds
            raise CheckpointMismatchError(
                f"train_gates: cannot read the training checkpoint {self.checkpoint_path} ({type(err).__name__}: "
                f"{err}); delete it to train from scratch, or set gate.resume=false") from err
        if state.get("fingerprint") != self.fingerprint:
            raise CheckpointMismatchError(
                f"train_gates: {self.checkpoint_path} was written under another configuration (fingerprint "
                f"{state.get('fingerprint')!r}, this run {self.fingerprint!r}: gate, meteora, tasks, model or seed "
                "differ); delete it, or set gate.resume=false to train from scratch and replace it")
        load_full_gate_state(self.model, state["gates"])
        load_full_optimizer_state(self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.history = state["step"], state["history"]
        if is_main_process():
            print(f"train_gates: resumed from {self.checkpoint_path} at step {self.step}")
        return True

    # --- training --------------------------------------------------------------------------------
    def train_step(self) -> dict:
        """One optimisation step on the scheduled (global) batch; returns its losses and routing accuracy.

        This rank takes its share of the batch's rows in `gradient_accumulation` micro-batches. Every
        micro-batch's mean losses are weighted by its share of the global token counts (times the world
        size, which DDP/FSDP divide the summed gradients by), so the gradient is the whole batch's."""
        rows = self.schedule[self.step]
        rows = rows[list(shard_indices(len(rows), rank(), world_size()))]
        micro_batches = np.array_split(rows, self.gradient_accumulation)
        world = world_size()
        gate_tokens, lm_tokens = all_reduce_sum([
            sum(len(self.examples[i].input_ids) for i in rows),
            sum(sum(label != IGNORE for label in self.examples[i].labels[1:]) for i in rows),
        ])
        device = self.params[0].device
        sums = {"lm": 0.0, "gate": 0.0, "accuracy": 0.0}
        layer_sums: dict[int, float] = {}
        self.optimizer.zero_grad(set_to_none=True)
        for m, micro in enumerate(micro_batches):
            batch = {k: v.to(device) for k, v in collate([self.examples[i] for i in micro], self.pad_id).items()}
            mask, labels, task_ids = batch["attention_mask"], batch["labels"], self.task_ids[micro].to(device)
            positions = predicted_positions(labels)
            if self.settings.gradient == "local":
                lm, gate = self._local_losses(batch["input_ids"], mask, labels, positions, task_ids)
            else:
                out = self.forward_module(input_ids=batch["input_ids"], attention_mask=mask, logits_to_keep=positions)
                lm = lm_loss(out.logits, labels, positions)
                gate = self.model.gate_loss(task_ids, mask)
            lm_share = int((labels[:, 1:] != IGNORE).sum()) / lm_tokens
            gate_share = int(mask.sum()) / gate_tokens
            loss = world * (lm * lm_share + self.settings.lambda_gate * gate * gate_share)
            finite = all_reduce_sum([float(torch.isfinite(loss))])[0] == world
            if not finite:
                self.save_checkpoint()
                raise NonFiniteLossError(
                    f"train_gates: non-finite loss at step {self.step + 1} (lm={lm.item()}, gate={gate.item()}"
                    f"{f', rank {rank()}' if world > 1 else ''}); "
                    f"the last good state (step {self.step}) is saved in {self.checkpoint_path}. "
                    "Lower gate.lr or gate.lambda_gate, or check the adapters for NaN weights."
                )
            with torch.no_grad():
                accuracy = self.model.routing_accuracy(task_ids, mask)
            with gradient_sync(self.forward_module, enabled=m == len(micro_batches) - 1):
                loss.backward()
            sums["lm"] += lm.item() * lm_share
            sums["gate"] += gate.item() * gate_share
            sums["accuracy"] += accuracy["overall"] * gate_share
            for layer, acc in accuracy["per_layer"].items():
                layer_sums[layer] = layer_sums.get(layer, 0.0) + acc * gate_share
        totals = all_reduce_sum([*sums.values(), *layer_sums.values()])
        lm_value, gate_value, accuracy_value = totals[:3]
        per_layer = dict(zip(layer_sums, totals[3:]))
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.settings.max_grad_norm)
        grad_norm = float(local_value(grad_norm))
        if all_reduce_sum([float(math.isfinite(grad_norm))])[0] != world:
            self.optimizer.zero_grad(set_to_none=True)
            self.save_checkpoint()
            raise NonFiniteLossError(
                f"train_gates: non-finite gradient norm at step {self.step + 1} (loss finite: lm={lm_value}, "
                f"gate={gate_value}); the gates were not updated and the last good state (step {self.step}) is "
                f"saved in {self.checkpoint_path}. Lower gate.lr, use trainer.mixed_precision=fp32, or check the "
                "adapters for huge weights.")
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return {
            "loss": lm_value + self.settings.lambda_gate * gate_value, "lm_loss": lm_value, "gate_loss": gate_value,
            "grad_norm": grad_norm,
            "lr": self.scheduler.get_last_lr()[0], "routing_accuracy": accuracy_value,
            "tokens": int(gate_tokens),
            **{f"routing_accuracy_layer_{layer:02d}": acc for layer, acc in per_layer.items()},
        }

    def _local_losses(self, input_ids, mask, labels, positions, task_ids) -> tuple[torch.Tensor, torch.Tensor]:
        """(LM loss without gradient, gate loss with gradients into the gates only) for gradient=local."""
        inputs: dict[str, torch.Tensor] = {}
        hooks = [layer.register_forward_pre_hook(lambda module, args, name=name: inputs.__setitem__(name, args[0]))
                 for name, layer in self.model.meteora_layers().items()]
        try:
            with torch.no_grad():
                out = self.model(input_ids=input_ids, attention_mask=mask, logits_to_keep=positions)
        finally:
            for hook in hooks:
                hook.remove()
        return lm_loss(out.logits, labels, positions), local_gate_loss(self.model, inputs, task_ids, mask)

    def fit(self) -> list[dict]:
        """Train until `settings.steps`, checkpointing and logging; returns the logged history."""
        self.model.train()
        self.model.keep_routing(True)
        s = self.settings
        try:
            with tqdm(total=s.steps, initial=self.step, desc="train_gates", disable=not is_main_process()) as bar:
                while self.step < s.steps:
                    metrics = self.train_step()
                    bar.update(1)
                    bar.set_postfix(lm=f"{metrics['lm_loss']:.3f}", gate=f"{metrics['gate_loss']:.3f}",
                                    acc=f"{metrics['routing_accuracy']:.3f}")
                    if self.step % s.log_every == 0 or self.step == s.steps:
                        self.history.append({"step": self.step, **metrics})
                        self.log_fn(metrics, self.step)
                    if self.step % s.checkpoint_every == 0 or self.step == s.steps:
                        self.save_checkpoint()
        finally:
            self.model.keep_routing(False)
            self.model.eval()
        return self.history


def fingerprint(cfg: DictConfig, tasks: Sequence[str]) -> str:
    """Identity of a training run: the gate settings, the tasks (adapter order), model and seed."""
    key = {"gate": OmegaConf.to_container(cfg.gate, resolve=True),
           "meteora": OmegaConf.to_container(cfg.meteora, resolve=True), "tasks": list(tasks),
           "model": OmegaConf.to_container(cfg.model, resolve=True), "seed": cfg.seed}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def checkpoint_dir(cfg: DictConfig, run_key: str) -> Path:
    """artifacts/checkpoints/gates/<fingerprint>/: one folder per configuration, so that a sweep (a DVC
    experiment workspace keeps the untracked checkpoints) never resumes nor overwrites another run's state."""
    return Path(cfg.paths.artifacts) / "checkpoints" / "gates" / run_key


def main(argv: Sequence[str] | None = None) -> None:
    cfg = load_config(argv)
    engine, info = setup_distributed(cfg)
    try:
        train(cfg, engine, info)
    finally:
        destroy_distributed()


def train(cfg: DictConfig, engine: TrainerSettings, info: DistInfo) -> None:
    """The stage's work on this rank (every rank of a DDP/FSDP run calls it)."""
    seed_everything(int(cfg.seed))
    set_threads(cfg)
    tasks = selected_tasks(cfg)
    model, tokenizer = build_meteora(cfg, tasks, top_k=int(cfg.meteora.top_k),
                                     temperature=float(cfg.meteora.temperature))
    forward_module = wrap_for_training(model, engine.engine, engine.mixed_precision, engine.gradient_checkpointing, info.device)
    records = [(i, r) for i, task in enumerate(tasks) for r in load_task_split(cfg, task, "train", cfg.gate.samples_per_task)]
    examples = [encode(tokenizer, r["input"], r["target"], int(cfg.gate.max_length)) for _, r in records]
    settings = GateSettings.from_config(cfg.gate, int(cfg.seed))
    artifacts = Path(cfg.paths.artifacts)
    run_key = fingerprint(cfg, tasks)
    with stage_run(cfg, "train_gates", params={"gate": cfg.gate, "meteora": cfg.meteora, "tasks": list(tasks),
                                                "trainer": cfg.trainer}) as run:
        trainer = GateTrainer(
            model, examples, [i for i, _ in records], settings, checkpoint_dir(cfg, run_key),
            tokenizer.pad_token_id, balance=bool(cfg.gate.balance), fingerprint=run_key,
            log_fn=lambda metrics, step: run.log_metrics(metrics, step=step),
            forward_module=forward_module, gradient_accumulation=engine.gradient_accumulation,
        )
        if cfg.gate.resume:
            trainer.try_resume()
        start, first_step = time.perf_counter(), trainer.step
        history = trainer.fit()
        elapsed = time.perf_counter() - start
        save_gates(model, artifacts / "gates")
        if not is_main_process():
            return
        run.output(artifacts / "gates")
        final = history[-1] if history else {}
        tokens = sum(len(examples[i].input_ids) for i in trainer.schedule[first_step:].flatten())
        summary = {
            "tasks": list(tasks),
            "adapters": model.adapter_names,
            "settings": asdict(settings),
            "steps_run": trainer.step - first_step,
            "time_s": round(elapsed, 1),
            "tokens_per_s": round(tokens / max(elapsed, 1e-9), 1),
            "final": {k: final.get(k) for k in ("lm_loss", "gate_loss", "routing_accuracy")},
            "per_layer_routing_accuracy": {k.rsplit("_", 1)[-1]: v for k, v in final.items()
                                           if k.startswith("routing_accuracy_layer_")},
            "trainer": trainer_summary(engine, info),
            "mlflow_run_id": run.run_id,
        }
        run.write_json(Path(cfg.paths.reports) / "train_gates.json", summary)
        run.write_json(Path(cfg.paths.reports) / "plots" / "train_gates_history.json",
                       [{k: h[k] for k in ("step", "loss", "lm_loss", "gate_loss", "routing_accuracy")} for h in history])


if __name__ == "__main__":
    main()
