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
