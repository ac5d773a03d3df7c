"""Host time per call of a Python op registered two ways with torch.library, on CPU, in eager decode.

``python -m benchmarks.op_overhead [--out FILE.json]`` registers one op of the mixture's signature
(7 tensors, 2 of them optional, an int, a float and a string in; 5 tensors out; a fake implementation and
an autograd formula) through ``torch.library.custom_op`` and through ``torch.library.Library``
``define``/``impl``, and times a call of each against calling the implementation directly, under
``torch.no_grad()`` (``generate``) and with gradients on but no input requiring them. The implementation
returns preallocated tensors, so the timings are the registration's own cost. Median microseconds per call.
Then the project's own mixture in eager training, forward + backward at tiny shapes (4 tokens, d 16, 4
adapters, r 2), through the registered ``torch.ops.meteora.moe_lora`` and through ``moe_lora_op`` (which
takes a plain ``torch.autograd.Function`` with the same implementation and backward outside torch.compile).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.utils.benchmark as torch_benchmark

SCHEMA = ("(Tensor x, Tensor? gate_x, Tensor gate_weight, Tensor lora_a, Tensor lora_b, Tensor scaling, Tensor? base, "
          "int top_k, float temperature, str mode) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")


def _outputs(num_tokens: int = 1) -> tuple[torch.Tensor, ...]:
    return (torch.zeros(num_tokens, 8), torch.zeros(num_tokens, 4), torch.zeros(num_tokens, 2, dtype=torch.long),
            torch.zeros(num_tokens, 2), torch.zeros(num_tokens, 16))


_OUT = _outputs()


def impl(x, gate_x, gate_weight, lora_a, lora_b, scaling, base, top_k, temperature, mode):
    return _OUT


def fake(x, gate_x, gate_weight, lora_a, lora_b, scaling, base, top_k, temperature, mode):
    return tuple(torch.empty_like(t) for t in _OUT)


def setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def backward(ctx, *grads):
    return (grads[0].new_zeros(ctx.saved_tensors[0].shape),) + (None,) * 9


def register_library() -> object:
    lib = torch.library.Library("meteora_overhead_lib", "FRAGMENT")
    lib.define("mix" + SCHEMA)
    lib.impl("mix", impl, "CompositeExplicitAutograd")
    torch.library.register_fake("meteora_overhead_lib::mix", fake, lib=lib)
    torch.library.register_autograd("meteora_overhead_lib::mix", backward, setup_context=setup_context, lib=lib)
    register_library.keep = lib  # the registrations live as long as the Library object
    return torch.ops.meteora_overhead_lib.mix.default


def register_custom_op() -> object:
    op = torch.library.custom_op("meteora_overhead_custom::mix", mutates_args=(), schema=SCHEMA)(impl)
    op.register_fake(fake)
    op.register_autograd(backward, setup_context=setup_context)
    return op


def measure(min_run_s: float = 0.5) -> dict:
    """Median microseconds per call: direct, Library, custom_op; under no_grad and grad-enabled."""
    args = (torch.randn(1, 16), None, torch.randn(4, 16), torch.randn(4, 4, 16), torch.randn(4, 8, 4), torch.ones(4), None, 2, 1.0, "topk")
    calls = {"direct": impl, "library": register_library(), "custom_op": register_custom_op()}
    results: dict = {"torch": torch.__version__, "python": sys.version.split()[0], "threads": torch.get_num_threads(), "us": {}}
    for grad in (False, True):
        label = "grad_enabled" if grad else "no_grad"
        for name, fn in calls.items():
            with torch.set_grad_enabled(grad):
                fn(*args)
                timer = torch_benchmark.Timer(stmt="fn(*args)", globals={"fn": fn, "args": args})
                results["us"][f"{name}/{label}"] = timer.blocked_autorange(min_run_time=min_run_s).median * 1e6
    return results


def measure_training(min_run_s: float = 0.5) -> dict:
    """Median microseconds per forward + backward of the mixture: the registered operator, moe_lora_op."""
    from meteora.kernels.op import moe_lora_op

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 16, generator=gen, requires_grad=True)
    gate = torch.randn(4, 16, generator=gen, requires_grad=True)
    rest = (torch.randn(4, 2, 16, generator=gen), torch.randn(4, 16, 2, generator=gen), torch.ones(4), torch.randn(4, 16, generator=gen))

    def step(fn) -> None:
        out, logits, *_ = fn(x, None, gate, *rest, 2, 1.0, "topk")
        (out.sum() + logits.sum()).backward()

    results = {}
    for name, fn in (("operator", torch.ops.meteora.moe_lora), ("moe_lora_op", moe_lora_op)):
        step(fn)
        timer = torch_benchmark.Timer(stmt="step(fn)", globals={"step": step, "fn": fn})
        results[f"train_forward_backward/{name}"] = timer.blocked_autorange(min_run_time=min_run_s).median * 1e6
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.op_overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="write the results JSON here")
    parser.add_argument("--min-run-s", type=float, default=0.5)
    args = parser.parse_args(argv)
    results = measure(args.min_run_s)
    results["us"].update(measure_training(args.min_run_s))
    text = json.dumps(results, indent=2)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
