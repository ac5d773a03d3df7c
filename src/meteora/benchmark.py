"""Timing of the mixture-of-LoRA forward strategies (the paper's Figure 5 and issue 5's targets).

Three sections, each optional, all in one process and one JSON file:

* ``layer``: one decoder layer's 7 adapted projections (q, k, v, o, gate, up, down) at a model's shapes,
  N random adapters, for every strategy (``base``: the base linears alone; ``single``: base + one LoRA in
  plain torch; ``loop``, ``bmm``, ``triton``, ``fused``, ``auto``: base + :func:`meteora.ops.moe_lora`;
  ``fused_out``: the fused kernels accumulating straight into the base output), every token count,
  routing (``random``; ``skewed``: most tokens to adapters 0 and 1) and dtype. Per cell: median ms for the
  layer, ratio to ``single`` and ``base``, peak extra memory (CUDA), and the relative error of the outputs
  against float64 computed from the same inputs and the strategy's own routing.
* ``model``: a LLaMA-architecture model built from a config with random weights: bare, PEFT with one LoRA,
  and MeteoRA with N random adapters (:func:`meteora.attach_meteora`); prefill and greedy decode, eager
  and (on CUDA) replayed from CUDA graphs.
* ``train``: one gate-training step (forward + backward into the gates and the inputs, with the gate
  cross-entropy) over the 7 projections vs one single-LoRA training step (into A, B and the inputs).

Needs only torch, triton, transformers and peft (no Hydra, DVC or MLflow), so it runs on the GPU machine:
``PYTHONPATH=src python -m meteora.benchmark --config conf/benchmark/gpu.yaml --out reports/benchmark/h100.json``
and ``python -m meteora.benchmark --markdown reports/benchmark/h100.json`` prints the summary tables.

JSON: ``{"meta": {...}, "layer": [cell...], "model": [row...], "train": [row...],
"targets": {...}}``; a layer cell is ``{"model", "dtype", "routing", "tokens", "strategy", "ms",
"x_single", "x_base", "peak_extra_mb", "peak_extra_mb_down", "err", "routing_match", "error"}``.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .adapters import AdapterBank, StackedLoRA
from .ops import lora_delta, moe_lora
from .routing import Routing

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MOE_STRATEGIES = ("loop", "bmm", "triton", "fused", "auto", "reference")
# Strategies that synchronise with the host by design (the loop's nonzero): never captured in a CUDA graph,
# since a failed capture can leave the CUDA context unusable for the rest of the run.
NOT_CAPTURABLE = ("loop", "reference")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------

@dataclass
class Shapes:
    """A LLaMA-architecture decoder's sizes."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int = 32000

    def projections(self) -> list[tuple[str, int, int]]:
        """(name, d_in, d_out) of the 7 adapted linears of one decoder block."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, m = self.hidden, self.intermediate
        return [("q_proj", h, q), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", q, h),
                ("gate_proj", h, m), ("up_proj", h, m), ("down_proj", m, h)]


@dataclass
class LayerBench:
    models: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=lambda: [1, 16, 256])
    routings: list[str] = field(default_factory=lambda: ["random", "skewed"])
    dtypes: list[str] = field(default_factory=lambda: ["float32"])
    strategies: list[str] = field(default_factory=lambda: ["base", "single", "loop", "bmm", "fused", "auto"])
    cuda_graphs: bool = False  # also time the layer replayed from a CUDA graph (no launch overhead)


@dataclass
class ModelBench:
    model: str = ""
    layers: int = 2
    dtype: str = "float32"
    prefill_tokens: int = 2048
    prompt_tokens: int = 128
    new_tokens: int = 64
    batches: list[int] = field(default_factory=lambda: [1, 16])
    cuda_graphs: bool = True
    systems: list[str] = field(default_factory=lambda: ["bare", "peft_lora", "meteora"])


@dataclass
class TrainBench:
    model: str = ""
    tokens: int = 2048
    dtype: str = "float32"
    strategies: list[str] = field(default_factory=lambda: ["single", "auto"])
    gate_loss_weight: float = 50.0
    cuda_graphs: bool = False  # also time the step (forward + backward) replayed from a CUDA graph


@dataclass
class BenchConfig:
    profile: str = "cpu"
    report: str = ""  # the results' file name under reports/benchmark/ when the pipeline stage runs it
    device: str = "auto"
    seed: int = 0
    num_adapters: int = 28
    rank: int = 8
    alpha: float = 16.0
    top_k: int = 2
    samples: int = 5
    min_sample_s: float = 0.02
    shapes: dict[str, Shapes] = field(default_factory=dict)
    layer: LayerBench | None = None
    model: ModelBench | None = None
    train: TrainBench | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "BenchConfig":
        """Build from a plain mapping (a YAML file or the Hydra group ``benchmark``); unknown keys raise."""
        raw = dict(raw)
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"unknown benchmark settings {sorted(unknown)}; known: {sorted(known)}")
        shapes = {name: Shapes(**dims) for name, dims in (raw.pop("shapes", None) or {}).items()}
        sections = {}
        for key, kind in (("layer", LayerBench), ("model", ModelBench), ("train", TrainBench)):
            value = raw.pop(key, None)
            sections[key] = kind(**value) if value else None
        cfg = cls(shapes=shapes, **sections, **raw)
        for name in _section_models(cfg):
            if name not in cfg.shapes:
                raise ValueError(f"benchmark names model shapes {name!r} but `shapes` defines only {sorted(cfg.shapes)}")
        return cfg


def _section_models(cfg: BenchConfig) -> list[str]:
    names = list(cfg.layer.models) if cfg.layer else []
    names += [s.model for s in (cfg.model, cfg.train) if s is not None]
    return names


def load_config(path: str | Path, overrides: list[str] = ()) -> BenchConfig:
    """Read a benchmark YAML; overrides like ``layer.tokens=[1,16]`` (values parsed as YAML) replace keys."""
    import yaml

    raw = yaml.safe_load(Path(path).read_text())
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep:
            raise ValueError(f"override {override!r} is not key=value")
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return BenchConfig.from_dict(raw)


# ----------------------------------------------------------------------------------------------
# timing and memory
# ----------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], Any], device: torch.device, samples: int, min_sample_s: float) -> float:
    """Median milliseconds per call: warm-up, then `samples` samples of n back-to-back calls (n chosen so
    that a sample lasts about min_sample_s), timed with CUDA events on a GPU, the wall clock on CPU."""
    fn()
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    calls = max(1, min(1000, int(min_sample_s / max(time.perf_counter() - start, 1e-6))))
    results = []
    for _ in range(samples):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            results.append(begin.elapsed_time(end) / calls)
        else:
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            results.append((time.perf_counter() - start) * 1e3 / calls)
    return statistics.median(results)


def time_graph_ms(fn: Callable[[], Any], device: torch.device, cfg: "BenchConfig") -> tuple[float | None, str | None]:
    """Median ms per replay of fn captured in a CUDA graph, or (None, why it could not be captured)."""
    try:
        graph = _graph(fn)
    except RuntimeError as err:  # a host synchronisation inside fn (e.g. the loop strategy's nonzero)
        torch.cuda.synchronize(device)
        return None, f"{type(err).__name__}: {err}"[:300]
    try:
        return time_ms(graph.replay, device, cfg.samples, cfg.min_sample_s), None
    finally:
        del graph
        torch.cuda.empty_cache()


def peak_extra_mb(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak CUDA memory allocated while fn runs, above what was allocated before (MiB); None on CPU."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = fn()
    _sync(device)
    del result
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


# ----------------------------------------------------------------------------------------------
# layer level
# ----------------------------------------------------------------------------------------------

@dataclass
class Projection:
    """One adapted linear: base weight (d_out, d_in), gate (N, d_in), the stacked adapters, and the one
    adapter that the ``single`` strategy applies."""

    name: str
    weight: torch.Tensor
    gate: torch.Tensor
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: torch.Tensor
    single_scaling: float


def make_projections(shapes: Shapes, cfg: BenchConfig, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> list[Projection]:
    """Random weights with unit-scale outputs (never zeros: they can time faster than real data)."""
    projections = []
    n, r = cfg.num_adapters, cfg.rank

    def randn(*size: int, std: float) -> torch.Tensor:
        return (torch.randn(*size, generator=gen, device=device) * std).to(dtype)

    for name, d_in, d_out in shapes.projections():
        projections.append(Projection(
            name=name,
            weight=randn(d_out, d_in, std=d_in**-0.5),
            gate=randn(n, d_in, std=d_in**-0.5),
            lora_a=randn(n, r, d_in, std=d_in**-0.5),
            lora_b=randn(n, d_out, r, std=r**-0.5),
            scaling=torch.full((n,), cfg.alpha / r, device=device),
            single_scaling=cfg.alpha / r,
        ))
    return projections


def make_inputs(projections: list[Projection], num_tokens: int, routing: str, dtype: torch.dtype,
                device: torch.device, gen: torch.Generator) -> tuple[dict[int, torch.Tensor], list[torch.Tensor]]:
    """Inputs per d_in (q/k/v/gate/up share the hidden state) and the gates to use. ``skewed``: x is
    shifted along a direction u and gates 0 and 1 lean on u, so most tokens pick adapters 0 and 1."""
    inputs, directions = {}, {}
    for p in projections:
        d_in = p.weight.shape[1]
        if d_in in inputs:
            continue
        x = torch.randn(num_tokens, d_in, generator=gen, device=device)
        u = torch.randn(d_in, generator=gen, device=device)
        u /= u.norm()
        if routing == "skewed":
            x += 2.5 * u
        elif routing != "random":
            raise ValueError(f"unknown routing {routing!r}; expected 'random' or 'skewed'")
        inputs[d_in], directions[d_in] = x.to(dtype), u
    gates = []
    for p in projections:
        gate = p.gate
        if routing == "skewed":
            gate = gate.clone()
            gate[:2] += (3.0 * directions[p.weight.shape[1]]).to(gate.dtype)
        gates.append(gate)
    return inputs, gates


def apply_strategy(strategy: str, p: Projection, gate: torch.Tensor, x: torch.Tensor, top_k: int) -> tuple[torch.Tensor, Routing | None]:
    """One projection's output under a strategy, and the routing it used (None for base and single)."""
    base = F.linear(x, p.weight)
    if strategy == "base":
        return base, None
    if strategy == "single":
        return base + lora_delta(x, p.lora_a[0], p.lora_b[0], p.single_scaling), None
    if strategy == "fused_out":
        from .kernels import fused_moe_lora

        out, logits, indices, weights = fused_moe_lora(x, gate, p.lora_a, p.lora_b, p.scaling, top_k, out=base)
        return out, Routing(logits, indices, weights)
    if strategy not in MOE_STRATEGIES:
        raise ValueError(f"unknown benchmark strategy {strategy!r}")
    delta, routing = moe_lora(x, gate, p.lora_a, p.lora_b, p.scaling, top_k, strategy=strategy)
    return base + delta, routing


def reference_output(strategy: str, p: Projection, x64: torch.Tensor, routing: Routing | None) -> torch.Tensor:
    """float64 output of a projection with the strategy's own routing (indices kept, weights recomputed
    in float64 from its logits), through dense float64 GEMMs."""
    out = x64 @ p.weight.double().T
    if strategy == "base":
        return out
    a, b = p.lora_a.double(), p.lora_b.double()
    if strategy == "single":
        return out + p.single_scaling * (x64 @ a[0].T) @ b[0].T
    n, r, d_in = a.shape
    logits = routing.logits.double()
    weights = torch.softmax(logits.gather(1, routing.indices), dim=-1)
    coef = torch.zeros_like(logits).scatter_add_(1, routing.indices, weights * p.scaling.double()[routing.indices])
    hidden = (x64 @ a.reshape(n * r, d_in).T).view(-1, n, r) * coef[..., None]
    return out + hidden.reshape(-1, n * r) @ b.permute(0, 2, 1).reshape(n * r, -1)


def routing_match(p: Projection, gate: torch.Tensor, x: torch.Tensor, routing: Routing | None, top_k: int) -> float | None:
    """Share of tokens whose chosen adapters equal the float64 gate's top-k (lower index wins ties)."""
    if routing is None:
        return None
    logits64 = x.double() @ gate.double().T
    expected = torch.sort(logits64, dim=-1, descending=True, stable=True)[1][:, :top_k]
    return (routing.indices == expected).all(-1).float().mean().item()


def run_layer(cfg: BenchConfig, device: torch.device, log: Callable[[str], None],
              progress: Callable[[list[dict]], None] = lambda cells: None) -> list[dict]:
    """The layer section: one cell (time, error, memory) per model, dtype, routing, token count, strategy;
    ``progress`` sees the cells so far after every row."""
    section = cfg.layer
    cells = []
    for model_name in section.models:
        shapes = cfg.shapes[model_name]
        for dtype_name in section.dtypes:
            dtype = DTYPES[dtype_name]
            gen = torch.Generator(device=device).manual_seed(cfg.seed)
            projections = make_projections(shapes, cfg, dtype, device, gen)
            for routing_name in section.routings:
                for num_tokens in section.tokens:
                    inputs, gates = make_inputs(projections, num_tokens, routing_name, dtype, device, gen)
                    row = _layer_row(cfg, projections, inputs, gates, device)
                    for strategy, values in row.items():
                        cells.append({"model": model_name, "dtype": dtype_name, "routing": routing_name,
                                      "tokens": num_tokens, "strategy": strategy, **values})
                    for key in ("ms", "ms_graph"):
                        single = row.get("single", {}).get(key)
                        base = row.get("base", {}).get(key)
                        suffix = "" if key == "ms" else "_graph"
                        for cell in cells[-len(row):]:
                            if key in cell:
                                cell["x_single" + suffix] = _ratio(cell.get(key), single)
                                cell["x_base" + suffix] = _ratio(cell.get(key), base)
                    log(f"layer {model_name} {dtype_name} {routing_name} T={num_tokens}: " + ", ".join(
                        f"{s}={v['ms']:.3f}ms" if v.get("ms") is not None else f"{s}=ERR" for s, v in row.items()))
                    progress(cells)
                    del inputs, gates
            del projections
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return cells


def _layer_row(cfg: BenchConfig, projections: list[Projection], inputs: dict[int, torch.Tensor],
               gates: list[torch.Tensor], device: torch.device) -> dict[str, dict]:
    """All strategies on one set of inputs: error and memory per projection, then the layer's time."""
    top_k = cfg.top_k
    row: dict[str, dict] = {}
    x64 = {d: x.double() for d, x in inputs.items()}
    for strategy in cfg.layer.strategies:
        values: dict[str, Any] = {"ms": None, "err": 0.0, "routing_match": None, "peak_extra_mb": None,
                                  "peak_extra_mb_down": None, "error": None}
        try:
            with torch.no_grad():
                for p, gate in zip(projections, gates):
                    x = inputs[p.weight.shape[1]]
                    out, routing = apply_strategy(strategy, p, gate, x, top_k)
                    ref = reference_output(strategy, p, x64[p.weight.shape[1]], routing)
                    values["err"] = max(values["err"], ((out.double() - ref).norm() / ref.norm()).item())
                    match = routing_match(p, gate, x, routing, top_k)
                    if match is not None:
                        values["routing_match"] = min(match, values["routing_match"] if values["routing_match"] is not None else 1.0)
                    del out, ref
                    peak = peak_extra_mb(lambda: apply_strategy(strategy, p, gate, x, top_k), device)
                    if peak is not None:
                        values["peak_extra_mb"] = max(peak, values["peak_extra_mb"] or 0.0)
                        if p.name == "down_proj":
                            values["peak_extra_mb_down"] = peak

                def layer() -> None:
                    for p, gate in zip(projections, gates):
                        apply_strategy(strategy, p, gate, inputs[p.weight.shape[1]], top_k)

                values["ms"] = time_ms(layer, device, cfg.samples, cfg.min_sample_s)
                if cfg.layer.cuda_graphs and device.type == "cuda" and strategy not in NOT_CAPTURABLE:
                    values["ms_graph"], values["graph_error"] = time_graph_ms(layer, device, cfg)
        except (RuntimeError, NotImplementedError, ValueError) as err:
            values["error"] = f"{type(err).__name__}: {err}"[:500]
        row[strategy] = values
    return row


def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or not reference:
        return None
    return value / reference


# ----------------------------------------------------------------------------------------------
# model level
# ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_llama(shapes: Shapes, layers: int, dtype: torch.dtype, device: torch.device, seed: int):
    """A LlamaForCausalLM with random weights, built directly on the device in the given dtype."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=shapes.hidden, intermediate_size=shapes.intermediate, num_attention_heads=shapes.heads,
        num_key_value_heads=shapes.kv_heads, head_dim=shapes.head_dim, num_hidden_layers=layers,
        vocab_size=shapes.vocab, max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with _default_dtype(dtype), torch.device(device):
        model = LlamaForCausalLM(config)
    return model.eval().requires_grad_(False)


def random_bank_on(model: torch.nn.Module, cfg: BenchConfig, dtype: torch.dtype, device: torch.device, seed: int) -> AdapterBank:
    """N random LoRA adapters for every target linear of the model, created on the device."""
    gen = torch.Generator(device=device).manual_seed(seed)
    bank = AdapterBank([f"adapter_{i}" for i in range(cfg.num_adapters)])
    n, r = cfg.num_adapters, cfg.rank
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in TARGETS:
            d_in, d_out = module.in_features, module.out_features
            bank.modules[name] = StackedLoRA(
                (torch.randn(n, r, d_in, generator=gen, device=device) * d_in**-0.5).to(dtype),
                (torch.randn(n, d_out, r, generator=gen, device=device) * r**-0.5).to(dtype),
                torch.full((n,), cfg.alpha / r, device=device),
            )
    return bank


def _static_cache(model, max_len: int, batch: int, dtype: torch.dtype, device: torch.device):
    """A transformers StaticCache across the 5.x signatures."""
    from transformers import StaticCache

    try:
        return StaticCache(config=model.config, max_cache_len=max_len)
    except TypeError:
        return StaticCache(config=model.config, max_batch_size=batch, max_cache_len=max_len, device=device, dtype=dtype)


def _graph(step: Callable[[], Any], warmup: int = 2) -> torch.cuda.CUDAGraph:
    """Capture step() in a CUDA graph after warm-up runs on a side stream."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def measure_prefill(model, section: ModelBench, cfg: BenchConfig, device: torch.device, graphs: bool) -> float:
    ids = torch.randint(0, model.config.vocab_size, (1, section.prefill_tokens), device=device)

    def step():
        return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits

    if not graphs:
        return time_ms(step, device, cfg.samples, cfg.min_sample_s)
    graph = _graph(step)
    return time_ms(graph.replay, device, cfg.samples, cfg.min_sample_s)


def measure_decode(model, section: ModelBench, batch: int, dtype: torch.dtype, device: torch.device, graphs: bool, trials: int = 3) -> float:
    """Milliseconds per greedy decode step (batch tokens), after a prompt of prompt_tokens."""
    prompt = torch.randint(0, model.config.vocab_size, (batch, section.prompt_tokens), device=device)
    steps = section.new_tokens
    results = []
    for _ in range(trials):
        if graphs:
            cache = _static_cache(model, section.prompt_tokens + 2 * steps + 16, batch, dtype, device)
            positions = torch.arange(section.prompt_tokens, device=device)
            out = model(input_ids=prompt, past_key_values=cache, cache_position=positions,
                        position_ids=positions[None].expand(batch, -1), use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1:].argmax(-1)
            cache_position = torch.full((1,), section.prompt_tokens, device=device, dtype=torch.long)
            position_ids = torch.full((batch, 1), section.prompt_tokens, device=device, dtype=torch.long)

            def step():
                logits = model(input_ids=token, past_key_values=cache, cache_position=cache_position,
                               position_ids=position_ids, use_cache=True, logits_to_keep=1).logits
                token.copy_(logits[:, -1:].argmax(-1))
                cache_position.add_(1)
                position_ids.add_(1)

            graph = _graph(step)
            run = graph.replay
        else:
            out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
            state = {"cache": out.past_key_values, "token": out.logits[:, -1:].argmax(-1)}

            def run():
                out = model(input_ids=state["token"], past_key_values=state["cache"], use_cache=True, logits_to_keep=1)
                state["cache"], state["token"] = out.past_key_values, out.logits[:, -1:].argmax(-1)

        _sync(device)
        start = time.perf_counter()
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
        for _ in range(steps):
            run()
        if device.type == "cuda":
            end.record()
            end.synchronize()
            results.append(begin.elapsed_time(end) / steps)
        else:
            results.append((time.perf_counter() - start) * 1e3 / steps)
    return statistics.median(results)


def run_model(cfg: BenchConfig, device: torch.device, log: Callable[[str], None]) -> list[dict]:
    """Bare model, PEFT with one LoRA, MeteoRA: prefill and decode, eager and with CUDA graphs."""
    from peft import LoraConfig, get_peft_model

    from .model import attach_meteora

    section = cfg.model
    dtype = DTYPES[section.dtype]
    shapes = cfg.shapes[section.model]
    model = build_llama(shapes, section.layers, dtype, device, cfg.seed)
    modes = [False] + ([True] if section.cuda_graphs and device.type == "cuda" else [])
    rows = []

    def measure(system: str, target) -> None:
        for graphs in modes:
            cases = [("prefill", 1)] + [("decode", b) for b in section.batches]
            for phase, batch in cases:
                entry = {"system": system, "phase": phase, "batch": batch, "graphs": graphs, "ms": None, "error": None}
                try:
                    with torch.no_grad():
                        if phase == "prefill":
                            entry["ms"] = measure_prefill(target, section, cfg, device, graphs)
                        else:
                            entry["ms"] = measure_decode(target, section, batch, dtype, device, graphs)
                except Exception as err:  # a failed capture is a result to report, not a crash
                    entry["error"] = f"{type(err).__name__}: {err}"[:500]
                rows.append(entry)
                log(f"model {system} {phase} b={batch} graphs={graphs}: "
                    + (f"{entry['ms']:.3f} ms" if entry["ms"] is not None else entry["error"]))
                gc.collect()

    if "bare" in section.systems:
        measure("bare", model)
    if "peft_lora" in section.systems:
        lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(TARGETS), lora_dropout=0.0, init_lora_weights=False)
        peft_model = get_peft_model(model, lora, autocast_adapter_dtype=False).eval()  # LoRA in the model's dtype
        measure("peft_lora", peft_model)
        model = peft_model.unload()
        del peft_model
    if "meteora" in section.systems:
        bank = random_bank_on(model, cfg, dtype, device, cfg.seed + 1)
        meteora = attach_meteora(model, bank, top_k=cfg.top_k, strategy="auto")
        meteora.eval()
        measure("meteora", meteora)
    bare = {(r["phase"], r["batch"], r["graphs"]): r["ms"] for r in rows if r["system"] == "bare"}
    for r in rows:
        r["x_bare"] = _ratio(r["ms"], bare.get((r["phase"], r["batch"], r["graphs"])))
    del model
    gc.collect()
    return rows


# ----------------------------------------------------------------------------------------------
# training step
# ----------------------------------------------------------------------------------------------

def run_train(cfg: BenchConfig, device: torch.device, log: Callable[[str], None]) -> list[dict]:
    """Forward + backward over the 7 projections: gate training (gates and inputs get gradients, the gate
    cross-entropy included) per strategy, vs a single LoRA (A, B and inputs get gradients)."""
    section = cfg.train
    dtype = DTYPES[section.dtype]
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    projections = make_projections(cfg.shapes[section.model], cfg, dtype, device, gen)
    inputs, gates = make_inputs(projections, section.tokens, "random", dtype, device, gen)
    upstream = [torch.randn(section.tokens, p.weight.shape[0], generator=gen, device=device).to(dtype) for p in projections]
    task_ids = torch.randint(0, cfg.num_adapters, (section.tokens,), generator=gen, device=device)
    rows = []
    for strategy in section.strategies:
        xs = {d: x.detach().clone().requires_grad_() for d, x in inputs.items()}
        if strategy == "single":
            trained = [(p.lora_a[0].clone().requires_grad_(), p.lora_b[0].clone().requires_grad_()) for p in projections]
            leaves = list(xs.values()) + [t for pair in trained for t in pair]

            def step():
                outs = [F.linear(xs[p.weight.shape[1]], p.weight) + lora_delta(xs[p.weight.shape[1]], a, b, p.single_scaling)
                        for p, (a, b) in zip(projections, trained)]
                return torch.autograd.grad(outs, leaves, upstream)
        else:
            trained_gates = [g.detach().clone().requires_grad_() for g in gates]
            leaves = list(xs.values()) + trained_gates

            def step():
                outs, gate_loss = [], 0.0
                for p, gate in zip(projections, trained_gates):
                    x = xs[p.weight.shape[1]]
                    delta, routing = moe_lora(x, gate, p.lora_a, p.lora_b, p.scaling, cfg.top_k, strategy=strategy)
                    outs.append(F.linear(x, p.weight) + delta)
                    gate_loss = gate_loss + F.cross_entropy(routing.logits, task_ids)
                return torch.autograd.grad(outs + [gate_loss * section.gate_loss_weight], leaves, upstream + [None])

        entry = {"strategy": strategy, "tokens": section.tokens, "dtype": section.dtype, "ms": None, "error": None}
        try:
            entry["ms"] = time_ms(step, device, cfg.samples, cfg.min_sample_s)
            entry["peak_extra_mb"] = peak_extra_mb(step, device)
            if section.cuda_graphs and device.type == "cuda" and strategy not in NOT_CAPTURABLE:
                entry["ms_graph"], entry["graph_error"] = time_graph_ms(step, device, cfg)
        except (RuntimeError, NotImplementedError, ValueError) as err:
            entry["error"] = f"{type(err).__name__}: {err}"[:500]
        rows.append(entry)
        log(f"train {strategy}: " + (f"{entry['ms']:.3f} ms, graph {entry.get('ms_graph')}" if entry["ms"] is not None else entry["error"]))
    for key, suffix in (("ms", ""), ("ms_graph", "_graph")):
        single = next((r.get(key) for r in rows if r["strategy"] == "single"), None)
        for r in rows:
            if key in r:
                r["x_single" + suffix] = _ratio(r.get(key), single)
    return rows


# ----------------------------------------------------------------------------------------------
# targets, report, entry point
# ----------------------------------------------------------------------------------------------

def summarize(results: dict) -> dict:
    """Issue 5's targets, each with the measured worst case and whether it holds (None: not measured)."""
    cells = [c for c in results.get("layer", []) if c.get("ms") is not None]
    on_gpu = results["meta"]["device"] == "cuda"

    def worst(strategy: str, pick: Callable[[dict], bool], key: str = "x_single") -> float | None:
        values = [c[key] for c in cells if c["strategy"] == strategy and pick(c) and c.get(key) is not None]
        return max(values) if values else None

    def check(value: float | None, limit: float) -> dict:
        return {"worst": value, "limit": limit, "met": None if value is None else value <= limit}

    targets: dict[str, Any] = {}
    low_precision = lambda c: c["dtype"] != "float32"  # noqa: E731
    if on_gpu:
        for strategy in ("fused", "auto", "fused_out"):
            for key, label in (("x_single", ""), ("x_single_graph", "_graphs")):
                targets[f"{strategy}{label}_vs_single_256plus"] = check(worst(strategy, lambda c: c["tokens"] >= 256 and low_precision(c), key), 1.15)
                targets[f"{strategy}{label}_vs_single_16minus"] = check(worst(strategy, lambda c: c["tokens"] <= 16 and low_precision(c), key), 1.0)
        mem = [(c["peak_extra_mb"], s["peak_extra_mb"]) for c in cells for s in cells
               if c["strategy"] == "auto" and s["strategy"] == "single" and c.get("peak_extra_mb") and s.get("peak_extra_mb")
               and all(c[k] == s[k] for k in ("model", "dtype", "routing", "tokens"))]
        targets["auto_memory_vs_single"] = check(max((a / b for a, b in mem), default=None), 1.5)
        for slow in ("bmm", "triton"):
            speedups = [s["ms"] / c["ms"] for c in cells for s in cells
                        if c["strategy"] == "auto" and s["strategy"] == slow and c["tokens"] >= 2048
                        and all(c[k] == s[k] for k in ("model", "dtype", "routing", "tokens"))]
            targets[f"auto_speedup_vs_{slow}_2048plus"] = {"worst": min(speedups, default=None), "limit": 10.0,
                                                          "met": None if not speedups else min(speedups) >= 10.0}
        rows = [r for r in results.get("model", []) if r["system"] == "meteora" and r["graphs"] and r.get("x_bare")]
        targets["meteora_decode_graphs_vs_bare"] = check(max((r["x_bare"] for r in rows if r["phase"] == "decode"), default=None), 1.3)
        targets["meteora_prefill_graphs_vs_bare"] = check(max((r["x_bare"] for r in rows if r["phase"] == "prefill"), default=None), 1.15)
        for key, label in (("x_single", ""), ("x_single_graph", "_graphs")):
            train = [r[key] for r in results.get("train", []) if r["strategy"] == "auto" and r.get(key)]
            targets[f"gate_train_step{label}_vs_single"] = check(max(train, default=None), 1.3)
    else:
        targets["cpu_auto_vs_single"] = check(worst("auto", lambda c: True), 1.5)
    return targets


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def to_markdown(results: dict) -> str:
    """Summary tables of a results JSON."""
    meta = results["meta"]
    lines = [f"# Benchmark: {meta['device_name']} ({meta['date']})", "",
             f"torch {meta['torch']}, triton {meta['triton']}, transformers {meta['transformers']}, peft {meta['peft']}; "
             f"{meta['num_adapters']} adapters, r={meta['rank']}, top-{meta['top_k']}. Median ms per decoder layer "
             "(7 projections, base GEMMs included), x = ratio to `single` (base + one LoRA in torch).", ""]
    cells = results.get("layer", [])
    groups = sorted({(c["model"], c["dtype"], c["routing"]) for c in cells}, key=str)
    strategies = list(dict.fromkeys(c["strategy"] for c in cells))
    for (model, dtype, routing), (key, ratio, mode) in [(g, m) for g in groups for m in
                                                         (("ms", "x_single", "eager"), ("ms_graph", "x_single_graph", "CUDA graphs"))]:
        if not any(c.get(key) is not None for c in cells if (c["model"], c["dtype"], c["routing"]) == (model, dtype, routing)):
            continue
        lines += [f"## Layer: {model}, {dtype}, {routing} routing, {mode}", "",
                  "| tokens | " + " | ".join(strategies) + " |", "|---:|" + "---:|" * len(strategies)]
        for tokens in sorted({c["tokens"] for c in cells}):
            row = {c["strategy"]: c for c in cells if (c["model"], c["dtype"], c["routing"], c["tokens"]) == (model, dtype, routing, tokens)}
            if not row:
                continue
            parts = []
            for s in strategies:
                c = row.get(s)
                if c is None or c.get(key) is None:
                    parts.append("error" if c and c.get("error") else "-")
                elif s in ("base", "single"):
                    parts.append(_fmt(c[key]))
                else:
                    parts.append(f"{_fmt(c[key])} ({_fmt(c.get(ratio), 2)}x)")
            lines.append(f"| {tokens} | " + " | ".join(parts) + " |")
        lines.append("")
    mem_cells = [c for c in cells if c.get("peak_extra_mb") is not None]
    if mem_cells:
        lines += ["## Peak extra memory (MiB), largest projection / down_proj, and max relative error vs float64", "",
                  "| model | dtype | routing | tokens | strategy | peak MiB | down MiB | rel. error | routing = fp64 top-k |",
                  "|---|---|---|---:|---|---:|---:|---:|---:|"]
        top = max(c["tokens"] for c in mem_cells)
        for c in mem_cells:
            if c["tokens"] == top:
                lines.append(f"| {c['model']} | {c['dtype']} | {c['routing']} | {c['tokens']} | {c['strategy']} | "
                             f"{_fmt(c['peak_extra_mb'], 1)} | {_fmt(c['peak_extra_mb_down'], 1)} | {_fmt(c['err'], 5)} | {_fmt(c['routing_match'], 4)} |")
        lines.append("")
    model_rows = results.get("model", [])
    if model_rows:
        lines += ["## Whole model (prefill: ms per forward; decode: ms per step)", "",
                  "| system | phase | batch | CUDA graphs | ms | x bare |", "|---|---|---:|---|---:|---:|"]
        for r in model_rows:
            value = _fmt(r["ms"]) if r["ms"] is not None else f"error: {r['error'][:80]}"
            lines.append(f"| {r['system']} | {r['phase']} | {r['batch']} | {r['graphs']} | {value} | {_fmt(r.get('x_bare'), 2)} |")
        lines.append("")
    train_rows = results.get("train", [])
    if train_rows:
        lines += ["## Training step (forward + backward, 7 projections)", "",
                  "| strategy | tokens | ms | x single | CUDA graphs ms | x single |", "|---|---:|---:|---:|---:|---:|"]
        for r in train_rows:
            lines.append(f"| {r['strategy']} | {r['tokens']} | {_fmt(r['ms'])} | {_fmt(r.get('x_single'), 2)} | "
                         f"{_fmt(r.get('ms_graph'))} | {_fmt(r.get('x_single_graph'), 2)} |")
        lines.append("")
    lines += ["## Targets (issue 5)", "", "| target | worst measured | limit | met |", "|---|---:|---:|---|"]
    for name, t in results.get("targets", {}).items():
        lines.append(f"| {name} | {_fmt(t['worst'], 3)} | {t['limit']} | {t['met']} |")
    return "\n".join(lines) + "\n"


def _versions() -> dict[str, str]:
    import peft
    import transformers
    import triton

    return {"torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def run(cfg: BenchConfig, log: Callable[[str], None] = print, save: Callable[[dict], None] = lambda results: None) -> dict:
    """Run every configured section; returns the results mapping (see the module docstring). ``save``
    receives the partial results after every layer row and section (a long GPU run keeps what it did)."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    torch.manual_seed(cfg.seed)
    meta = {
        "profile": cfg.profile, "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "num_adapters": cfg.num_adapters, "rank": cfg.rank, "top_k": cfg.top_k, **_versions(), "config": asdict(cfg),
    }
    results: dict[str, Any] = {"meta": meta}
    started = time.perf_counter()
    if cfg.layer:
        results["layer"] = run_layer(cfg, device, log, lambda cells: save({**results, "layer": cells}))
    if cfg.train:
        results["train"] = run_train(cfg, device, log)
        save(results)
    if cfg.model:
        results["model"] = run_model(cfg, device, log)
    meta["seconds"] = round(time.perf_counter() - started, 1)
    results["targets"] = summarize(results)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Time the mixture-of-LoRA strategies (see the module docstring).")
    parser.add_argument("--config", help="benchmark YAML, e.g. conf/benchmark/gpu.yaml")
    parser.add_argument("--out", help="where to write the results JSON")
    parser.add_argument("--sections", default=None, help="comma-separated subset of layer,train,model")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. layer.tokens=[1,16]")
    parser.add_argument("--markdown", metavar="JSON", help="print the summary tables of a results JSON and exit")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="combine the sections of several results JSONs (one "
                        "device) into --out, targets recomputed; later files win")
    args = parser.parse_args(argv)
    if args.markdown:
        print(to_markdown(json.loads(Path(args.markdown).read_text())), end="")
        return
    if args.merge:
        if not args.out:
            parser.error("--merge needs --out")
        merged: dict[str, Any] = {}
        runs = []
        for path in args.merge:
            part = json.loads(Path(path).read_text())
            runs.append({k: v for k, v in part["meta"].items() if k != "config"} | {"sections": [k for k in part if k in ("layer", "train", "model")]})
            merged.update({k: v for k, v in part.items() if k != "targets"})
        merged["meta"] = {**merged["meta"], "runs": runs}
        merged["targets"] = summarize(merged)
        Path(args.out).write_text(json.dumps(merged, indent=2) + "\n")
        return
    if not args.config or not args.out:
        parser.error("--config and --out are required (or --markdown JSON, or --merge)")
    cfg = load_config(args.config, args.set)
    if args.sections:
        keep = set(args.sections.split(","))
        for name in ("layer", "train", "model"):
            if name not in keep:
                setattr(cfg, name, None)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save = lambda results: out.write_text(json.dumps(results, indent=2) + "\n")  # noqa: E731
    results = run(cfg, log=lambda line: print(line, flush=True), save=save)
    save(results)
    print(to_markdown(results))


if __name__ == "__main__":
    main()
