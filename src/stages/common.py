"""Shared plumbing of the pipeline stages: configuration, MLflow runs, seeding, devices, JSON I/O.

Every stage is run either by DVC (`python -m stages.<name> --params params.yaml`, reading the
composed `params.yaml`) or by hand with Hydra overrides (`python -m stages.<name> tasks=bigbench22
gate.top_k=1`, composing from `conf/`). `python -m stages.common compose [overrides...]` prints the
composed configuration exactly as DVC's Hydra integration writes `params.yaml`;
`python -m stages.common check` fails when the committed `params.yaml` is out of date.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from omegaconf import DictConfig, OmegaConf

CONFIG_NAME = "config"
_ABSENT = object()


class ConfigError(ValueError):
    """A configuration that cannot be loaded or that names something that does not exist."""


def project_root() -> Path:
    """The project root: the working directory when it holds `conf/` (DVC runs stages there), else the repo."""
    cwd = Path.cwd()
    if (cwd / "conf" / f"{CONFIG_NAME}.yaml").is_file():
        return cwd
    return Path(__file__).resolve().parents[2]


def compose(overrides: Sequence[str] = (), config_dir: str | Path | None = None) -> DictConfig:
    """Compose `conf/config.yaml` with Hydra overrides and resolve interpolations (as DVC does)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    config_dir = Path(config_dir) if config_dir is not None else project_root() / "conf"
    if not (config_dir / f"{CONFIG_NAME}.yaml").is_file():
        raise ConfigError(f"no {CONFIG_NAME}.yaml in config directory {config_dir}")
    try:
        with initialize_config_dir(str(config_dir.resolve()), version_base=None):
            cfg = hydra_compose(config_name=CONFIG_NAME, overrides=list(overrides))
    except HydraException as err:
        raise ConfigError(f"cannot compose {config_dir}/{CONFIG_NAME}.yaml with {list(overrides)}: {err}") from err
    OmegaConf.resolve(cfg)
    return cfg


def load_params(path: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """Load a composed params file; `key=value` overrides may only change keys that exist."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file {path} does not exist (compose it: python -m stages.common compose > {path})")
    cfg = OmegaConf.load(path)
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"params file {path} does not hold a mapping")
    for override in overrides:
        key, sep, value = override.partition("=")
        current = OmegaConf.select(cfg, key, default=_ABSENT) if sep and not key.startswith(("+", "~")) else _ABSENT
        if current is _ABSENT or isinstance(current, DictConfig):
            raise ConfigError(
                f"override {override!r} does not set an existing key of {path}; config-group choices "
                "(e.g. model=llama3_8b) need composition from conf/: drop --params or use `dvc exp run -S`"
            )
        OmegaConf.update(cfg, key, yaml.safe_load(value) if value else value, merge=False)
    return cfg


def load_config(argv: Sequence[str] | None = None) -> DictConfig:
    """The stage configuration: `--params FILE [key=value ...]` or Hydra overrides composed from conf/."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(add_help=True)
    parser.add_argument("--params", default=None, help="composed params file (DVC mode), e.g. params.yaml")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. tasks=bigbench22 gate.top_k=1")
    args = parser.parse_args(argv)
    if args.params is not None:
        return load_params(args.params, args.overrides)
    return compose(args.overrides)


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings to dotted keys; lists are kept as values."""
    if isinstance(obj, DictConfig):
        obj = OmegaConf.to_container(obj, resolve=True)
    if not isinstance(obj, Mapping):
        return {prefix: obj} if prefix else {"value": obj}
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def shared_root(workspace: str | os.PathLike | None = None) -> Path:
    """The project that owns a workspace (default :func:`project_root`): the workspace itself, or, for a DVC
    experiment's temporary copy (`<root>/.dvc/tmp/exps/<run>/`, where queued and `--temp` experiments run),
    the root it was copied from. Stores shared by all runs (MLflow, the raw-data cache) live there."""
    workspace = Path(workspace or project_root()).resolve()
    parts = workspace.parts
    for i in range(len(parts) - 3):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return workspace


def tracking_uri(uri: str, workspace: str | os.PathLike | None = None) -> str:
    """`mlflow.tracking_uri` with a relative `sqlite:///` path anchored at :func:`shared_root`, so that
    every run, queued DVC experiments included, lands in the project's one store."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not Path(uri[len(prefix):]).is_absolute():
        return prefix + str(shared_root(workspace) / uri[len(prefix):])
    return uri


@contextlib.contextmanager
def start_run(cfg: DictConfig, stage: str, params: Mapping[str, Any] | None = None) -> Iterator[Any]:
    """An MLflow run of one stage: tracking store and experiment from `cfg.mlflow` (a server:
    `mlflow.tracking_uri=http://...`), tagged with the stage, the DVC experiment name (env `DVC_EXP_NAME`)
    and the model/tasks profile; logs `params` flattened."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(str(cfg.mlflow.tracking_uri)))
    mlflow.set_experiment(str(cfg.mlflow.experiment))
    tags = {
        "stage": stage,
        "dvc_exp": os.environ.get("DVC_EXP_NAME", ""),
        "model": str(OmegaConf.select(cfg, "model.name", default="")),
        "tasks": str(OmegaConf.select(cfg, "tasks.profile", default="")),
    }
    with mlflow.start_run(run_name=stage, tags=tags) as run:
        if params:
            flat = {key: (json.dumps(v) if isinstance(v, (list, tuple)) else v) for key, v in flatten(params).items()}
            mlflow.log_params({key: str(v)[:6000] for key, v in flat.items()})
        yield run


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_threads(cfg: DictConfig) -> None:
    """torch intra-op threads on CPU: `cpu_threads` when set, else this process's share of the cores
    (all of them for one process, cores / processes under torchrun)."""
    threads = OmegaConf.select(cfg, "cpu_threads", default=None)
    if not threads:
        threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    torch.set_num_threads(int(threads))


def device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def write_json(path: str | Path, obj: Any) -> Path:
    """Write `obj` as indented JSON (parents created, trailing newline)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_jsonl(path: str | Path, records: Iterable[Mapping[str, Any]]) -> Path:
    """Write one JSON object per line (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL file; a bad line raises naming the file and line number."""
    path = Path(path)
    records = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{lineno}: not valid JSON: {err}") from err
    return records


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.common")
    sub = parser.add_subparsers(dest="command", required=True)
    p_compose = sub.add_parser("compose", help="print the composed config as DVC writes params.yaml")
    p_compose.add_argument("overrides", nargs="*")
    p_check = sub.add_parser("check", help="fail when params.yaml differs from the default composition")
    p_check.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    text = OmegaConf.to_yaml(compose(getattr(args, "overrides", [])))
    if args.command == "compose":
        sys.stdout.write(text)
        return 0
    current = Path(args.params).read_text(encoding="utf-8") if Path(args.params).is_file() else ""
    if current != text:
        sys.stderr.write(f"{args.params} is out of date: run `python -m stages.common compose > {args.params}`\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main())
