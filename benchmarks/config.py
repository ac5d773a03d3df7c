"""Benchmark settings: dataclasses read from a YAML file (``conf/benchmark/*.yaml``) and OmegaConf
dotlist overrides (``layer.tokens=[1,16]``); unknown keys and wrong types raise, naming the key."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
        return [
            ("q_proj", h, q),
            ("k_proj", h, kv),
            ("v_proj", h, kv),
            ("o_proj", q, h),
            ("gate_proj", h, m),
            ("up_proj", h, m),
            ("down_proj", m, h),
        ]


@dataclass
class LayerSection:
    """One decoder layer's 7 projections per strategy (see :mod:`benchmarks.layer`)."""

    models: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=lambda: [1, 16, 256])
    routings: list[str] = field(default_factory=lambda: ["random", "skewed"])
    dtypes: list[str] = field(default_factory=lambda: ["float32"])
    strategies: list[str] = field(default_factory=lambda: ["base", "single", "peft", "meteora"])
    cuda_graphs: bool = False  # also time the layer replayed from a CUDA graph (no launch overhead)
    # Decoder layers of distinct weights run in turn per timed call (the time is per layer): more than one
    # takes the weights out of the last-level cache, as in a model with many layers.
    weight_sets: int = 1
    # The strategies of a cell are timed in this many interleaved rounds (each a full rep_ms measurement per
    # strategy), so that a drift of the machine hits them all: ms is the median round, x_<reference> the
    # median of the per-round ratios and, from three rounds on, x_<reference>_ci its 95% bootstrap interval.
    rounds: int = 1


@dataclass
class ModelSection:
    """Whole-model prefill and ``model.generate`` decode per system (see :mod:`benchmarks.model`)."""

    model: str = ""
    layers: int = 2
    dtype: str = "float32"
    systems: list[str] = field(default_factory=lambda: ["bare", "peft_lora", "meteora"])
    modes: list[str] = field(default_factory=lambda: ["eager"])  # eager, compiled, graphs
    prefill_tokens: int = 2048
    prompt_tokens: int = 128
    new_tokens: int = 32
    batches: list[int] = field(default_factory=lambda: [1, 16])
    repeats: int = 3  # interleaved rounds over the systems; rows give the median round
    min_run_s: float = 0.2  # per generate measurement (torch.utils.benchmark blocked_autorange)


@dataclass
class TrainSection:
    """One training step at a token count: MeteoRA's gates vs one trainable PEFT LoRA."""

    model: str = ""
    layers: int = 2
    dtype: str = "float32"
    tokens: int = 2048
    systems: list[str] = field(default_factory=lambda: ["peft_lora", "meteora"])
    gate_loss_weight: float = 50.0
    repeats: int = 3  # interleaved rounds over the systems; rows give the median round
    rep_ms: float = 1000.0  # per measurement (a step takes tens of ms: the global rep_ms would time one or two)


@dataclass
class Target:
    """A threshold: the worst ``metric`` over the ``section``'s rows matching ``where`` must be <= ``limit``."""

    section: str
    metric: str
    limit: float
    where: dict[str, Any] = field(default_factory=dict)


@dataclass
class BenchConfig:
    profile: str = "cpu"
    out: str = "reports/benchmark/cpu.json"  # the results JSON, relative to the working directory
    device: str = "auto"
    seed: int = 0
    num_adapters: int = 28
    rank: int = 8
    alpha: float = 16.0
    top_k: int = 2
    warmup_ms: float = 25.0  # do_bench warm-up / torch.utils.benchmark: unused
    rep_ms: float = 100.0  # do_bench repetition time / torch.utils.benchmark min_run_time
    shapes: dict[str, Shapes] = field(default_factory=dict)
    layer: LayerSection | None = None
    model: ModelSection | None = None
    train: TrainSection | None = None
    targets: dict[str, Target] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.layer is not None and self.layer.weight_sets < 1:
            raise ValueError(f"benchmark layer.weight_sets must be at least 1, got {self.layer.weight_sets}")
        if self.layer is not None and self.layer.rounds < 1:
            raise ValueError(f"benchmark layer.rounds must be at least 1, got {self.layer.rounds}")
        for section, name in self.section_models():
            if name not in self.shapes:
                raise ValueError(
                    f"benchmark section `{section}` names model shapes {name!r}, but `shapes` "
                    f"defines only {sorted(self.shapes)}"
                )

    def section_models(self) -> list[tuple[str, str]]:
        names = [("layer", m) for m in self.layer.models] if self.layer else []
        return names + [(key, s.model) for key, s in (("model", self.model), ("train", self.train)) if s is not None]


def from_mapping(raw: Any, overrides: list[str] | tuple[str, ...] = ()) -> BenchConfig:
    """A :class:`BenchConfig` from a mapping (a YAML file's, the Hydra group ``benchmark``) and dotlist overrides."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        merged = OmegaConf.merge(OmegaConf.structured(BenchConfig), raw, OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ValueError(f"bad benchmark settings: {err}") from err


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> BenchConfig:
    """Read a benchmark YAML (e.g. ``conf/benchmark/gpu.yaml``) with dotlist overrides."""
    from omegaconf import OmegaConf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"benchmark config {path} does not exist (profiles: conf/benchmark/*.yaml)")
    return from_mapping(OmegaConf.load(path), overrides)
