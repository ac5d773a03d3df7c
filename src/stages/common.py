"""Shared plumbing of the pipeline stages: configuration, MLflow runs, seeding, devices, JSON I/O.

Every stage is run either by DVC (`python -m stages.<name> --params params.yaml`, reading the
composed `params.yaml`) or by hand with Hydra overrides (`python -m stages.<name> tasks=bigbench22
meteora.top_k=1`, composing from `conf/`). `python -m stages.common compose [overrides...]` prints the
composed configuration exactly as DVC's Hydra integration writes `params.yaml`;
`python -m stages.common check` fails when the committed `params.yaml` is out of date.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from meteora.dtypes import dtype_of
from meteora.io import atomic_write_json, atomic_write_text
from stages.config import register as register_schema
from stages.config import validated

CONFIG_NAME = "config"
MLFLOW_LOCK_TIMEOUT_S = 600  # longest wait for the tracking store's lock (another process writing)
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
    register_schema()
    try:
        with initialize_config_dir(str(config_dir.resolve()), version_base=None):
            cfg = hydra_compose(config_name=CONFIG_NAME, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"cannot compose {config_dir}/{CONFIG_NAME}.yaml with {list(overrides)}: {err}") from err
    OmegaConf.resolve(cfg)
    return cfg


def load_params(path: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """Load a composed params file; `key=value` overrides may only change keys that exist."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file {path} does not exist (compose it: python -m stages.common compose > {path})")
    loaded = OmegaConf.load(path)
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"params file {path} does not hold a mapping")
    try:
        cfg = validated(loaded)
    except OmegaConfBaseException as err:
        raise ConfigError(f"params file {path} does not match the schema (src/stages/config.py): {err}; "
                          f"recompose it: python -m stages.common compose > {path}") from err
    for override in overrides:
        key, sep, value = override.partition("=")
        current = OmegaConf.select(cfg, key, default=_ABSENT) if sep and not key.startswith(("+", "~")) else _ABSENT
        if current is _ABSENT or isinstance(current, DictConfig):
            raise ConfigError(
                f"override {override!r} does not set an existing key of {path}; config-group choices "
                "(e.g. model=llama3_8b) need composition from conf/: drop --params or use `dvc exp run -S`"
            )
        try:
            OmegaConf.update(cfg, key, yaml.safe_load(value) if value else value, merge=False)
        except OmegaConfBaseException as err:
            raise ConfigError(f"override {override!r}: {err}") from err
    return cfg


def load_config(argv: Sequence[str] | None = None) -> DictConfig:
    """The stage configuration: `--params FILE [key=value ...]` or Hydra overrides composed from conf/."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(add_help=True)
    parser.add_argument("--params", default=None, help="composed params file (DVC mode), e.g. params.yaml")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. tasks=bigbench22 meteora.top_k=1")
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


def is_rank_zero() -> bool:
    """True on rank 0 of a process group (or torchrun's env `RANK`) and when there is none."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", 0)) == 0


def git_commit(cwd: str | os.PathLike | None = None) -> str:
    """The checked-out commit (`git rev-parse HEAD`), with `-dirty` when tracked files differ; "" outside git."""
    cwd = Path(cwd or project_root())
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return ""
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _store_lock(uri: str) -> contextlib.AbstractContextManager:
    """A file lock beside a sqlite tracking store (`<db>.lock`): MLflow's sqlite store takes one writer at a
    time and races when two processes create it, so every write of every stage process is serialised.
    Other stores (a tracking server) need no lock."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return contextlib.nullcontext()
    from filelock import FileLock

    db = Path(uri[len(prefix):])
    db.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(db) + ".lock", timeout=MLFLOW_LOCK_TIMEOUT_S)


def _scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Flatten nested metrics to dotted keys; numbers (bools included) as floats, None and non-numbers dropped."""
    out = {}
    for key, value in flatten(metrics).items():
        if isinstance(value, (bool, int, float, np.integer, np.floating)) and not isinstance(value, str):
            out[key] = float(value)
    return out


class StageRun:
    """What a stage does with its MLflow run, yielded by :func:`stage_run`.

    Every method is a no-op on ranks other than 0 (files included: only rank 0 writes outputs), so a
    DDP/FSDP stage calls them unconditionally. Each MLflow write holds the store's lock.
    """

    def __init__(self, lock: contextlib.AbstractContextManager, active: bool, outputs: list[str] | None = None) -> None:
        self.active = active
        self.outputs: list[str] = [] if outputs is None else outputs
        self.run_id: str | None = None
        self._lock = lock

    def _mlflow(self, fn: str, *args: Any, **kwargs: Any) -> Any:
        import mlflow

        if not self.active:
            return None
        with self._lock:
            return getattr(mlflow, fn)(*args, **kwargs)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log `params` flattened to dotted keys (lists as JSON, values cut at MLflow's 6000 characters)."""
        flat = {k: (json.dumps(v) if isinstance(v, (list, tuple)) else v) for k, v in flatten(params).items()}
        self._mlflow("log_params", {k: str(v)[:6000] for k, v in flat.items()})

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log the numbers of `metrics` (nested mappings flattened to dotted keys, None skipped)."""
        scalars = _scalar_metrics(metrics)
        if scalars:
            self._mlflow("log_metrics", scalars, step=step)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._mlflow("set_tags", {k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._mlflow("log_artifact", str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._mlflow("log_text", text, artifact_file)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        self._mlflow("log_dict", obj, artifact_file)

    def output(self, path: str | os.PathLike) -> Path:
        """Record `path` (a file or directory the stage wrote) in the run's `outputs` tag."""
        if self.active and str(path) not in self.outputs:
            self.outputs.append(str(path))
        return Path(path)

    def write_json(self, path: str | os.PathLike, obj: Any, artifact: bool = True) -> Path:
        """Write `obj` as JSON atomically (rank 0 only), record it as an output and log it as an artifact."""
        if not self.active:
            return Path(path)
        write_json(path, obj)
        if artifact:
            self.log_artifact(path)
        return self.output(path)

    @contextlib.contextmanager
    def nested(self, name: str, tags: Mapping[str, Any] | None = None) -> Iterator[StageRun]:
        """A child MLflow run (one method of a sweep, ...) logged through the same lock."""
        child = StageRun(self._lock, self.active, self.outputs)
        if not self.active:
            yield child
            return
        run = self._mlflow("start_run", run_name=name, nested=True, tags={k: str(v) for k, v in (tags or {}).items()})
        child.run_id = run.info.run_id
        status = "FAILED"
        try:
            yield child
            status = "FINISHED"
        finally:
            self._mlflow("end_run", status=status)


@contextlib.contextmanager
def stage_run(cfg: DictConfig, stage: str, params: Mapping[str, Any] | None = None,
              tags: Mapping[str, Any] | None = None) -> Iterator[StageRun]:
    """The MLflow run of one stage, on rank 0 only (other ranks get an inactive :class:`StageRun`).

    Store and experiment from `cfg.mlflow` (a relative sqlite path is the project's one store, see
    :func:`tracking_uri`); tags: the stage, the git commit, the DVC experiment (env `DVC_EXP_NAME`), the
    model and task profile, and `tags`; params: `params` flattened (the settings the stage reads);
    artifact `config/params.yaml`: the whole composed configuration. On exit the run gets the metric
    `seconds` (wall time of the block), the tag `outputs` (what :meth:`StageRun.output` /
    :meth:`StageRun.write_json` recorded) and status FINISHED, or FAILED when the block raised.
    """
    uri = tracking_uri(str(cfg.mlflow.tracking_uri))
    handle = StageRun(_store_lock(uri), active=is_rank_zero())
    if not handle.active:
        yield handle
        return
    import mlflow

    all_tags = {
        "stage": stage,
        "git_commit": git_commit(),
        "dvc_exp": os.environ.get("DVC_EXP_NAME", ""),
        "model": str(OmegaConf.select(cfg, "model.name", default="")),
        "tasks": str(OmegaConf.select(cfg, "tasks.profile", default="")),
        **{k: str(v) for k, v in (tags or {}).items()},
    }
    with handle._lock:
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(str(cfg.mlflow.experiment))
        run = mlflow.start_run(run_name=stage, tags=all_tags)
    handle.run_id = run.info.run_id
    status, started = "FAILED", time.perf_counter()
    try:
        if params:
            handle.log_params(params)
        handle.log_text(OmegaConf.to_yaml(cfg), "config/params.yaml")
        yield handle
        status = "FINISHED"
    finally:
        try:
            handle.log_metrics({"seconds": time.perf_counter() - started})
            if handle.outputs:
                handle.set_tags({"outputs": ", ".join(handle.outputs)})
        finally:
            handle._mlflow("end_run", status=status)


@contextlib.contextmanager
def start_run(cfg: DictConfig, stage: str, params: Mapping[str, Any] | None = None) -> Iterator[Any]:
    """Transitional: :func:`stage_run` yielding the active ``mlflow`` run object (stages move to stage_run)."""
    import mlflow

    with stage_run(cfg, stage, params):
        yield mlflow.active_run()


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


def torch_dtype(name: str, setting: str = "model.dtype") -> torch.dtype:
    """The torch dtype of a `model.dtype` name; an unknown name raises ConfigError naming the setting."""
    try:
        return dtype_of(name, setting)
    except ValueError as err:
        raise ConfigError(str(err)) from err


def device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def write_json(path: str | Path, obj: Any) -> Path:
    """Write `obj` as indented JSON atomically (parents created, trailing newline)."""
    return atomic_write_json(path, obj)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_jsonl(path: str | Path, records: Iterable[Mapping[str, Any]]) -> Path:
    """Write one JSON object per line atomically (parents created)."""
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


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
