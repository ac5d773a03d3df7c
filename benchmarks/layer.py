"""One decoder layer's 7 adapted projections (q, k, v, o, gate, up, down) at a model's shapes, per strategy.

Strategies: ``base`` (the base linears alone), ``single`` (base + one LoRA in plain torch), ``peft``
(PEFT's LoRA layers, one adapter), ``meteora`` (:class:`meteora.MeteoRALinear` layers from
:func:`meteora.attach_meteora`, strategy ``auto``; ``meteora_unstacked``: the same with ``stack_weights=False``,
three products per projection instead of one; ``meteora_routed``: stacked, with the routing kept on every
call as gate training and routing traces run it, so off the eager inference path; ``meteora_given``: its two
products with the routing computed beforehand, the cost with the routing free), any :func:`meteora.moe_lora`
strategy (base + the mixture's delta) and ``<strategy>_out`` (``moe_lora(..., out=base)``: the delta added into the base
output). Per cell: median ms of the layer (eager and, on CUDA, replayed from a CUDA graph), ratios to
``single``, ``peft`` and ``base``, peak extra memory, and the relative error against float64 computed from
the same inputs with the strategy's own routing. ``layer.weight_sets`` > 1 times that many decoder layers
of distinct weights in turn (the time is per layer), so that the weights come from memory rather than the
last-level cache, as in a whole model.
"""

from __future__ import annotations

import gc
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from meteora import AdapterBank, MeteoRALinear, Routing, StackedLoRA, attach_meteora, lora_delta, moe_lora, route
from meteora.ops import STRATEGIES as MOE_STRATEGIES

from .config import DTYPES, BenchConfig, Shapes
from .timing import error_text, paired_ratio, peak_extra_mb, ratio, time_graph_ms, time_ms

METEORA_STRATEGIES = ("meteora", "meteora_unstacked", "meteora_routed")  # MeteoRALinear layers, see the module docstring

# Strategies that synchronise with the host by design (the loop's nonzero): never captured in a CUDA graph.
NOT_CAPTURABLE = ("loop", "reference")
Runner = Callable[[int, torch.Tensor], tuple[torch.Tensor, Routing | None]]


@dataclass
class Projection:
    """One adapted linear: base weight (d_out, d_in), gate (N, d_in), adapters A (N, r, d_in) and
    B (N, d_out, r), scaling (N,); ``single`` applies adapter 0."""

    name: str
    weight: torch.Tensor
    gate: torch.Tensor
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: torch.Tensor

    @property
    def d_in(self) -> int:
        return self.weight.shape[1]


def make_projections(
    shapes: Shapes, cfg: BenchConfig, dtype: torch.dtype, device: torch.device, gen: torch.Generator
) -> list[Projection]:
    """Random weights with unit-scale outputs (never zeros: they can time faster than real data)."""
    n, r = cfg.num_adapters, cfg.rank

    def randn(*size: int, std: float) -> torch.Tensor:
        return (torch.randn(*size, generator=gen, device=device) * std).to(dtype)

    return [
        Projection(
            name,
            randn(d_out, d_in, std=d_in**-0.5),
            randn(n, d_in, std=d_in**-0.5),
            randn(n, r, d_in, std=d_in**-0.5),
            randn(n, d_out, r, std=r**-0.5),
            torch.full((n,), cfg.alpha / r, device=device),
        )
        for name, d_in, d_out in shapes.projections()
    ]


def make_hidden(
    projections: list[Projection], num_tokens: int, routing: str, dtype: torch.dtype, device: torch.device,
    gen: torch.Generator,
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Inputs (T, d_in) per d_in (q/k/v/gate/up share the hidden state) and a unit direction u per d_in;
    ``skewed`` shifts x along u (see :func:`routing_gates`)."""
    if routing not in ("random", "skewed"):
        raise ValueError(f"unknown benchmark routing {routing!r}; expected 'random' or 'skewed'")
    inputs, directions = {}, {}
    for p in projections:
        if p.d_in in inputs:
            continue
        x = torch.randn(num_tokens, p.d_in, generator=gen, device=device)
        u = torch.randn(p.d_in, generator=gen, device=device)
        u /= u.norm()
        if routing == "skewed":
            x += 2.5 * u
        inputs[p.d_in], directions[p.d_in] = x.to(dtype), u
    return inputs, directions


def routing_gates(projections: list[Projection], directions: dict[int, torch.Tensor], routing: str) -> list[torch.Tensor]:
    """The gates to use: the projections' own, and for ``skewed`` with gates 0 and 1 leaning on u, so that
    most tokens (shifted along u) pick adapters 0 and 1."""
    gates = []
    for p in projections:
        gate = p.gate
        if routing == "skewed":
            gate = gate.clone()
            gate[:2] += (3.0 * directions[p.d_in]).to(gate.dtype)
        gates.append(gate)
    return gates


def make_inputs(
    projections: list[Projection], num_tokens: int, routing: str, dtype: torch.dtype, device: torch.device,
    gen: torch.Generator,
) -> tuple[dict[int, torch.Tensor], list[torch.Tensor]]:
    """Inputs (T, d_in) per d_in and the gates to use (:func:`make_hidden`, :func:`routing_gates`)."""
    inputs, directions = make_hidden(projections, num_tokens, routing, dtype, device, gen)
    return inputs, routing_gates(projections, directions, routing)


def _block(projections: list[Projection]) -> nn.Module:
    """An nn.Module holding the 7 base linears by name (their weights shared with the projections)."""
    block = nn.Module()
    for p in projections:
        linear = nn.Linear(p.d_in, p.weight.shape[0], bias=False, device=p.weight.device, dtype=p.weight.dtype)
        linear.weight = nn.Parameter(p.weight, requires_grad=False)
        setattr(block, p.name, linear)
    return block


def peft_block(projections: list[Projection], cfg: BenchConfig) -> nn.Module:
    """PEFT LoRA layers (one adapter, adapter 0's weights) on the 7 base linears."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        target_modules=[p.name for p in projections],
        lora_dropout=0.0,
        init_lora_weights=False,
    )
    block = inject_adapter_in_model(config, _block(projections))
    with torch.no_grad():
        for p in projections:
            layer = getattr(block, p.name)
            layer.lora_A["default"].weight.data = p.lora_a[0].clone()
            layer.lora_B["default"].weight.data = p.lora_b[0].clone()
    return block.requires_grad_(False)


def meteora_layers(projections: list[Projection], cfg: BenchConfig, stack_weights: bool = True) -> list[MeteoRALinear]:
    """:class:`MeteoRALinear` layers attached to the 7 base linears (their gates are set per input)."""
    bank = AdapterBank([f"adapter_{i}" for i in range(cfg.num_adapters)])
    for p in projections:
        bank.modules[p.name] = StackedLoRA(p.lora_a, p.lora_b, p.scaling)
    model = attach_meteora(_block(projections), bank, top_k=cfg.top_k, strategy="auto", stack_weights=stack_weights)
    return [getattr(model.model, p.name) for p in projections]


def runner(
    strategy: str, projections: list[Projection], gates: list[torch.Tensor], cfg: BenchConfig, built: dict[str, Any]
) -> Runner:
    """(projection index, x) -> (output, the routing used or None) under a strategy; ``built`` caches
    the PEFT and MeteoRA modules across inputs."""
    scale = cfg.alpha / cfg.rank
    if strategy == "base":
        return lambda i, x: (F.linear(x, projections[i].weight), None)
    if strategy == "single":
        return lambda i, x: (
            F.linear(x, projections[i].weight)
            + lora_delta(x, projections[i].lora_a[0], projections[i].lora_b[0], scale),
            None,
        )
    if strategy == "peft":
        if "peft" not in built:
            built["peft"] = peft_block(projections, cfg)
        block = built["peft"]
        return lambda i, x: (getattr(block, projections[i].name)(x), None)
    if strategy == "meteora_given":
        return _given_routing_runner(projections, gates, cfg, built)
    if strategy in METEORA_STRATEGIES:
        if strategy not in built:
            built[strategy] = meteora_layers(projections, cfg, stack_weights=strategy != "meteora_unstacked")
        layers = built[strategy]
        with torch.no_grad():
            for layer, gate in zip(layers, gates):
                layer.gate.weight.copy_(gate)

        def run(i: int, x: torch.Tensor) -> tuple[torch.Tensor, Routing | None]:
            out = layers[i](x)
            return out, layers[i].last_routing

        return run
    moe, _, into = strategy.partition("_")
    if moe not in MOE_STRATEGIES or into not in ("", "out"):
        raise ValueError(
            f"unknown benchmark strategy {strategy!r}; expected base, single, peft, meteora, one of "
            f"{MOE_STRATEGIES} or <that>_out"
        )

    def mix(i: int, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        p = projections[i]
        base = F.linear(x, p.weight)
        if into:
            return moe_lora(x, gates[i], p.lora_a, p.lora_b, p.scaling, cfg.top_k, strategy=moe, out=base)
        delta, routing = moe_lora(x, gates[i], p.lora_a, p.lora_b, p.scaling, cfg.top_k, strategy=moe)
        return base + delta, routing

    return mix


def _given_routing_runner(projections: list[Projection], gates: list[torch.Tensor], cfg: BenchConfig,
                          built: dict[str, Any]) -> Runner:
    """``meteora_given``: MeteoRA's stacked product and B product with the routing computed beforehand (once
    per projection and input, outside the timed call): the layer's cost with the routing free, a floor for
    ``meteora`` on hosts where each small tensor operation costs microseconds."""
    if "meteora" not in built:
        built["meteora"] = meteora_layers(projections, cfg)
    layers = built["meteora"]
    given: dict[tuple[int, int], tuple[torch.Tensor, Routing]] = {}

    def run(i: int, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        layer, d_out = layers[i], projections[i].weight.shape[0]
        n, r = layer.lora_a.shape[:2]
        if (i, id(x)) not in given:
            routing = route(F.linear(x, gates[i]).float(), cfg.top_k)
            coef = torch.zeros_like(routing.logits).scatter_(1, routing.indices, routing.weights) * layer.scaling
            given[i, id(x)] = coef.repeat_interleave(r, dim=1).to(x.dtype), routing
        coef, routing = given[i, id(x)]
        y = F.linear(x, layer._stack, layer._stack_bias)
        out = torch.addmm(y[:, :d_out], y[:, d_out:d_out + n * r] * coef, layer.lora_b_rows.view(n * r, d_out))
        return out, routing

    return run


def reference_output(
    strategy: str, p: Projection, x64: torch.Tensor, routing: Routing | None, scale: float
) -> torch.Tensor:
    """float64 output of a projection with the strategy's own routing (indices kept, weights recomputed in
    float64 from its logits), through dense float64 GEMMs."""
    out = x64 @ p.weight.double().T
    if strategy == "base":
        return out
    a, b = p.lora_a.double(), p.lora_b.double()
    if routing is None:  # single, peft: adapter 0
        return out + scale * (x64 @ a[0].T) @ b[0].T
    n, r, d_in = a.shape
    logits = routing.logits.double()
    weights = torch.softmax(logits.gather(1, routing.indices), dim=-1)
    coef = torch.zeros_like(logits).scatter_add_(1, routing.indices, weights * p.scaling.double()[routing.indices])
    hidden = (x64 @ a.reshape(n * r, d_in).T).view(-1, n, r) * coef[..., None]
    return out + hidden.reshape(-1, n * r) @ b.permute(0, 2, 1).reshape(n * r, -1)


def routing_match(gate: torch.Tensor, x: torch.Tensor, routing: Routing | None, top_k: int) -> float | None:
    """Share of tokens whose chosen adapters equal the float64 gate's top-k (lower index wins ties)."""
    if routing is None:
        return None
    logits64 = x.double() @ gate.double().T
    expected = torch.sort(logits64, dim=-1, descending=True, stable=True)[1][:, :top_k]
    return (routing.indices == expected).all(-1).float().mean().item()


WeightSets = list[tuple[list[Projection], list[torch.Tensor], dict[str, Any]]]


def measure_strategy(strategy: str, weight_sets: WeightSets, inputs: dict[int, torch.Tensor], cfg: BenchConfig,
                     device: torch.device) -> dict[str, Any]:
    """One strategy's values alone (:func:`prepare_strategy`, then its eager rounds)."""
    measured = {strategy: prepare_strategy(strategy, weight_sets, inputs, cfg, device)}
    time_rounds(measured, cfg, device, len(weight_sets))
    return measured[strategy][0]


def time_rounds(measured: dict[str, tuple[dict[str, Any], Callable[[], None] | None]], cfg: BenchConfig,
                device: torch.device, layers_per_call: int) -> None:
    """Time the prepared strategies of one cell in ``layer.rounds`` interleaved rounds, one median
    measurement of each per round (so that a drift of the machine hits them all): ms_rounds per strategy
    (per decoder layer: the call's time over ``layers_per_call``), ms the median round. Inference: no
    gradients are recorded."""
    with torch.no_grad():
        for _ in range(cfg.layer.rounds):
            for values, layer_call in measured.values():
                if layer_call is not None and values["error"] is None:
                    try:
                        ms = time_ms(layer_call, device, cfg.warmup_ms, cfg.rep_ms)
                        values["ms_rounds"].append(ms / layers_per_call)
                    except Exception as err:  # a strategy failing mid-way keeps its error, the others go on
                        values["error"] = error_text(err)
    for values, _ in measured.values():
        if values["error"] is None and values["ms_rounds"]:
            values["ms"] = statistics.median(values["ms_rounds"])


def prepare_strategy(strategy: str, weight_sets: WeightSets, inputs: dict[int, torch.Tensor], cfg: BenchConfig,
                     device: torch.device) -> tuple[dict[str, Any], Callable[[], None] | None]:
    """Error, routing agreement and memory per projection of the first weight set, the median time of one
    decoder layer replayed from a CUDA graph, and the eager call of one decoder layer per weight set for
    :func:`time_rounds` (None after an error): the layers of every set (projections, their gates, the
    modules built for them) run one after the other, the time divided by their number."""
    values: dict[str, Any] = {
        "ms": None,
        "ms_rounds": [],
        "ms_graph": None,
        "graph_error": None,
        "err": 0.0,
        "routing_match": None,
        "peak_extra_mb": None,
        "error": None,
    }
    scale = cfg.alpha / cfg.rank
    try:
        runs = [runner(strategy, projections, gates, cfg, built) for projections, gates, built in weight_sets]
        projections, gates, _ = weight_sets[0]
        run = runs[0]
        keep = [layer for *_, b in weight_sets for layer in b.get(strategy, [])] if strategy in METEORA_STRATEGIES else []
        with torch.no_grad():
            for layer in keep:
                layer.keep_routing = True
            for i, p in enumerate(projections):
                x = inputs[p.d_in]
                out, routing = run(i, x)
                ref = reference_output(strategy, p, x.double(), routing, scale)
                values["err"] = max(values["err"], ((out.double() - ref).norm() / ref.norm()).item())
                match = routing_match(gates[i], x, routing, cfg.top_k)
                if match is not None:
                    values["routing_match"] = min(
                        match, 1.0 if values["routing_match"] is None else values["routing_match"]
                    )
                del out, ref, routing
                peak = peak_extra_mb(lambda i=i, x=x: run(i, x), device)
                if peak is not None:
                    values["peak_extra_mb"] = max(peak, values["peak_extra_mb"] or 0.0)
            for layer in keep:
                layer.keep_routing = strategy == "meteora_routed"

            def layer_call() -> None:
                for set_run in runs:
                    for i, p in enumerate(projections):
                        set_run(i, inputs[p.d_in])

            if cfg.layer.cuda_graphs and device.type == "cuda" and strategy.split("_")[0] not in NOT_CAPTURABLE:
                values["ms_graph"], values["graph_error"] = time_graph_ms(layer_call, cfg.rep_ms)
                if values["ms_graph"] is not None:
                    values["ms_graph"] /= len(runs)
            return values, layer_call
    except Exception as err:  # one failing strategy is a row with its error, not a crashed benchmark
        values["error"] = error_text(err)
    return values, None


def add_ratios(row: dict[str, dict[str, Any]]) -> None:
    """x_<reference> (eager: the median per-round ratio, with x_<reference>_ci) and x_<reference>_graph of
    every strategy of a cell against single, peft and base."""
    for reference in ("single", "peft", "base"):
        ref = row.get(reference, {})
        for values in row.values():
            ok = values["error"] is None and ref.get("error") is None
            values[f"x_{reference}"], values[f"x_{reference}_ci"] = (
                paired_ratio(values["ms_rounds"], ref.get("ms_rounds", [])) if ok else (None, None))
            values[f"x_{reference}_graph"] = ratio(values.get("ms_graph"), ref.get("ms_graph"))


def run_layer(
    cfg: BenchConfig,
    device: torch.device,
    log: Callable[[str], None],
    progress: Callable[[list[dict]], None] = lambda cells: None,
) -> list[dict]:
    """One cell per model, dtype, routing, token count and strategy; ``progress`` sees the cells after every row."""
    section = cfg.layer
    cells: list[dict] = []
    for model_name in section.models:
        for dtype_name in section.dtypes:
            dtype = DTYPES[dtype_name]
            gen = torch.Generator(device=device).manual_seed(cfg.seed)
            sets = [make_projections(cfg.shapes[model_name], cfg, dtype, device, gen) for _ in range(section.weight_sets)]
            builts: list[dict[str, Any]] = [{} for _ in sets]
            for routing_name in section.routings:
                for num_tokens in section.tokens:
                    inputs, directions = make_hidden(sets[0], num_tokens, routing_name, dtype, device, gen)
                    gates = [routing_gates(projections, directions, routing_name) for projections in sets]
                    weight_sets = list(zip(sets, gates, builts))
                    measured = {s: prepare_strategy(s, weight_sets, inputs, cfg, device) for s in section.strategies}
                    time_rounds(measured, cfg, device, len(weight_sets))
                    row = {s: values for s, (values, _) in measured.items()}
                    del measured
                    add_ratios(row)
                    cells += [
                        {
                            "model": model_name,
                            "dtype": dtype_name,
                            "routing": routing_name,
                            "tokens": num_tokens,
                            "strategy": s,
                            **v,
                        }
                        for s, v in row.items()
                    ]
                    log(
                        f"layer {model_name} {dtype_name} {routing_name} T={num_tokens}: "
                        + ", ".join(
                            f"{s}={v['ms']:.3f}/{v['ms_graph'] or 0:.3f}ms"
                            if v["ms"] is not None
                            else f"{s}=ERR {v['error'][:80]}"
                            for s, v in row.items()
                        )
                    )
                    progress(cells)
                    del inputs, gates, weight_sets
            del sets, builts
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return cells
