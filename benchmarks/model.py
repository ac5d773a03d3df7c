"""Whole model, as a user runs it: prefill (one forward of 1 x prefill_tokens; eager, and replayed from a
CUDA graph in mode ``graphs``) and ``model.generate`` decode ms/token at each batch size (eager with the
default dynamic cache; mode ``compiled``: a static cache and Hugging Face's compiled decode step,
``torch.compile(mode="reduce-overhead")``). Decode ms/token = (generate of 1 + n new tokens - generate of
1 new token) / n, so the prompt's prefill cancels. Eager prefill and decode run in ``repeats`` rounds that
interleave the systems; a row is the median round, its ratios the median per-round ratio with a 95% bootstrap
interval over the rounds (prefill replayed from a CUDA graph: one measurement, the ratio of medians).
A system or mode that fails is a row with its error; the eager rows run before any compiled one.
"""

from __future__ import annotations

import gc
import statistics
from collections.abc import Callable
from typing import Any

import torch

from .config import DTYPES, BenchConfig
from .systems import build_system
from .timing import error_text, paired_ratio, ratio, time_call_s, time_graph_ms, time_ms

MODES = ("eager", "compiled", "graphs")


def _compile_kwargs() -> dict[str, Any]:
    """generate() settings of the compiled mode: static cache, decode step under torch.compile."""
    from transformers import CompileConfig

    for name in ("cache_size_limit", "recompile_limit"):  # one graph per system and batch size
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    return {
        "cache_implementation": "static",
        "compile_config": CompileConfig(mode="reduce-overhead", fullgraph=False, dynamic=False),
    }


def _generate(model, prompt: torch.Tensor, new_tokens: int, extra: dict[str, Any]) -> Callable[[], Any]:
    mask = torch.ones_like(prompt)
    return lambda: model.generate(
        input_ids=prompt,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        **extra,
    )


def prefill_forward(model, ids: torch.Tensor) -> Callable[[], torch.Tensor]:
    """One forward of the prompt ``ids`` (1, T) without a cache, the last position's logits kept."""
    return lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1).logits


def decode_ms_per_token(
    model, prompt: torch.Tensor, new_tokens: int, extra: dict[str, Any], min_run_s: float, warmup: bool = False
) -> float | None:
    """ms per decode step of generate: long minus short generate, over the extra tokens; with ``warmup``
    both are called once, untimed (warm-up, compilation), and None is returned."""
    with torch.no_grad():
        if warmup:
            _generate(model, prompt, 1 + new_tokens, extra)()
            _generate(model, prompt, 1, extra)()
            return None
        long = time_call_s(_generate(model, prompt, 1 + new_tokens, extra), min_run_s)
        short = time_call_s(_generate(model, prompt, 1, extra), min_run_s)
    return (long - short) * 1e3 / new_tokens


def add_model_ratios(rows: list[dict]) -> None:
    """x_bare and x_peft_lora of every row: rows with rounds (eager prefill, decode), the median of the
    per-round ratios (the systems of a round run side by side) and its interval x_<reference>_ci; rows
    without (prefill replayed from a CUDA graph), the ratio of the medians."""
    index = {(r["system"], r["phase"], r["batch"], r["mode"]): r for r in rows}
    for r in rows:
        for reference in ("bare", "peft_lora"):
            ref = index.get((reference, r["phase"], r["batch"], r["mode"]), {})
            if r.get("ms_rounds") and ref.get("ms_rounds"):
                r[f"x_{reference}"], r[f"x_{reference}_ci"] = paired_ratio(r["ms_rounds"], ref["ms_rounds"])
            else:
                r[f"x_{reference}"] = ratio(r["ms"], ref.get("ms"))


def run_model(
    cfg: BenchConfig,
    device: torch.device,
    log: Callable[[str], None],
    progress: Callable[[list[dict]], None] = lambda rows: None,
) -> list[dict]:
    """Rows {system, phase (prefill/decode), batch, mode, ms, x_bare, x_peft_lora, error}; ``progress``
    sees the rows after each one."""
    section = cfg.model
    unknown = set(section.modes) - set(MODES)
    if unknown:
        raise ValueError(f"benchmark model.modes has {sorted(unknown)}; expected some of {MODES}")
    dtype = DTYPES[section.dtype]
    shapes = cfg.shapes[section.model]
    systems: dict[str, Any] = {}
    rows: list[dict] = []

    def add(system: str, phase: str, batch: int, mode: str, ms: float | None, error: str | None) -> None:
        rows.append({"system": system, "phase": phase, "batch": batch, "mode": mode, "ms": ms, "error": error})
        log(f"model {system} {phase} b={batch} {mode}: " + (f"{ms:.3f} ms" if ms is not None else f"ERROR {error}"))
        progress(rows)

    for name in section.systems:
        try:
            systems[name] = build_system(name, cfg, shapes, section.layers, dtype, device)
        except Exception as err:
            for mode in section.modes:
                add(name, "prefill", 1, mode, None, error_text(err))
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    prefill = torch.randint(0, shapes.vocab, (1, section.prefill_tokens), device=device, generator=gen)
    prompts = {
        b: torch.randint(0, shapes.vocab, (b, section.prompt_tokens), device=device, generator=gen)
        for b in section.batches
    }

    forwards = {name: prefill_forward(model, prefill) for name, model in systems.items()}
    prefill_rounds: dict[str, list[float]] = {name: [] for name in systems}
    prefill_errors: dict[str, str] = {}
    with torch.no_grad():
        for _ in range(section.repeats):  # eager rounds, interleaved as the decode rounds are
            for name, forward in forwards.items():
                if name not in prefill_errors:
                    try:
                        prefill_rounds[name].append(time_ms(forward, device, cfg.warmup_ms, cfg.rep_ms))
                    except Exception as err:
                        prefill_errors[name] = error_text(err)
        for name, forward in forwards.items():
            if name in prefill_errors or not prefill_rounds[name]:
                add(name, "prefill", 1, "eager", None, prefill_errors.get(name, "no rounds (model.repeats=0)"))
                continue
            add(name, "prefill", 1, "eager", statistics.median(prefill_rounds[name]), None)
            rows[-1]["ms_rounds"] = prefill_rounds[name]
            if "graphs" in section.modes and device.type == "cuda":
                add(name, "prefill", 1, "graphs", *time_graph_ms(forward, cfg.rep_ms))

    for mode in [m for m in section.modes if m != "graphs"]:
        if mode == "compiled" and device.type != "cuda":
            continue
        extra = _compile_kwargs() if mode == "compiled" else {}
        for batch in section.batches:
            rounds: dict[str, list[float]] = {name: [] for name in systems}
            errors: dict[str, str] = {}
            for round_ in range(section.repeats + 1):  # round 0 warms up (and compiles)
                for name, model in systems.items():
                    if name in errors:
                        continue
                    try:
                        ms = decode_ms_per_token(
                            model, prompts[batch], section.new_tokens, extra, section.min_run_s, warmup=round_ == 0
                        )
                        if ms is not None:
                            rounds[name].append(ms)
                    except Exception as err:
                        errors[name] = error_text(err)
            for name in systems:
                add(
                    name,
                    "decode",
                    batch,
                    mode,
                    statistics.median(rounds[name]) if rounds[name] else None,
                    errors.get(name),
                )
                if rounds[name]:
                    rows[-1]["ms_rounds"] = rounds[name]
            gc.collect()
    add_model_ratios(rows)
    del systems
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows
