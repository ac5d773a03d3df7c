"""Where the time of one whole-model training step goes (the benchmark's train section): per system, the
step's median ms and its spread over single steps with the garbage collector on and off; for MeteoRA also
the step without the routing-accuracy bookkeeping, forward + backward alone and the forward alone; then
the step's device kernels and host calls from torch.profiler, and the Python functions that take the most
host time (cProfile). A diagnostic, printed, not a result:
    PYTHONPATH=src:. python3 benchmarks/profile_train.py [--config conf/benchmark/gpu.yaml] [--device cuda] [key=value ...]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import io
import pstats
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.config import DTYPES, BenchConfig, load_config
from benchmarks.systems import build_system
from benchmarks.timing import time_ms
from benchmarks.train import training_step
from stages import objectives


@contextlib.contextmanager
def without_routing_accuracy(model):
    """The step with MeteoRAModel.routing_accuracy replaced by a constant."""
    original = model.routing_accuracy
    model.routing_accuracy = lambda *a, **k: {"overall": 0.0, "per_layer": {}, "per_module": {}}
    try:
        yield
    finally:
        model.routing_accuracy = original


def table(prof, steps: int, key: str, rows: int = 14) -> str:
    events = sorted(prof.key_averages(), key=lambda e: -getattr(e, key, 0))[:rows]
    return "\n".join(f"  {getattr(e, key, 0) / steps / 1e3:8.3f} ms  x{e.count // steps:4d}  {e.key[:90]}" for e in events)


def python_hotspots(step, sync, steps: int = 5, rows: int = 25) -> str:
    """The Python functions with the most own host time over ``steps`` steps (cProfile, by tottime)."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    sync()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(rows)
    return text.getvalue()


def timed_steps(step, sync, steps: int, collect: bool) -> tuple[list[float], dict[int, list[float]]]:
    """Wall ms of ``steps`` single steps (synchronised after each) and the ms of every garbage collection
    that ran during them, per generation; the collector off unless ``collect``."""
    collections: dict[int, list[float]] = {0: [], 1: [], 2: []}
    started: list[float] = []

    def track(phase: str, info: dict) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            collections[info["generation"]].append((time.perf_counter() - started.pop()) * 1e3)

    times = []
    gc.callbacks.append(track)
    if not collect:
        gc.disable()
    try:
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
    finally:
        gc.enable()
        gc.callbacks.remove(track)
    return times, collections


def step_spread(step, sync, steps: int = 40) -> str:
    """:func:`timed_steps` with the collector on, then off: min, median, p90 and max ms, and the collections."""
    lines = []
    for collect in (True, False):
        times, collections = timed_steps(step, sync, steps, collect)
        gcs = ", ".join(f"gen{g} {len(v)}x {sum(v):.1f} ms" for g, v in collections.items())
        lines.append(f"  gc {'on ' if collect else 'off'}: min {min(times):.2f} median {statistics.median(times):.2f} "
                     f"p90 {statistics.quantiles(times, n=10)[-1]:.2f} max {max(times):.2f} ms; collections: {gcs}")
    return "\n".join(lines)


def meteora_parts(name: str, model, ids: torch.Tensor, task_ids: torch.Tensor, cfg: BenchConfig, step, device) -> None:
    """The step without routing accuracy, forward + backward alone, the forward alone (no grad)."""
    with without_routing_accuracy(model):
        print(f"{name}: step without routing accuracy {time_ms(step, device, cfg.warmup_ms, cfg.rep_ms):.3f} ms")
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    objective = objectives.GateObjective(model, task_ids.tolist(), cfg.train.gate_loss_weight)

    def forward_backward() -> None:
        loss = objectives.answer_loss(model, batch) + cfg.train.gate_loss_weight * model.gate_loss(task_ids, batch["attention_mask"])
        loss.backward()

    def forward() -> None:
        with torch.no_grad():
            objectives.answer_loss(model, batch)

    with objective.training():
        print(f"{name}: forward + backward only {time_ms(forward_backward, device, cfg.warmup_ms, cfg.rep_ms):.3f} ms")
        print(f"{name}: forward only (no grad) {time_ms(forward, device, cfg.warmup_ms, cfg.rep_ms):.3f} ms")
    model.train()
    model.keep_routing(True)  # as training_step left it


def profile_system(name: str, cfg: BenchConfig, device: torch.device) -> None:
    section = cfg.train
    dtype, shapes = DTYPES[section.dtype], cfg.shapes[section.model]
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    ids = torch.randint(0, shapes.vocab, (1, section.tokens), device=device, generator=gen)
    task_ids = torch.randint(0, cfg.num_adapters, (1,), device=device, generator=gen)
    model = build_system(name, cfg, shapes, section.layers, dtype, device).train()
    step = training_step(name, model, ids, task_ids, section.gate_loss_weight)
    print(f"{name}: step {time_ms(step, device, cfg.warmup_ms, cfg.rep_ms):.3f} ms", flush=True)
    if name != "peft_lora":
        meteora_parts(name, model, ids, task_ids, cfg, step, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        step()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(5):
            step()
        sync()
    print(f"{name}: single steps\n{step_spread(step, sync)}", flush=True)
    print(f"{name}: device kernels per step\n{table(prof, 5, 'self_device_time_total')}")
    print(f"{name}: host calls per step\n{table(prof, 5, 'self_cpu_time_total')}", flush=True)
    print(f"{name}: Python host time over 5 steps\n{python_hotspots(step, sync)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="conf/benchmark/gpu.yaml")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    device = torch.device(args.device)
    for name in cfg.train.systems:
        profile_system(name, cfg, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
