"""The pipeline through `dvc repro` itself, on model=tiny_random and tasks=tiny (the BIG-bench-format
fixture), in a temporary copy of the project (its own git + DVC repository and MLflow store).

`tiny_project` prepares the copy once per session; `repro(project, *targets)` runs `dvc repro` there.
Later stages extend `TINY_OVERRIDES` (settings that keep them fast) and add tests that call `repro`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
TASKS = ["fixture_choice", "fixture_count", "fixture_generate"]
FIRST_HALF = ["prepare_model", "build_datasets", "adapters", "score_adapters", "lora_b"]

# Hydra overrides composing the test profile's params.yaml: tiny model, fixture tasks, few steps.
TINY_OVERRIDES = [
    "model=tiny_random",
    "tasks=tiny",
    "adapter.train.n_examples=8",
    "adapter.train.steps=4",
    "adapter.train.batch_size=2",
    "adapter.train.warmup_steps=1",
    "adapter.train.checkpoint_every=2",
    "adapter.eval.n_examples=2",
    "adapter.eval.max_new_tokens=4",
    "adapter.lora_b.samples_per_task=4",
    "adapter.lora_b.steps=4",
    "adapter.lora_b.batch_size=2",
    "adapter.lora_b.warmup_steps=1",
]


def run(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command in the project copy with the virtualenv first on PATH and the copy's src/."""
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(project / "src"), "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(list(args), cwd=project, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}")
    return result


def repro(project: Path, *targets: str) -> subprocess.CompletedProcess:
    """`dvc repro <targets>` in the project copy."""
    return run(project, str(VENV_BIN / "dvc"), "repro", *targets)


def compose_params(project: Path, *overrides: str) -> None:
    """(Re)write the copy's params.yaml from its conf/ with TINY_OVERRIDES + `overrides`."""
    text = run(project, sys.executable, "-m", "stages.common", "compose", *TINY_OVERRIDES, *overrides).stdout
    (project / "params.yaml").write_text(text)


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory) -> Path:
    """A copy of the project (code, conf, dvc.yaml, DVC config, fixture) as its own git + DVC repo."""
    project = tmp_path_factory.mktemp("project")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("src", "conf", ".dvc", "benchmarks"):
        shutil.copytree(ROOT / folder, project / folder, ignore=shutil.ignore_patterns(
            "__pycache__", "*.pyc", "tmp", "cache", "config.local"))
    fixture = Path("tests") / "fixtures" / "bigbench"
    shutil.copytree(ROOT / fixture, project / fixture, ignore=ignore)
    for file in ("dvc.yaml", ".dvcignore"):
        shutil.copy2(ROOT / file, project / file)
    run(project, "git", "init", "-q")
    compose_params(project)
    return project


@pytest.fixture(scope="session")
def first_half(tiny_project) -> Path:
    """The project copy after `dvc repro` of prepare_model, build_datasets, adapters, score_adapters, lora_b."""
    repro(tiny_project, *FIRST_HALF)
    return tiny_project


def test_first_half_outputs(first_half):
    from meteora.adapters import load_adapter_bank

    project = first_half
    source = json.loads((project / "artifacts" / "model" / "meteora_source.json").read_text())
    assert source["source"] == "random" and (project / "artifacts" / "model" / "model.safetensors").is_file()
    for task in TASKS:
        for split in ("train", "test"):
            assert (project / "data" / "tasks" / task / f"{split}.jsonl").stat().st_size > 0
        trained = json.loads((project / "reports" / "adapters" / "train" / f"{task}.json").read_text())
        assert trained["source"] == "train" and trained["train"]["steps"] == 4
        scores = json.loads((project / "reports" / "adapters" / f"{task}.json").read_text())
        assert {"base", "adapter"} <= set(scores) and scores["eval_examples"] == 2
    assert (project / "data" / "composite" / "composite-3.jsonl").stat().st_size > 0
    bank = load_adapter_bank({t: project / "artifacts" / "adapters" / t for t in TASKS})
    assert bank.names == TASKS and len(bank.modules) == 2 * 7
    assert json.loads((project / "reports" / "lora_b.json").read_text())["samples_per_task"] == {t: 4 for t in TASKS}
    assert (project / "artifacts" / "lora_b" / "adapter_config.json").is_file()
    assert (project / "mlflow.db").is_file()
    assert not (project / "artifacts" / "checkpoints" / "adapters").exists() or not any(
        (project / "artifacts" / "checkpoints" / "adapters").iterdir())


def test_changing_one_task_reruns_only_its_adapter(first_half):
    """A setting of one task changes only that task's data, so only its adapter stage is stale."""
    project = first_half
    status = run(project, str(VENV_BIN / "dvc"), "status", *FIRST_HALF).stdout
    assert "up to date" in status.lower() or status.strip() == "", status
    compose_params(project, "tasks.catalog.fixture_count.metric=contains")
    try:
        status = run(project, str(VENV_BIN / "dvc"), "status", "build_datasets").stdout
        assert "build_datasets" in status
        repro(project, "build_datasets")
        status = run(project, str(VENV_BIN / "dvc"), "status", "adapters", "lora_b").stdout
        assert "adapters@fixture_count" in status and "lora_b" in status
        assert "adapters@fixture_choice" not in status and "adapters@fixture_generate" not in status
    finally:
        compose_params(project)
        repro(project, "build_datasets")


# --- the second half: train_gates, baselines, evaluate, report ------------------------------------------

SECOND_HALF = ["train_gates", "baselines", "evaluate", "report"]
# Settings that keep gate training and evaluation fast on the tiny profile (a learnable routing task:
# the fixture tasks' prompts differ in their words, so the gates' cross-entropy must fall).
SECOND_HALF_OVERRIDES = [
    "gate.steps=24", "gate.batch_size=6", "gate.max_length=48", "gate.lr=0.05", "gate.log_every=4",
    "gate.checkpoint_every=8", "eval.max_test_per_task=2", "eval.batch_size=4", "eval.max_new_tokens.exact_match=3",
    "eval.max_new_tokens.contains=3", "eval.max_new_tokens.generation=4", "eval.composite.max_samples=1",
    "eval.composite.max_new_tokens_per_task=3",
    # report reads reports/mov/: a two-method MoV run that takes about 20 s on the tiny profile
    "method.run=[base,mov5]", "method.train.steps=2", "method.eval.max_test_per_task=2",
    "method.eval.max_test_train_tasks=1",
]


def committed(project: Path) -> Path:
    """The tiny project with its Makefile, committed to its git repository (DVC experiments need a commit);
    idempotent, so that every test that runs experiments can call it in any order."""
    if run(project, "git", "rev-parse", "--verify", "HEAD", check=False).returncode == 0:
        return project
    for file in ("Makefile", "pyproject.toml"):
        shutil.copy2(ROOT / file, project / file)
    (project / ".setup-stamp").touch()  # the copy uses this checkout's virtualenv (VENV= below)
    run(project, "git", "add", "-A")
    run(project, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "tiny project")
    return project


@pytest.fixture(scope="session")
def second_half(first_half) -> Path:
    """The project copy after `dvc repro report` (train_gates, baselines, evaluate, benchmark and mov)."""
    compose_params(first_half, *SECOND_HALF_OVERRIDES)
    repro(first_half, "report")
    return first_half


def test_second_half_outputs(second_half):
    project = second_half
    manifest = json.loads((project / "artifacts" / "gates" / "manifest.json").read_text())
    assert manifest["adapters"] == TASKS and manifest["top_k"] == 2
    history = json.loads((project / "reports" / "plots" / "train_gates_history.json").read_text())
    assert [h["step"] for h in history] == [4, 8, 12, 16, 20, 24]
    assert history[-1]["gate_loss"] < history[0]["gate_loss"]
    results = json.loads((project / "reports" / "eval" / "results.json").read_text())
    methods = ["base", "oracle", "lora_b", "meteora_top1", "meteora_top2"]
    assert results["methods"] == methods and results["profile"]["tasks"] == TASKS
    assert all(set(results["per_task"][m]) == set(TASKS) for m in methods)
    assert set(results["composite"]["composite-3"]) == {"tasks", "meteora", "lora_b"}
    chained = results["chained"]["composite-3"]
    assert set(chained) == {"tasks", "meteora", "oracle", "lora_b", "base"}
    assert set(chained["meteora"]["segment_routing"]["segment"]) == set(TASKS)
    assert set(results["intervals"]["chained"]["composite-3"]) >= {"meteora", "meteora-lora_b", "meteora-oracle"}
    routing = results["routing"]
    assert set(routing["per_task"]) == set(TASKS)
    confusion = routing["confusion"]  # counted apart from the accuracy: its diagonal must be the accuracy
    assert confusion["tasks"] == confusion["adapters"] == TASKS
    for i, task in enumerate(TASKS):
        assert sum(confusion["shares"][i]) == pytest.approx(1.0, abs=1e-3)
        assert confusion["shares"][i][i] == pytest.approx(routing["per_task"][task], abs=1e-3)
    summary = json.loads((project / "reports" / "eval" / "summary.json").read_text())
    assert set(summary["table1"]) == set(methods) and "routing_accuracy" in summary
    trace = json.loads((project / "reports" / "eval" / "traces.json").read_text())["composite-3"]  # chained
    assert trace["adapters"] == TASKS and len(trace["share"]) == len(trace["top1"]) == len(trace["tokens"])
    assert [b["task"] for b in trace["boundaries"]] == TASKS and len(trace["answer_spans"]) == 3
    for name in ("table1", "per_task", "table2", "chained", "routing"):
        assert (project / "reports" / "tables" / f"{name}.md").read_text().count("|") > 10, name
    for name in ("fig3_radar", "fig4_routing_trace", "fig5_strategies", "fig6_routing_confusion"):
        assert (project / "reports" / "figures" / f"{name}.png").read_bytes()[:4] == b"\x89PNG", name
    assert "Table 1" in (project / "reports" / "results.md").read_text()
    metrics = run(project, str(VENV_BIN / "dvc"), "metrics", "show", "--json").stdout
    assert "routing_accuracy" in metrics and "oracle_minus_meteora" in metrics
    assert "up to date" in run(project, str(VENV_BIN / "dvc"), "status", *SECOND_HALF).stdout.lower()


def test_documented_sweep_runs_two_queue_workers_into_one_mlflow_store(second_half):
    """`make sweep-topk` as the README types it, with the virtualenv not on PATH (the Makefile puts it
    there: the queue's workers start `dvc` by name), on two queue workers at once: both experiments
    succeed, and both runs of train_gates and evaluate are in the project's one MLflow sqlite store."""
    import mlflow

    project = committed(second_half)
    settings = " ".join((*TINY_OVERRIDES, *SECOND_HALF_OVERRIDES))
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", str(project)), "PYTHONPATH": str(project / "src"),
           "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1"}
    command = ["make", "sweep-topk", "TOP_K=1,3", "JOBS=2", f"VENV={VENV_BIN.parent}", f"SET={settings}"]
    try:
        result = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True)
        assert result.returncode == 0, f"{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    finally:
        run(project, str(VENV_BIN / "dvc"), "queue", "stop", check=False)
    experiments = json.loads(run(project, str(VENV_BIN / "dvc"), "exp", "show", "--json").stdout)
    names = {exp["name"]: exp for baseline in experiments for exp in baseline.get("experiments") or []
             for exp in exp.get("revs", [])}
    top_ks = sorted(exp["data"]["params"]["params.yaml"]["data"]["meteora"]["top_k"] for exp in names.values())
    assert top_ks == [1, 3], names.keys()
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["meteora"], output_format="list")
    for stage in ("train_gates", "evaluate"):
        swept = {r.data.tags["dvc_exp"] for r in runs if r.data.tags.get("stage") == stage
                 and r.data.tags.get("dvc_exp") in names and r.info.status == "FINISHED"}
        assert swept == set(names), (stage, swept, set(names))
    for name in names:
        logs = run(project, str(VENV_BIN / "dvc"), "queue", "logs", name).stdout
        assert "database is locked" not in logs and "OperationalError" not in logs, logs[-4000:]


def test_adapter_count_experiment(second_half):
    """An adapter-count run (`meteora.num_adapters=2`) trains and evaluates MeteoRA over the first two tasks."""
    project = committed(second_half)
    dvc = str(VENV_BIN / "dvc")
    settings = [f"-S{o}" for o in (*TINY_OVERRIDES, *SECOND_HALF_OVERRIDES)]
    run(project, dvc, "exp", "run", "-n", "two-adapters", *settings, "-Smeteora.num_adapters=2")
    results = json.loads((project / "reports" / "eval" / "results.json").read_text())
    assert results["profile"]["tasks"] == TASKS[:2] and results["composite"] == results["chained"] == {}
    manifest = json.loads((project / "artifacts" / "gates" / "manifest.json").read_text())
    assert manifest["adapters"] == TASKS[:2]
    shown = run(project, dvc, "exp", "show", "--json").stdout
    assert "two-adapters" in shown
