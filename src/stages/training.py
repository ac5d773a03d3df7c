"""PEFT LoRA training shared by the adapters and lora_b stages (and reusable by other methods):
answer-only loss, length-bucketed batches, warm-up + cosine schedule, resumable checkpoints, a NaN
check, tqdm progress and MLflow metrics (loss curve, tokens/s)."""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
import torch
from omegaconf import DictConfig, OmegaConf
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn
from tqdm.auto import tqdm

from meteora.io import atomic_directory

IGNORE = -100
STATE_FILE = "trainer_state.pt"


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings of one LoRA training run."""

    steps: int
    batch_size: int
    lr: float
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    checkpoint_every: int = 0
    max_length: int = 512
    seed: int = 0

    @classmethod
    def from_config(cls, node: DictConfig | Mapping[str, Any], **extra: Any) -> TrainSettings:
        """Settings from a config node; keys the dataclass does not know are ignored."""
        values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
        values.update(extra)
        return cls(**{k: v for k, v in values.items() if k in cls.__dataclass_fields__})


@dataclass
class Encoded:
    """One training sequence: input_ids (T,) and labels (T,) with IGNORE on the prompt tokens."""

    input_ids: list[int]
    labels: list[int]


def encode(tokenizer, prompt: str, answer: str, max_length: int) -> Encoded:
    """prompt + answer + EOS; the loss is on answer + EOS only. An answer is cut to half of
    `max_length`; the prompt keeps its last tokens (the question and `[/INST]` sit at its end)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"][: max(1, max_length // 2) - 1]
    answer_ids = answer_ids + [tokenizer.eos_token_id]
    keep = max_length - len(answer_ids)
    prompt_ids = prompt_ids[-keep:] if keep > 0 else []
    return Encoded(prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + answer_ids)


def encode_records(tokenizer, records: Sequence[Mapping[str, Any]], max_length: int) -> list[Encoded]:
    """Encode task records ({"input": prompt, "target": answer, ...})."""
    return [encode(tokenizer, r["input"], r["target"], max_length) for r in records]


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


def answer_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (answer) tokens, the model's LM head applied
    only at the positions that predict one (a prompt is mostly unlabelled: this skips most of the
    vocabulary projection). Equals the HF `labels=` loss."""
    targets = batch["labels"][:, 1:]
    positions = torch.nonzero((targets != IGNORE).any(dim=0)).squeeze(1)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   logits_to_keep=positions).logits
    return nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets[:, positions].flatten(),
                                       ignore_index=IGNORE)


def batch_schedule(lengths: Sequence[int], steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """Example indices of every step: seeded epochs; inside an epoch, windows of 8 batches are
    sorted by length before being cut into batches (less padding), and the batches are shuffled."""
    rng = random.Random(seed)
    schedule: list[list[int]] = []
    while len(schedule) < steps:
        order = list(range(len(lengths)))
        rng.shuffle(order)
        window = 8 * batch_size
        batches = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
            batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
        rng.shuffle(batches)
        schedule += batches
    return schedule[:steps]


def lr_lambda(warmup: int, total: int):
    """Linear warm-up to 1, then cosine decay to 0 at `total` steps."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def load_base(path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | None = None):
    """(causal LM in eval mode with every weight frozen, tokenizer) from a prepare_model folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no base model in {path} (run the prepare_model stage)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    model.requires_grad_(False)
    return (model.to(device) if device is not None else model), tokenizer


def lora_config(node: DictConfig | Mapping[str, Any]) -> LoraConfig:
    """PEFT LoraConfig from `adapter.lora` (r, alpha, dropout, target_modules)."""
    return LoraConfig(r=int(node["r"]), lora_alpha=float(node["alpha"]), lora_dropout=float(node["dropout"]),
                      target_modules=list(node["target_modules"]), bias="none", task_type="CAUSAL_LM")


def with_lora(base: nn.Module, node: DictConfig | Mapping[str, Any], seed: int) -> PeftModel:
    """The base model wrapped by a fresh, seeded LoRA (base frozen)."""
    torch.manual_seed(seed)
    return get_peft_model(base, lora_config(node))


class CheckpointMismatchError(RuntimeError):
    """A training checkpoint on disk belongs to another configuration or cannot be read; it is never
    resumed from or overwritten silently."""


def fingerprint(settings: TrainSettings, data: Sequence[Encoded], extra: Mapping[str, Any]) -> str:
    """Hash of everything a checkpoint depends on (its folder's name: other settings never share it)."""
    digest = hashlib.sha256(json.dumps({"settings": asdict(settings), "extra": extra}, sort_keys=True,
                                       default=str).encode())
    for e in data:
        digest.update(json.dumps([e.input_ids, e.labels]).encode())
    return digest.hexdigest()


def _log(metrics: Mapping[str, float], step: int | None = None) -> None:
    """MLflow metrics of the active run (none outside a stage's run)."""
    if mlflow.active_run() is not None:
        mlflow.log_metrics(dict(metrics), step=step)


def _save_checkpoint(folder: Path, model: PeftModel, optimizer, scheduler, state: dict) -> None:
    with atomic_directory(folder) as tmp:
        torch.save({**state, "adapter": get_peft_model_state_dict(model), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict()}, tmp / STATE_FILE)


def train_lora(
    model: PeftModel,
    data: Sequence[Encoded],
    settings: TrainSettings,
    *,
    pad_id: int,
    checkpoint_dir: str | Path | None = None,
    fingerprint_extra: Mapping[str, Any] | None = None,
    desc: str = "train",
    metric_prefix: str = "",
) -> dict[str, Any]:
    """Train the trainable parameters of `model` (a PEFT model) on `data` for `settings.steps`.

    Every `checkpoint_every` steps the LoRA weights, optimiser, scheduler and loss history are saved
    to `checkpoint_dir/<fingerprint>/`; a later call with the same settings and data resumes from there
    (other settings get their own folder; an unreadable checkpoint raises
    :class:`CheckpointMismatchError` naming it). Returns
    {"steps", "final_loss", "loss_curve", "tokens", "tokens_per_s", "seconds", "resumed_from"}.
    Raises FloatingPointError on a non-finite loss, naming the step.
    """
    if not data:
        raise ValueError(f"{desc}: no training examples")
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(settings.warmup_steps, settings.steps))
    schedule = batch_schedule([len(e.input_ids) for e in data], settings.steps, settings.batch_size, settings.seed)
    key = fingerprint(settings, data, fingerprint_extra or {})
    folder = Path(checkpoint_dir) / key[:16] if checkpoint_dir else None
    start_step, losses, tokens, seconds = 0, [], 0, 0.0
    if folder is not None and (folder / STATE_FILE).is_file():
        try:
            state = torch.load(folder / STATE_FILE, map_location=device, weights_only=True)
        except Exception as err:  # truncated or foreign file: torch raises several kinds
            raise CheckpointMismatchError(f"{desc}: cannot read the training checkpoint {folder / STATE_FILE} "
                                          f"({type(err).__name__}: {err}); delete it to train from scratch") from err
        if state.get("fingerprint") != key:
            raise CheckpointMismatchError(f"{desc}: {folder / STATE_FILE} holds fingerprint {state.get('fingerprint')!r}, "
                                          f"not this run's {key!r}; delete it to train from scratch")
        set_peft_model_state_dict(model, state["adapter"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step, losses, tokens, seconds = state["step"], state["losses"], state["tokens"], state["seconds"]
        torch.set_rng_state(state["rng"])
    model.train()
    bar = tqdm(range(start_step, settings.steps), desc=desc, initial=start_step, total=settings.steps)
    for step in bar:
        begin = time.perf_counter()
        batch = {k: v.to(device) for k, v in collate([data[i] for i in schedule[step]], pad_id).items()}
        loss = answer_loss(model, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: loss is {loss.item()} at step {step + 1}; lower the learning rate "
                                     f"(lr={settings.lr}) or check the data")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - begin
        tokens += int(batch["attention_mask"].sum())
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens / seconds:.0f}")
        _log({f"{metric_prefix}loss": losses[-1], f"{metric_prefix}lr": scheduler.get_last_lr()[0]}, step + 1)
        done = step + 1
        if folder is not None and settings.checkpoint_every and done % settings.checkpoint_every == 0 \
                and done < settings.steps:
            _save_checkpoint(folder, model, optimizer, scheduler, {"fingerprint": key, "step": done, "losses": losses,
                                                                   "tokens": tokens, "seconds": seconds,
                                                                   "rng": torch.get_rng_state()})
    model.eval()
    tail = losses[-max(1, len(losses) // 10):]
    stats = {"steps": settings.steps, "final_loss": sum(tail) / len(tail), "loss_curve": losses,
             "tokens": tokens, "tokens_per_s": tokens / max(seconds, 1e-9), "seconds": seconds,
             "resumed_from": start_step}
    _log({f"{metric_prefix}final_loss": stats["final_loss"], f"{metric_prefix}tokens_per_s": stats["tokens_per_s"],
          f"{metric_prefix}train_tokens": tokens})
    return stats
