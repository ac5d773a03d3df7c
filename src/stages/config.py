"""The configuration's schema: a dataclass per settings group, registered in Hydra's ConfigStore.

`conf/config.yaml` starts its defaults list with `schema` (the :class:`Config` below), so every composition
(`python -m stages.common compose`, a stage's own, DVC's for `dvc exp run -S`) merges the YAML groups
onto typed dataclasses: an unknown key or a value of the wrong type fails there, naming the key
(`Key 'lr_max' not in 'GateConfig'`, full_key: gate.lr_max). DVC's process finds the registration
through the Hydra plugin module `src/hydra_plugins/meteora_config.py` (`.dvc/config`: plugins_path).

A stage takes its typed settings with :func:`settings`, e.g. ``settings(cfg, "gate")`` -> GateConfig.
Groups whose files differ in shape (model, tasks, method, benchmark) stay free mappings here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

SCHEMA_NAME = "schema"


@dataclass
class MeteoraConfig:
    """`conf/meteora/`: how the trained gates mix the task adapters (what the model is evaluated with)."""

    top_k: int = 2
    temperature: float = 1.0
    num_adapters: int | None = None  # null: every adapter of the task list; n: the first n
    strategy: str = "auto"           # forward strategy of the mixture (meteora.ops.STRATEGIES)


@dataclass
class GateConfig:
    """`conf/gate/`: gate training (stage train_gates)."""

    lambda_gate: float = 50.0
    gradient: str = "local"          # full | local
    steps: int = 200
    batch_size: int = 8
    max_length: int = 128
    lr: float = 1.0e-1
    schedule: str = "cosine"         # any transformers scheduler name
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    max_grad_norm: float = 0.3
    label_template: bool = True      # false: the [INST] / [/INST] tokens are left out of the gate labels
    init: str = "uniform"            # uniform | normal | zeros
    init_std: float = 0.02
    balance: bool = True
    samples_per_task: int | None = None
    log_every: int = 10
    checkpoint_every: int = 25
    resume: bool = True


@dataclass
class TrainerConfig:
    """`conf/trainer/`: the engine and where it runs."""

    engine: str = "single"           # single | ddp | fsdp
    devices: int = 1
    nodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    backend: str = "auto"            # auto | nccl | gloo
    mixed_precision: str = "fp32"    # fp32 | bf16
    gradient_checkpointing: bool = False
    gradient_accumulation: int = 1


@dataclass
class LoraConfig:
    """`adapter.lora`: the task adapters' LoRA shape."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=list)  # conf/adapter lists them (meteora.DEFAULT_TARGETS)


@dataclass
class AdapterTrainConfig:
    """`adapter.train`: one task adapter's training."""

    n_examples: int = 96
    steps: int = 24
    batch_size: int = 2
    lr: float = 2.0e-3
    warmup_steps: int = 2
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    checkpoint_every: int = 4


@dataclass
class AdapterScoreConfig:
    """`adapter.eval`: base model vs adapter on the start of the task's test split (stage score_adapters)."""

    n_examples: int = 16
    max_new_tokens: int = 12
    batch_size: int = 8


@dataclass
class LoraBConfig:
    """`adapter.lora_b`: the one LoRA on the mixture of all tasks."""

    samples_per_task: int = 12
    steps: int = 32
    batch_size: int = 2
    lr: float = 2.0e-3
    warmup_steps: int = 4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    checkpoint_every: int = 8


@dataclass
class AdapterConfig:
    """`conf/adapter/`."""

    source: str = "auto"             # train | hub | auto
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: AdapterTrainConfig = field(default_factory=AdapterTrainConfig)
    eval: AdapterScoreConfig = field(default_factory=AdapterScoreConfig)
    lora_b: LoraBConfig = field(default_factory=LoraBConfig)


@dataclass
class CompositeConfig:
    """`eval.composite`: the composite-n sets (Table 2)."""

    names: list[str] | None = None
    max_samples: int = 4
    max_new_tokens_per_task: int = 16
    batch_size: int = 4
    max_prompt_tokens: int | None = None
    top_k: int = 2
    temperature: dict[str, float] = field(default_factory=dict)


@dataclass
class ChainedConfig:
    """`eval.chained`: chained composite-n (one sequence, each sub-question after the model's own answer)."""

    names: list[str] | None = None
    max_samples: int = 8
    batch_size: int = 4
    separator: str = "\n\n"


@dataclass
class TraceConfig:
    """`eval.trace`: the chained composite answer whose routing Figure 4 draws."""

    composite: str = "composite-3"
    index: int = 0


@dataclass
class EvalConfig:
    """`conf/eval/`: the evaluation (stages baselines and evaluate)."""

    methods: list[str] = field(default_factory=lambda: ["base", "oracle", "lora_b", "meteora"])
    meteora_top_ks: list[int] = field(default_factory=lambda: [1, 2])
    max_test_per_task: int | None = 12
    dtype: str | None = None
    batch_size: int = 16
    max_prompt_tokens: int | None = 512
    max_new_tokens: dict[str, int] = field(default_factory=dict)
    composite: CompositeConfig = field(default_factory=CompositeConfig)
    chained: ChainedConfig = field(default_factory=ChainedConfig)
    trace: TraceConfig = field(default_factory=TraceConfig)


@dataclass
class PathsConfig:
    data: str = "data"
    artifacts: str = "artifacts"
    reports: str = "reports"


@dataclass
class MlflowConfig:
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "meteora"


@dataclass
class Config:
    """The whole composed configuration (`params.yaml`)."""

    model: dict[str, Any] = field(default_factory=dict)
    tasks: dict[str, Any] = field(default_factory=dict)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    meteora: MeteoraConfig = field(default_factory=MeteoraConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    benchmark: dict[str, Any] = field(default_factory=dict)
    method: dict[str, Any] = field(default_factory=dict)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    seed: int = 0
    cpu_threads: int | None = None
    paths: PathsConfig = field(default_factory=PathsConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)


def register() -> None:
    """Store :class:`Config` in Hydra's ConfigStore as `schema` (the first entry of conf/config.yaml's defaults)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=Config, provider="meteora")


def validated(cfg: DictConfig) -> DictConfig:
    """`cfg` (a loaded params file) merged onto the schema: unknown keys and wrong types raise; struct mode on."""
    merged = OmegaConf.merge(OmegaConf.structured(Config), cfg)
    OmegaConf.set_struct(merged, True)
    return merged


def settings(cfg: DictConfig, group: str) -> Any:
    """The typed settings of one group, e.g. ``settings(cfg, "gate")`` -> :class:`GateConfig`."""
    return OmegaConf.to_object(OmegaConf.select(cfg, group, throw_on_missing=True))

