"""What train_gates and evaluate share: the profile's task list, its data, the base model, MeteoRA on it."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from meteora import MeteoRAModel, attach_meteora
from stages.common import ConfigError, device, read_jsonl, torch_dtype
from stages.generation import prepare_tokenizer


def task_list(cfg: DictConfig) -> list[str]:
    """All tasks of the profile, in adapter (gate output) order."""
    return [str(t) for t in cfg.tasks.names]


def selected_tasks(cfg: DictConfig) -> list[str]:
    """The tasks MeteoRA is built from: all of them, or the first `meteora.num_adapters` (adapter-count sweep)."""
    tasks = task_list(cfg)
    n = cfg.meteora.get("num_adapters")
    if n is None:
        return tasks
    if not 1 <= int(n) <= len(tasks):
        raise ConfigError(f"meteora.num_adapters={n} must be between 1 and the {len(tasks)} tasks of the profile")
    return tasks[: int(n)]


def check_top_k(top_k: int, num_adapters: int, setting: str) -> None:
    """A top-k that cannot be routed (more experts than adapters) is an error naming the setting, never clamped."""
    if not 1 <= int(top_k) <= num_adapters:
        raise ConfigError(f"{setting}={top_k} must be between 1 and the {num_adapters} adapters of this run "
                          "(tasks.names, meteora.num_adapters)")


def load_task_split(cfg: DictConfig, task: str, split: str, limit: int | None = None) -> list[dict]:
    """Records of data/tasks/<task>/<split>.jsonl (the first `limit` when given)."""
    path = Path(cfg.paths.data) / "tasks" / task / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"task {task!r}: {path} does not exist (run the build_datasets stage)")
    records = read_jsonl(path)
    if not records:
        raise ValueError(f"task {task!r}: {path} is empty")
    return records[: int(limit)] if limit else records


def model_dir(cfg: DictConfig) -> Path:
    return Path(cfg.paths.artifacts) / "model"


def adapter_dir(cfg: DictConfig, task: str) -> Path:
    return Path(cfg.paths.artifacts) / "adapters" / task


def decode_dtype(cfg: DictConfig) -> str:
    """The dtype the decoding stages load the model in: `eval.dtype`, or `model.dtype` when it is null."""
    return str(OmegaConf.select(cfg, "eval.dtype", default=None) or cfg.model.get("dtype", "float32"))


def load_base(cfg: DictConfig, dtype: str | None = None):
    """The base causal LM (in `dtype`, default `model.dtype`; eval mode, on this process's device) and
    its tokenizer (left padding) from artifacts/model."""
    path = model_dir(cfg)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no base model in {path} (run the prepare_model stage)")
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(path))
    setting = "model.dtype" if dtype is None else "eval.dtype"
    dtype = torch_dtype(str(dtype or cfg.model.get("dtype", "float32")), setting)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device()).eval()
    return model, tokenizer


def build_meteora(cfg: DictConfig, tasks: list[str], top_k: int, temperature: float,
                  dtype: str | None = None) -> tuple[MeteoRAModel, object]:
    """The base model (in `dtype`, default `model.dtype`) with the tasks' adapters embedded (in `tasks`
    order, cast to that dtype) and fresh gates."""
    model, tokenizer = load_base(cfg, dtype)
    adapters = {task: adapter_dir(cfg, task) for task in tasks}
    check_top_k(top_k, len(tasks), "meteora.top_k")
    meteora = attach_meteora(model, adapters, top_k=top_k, temperature=temperature,
                             strategy=str(cfg.meteora.strategy))
    return meteora, tokenizer
