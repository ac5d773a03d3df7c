"""What torch.compile checks before every call of a compiled model (the host time of compiled decode that
runs before the CUDA graph launches): per system, the number of guards of the compiled forward and the
median microseconds of one check of them all. Any device (backend ``eager``: the guards are Dynamo's, the
same for every backend). A diagnostic, printed, not a result:
    PYTHONPATH=src:. python3 -m benchmarks.guard_cost [--config conf/benchmark/cpu.yaml] [--systems bare,meteora]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from .config import DTYPES, load_config
from .systems import build_system


def guard_cost(model, ids: torch.Tensor, checks: int = 2000) -> tuple[int, float]:
    """(guards, median us per check) of ``model(input_ids=ids)`` compiled: one forward without a cache, no
    gradients. Reads Dynamo's cache entry for the compiled function (an internal API)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    def forward(input_ids):
        return model(input_ids=input_ids, use_cache=False).logits

    torch._dynamo.reset()
    frame_locals = {"input_ids": ids, "model": model}  # the closure's free variable is a local of its frame
    rounds = []
    with torch.no_grad():  # the grad mode is one of the guards
        explained = torch._dynamo.explain(forward)(ids)
        torch.compile(forward, backend="eager", fullgraph=True)(ids)
        (entry,) = _debug_get_cache_entry_list(forward.__code__)
        if not entry.guard_manager.check(frame_locals):
            raise RuntimeError("the compiled forward's guards fail on the inputs that compiled it")
        for _ in range(7):
            started = time.perf_counter()
            for _ in range(checks):
                entry.guard_manager.check(frame_locals)
            rounds.append((time.perf_counter() - started) / checks * 1e6)
    return len(explained.out_guards), statistics.median(rounds)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.guard_cost", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="conf/benchmark/cpu.yaml")
    parser.add_argument("--systems", default="bare,peft_lora,meteora")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("overrides", nargs="*", help="OmegaConf dotlist, e.g. model.layers=4")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    section, device = cfg.model, torch.device(args.device)
    shapes = cfg.shapes[section.model]
    ids = torch.randint(0, shapes.vocab, (1, 1), device=device, generator=torch.Generator(device).manual_seed(cfg.seed))
    for name in args.systems.split(","):
        model = build_system(name, cfg, shapes, section.layers, DTYPES[section.dtype], device)
        guards, us = guard_cost(model, ids)
        print(f"{name}: {section.layers} layers, {guards} guards, {us:.1f} us per check", flush=True)


if __name__ == "__main__":
    main()
