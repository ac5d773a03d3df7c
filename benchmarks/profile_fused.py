"""Where the time of one adapted projection goes, per strategy: host time per call (launch overhead) and
device time per kernel (torch.profiler), the host side of one MeteoRA layer call (cProfile), and the
kernels of a gate-training step. A diagnostic; GPU only:
    PYTHONPATH=src:. python3 benchmarks/profile_fused.py [tokens ...]
"""

import cProfile
import pstats
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.config import BenchConfig, Shapes
from benchmarks.layer import make_inputs, make_projections, runner

STRATEGIES = ("base", "single", "peft", "meteora", "auto_out")


def host_us(fn, calls=200):
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls * 1e6
    torch.cuda.synchronize()
    return host


def kernel_table(prof, calls):
    kernels = {}
    for evt in prof.key_averages():
        t = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if t > 0:
            kernels[evt.key[:60]] = t / calls
    return kernels


def profile_train(projections, gates, inputs, num_tokens=2048):
    """Kernels of forward + backward for up_proj and down_proj: gate training (auto) vs single LoRA."""
    from meteora.ops import lora_delta, moe_lora

    for p, gate in zip(projections, gates):
        if p.name not in ("up_proj", "down_proj"):
            continue
        x = inputs[p.d_in].detach().requires_grad_()
        g = torch.randn(num_tokens, p.weight.shape[0], device=x.device, dtype=x.dtype)
        gw = gate.detach().clone().requires_grad_()
        a, b = p.lora_a[0].clone().requires_grad_(), p.lora_b[0].clone().requires_grad_()
        target = torch.randint(0, gate.shape[0], (num_tokens,), device=x.device)

        def meteora(x=x, gw=gw, p=p, target=target, g=g):
            delta, routing = moe_lora(x, gw, p.lora_a, p.lora_b, p.scaling, 2, strategy="auto")
            y = torch.nn.functional.linear(x, p.weight) + delta
            loss = torch.nn.functional.cross_entropy(routing.logits, target)
            return torch.autograd.grad([y, loss], [x, gw], [g, None])

        def single(x=x, a=a, b=b, p=p, g=g):
            y = torch.nn.functional.linear(x, p.weight) + lora_delta(x, a, b, 2.0)
            return torch.autograd.grad([y], [x, a, b], [g])

        for name, fn in (("single", single), ("meteora", meteora)):
            for _ in range(3):
                fn()
            host = host_us(fn, 50)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    fn()
                torch.cuda.synchronize()
            kernels = kernel_table(prof, 10)
            detail = "; ".join(f"{k}={v:.1f}" for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])[:12])
            print(
                f"TRAIN T={num_tokens} {p.name} {name:8s} host {host:7.1f} us "
                f"device {sum(kernels.values()):8.1f} us [{detail}]",
                flush=True,
            )


def main():
    tokens = [int(t) for t in sys.argv[1:]] or [1, 16, 256, 2048, 8192]
    cfg = BenchConfig(num_adapters=28, rank=8, top_k=2)
    shapes = Shapes(4096, 14336, 32, 8, 128)
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    projections = make_projections(shapes, cfg, torch.bfloat16, device, gen)
    picked = [i for i, p in enumerate(projections) if p.name in ("q_proj", "up_proj", "down_proj")]
    built = {}
    for num_tokens in tokens:
        inputs, gates = make_inputs(projections, num_tokens, "random", torch.bfloat16, device, gen)
        runners = {s: runner(s, projections, gates, cfg, built) for s in STRATEGIES}
        for i in picked:
            p, x = projections[i], inputs[projections[i].d_in]
            for strategy in STRATEGIES:
                fn = lambda run=runners[strategy], i=i, x=x: run(i, x)
                with torch.no_grad():
                    for _ in range(3):
                        fn()
                    host = host_us(fn)
                    with profile(activities=[ProfilerActivity.CUDA]) as prof:
                        for _ in range(20):
                            fn()
                        torch.cuda.synchronize()
                kernels = kernel_table(prof, 20)
                total = sum(kernels.values())
                detail = "; ".join(f"{k}={v:.1f}" for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])[:6])
                print(
                    f"T={num_tokens:5d} {p.name:9s} {strategy:9s} host {host:7.1f} us/call  "
                    f"device {total:8.1f} us  [{detail}]",
                    flush=True,
                )
        if num_tokens == 1:
            i = picked[0]
            x = inputs[projections[i].d_in]
            profiler = cProfile.Profile()
            with torch.no_grad():
                profiler.enable()
                for _ in range(200):
                    runners["meteora"](i, x)
                profiler.disable()
            torch.cuda.synchronize()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(18)
        if num_tokens == 2048:
            profile_train(projections, gates, inputs)


if __name__ == "__main__":
    main()
