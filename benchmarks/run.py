"""All configured sections in one process, into one results mapping:
``{"meta": {...}, "layer": [cell...], "model": [row...], "train": [row...], "targets": {...}}``."""

from __future__ import annotations

import dataclasses
import datetime
import platform
import time
from collections.abc import Callable
from typing import Any

import torch

from .config import BenchConfig
from .layer import run_layer
from .model import run_model
from .targets import summarize
from .train import run_train


def versions() -> dict[str, str]:
    import peft
    import transformers
    import triton

    return {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"benchmark device={name!r} but CUDA is not available; set device=auto or cpu")
    return device


def run(
    cfg: BenchConfig, log: Callable[[str], None] = print, save: Callable[[dict], None] = lambda results: None
) -> dict[str, Any]:
    """Run every configured section; ``save`` receives the partial results after every layer row and
    section (a long GPU run keeps what it did)."""
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    meta = {
        "profile": cfg.profile,
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "num_adapters": cfg.num_adapters,
        "rank": cfg.rank,
        "top_k": cfg.top_k,
        **versions(),
        "config": dataclasses.asdict(cfg),
    }
    results: dict[str, Any] = {"meta": meta}
    started = time.perf_counter()
    if cfg.layer:
        results["layer"] = run_layer(cfg, device, log, lambda cells: save({**results, "layer": cells}))
        save(results)
    if cfg.train:
        results["train"] = run_train(cfg, device, log)
        save(results)
    if cfg.model:
        results["model"] = run_model(cfg, device, log, lambda rows: save({**results, "model": rows}))
    meta["seconds"] = round(time.perf_counter() - started, 1)
    results["targets"] = summarize(cfg.targets, results)
    save(results)
    return results
