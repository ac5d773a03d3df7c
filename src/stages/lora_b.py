"""Stage lora_b: the LoRA-B baseline, one LoRA trained on the mixture of all tasks' training data
(the first `adapter.lora_b.samples_per_task` train examples of every task; the paper: 1,000), or the
paper's published `*_lora_b` folder in the paper profiles. Output: `artifacts/lora_b/` (PEFT folder)
and `reports/lora_b.json`."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from omegaconf import DictConfig

from meteora.adapters import validate_adapter
from stages.adapters import adapter_source, fetch_paper_folder, meta_base, save_peft
from stages.common import device, load_config, seed_everything, set_threads, stage_run, torch_dtype
from stages.setup import load_task_split
from stages.training import TrainSettings, encode_records, load_base, train_lora, with_lora


def train_lora_b(cfg: DictConfig, out: Path, log_fn: Callable[[dict, int], None] | None = None) -> dict:
    """Train LoRA-B on the task mixture, save and validate it (`log_fn(metrics, step)` gets every step's
    metrics); returns the report."""
    seed = int(cfg.seed)
    seed_everything(seed)
    base, tokenizer = load_base(Path(cfg.paths.artifacts) / "model", torch_dtype(str(cfg.model.dtype)), device())
    max_length = int(cfg.model.max_length)
    per_task = int(cfg.adapter.lora_b.samples_per_task)
    counts, data = {}, []
    for task in (str(t) for t in cfg.tasks.names):
        records = load_task_split(cfg, task, "train", per_task)
        counts[task] = len(records)
        data += encode_records(tokenizer, records, max_length)
    settings = TrainSettings.from_config(cfg.adapter.lora_b, max_length=max_length, seed=seed)
    model = with_lora(base, cfg.adapter.lora, seed)
    checkpoints = Path(cfg.paths.artifacts) / "checkpoints" / "lora_b"
    stats = train_lora(model, data, settings, pad_id=tokenizer.pad_token_id, checkpoint_dir=checkpoints,
                       fingerprint_extra={"tasks": counts, "lora": dict(cfg.adapter.lora), "model": cfg.model.name},
                       desc="lora_b", log_fn=log_fn, config_key="adapter.lora_b")
    save_peft(model, out)
    validate_adapter(out, model.unload())
    shutil.rmtree(checkpoints, ignore_errors=True)
    return {"source": "train", "samples_per_task": counts, "train": stats}


def main(argv: Sequence[str] | None = None) -> None:
    cfg = load_config(argv)
    set_threads(cfg)
    source = adapter_source(cfg)
    out = Path(cfg.paths.artifacts) / "lora_b"
    params = {"seed": cfg.seed, "model": cfg.model.name, "source": source, "tasks": cfg.tasks.names,
              "lora": cfg.adapter.lora, "lora_b": cfg.adapter.lora_b}
    with stage_run(cfg, "lora_b", params) as run:
        start = time.perf_counter()
        if source == "train":
            report = train_lora_b(cfg, out, run.log_metrics)
        else:
            folder = str(cfg.model.paper_adapters.lora_b_folder)
            fetch_paper_folder(cfg, folder, out)
            validate_adapter(out, meta_base(cfg))
            report = {"source": "hub", "repo_id": str(cfg.model.paper_adapters.repo_id), "folder": folder}
        report["seconds"] = round(time.perf_counter() - start, 1)
        run.write_json(Path(cfg.paths.reports) / "lora_b.json", report)
        run.output(out)
    print(f"lora_b ({source}) in {report['seconds']} s -> {out}")


if __name__ == "__main__":
    main()
