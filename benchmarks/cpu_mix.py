"""The CPU mixture extension against the torch-operation form and one LoRA, per projection, on the CPU.

``PYTHONPATH=src:. python -m benchmarks.cpu_mix [--config conf/benchmark/cpu.yaml] [--out FILE.json]``

For each output width of the profile's decoder layer (d_in = hidden) and each token count: median
microseconds per call, over interleaved rounds, of the mixture read from the stacked product y =
x [W; A; W_g]^T (the GEMM itself not timed) by

* ``extension``: :func:`meteora.kernels.cpu.stacked_mix`, the C++ call (routing loop, the k chosen B's alone),
* ``torch``: :func:`meteora.kernels.dense.dense_stacked_mix` (about ten tensor operations, every B),
* ``single``: one LoRA's delta added to the base output (x A^T B^T s + base), what MeteoRA's mixture replaces.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from meteora.kernels import cpu
from meteora.kernels.dense import dense_stacked_mix

from .config import load_config


def time_rounds_us(fns: dict, rounds: int, calls: int) -> dict[str, float]:
    """Median microseconds per call of each function, the functions interleaved in every round."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            fn()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - start) / calls * 1e6)
    return {name: statistics.median(values) for name, values in times.items()}


def projection_row(d_in: int, d_out: int, tokens: int, num_adapters: int, rank: int, top_k: int, seed: int,
                   rounds: int, calls: int) -> dict:
    ext = cpu.extension()
    gen = torch.Generator().manual_seed(seed)
    width = d_out + num_adapters * (rank + 1)
    stack = torch.randn(width, d_in, generator=gen) / d_in**0.5
    b_rows = torch.randn(num_adapters, rank, d_out, generator=gen) / rank**0.5
    scaling = torch.full((num_adapters,), 2.0)
    a0, b0 = stack[d_out:d_out + rank], b_rows[0].T.contiguous()
    x = torch.randn(tokens, d_in, generator=gen)
    y = F.linear(x, stack)
    fns = {
        "extension": lambda: cpu.stacked_mix(ext, y, b_rows, scaling, top_k, 1.0, "topk"),
        "torch": lambda: dense_stacked_mix(y, b_rows, scaling, top_k, 1.0, "topk"),
        "single": lambda: F.linear(F.linear(x, a0), b0) * 2.0 + y[:, :d_out],
    }
    want = fns["torch"]()
    assert torch.allclose(fns["extension"](), want, rtol=1e-4, atol=1e-5)  # the same mixture, within rounding
    with torch.no_grad():
        us = time_rounds_us(fns, rounds, calls)
    return {"d_in": d_in, "d_out": d_out, "tokens": tokens, **{f"{name}_us": round(v, 2) for name, v in us.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cpu_mix", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="conf/benchmark/cpu.yaml")
    parser.add_argument("--out", help="results JSON")
    parser.add_argument("--tokens", default="1,4,16,32,64,128,256")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=100)
    args = parser.parse_args()
    cfg = load_config(args.config)
    if cpu.extension() is None:
        raise SystemExit("the CPU extension could not be built (see the warning above)")
    shape = cfg.shapes[cfg.layer.models[0]]
    widths = sorted({shape.hidden, shape.intermediate, shape.kv_heads * shape.head_dim}, reverse=True)
    rows = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        for seed, d_out in enumerate(widths):
            row = projection_row(shape.hidden, d_out, tokens, cfg.num_adapters, cfg.rank, cfg.top_k, seed, args.rounds,
                                 args.calls)
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(),
              "num_adapters": cfg.num_adapters, "rank": cfg.rank, "top_k": cfg.top_k, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
