"""The DVC graph is true: every stage depends on the code it imports and the files it reads, and on the
settings that change its results only.

The code lists are checked against a static scan of the imports (`ast`, function-level imports
included) from each stage's command; the staleness tests run `dvc status` in a temporary copy of the
project whose outputs are stand-ins committed with `dvc commit` (no stage runs).
"""

from __future__ import annotations

import ast
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).parent / "dvc")
SEARCH = (ROOT / "src", ROOT)  # where modules are found: the src/ layout, then top-level packages
# Packages depended on as one directory; every other module of src/stages as its own file.
UNITS = ("src/meteora", "src/stages/data", "benchmarks")
PACKAGE_DOC = "src/stages/__init__.py"  # a docstring only: not a dependency
CODE_PREFIXES = ("src/", "benchmarks", "scripts/")


def module_file(name: str) -> Path | None:
    """The file of module `name` in this project, or None (the standard library, a third-party package)."""
    parts = name.split(".")
    for base in SEARCH:
        path = base.joinpath(*parts)
        if path.with_suffix(".py").is_file():
            return path.with_suffix(".py")
        if (path / "__init__.py").is_file():
            return path / "__init__.py"
    return None


def imported_names(file: Path) -> Iterator[str]:
    """Every module name `file` imports (`from a import b` gives `a` and `a.b`; relative imports resolved)."""
    base_dir = next(b for b in SEARCH if b in file.parents)
    package = list(file.relative_to(base_dir).parent.parts)
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"), str(file))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                module = ".".join(package[: len(package) - node.level + 1] + ([module] if module else []))
            yield module
            yield from (f"{module}.{alias.name}" for alias in node.names)


def import_closure(entries: Iterable[str]) -> set[Path]:
    """The project's files that importing `entries` executes (transitively)."""
    seen: set[Path] = set()
    todo = list(entries)
    while todo:
        file = module_file(todo.pop())
        if file is not None and file not in seen:
            seen.add(file)
            todo.extend(imported_names(file))
    return seen


def code_units(files: Iterable[Path]) -> list[str]:
    """The dvc.yaml code dependencies that cover `files`."""
    units = set()
    for file in files:
        rel = file.relative_to(ROOT).as_posix()
        unit = next((u for u in UNITS if rel.startswith(u + "/")), rel)
        if unit != PACKAGE_DOC:
            units.add(unit)
    return sorted(units)


def entry_modules(cmd: str) -> list[str]:
    """The modules a stage command runs: `python -m stages.X`, and the stage `stages.launch` starts."""
    args = shlex.split(cmd)
    module = args[args.index("-m") + 1]
    return [module, f"stages.{args[args.index('-m') + 2]}"] if module == "stages.launch" else [module]


def stages() -> dict[str, dict]:
    """dvc.yaml's stages (a `foreach` stage by its `do` body)."""
    raw = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    return {name: body.get("do", body) for name, body in raw.items()}


def declared_code(stage: dict) -> list[str]:
    return sorted(d for d in stage.get("deps", []) if isinstance(d, str) and d.startswith(CODE_PREFIXES))


@pytest.mark.parametrize("name", sorted(stages()))
def test_code_deps_are_exactly_the_imported_modules(name):
    stage = stages()[name]
    entries = entry_modules(stage["cmd"])
    missing = [m for m in entries if module_file(m) is None]
    assert not missing, f"dvc.yaml stage {name}: command {stage['cmd']!r} runs {missing}, which do not exist"
    expected = code_units(import_closure(entries))
    assert declared_code(stage) == expected, (
        f"dvc.yaml stage {name}: the code deps must be the modules it imports; set them to:\n"
        + "\n".join(f"      - {d}" for d in expected))


def dag_edges(project: Path) -> set[tuple[str, str]]:
    dot = subprocess.run([DVC, "dag", "--dot"], cwd=project, capture_output=True, text=True, check=True).stdout
    edges = set()
    for line in dot.splitlines():
        if "->" in line:
            a, b = (part.strip(' ";').split("@")[0] for part in line.split("->"))
            edges.add((a, b))
    return edges


def test_dag_has_every_edge_the_stages_read():
    edges = dag_edges(ROOT)
    for edge in [("mov", "report"), ("benchmark", "report"), ("evaluate", "report"), ("baselines", "evaluate"),
                 ("train_gates", "report"), ("train_gates", "evaluate"), ("lora_b", "baselines"),
                 ("adapters", "score_adapters"), ("adapters", "train_gates"), ("build_datasets", "adapters")]:
        assert edge in edges, f"dvc dag lacks {edge[0]} -> {edge[1]}"
    # The baselines do not depend on the gates: a gate sweep leaves them cached.
    assert ("train_gates", "baselines") not in edges


# --- staleness: which settings and files re-run which stages ---------------------------------------------


def _dvc(project: Path, *args: str) -> str:
    result = subprocess.run([DVC, *args], cwd=project, capture_output=True, text=True,
                            env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "DVC_NO_ANALYTICS": "1",
                                 "HOME": str(project)})
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def committed(tmp_path_factory) -> Path:
    """A copy of the project (code, conf, params, dvc.yaml) whose every output is a stand-in, committed to
    dvc.lock as if the pipeline had run: `dvc status` is clean."""
    from dvc.repo import Repo

    project = tmp_path_factory.mktemp("dag")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("src", "conf"):
        shutil.copytree(ROOT / folder, project / folder, ignore=ignore)
    for file in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy2(ROOT / file, project / file)
    (project / ".dvc").mkdir()
    shutil.copy2(ROOT / ".dvc" / "config", project / ".dvc" / "config")
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    with Repo(str(project)) as repo:
        for stage in repo.index.stages:
            for entry in [*stage.outs, *stage.deps]:  # deps: a subfolder of an output, a module not written yet
                path = Path(entry.fs_path)
                if path.exists():
                    continue
                if path.suffix:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text("" if path.suffix == ".py" else f'{{"stand_in": "{stage.addressing}"}}\n')
                else:
                    path.mkdir(parents=True)
                    (path / "stand_in.txt").write_text(stage.addressing)
    _dvc(project, "commit", "--force")
    assert _stale(project) == set()
    return project


def _stale(project: Path, *targets: str) -> set[str]:
    """Stages `dvc status` lists as changed."""
    out = _dvc(project, "status", *targets)
    return {line[:-1].strip() for line in out.splitlines() if line.endswith(":") and not line.startswith(("\t", " "))}


def _set_params(project: Path, **changes) -> None:
    from omegaconf import OmegaConf

    params = OmegaConf.load(project / "params.yaml")
    for key, value in changes.items():
        OmegaConf.update(params, key.replace("__", "."), value, merge=False)
    (project / "params.yaml").write_text(OmegaConf.to_yaml(params))


def test_a_new_mov_result_makes_the_report_stale(committed):
    results = committed / "reports" / "mov" / "results.json"
    old = results.read_text()
    results.write_text('{"methods": []}\n')
    try:
        assert "report" in _stale(committed, "report")
    finally:
        results.write_text(old)
    assert _stale(committed, "report") == set()


def test_infrastructure_and_scoring_settings_retrain_nothing(committed):
    saved = (committed / "params.yaml").read_text()
    try:
        _set_params(committed, trainer__master_port=29611, trainer__devices=2, trainer__backend="gloo",
                    trainer__gradient_accumulation=2, cpu_threads=1, mlflow__experiment="other",
                    adapter__eval__n_examples=3, adapter__eval__max_new_tokens=5)
        stale = _stale(committed)
        retrained = ("adapters@", "train_gates", "lora_b", "evaluate", "baselines")
        assert not any(s.startswith(retrained) for s in stale), stale
        assert stale and all(s.startswith("score_adapters@") for s in stale), stale  # re-scoring only
        (committed / "params.yaml").write_text(saved)
        _set_params(committed, gate__lr=0.01)  # a gate-training setting: the gates and what reads them
        assert {"train_gates"} == {s for s in _stale(committed) if not s.startswith(("evaluate", "report"))}
        (committed / "params.yaml").write_text(saved)
        _set_params(committed, meteora__top_k=1)  # the MeteoRA settings: gates and MeteoRA rows, not the baselines
        assert _stale(committed) == {"train_gates", "evaluate"}
    finally:
        (committed / "params.yaml").write_text(saved)
