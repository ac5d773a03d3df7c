"""One training step of the whole model at ``tokens`` tokens (1 sequence), through the project's own
training loop (:class:`stages.trainer.Trainer`, as the stages run it): the answer loss on every token
(and for MeteoRA the gate cross-entropy, weighted) backward, the finite checks, clipping, then an AdamW
step over what trains: MeteoRA's gates, or one PEFT LoRA's A and B. Median ms per step, peak extra
memory, ratio to the PEFT LoRA step."""

from __future__ import annotations

import gc
import statistics
from collections.abc import Callable

import torch

from stages.objectives import AnswerObjective, GateObjective, Objective
from stages.trainer import Encoded, LoopSettings, Trainer

from .config import DTYPES, BenchConfig
from .systems import build_system
from .timing import error_text, paired_ratio, peak_extra_mb, time_ms


def training_step(
    name: str, model, ids: torch.Tensor, task_ids: torch.Tensor, gate_loss_weight: float
) -> Callable[[], None]:
    """A closure doing one optimisation step of system ``name`` (``peft_lora`` or ``meteora``) on the
    sequence ``ids`` (1, T): the trainer's step on a one-example schedule, rewound before every call."""
    if name == "meteora":
        model.keep_routing(True)
        objective: Objective = GateObjective(model, task_ids.tolist(), gate_loss_weight)
    elif name == "peft_lora":
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
        objective = AnswerObjective(model)
    else:
        raise ValueError(f"benchmark train.systems: {name!r} has no training step; expected peft_lora or meteora")
    tokens = ids[0].tolist()
    trainer = Trainer(objective, [Encoded(tokens, tokens)], [[0]], LoopSettings(steps=1, lr=1e-4, schedule="constant"),
                      pad_id=0, desc=f"benchmark {name}")

    def step() -> None:
        trainer.step = 0
        trainer.train_step()

    return step


def run_train(cfg: BenchConfig, device: torch.device, log: Callable[[str], None]) -> list[dict]:
    """Rows {system, tokens, ms, rounds_ms, peak_extra_mb, x_peft_lora, error}: every system built once, then
    ``repeats`` interleaved rounds of one measurement each (so that a drift of the machine hits them all);
    ms is the median round, x_peft_lora the median per-round ratio with its interval x_peft_lora_ci."""
    section = cfg.train
    dtype = DTYPES[section.dtype]
    shapes = cfg.shapes[section.model]
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    ids = torch.randint(0, shapes.vocab, (1, section.tokens), device=device, generator=gen)
    task_ids = torch.randint(0, cfg.num_adapters, (1,), device=device, generator=gen)
    rows, steps = {}, {}
    for name in section.systems:
        rows[name] = {"system": name, "tokens": section.tokens, "dtype": section.dtype, "ms": None, "rounds_ms": [],
                      "peak_extra_mb": None, "error": None}
        try:
            model = build_system(name, cfg, shapes, section.layers, dtype, device).train()
            steps[name] = training_step(name, model, ids, task_ids, section.gate_loss_weight)
            rows[name]["peak_extra_mb"] = peak_extra_mb(steps[name], device)
        except Exception as err:
            rows[name]["error"] = error_text(err)
    for _ in range(section.repeats):
        for name, step in steps.items():
            if rows[name]["error"] is None:
                try:
                    rows[name]["rounds_ms"].append(time_ms(step, device, cfg.warmup_ms, section.rep_ms))
                except Exception as err:
                    rows[name]["error"] = error_text(err)
    for row in rows.values():
        if row["error"] is None and row["rounds_ms"]:
            row["ms"] = statistics.median(row["rounds_ms"])
        log(f"train {row['system']} T={section.tokens}: "
            + (f"{row['ms']:.3f} ms (rounds {', '.join(f'{t:.2f}' for t in row['rounds_ms'])})" if row["ms"] is not None
               else f"ERROR {row['error']}"))
    del steps
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    single = rows.get("peft_lora", {})
    for row in rows.values():
        if row["ms"] is not None and single.get("ms") is not None:
            row["x_peft_lora"], row["x_peft_lora_ci"] = paired_ratio(row["rounds_ms"], single["rounds_ms"])
        else:
            row["x_peft_lora"] = None
    return list(rows.values())
