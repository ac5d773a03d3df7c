"""Stage train_gates: train MeteoRA's gates on the mixture of the tasks' training data.

loss = LM cross-entropy + lambda x gate cross-entropy (every gate of every layer, every non-padding
token labelled with the task its sample came from; `gate.label_template=false` leaves the prompt
template's tokens, `[INST]` and `[/INST]`, out of the labels). The LM term is on the answer tokens, as the
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
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from meteora import MeteoRAModel
from stages.common import load_config, seed_everything, set_threads, stage_run
from stages.data.examples import INST_CLOSE, INST_OPEN
from stages.distributed import DistInfo, destroy_distributed, is_main_process, save_gates, wrap_for_training
from stages.launch import TrainerSettings, setup_distributed, trainer_summary
from stages.objectives import GateObjective
from stages.setup import adapter_dir, build_meteora, load_task_split, selected_tasks
from stages.trainer import CHECKPOINT_FORMAT, IGNORE, Encoded, LoopSettings, Trainer
from stages.training import encode

CHECKPOINT_FILE = "checkpoint.pt"
TEMPLATE = re.compile(f"{re.escape(INST_OPEN)}|{re.escape(INST_CLOSE)}\n?")  # the template every prompt shares


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


class GateTrainer(Trainer):
    """The loop (:class:`stages.trainer.Trainer`) on :class:`stages.objectives.GateObjective` for the gates
    of `model`: `settings.batch_size` sequences a step drawn by :func:`batch_schedule`, transformers'
    `settings.schedule` with `warmup_ratio` of the steps warming up, the checkpoint at
    `checkpoint_dir/checkpoint.pt`. `forward_module`: the model's DDP wrapper, if any (FSDP shards the
    model in place). `unlabelled[i]`: positions of example i outside the gate labels (:func:`template_positions`)."""

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
        unlabelled: Sequence[Sequence[int]] | None = None,
    ) -> None:
        objective = GateObjective(model, task_ids, settings.lambda_gate, settings.gradient, forward_module, unlabelled)
        loop = LoopSettings(
            steps=settings.steps, lr=settings.lr, weight_decay=settings.weight_decay,
            max_grad_norm=settings.max_grad_norm, schedule=settings.schedule,
            warmup_steps=int(settings.warmup_ratio * settings.steps), checkpoint_every=settings.checkpoint_every,
            log_every=settings.log_every, gradient_accumulation=gradient_accumulation,
            names={**{k: f"gate.{k}" for k in ("steps", "lr", "batch_size")},
                   "gradient_accumulation": "trainer.gradient_accumulation"},
        )
        super().__init__(
            objective, examples, batch_schedule(task_ids, settings.steps, settings.batch_size, settings.seed, balance),
            loop, pad_id=pad_id, checkpoint_path=Path(checkpoint_dir) / CHECKPOINT_FILE, fingerprint=fingerprint,
            log_fn=log_fn, desc="train_gates",
            hint="Lower gate.lr or gate.lambda_gate, use trainer.mixed_precision=fp32, or check the adapters for "
                 "NaN or huge weights; gate.resume=false trains from scratch.",
        )
        self.model = model


def template_positions(tokenizer, prompt: str, example: Encoded) -> list[int]:
    """Positions in `example` (:func:`stages.training.encode` of `prompt`) of the prompt template's tokens,
    which every task shares: any token overlapping an `[INST]` or `[/INST]` marker, and the newline that
    ends the prompt. Positions cut off by the prompt's truncation are dropped."""
    encoded = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    spans = [m.span() for m in TEMPLATE.finditer(prompt)]
    kept = sum(label == IGNORE for label in example.labels)
    cut = len(encoded["input_ids"]) - kept
    if cut < 0 or encoded["input_ids"][cut:] != example.input_ids[:kept]:
        raise ValueError(f"template_positions: the example is not the encoding of its prompt {prompt[:60]!r}...")
    marked = [i for i, (start, end) in enumerate(encoded["offset_mapping"])
              if any(start < high and end > low for low, high in spans)]
    return [i - cut for i in marked if i >= cut]


def init_gates(model: MeteoRAModel, init: str, std: float) -> None:
    """Re-initialise every gate weight: `uniform` keeps nn.Linear's own (Kaiming-uniform, bound
    1/sqrt(d_in)), `normal` draws N(0, std^2), `zeros` starts every token at the uniform mixture."""
    if init not in ("uniform", "normal", "zeros"):
        raise ValueError(f"gate.init={init!r} must be 'uniform', 'normal' or 'zeros'")
    with torch.no_grad():
        for weight in model.gate_parameters():
            if init == "normal":
                weight.normal_(0.0, std)
            elif init == "zeros":
                weight.zero_()


def fingerprint(cfg: DictConfig, tasks: Sequence[str], examples: Sequence[Encoded]) -> str:
    """Identity of a training run: the gate settings, the tasks (adapter order), model and seed, the bytes
    of every adapter file and the training examples. A retrained adapter or other data is another run, so
    a checkpoint of the old one is never resumed in its place."""
    key = {"format": CHECKPOINT_FORMAT, "gate": OmegaConf.to_container(cfg.gate, resolve=True),
           "meteora": OmegaConf.to_container(cfg.meteora, resolve=True), "tasks": list(tasks),
           "model": OmegaConf.to_container(cfg.model, resolve=True), "seed": cfg.seed}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode())
    for task in tasks:
        folder = adapter_dir(cfg, task)
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            digest.update(str(file.relative_to(folder)).encode())
            digest.update(file.read_bytes())
    for e in examples:
        digest.update(json.dumps([e.input_ids, e.labels]).encode())
    return digest.hexdigest()[:16]


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
    init_gates(model, str(cfg.gate.init), float(cfg.gate.init_std))
    forward_module = wrap_for_training(model, engine.engine, engine.mixed_precision, engine.gradient_checkpointing, info.device)
    records = [(i, r) for i, task in enumerate(tasks) for r in load_task_split(cfg, task, "train", cfg.gate.samples_per_task)]
    examples = [encode(tokenizer, r["input"], r["target"], int(cfg.gate.max_length)) for _, r in records]
    unlabelled = None if cfg.gate.label_template else [
        template_positions(tokenizer, r["input"], e) for (_, r), e in zip(records, examples)]
    settings = GateSettings.from_config(cfg.gate, int(cfg.seed))
    artifacts = Path(cfg.paths.artifacts)
    run_key = fingerprint(cfg, tasks, examples)
    with stage_run(cfg, "train_gates", params={"gate": cfg.gate, "meteora": cfg.meteora, "tasks": list(tasks),
                                                "trainer": cfg.trainer}) as run:
        trainer = GateTrainer(
            model, examples, [i for i, _ in records], settings, checkpoint_dir(cfg, run_key),
            tokenizer.pad_token_id, balance=bool(cfg.gate.balance), fingerprint=run_key,
            log_fn=lambda metrics, step: run.log_metrics(metrics, step=step),
            forward_module=forward_module, gradient_accumulation=engine.gradient_accumulation, unlabelled=unlabelled,
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
