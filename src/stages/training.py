"""PEFT LoRA training shared by the adapters, lora_b and mov stages: answer-only encoding of
(prompt, answer) records, length-bucketed batches, a warm-up + cosine schedule, and
:func:`train_lora`, which runs the project's one loop (:class:`stages.trainer.Trainer`) with resumable
checkpoints and the non-finite checks."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from stages.objectives import AnswerObjective
from stages.trainer import CHECKPOINT_FORMAT, IGNORE, Encoded, LoopSettings, Trainer

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


def fingerprint(settings: TrainSettings, data: Sequence[Encoded], extra: Mapping[str, Any]) -> str:
    """Hash of everything a checkpoint depends on (its folder's name: other settings never share it)."""
    digest = hashlib.sha256(json.dumps({"settings": asdict(settings), "extra": extra, "format": CHECKPOINT_FORMAT},
                                       sort_keys=True, default=str).encode())
    for e in data:
        digest.update(json.dumps([e.input_ids, e.labels]).encode())
    return digest.hexdigest()


def train_lora(
    model: nn.Module,
    data: Sequence[Encoded],
    settings: TrainSettings,
    *,
    pad_id: int,
    checkpoint_dir: str | Path | None = None,
    fingerprint_extra: Mapping[str, Any] | None = None,
    desc: str = "train",
    log_fn: Callable[[dict, int], None] | None = None,
    config_key: str = "",
) -> dict[str, Any]:
    """Train the trainable parameters of `model` (a PEFT LoRA, MoV or MoLoRA model) on `data` for
    `settings.steps` steps of :func:`batch_schedule`, on the answer loss.

    With `checkpoint_dir`, every `checkpoint_every` steps the state is saved to
    `checkpoint_dir/<fingerprint[:16]>/trainer_state.pt`; a later call with the same settings and data
    resumes from there (other settings get their own folder; an unreadable checkpoint raises
    :class:`stages.trainer.CheckpointMismatchError` naming it). `log_fn(metrics, step)` gets every
    step's metrics; `config_key` (``adapter.train``...) is the config node of `settings`, named in errors.
    Returns {"steps", "final_loss", "loss_curve", "tokens", "tokens_per_s", "seconds", "resumed_from"}.
    Raises :class:`stages.trainer.NonFiniteLossError` on a non-finite loss or gradient.
    """
    if not data:
        raise ValueError(f"{desc}: no training examples")
    key = fingerprint(settings, data, fingerprint_extra or {})
    loop = LoopSettings(steps=settings.steps, lr=settings.lr, weight_decay=settings.weight_decay,
                        max_grad_norm=settings.max_grad_norm, schedule="warmup_cosine",
                        warmup_steps=settings.warmup_steps, checkpoint_every=settings.checkpoint_every,
                        names={k: f"{config_key}.{k}" for k in ("steps", "lr", "batch_size")} if config_key else {})
    trainer = Trainer(
        AnswerObjective(model), data,
        batch_schedule([len(e.input_ids) for e in data], settings.steps, settings.batch_size, settings.seed),
        loop, pad_id=pad_id, checkpoint_path=Path(checkpoint_dir) / key[:16] / STATE_FILE if checkpoint_dir else None,
        fingerprint=key, log_fn=log_fn, desc=desc,
        hint=f"Lower the learning rate ({loop.name('lr')}={settings.lr}) or check the data.",
    )
    trainer.try_resume()
    losses = [h["loss"] for h in trainer.fit()]
    tail = losses[-max(1, len(losses) // 10):]
    return {**trainer.summary(), "final_loss": sum(tail) / len(tail), "loss_curve": losses}
