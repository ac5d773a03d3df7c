"""Stage build_datasets: train/test JSONL of every task of the profile and the composite test sets.

Outputs: `data/tasks/<task>/{train,test}.jsonl` (records of `stages.data.Example.record`),
`data/composite/<name>.jsonl` (records of `stages.data.build_composite`), `reports/datasets.json`
(counts, metrics, substitutes), and the cached BIG-bench archive under `data/raw/`.
"""

from __future__ import annotations

import difflib
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from stages.common import ConfigError, load_config, seed_everything, shared_root, stage_run, write_jsonl
from stages.data import (
    build_composite,
    check_leakage,
    ensure_hub,
    fetch_archive,
    load_hub_task,
    parse_task,
    read_task_files,
    split_examples,
)


def shared_archive(path: str | Path) -> Path:
    """`path`, or the same relative path under the project root when this runs in a DVC experiment's
    temporary workspace (queued experiments) and only the project holds the 358 MB archive."""
    path = Path(path)
    shared = shared_root() / path
    return shared if not path.is_absolute() and not path.is_file() and shared.is_file() else path


def check_task_names(cfg: DictConfig) -> list[str]:
    """The profile's task names, checked: known to the catalog, unique, alphabetical (adapter order)."""
    names = [str(t) for t in cfg.tasks.names]
    catalog = cfg.tasks.catalog
    for name in names:
        if name not in catalog:
            close = difflib.get_close_matches(name, list(catalog), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown task {name!r} in tasks.names (not in tasks.catalog){hint}")
    if len(set(names)) != len(names):
        raise ConfigError(f"tasks.names lists a task twice: {names}")
    if names != sorted(names):
        raise ConfigError(f"tasks.names must be in alphabetical (adapter) order: {sorted(names)}")
    return names


def composite_tasks(cfg: DictConfig, names: Sequence[str]) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (sub-tasks after substitution, the paper's sub-tasks) for every composite whose
    sub-tasks are all in the profile; a composite with a missing sub-task is an error."""
    substitutes = dict(cfg.tasks.get("substitutes") or {})
    out = {}
    for name, paper in (cfg.tasks.get("composites") or {}).items():
        paper = [str(t) for t in paper]
        tasks = [substitutes.get(t, t) for t in paper]
        missing = [t for t in tasks if t not in names]
        if missing:
            raise ConfigError(
                f"composite {name!r} needs tasks {missing} that are not in tasks.names "
                "(add them, substitute them in tasks.substitutes, or drop the composite)"
            )
        out[str(name)] = (tasks, paper)
    return out


def load_examples(cfg: DictConfig, names: Sequence[str]):
    """task -> (examples, test examples or None), BIG-bench tasks read in one pass over the archive."""
    tasks_cfg = cfg.tasks
    catalog = tasks_cfg.catalog
    bigbench = [t for t in names if catalog[t].source == "bigbench"]
    for task in (t for t in names if catalog[t].source == "hub"):
        ensure_hub(task, catalog[task].hub)  # before the long archive read
    files = {}
    if bigbench:
        bb = tasks_cfg.bigbench
        if bb.get("dir"):
            files = read_task_files(bigbench, directory=bb.dir)
        else:
            archive = fetch_archive(shared_archive(bb.archive), str(bb.version))
            files = read_task_files(bigbench, archive=archive)
    out = {}
    for task in tqdm(names, desc="parse tasks"):
        spec = catalog[task]
        if spec.source == "bigbench":
            subtasks = list(spec.subtasks) if spec.get("subtasks") is not None else None
            out[task] = (parse_task(task, files[task], subtasks, spec.get("answer", "target"), task), None)
        elif spec.source == "hub":
            cap = 20 * (int(tasks_cfg.split.n_train) + int(tasks_cfg.split.n_test))
            out[task] = load_hub_task(task, OmegaConf.to_container(spec.hub, resolve=True), limit=cap)
        else:
            raise ConfigError(f"task {task!r}: unknown source {spec.source!r} (bigbench or hub)")
    return out


def build(cfg: DictConfig) -> dict:
    """Write all datasets; returns the summary written to reports/datasets.json."""
    names = check_task_names(cfg)
    composites = composite_tasks(cfg, names)
    split = cfg.tasks.split
    data = Path(cfg.paths.data)
    (data / "raw").mkdir(parents=True, exist_ok=True)
    for folder in (data / "tasks", data / "composite"):
        shutil.rmtree(folder, ignore_errors=True)

    train, test, summary = {}, {}, {}
    for task, (examples, test_examples) in load_examples(cfg, names).items():
        metric = str(cfg.tasks.catalog[task].metric)
        tr, te = split_examples(
            task, examples, seed=int(cfg.seed), test_fraction=float(split.test_fraction),
            n_train=int(split.n_train), n_test=int(split.n_test),
            max_input_chars=split.get("max_input_chars"), test_examples=test_examples,
        )
        train[task] = [e.record(metric) for e in tr]
        test[task] = [e.record(metric) for e in te]
        summary[task] = {"metric": metric, "available": len(examples), "train": len(tr), "test": len(te),
                         "mean_input_chars": round(sum(len(e.input) for e in tr + te) / len(tr + te), 1)}

    built = {
        name: build_composite(name, tasks, train, test, n_samples=int(split.n_composite),
                              n_shots=int(split.n_shots), seed=int(cfg.seed), paper_tasks=paper)
        for name, (tasks, paper) in composites.items()
    }
    check_leakage(train, test, built)

    for task in names:
        write_jsonl(data / "tasks" / task / "train.jsonl", train[task])
        write_jsonl(data / "tasks" / task / "test.jsonl", test[task])
    (data / "composite").mkdir(parents=True, exist_ok=True)
    for name, records in built.items():
        write_jsonl(data / "composite" / f"{name}.jsonl", records)
    return {
        "profile": str(cfg.tasks.profile),
        "tasks": summary,
        "composites": {name: {"tasks": composites[name][0], "paper_tasks": composites[name][1],
                              "samples": len(records),
                              "mean_input_chars": round(sum(len(r["input"]) for r in records) / max(len(records), 1),
                                                        1)}
                       for name, records in built.items()},
        "substitutes": dict(cfg.tasks.get("substitutes") or {}),
        "leakage_check": "passed",
    }


def main(argv: Sequence[str] | None = None) -> None:
    cfg = load_config(argv)
    seed_everything(int(cfg.seed))
    params = {"seed": cfg.seed, "tasks": {k: cfg.tasks[k] for k in ("profile", "names", "split", "substitutes")}}
    with stage_run(cfg, "build_datasets", params) as run:
        start = time.perf_counter()
        summary = build(cfg)
        summary["seconds"] = round(time.perf_counter() - start, 1)
        run.log_metrics({task: {"train": s["train"], "test": s["test"]} for task, s in summary["tasks"].items()})
        run.output(Path(cfg.paths.data) / "tasks")
        run.output(Path(cfg.paths.data) / "composite")
        run.write_json(Path(cfg.paths.reports) / "datasets.json", summary)
    print(f"built {len(summary['tasks'])} tasks and {len(summary['composites'])} composites "
          f"in {summary['seconds']} s -> {cfg.paths.data}/tasks, {cfg.paths.data}/composite")


if __name__ == "__main__":
    main()
