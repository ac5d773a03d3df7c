"""Stage adapters (one DVC stage per task: `python -m stages.adapters --task <task>`): the task's LoRA
adapter as a standard PEFT folder in `artifacts/adapters/<task>/`.

adapter.source: train (PEFT LoRA on the task's train split, answer tokens only, resumable from
`artifacts/checkpoints/adapters/<task>/`), hub (the paper's published adapter,
`model.paper_adapters`), auto (hub when the model profile names paper adapters, else train).
Every adapter is validated with the core's loader against the base model;
`reports/adapters/train/<task>.json` holds its training curve. Its scores are the stage score_adapters.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig

from meteora.adapters import validate_adapter
from meteora.io import atomic_directory
from stages.common import ConfigError, device, load_config, seed_everything, set_threads, stage_run, torch_dtype
from stages.hub import download
from stages.setup import load_task_split
from stages.training import TrainSettings, encode_records, load_base, train_lora, with_lora


def adapter_source(cfg: DictConfig) -> str:
    """train or hub (resolving auto from the model profile)."""
    source = str(cfg.adapter.source)
    if source == "auto":
        return "hub" if cfg.model.get("paper_adapters") else "train"
    if source not in ("train", "hub"):
        raise ConfigError(f"adapter.source {source!r} is not one of auto, train, hub")
    if source == "hub" and not cfg.model.get("paper_adapters"):
        raise ConfigError(f"adapter.source=hub but model {cfg.model.name!r} names no paper_adapters")
    return source


def check_task(cfg: DictConfig, task: str) -> None:
    names = [str(t) for t in cfg.tasks.names]
    if task not in names:
        raise ConfigError(f"unknown task {task!r}: not in tasks.names of profile {cfg.tasks.profile!r} ({names})")


def meta_base(cfg: DictConfig):
    """The base model's architecture on the meta device (shapes only, no memory) for validation."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(Path(cfg.paths.artifacts) / "model")
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def save_peft(model, out: Path) -> None:
    """Save the PEFT adapter folder (adapter_config.json + adapter_model.safetensors) only, atomically
    (written beside `out`, then moved into place)."""
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "README.md").unlink(missing_ok=True)


def fetch_paper_folder(cfg: DictConfig, folder: str, out: Path) -> None:
    """Download `<folder>/` of the model profile's paper adapter repository into `out`."""
    spec = cfg.model.paper_adapters
    with tempfile.TemporaryDirectory(dir=Path(cfg.paths.artifacts)) as tmp:
        download(spec.repo_id, tmp, revision=spec.revision, allow_patterns=[f"{folder}/*"],
                 what=f"adapter folder {folder}")
        if not (Path(tmp) / folder / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{spec.repo_id} has no PEFT adapter in {folder}/")
        shutil.rmtree(out, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(Path(tmp) / folder), out)


def train_adapter(cfg: DictConfig, task: str, out: Path, log_fn: Callable[[dict, int], None] | None = None) -> dict:
    """Train, save and validate the task's LoRA (`log_fn(metrics, step)` gets every step's metrics); returns
    the report."""
    seed = int(cfg.seed)
    seed_everything(seed)
    base, tokenizer = load_base(Path(cfg.paths.artifacts) / "model", torch_dtype(str(cfg.model.dtype)), device())
    max_length = int(cfg.model.max_length)
    train = load_task_split(cfg, task, "train", int(cfg.adapter.train.n_examples))
    data = encode_records(tokenizer, train, max_length)
    settings = TrainSettings.from_config(cfg.adapter.train, max_length=max_length, seed=seed)
    model = with_lora(base, cfg.adapter.lora, seed)
    stats = train_lora(model, data, settings, pad_id=tokenizer.pad_token_id,
                       checkpoint_dir=Path(cfg.paths.artifacts) / "checkpoints" / "adapters" / task,
                       fingerprint_extra={"task": task, "lora": dict(cfg.adapter.lora), "model": cfg.model.name},
                       desc=f"adapter {task}", log_fn=log_fn, config_key="adapter.train")
    save_peft(model, out)
    report = {"task": task, "source": "train", "train_examples": len(train), "train": stats}
    validate_adapter(out, model.unload())
    shutil.rmtree(Path(cfg.paths.artifacts) / "checkpoints" / "adapters" / task, ignore_errors=True)
    return report


def hub_adapter(cfg: DictConfig, task: str, out: Path) -> dict:
    """Download and validate the paper's adapter for the task."""
    folder = f"{cfg.model.paper_adapters.peft_folder}/{task}"
    fetch_paper_folder(cfg, folder, out)
    validate_adapter(out, meta_base(cfg))
    return {"task": task, "source": "hub", "repo_id": str(cfg.model.paper_adapters.repo_id), "folder": folder}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.adapters", add_help=False)
    parser.add_argument("--task", required=True, help="the task whose adapter to build")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    cfg = load_config(rest)
    set_threads(cfg)
    check_task(cfg, args.task)
    source = adapter_source(cfg)
    out = Path(cfg.paths.artifacts) / "adapters" / args.task
    params = {"task": args.task, "seed": cfg.seed, "model": cfg.model.name, "source": source,
              "lora": cfg.adapter.lora, "train": cfg.adapter.train}
    with stage_run(cfg, f"adapters@{args.task}", params, tags={"task": args.task}) as run:
        start = time.perf_counter()
        report = train_adapter(cfg, args.task, out, run.log_metrics) if source == "train" else hub_adapter(cfg, args.task, out)
        report["seconds"] = round(time.perf_counter() - start, 1)
        run.write_json(Path(cfg.paths.reports) / "adapters" / "train" / f"{args.task}.json", report)
        run.output(out)
    print(f"adapter {args.task} ({source}) in {report['seconds']} s -> {out}")


if __name__ == "__main__":
    main()
