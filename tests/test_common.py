"""Where MLflow runs go: one store per project, also from DVC's temporary experiment workspaces."""

from pathlib import Path

from stages.common import CONFIG_NAME, shared_root, tracking_uri


def test_shared_root_of_a_dvc_experiment_workspace(tmp_path):
    run_dir = tmp_path / "proj" / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    run_dir.mkdir(parents=True)
    assert shared_root(run_dir) == (tmp_path / "proj").resolve()
    assert shared_root(tmp_path / "proj") == (tmp_path / "proj").resolve()


def test_relative_sqlite_store_is_anchored_at_the_project(tmp_path):
    run_dir = tmp_path / "proj" / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    run_dir.mkdir(parents=True)
    expected = f"sqlite:///{(tmp_path / 'proj').resolve() / 'mlflow.db'}"
    assert tracking_uri("sqlite:///mlflow.db", run_dir) == expected
    assert tracking_uri("sqlite:///mlflow.db", tmp_path / "proj") == expected
    absolute = f"sqlite:///{Path('/data/mlflow.db')}"
    assert tracking_uri(absolute, run_dir) == absolute
    assert tracking_uri("http://mlflow.example:5000", run_dir) == "http://mlflow.example:5000"


def test_experiment_workspace_reads_the_projects_bigbench_archive(tmp_path, monkeypatch):
    from stages.build_datasets import shared_archive

    archive = Path("data/raw/bigbench-1.0.0.tar.gz")
    run_dir = tmp_path / "proj" / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    (run_dir / "conf").mkdir(parents=True)  # a workspace copy holds the project's conf/
    (run_dir / "conf" / f"{CONFIG_NAME}.yaml").write_text("seed: 0\n")
    monkeypatch.chdir(run_dir)
    assert shared_archive(archive) == archive  # nowhere yet: downloaded into the workspace
    (tmp_path / "proj" / archive).parent.mkdir(parents=True)
    (tmp_path / "proj" / archive).write_bytes(b"archive")
    assert shared_archive(archive) == (tmp_path / "proj").resolve() / archive
    (run_dir / archive).parent.mkdir(parents=True)
    (run_dir / archive).write_bytes(b"own copy")
    assert shared_archive(archive) == archive  # the workspace's own file wins


def _cfg(tmp_path):
    from omegaconf import OmegaConf

    store = {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "meteora"}
    return OmegaConf.create({"seed": 3, "model": {"name": "tiny"}, "tasks": {"profile": "tiny"}, "mlflow": store})


def _runs(tmp_path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["meteora"], output_format="list")


def test_stage_run_logs_params_config_commit_metrics_and_outputs(tmp_path):
    import json

    import mlflow

    from stages.common import git_commit, stage_run

    cfg = _cfg(tmp_path)
    with stage_run(cfg, "demo", params={"gate": {"top_k": 2, "names": ["a", "b"]}}, tags={"task": "t1"}) as run:
        out = run.write_json(tmp_path / "reports" / "demo.json", {"score": 0.25})
        run.log_metrics({"score": 0.25, "nested": {"x": 3}, "missing": None, "label": "text"})
        run.output(tmp_path / "artifacts" / "demo")
    (record,) = _runs(tmp_path)
    assert record.info.run_id == run.run_id and record.info.status == "FINISHED"
    assert json.loads(out.read_text()) == {"score": 0.25}
    assert record.data.params == {"gate.top_k": "2", "gate.names": '["a", "b"]'}
    assert record.data.metrics["score"] == 0.25 and record.data.metrics["nested.x"] == 3.0
    assert "missing" not in record.data.metrics and "label" not in record.data.metrics
    assert record.data.metrics["seconds"] >= 0
    tags = record.data.tags
    assert tags["stage"] == "demo" and tags["task"] == "t1" and tags["model"] == "tiny"
    assert tags["git_commit"] == git_commit() and tags["git_commit"]
    assert tags["outputs"] == f"{tmp_path / 'reports' / 'demo.json'}, {tmp_path / 'artifacts' / 'demo'}"
    local = mlflow.artifacts.download_artifacts(run_id=run.run_id, dst_path=str(tmp_path / "dl"))
    assert (Path(local) / "demo.json").is_file()
    from omegaconf import OmegaConf

    assert OmegaConf.load(Path(local) / "config" / "params.yaml") == cfg


def test_stage_run_marks_a_failed_block_and_reraises(tmp_path):
    import pytest

    from stages.common import stage_run

    with pytest.raises(RuntimeError, match="boom"), stage_run(_cfg(tmp_path), "demo"):
        raise RuntimeError("boom")
    (record,) = _runs(tmp_path)
    assert record.info.status == "FAILED"


def test_stage_run_off_rank_zero_logs_and_writes_nothing(tmp_path, monkeypatch):
    from stages.common import stage_run

    monkeypatch.setenv("RANK", "1")
    with stage_run(_cfg(tmp_path), "demo", params={"a": 1}) as run:
        run.write_json(tmp_path / "out.json", {"a": 1})
        run.log_metrics({"a": 1.0})
    assert not run.active and run.run_id is None
    assert not (tmp_path / "out.json").exists() and not (tmp_path / "mlflow.db").exists()


def test_write_json_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    import pytest

    from stages.common import read_json, write_json

    path = write_json(tmp_path / "r.json", {"old": 1})

    def disk_full(self, text, *args, **kwargs):
        with open(self, "w", encoding="utf-8") as fh:
            fh.write(text[: len(text) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_json(path, {"new": list(range(100))})
    monkeypatch.undo()
    assert read_json(path) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_two_processes_share_a_fresh_sqlite_store(tmp_path):
    """Two stage processes that start together (two DVC queue workers) both land in one new MLflow sqlite
    store: without the store's lock, creating it races (alembic migration errors, `database is locked`)."""
    import subprocess
    import sys

    script = (
        "import sys; from omegaconf import OmegaConf; from stages.common import stage_run\n"
        f"store = {{'tracking_uri': 'sqlite:///{tmp_path / 'mlflow.db'}', 'experiment': 'meteora'}}\n"
        "cfg = OmegaConf.create({'mlflow': store})\n"
        "with stage_run(cfg, sys.argv[1], params={'worker': sys.argv[1]}) as run:\n"
        "    for step in range(30):\n"
        "        run.log_metrics({'loss': 1.0 / (step + 1)}, step=step)\n"
    )
    workers = [subprocess.Popen([sys.executable, "-c", script, name], stderr=subprocess.PIPE, text=True)
               for name in ("w1", "w2")]
    errors = [w.communicate()[1] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], errors
    runs = _runs(tmp_path)
    assert sorted(r.data.params["worker"] for r in runs) == ["w1", "w2"]
    assert all(r.info.status == "FINISHED" for r in runs)
