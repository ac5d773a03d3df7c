"""The benchmark runs end to end on tiny CPU shapes and writes well-formed results (no timing asserted)."""
import json
from pathlib import Path

import pytest

from meteora.benchmark import BenchConfig, load_config, main, run, summarize, to_markdown

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "conf" / "benchmark" / "tiny.yaml"
QUICK = ["layer.tokens=[3]", "layer.routings=[random,skewed]", "model.layers=1", "model.new_tokens=2",
         "model.batches=[2]", "model.prefill_tokens=8", "train.tokens=8", "train.strategies=[single,auto]"]


@pytest.fixture(scope="module")
def results():
    return run(load_config(TINY, QUICK), log=lambda line: None)


def test_layer_cells_are_complete_and_correct(results):
    cfg = load_config(TINY, QUICK)
    cells = results["layer"]
    assert len(cells) == len(cfg.layer.routings) * len(cfg.layer.tokens) * len(cfg.layer.strategies)
    for cell in cells:
        assert cell["error"] is None, cell
        assert cell["ms"] > 0 and cell["x_single"] > 0 and cell["x_base"] > 0
        assert cell["err"] < 1e-4  # float32 against float64, same routing
        if cell["strategy"] not in ("base", "single"):
            assert 0.0 <= cell["routing_match"] <= 1.0


def test_model_and_train_sections(results):
    systems = {(r["system"], r["phase"]) for r in results["model"]}
    assert systems == {(s, p) for s in ("bare", "peft_lora", "meteora") for p in ("prefill", "decode")}
    assert all(r["error"] is None and r["ms"] > 0 and not r["graphs"] for r in results["model"])
    assert [r["strategy"] for r in results["train"]] == ["single", "auto"]
    assert all(r["error"] is None and r["ms"] > 0 for r in results["train"])


def test_results_are_json_with_targets_and_markdown(results):
    again = json.loads(json.dumps(results))
    assert again["meta"]["device"] == "cpu" and again["meta"]["profile"] == "tiny"
    assert set(again["targets"]) == {"cpu_auto_vs_single"} and again["targets"]["cpu_auto_vs_single"]["worst"] > 0
    assert summarize(again) == again["targets"]
    text = to_markdown(again)
    assert "## Layer: tiny, float32, random routing, eager" in text and "## Whole model" in text


def test_cli_writes_json_and_merges(tmp_path, capsys):
    first, second, merged = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "m.json"
    main(["--config", str(TINY), "--out", str(first), "--sections", "layer", "--set", "layer.tokens=[2]",
          "--set", "layer.strategies=[base,single,auto]", "--set", "layer.routings=[random]"])
    main(["--config", str(TINY), "--out", str(second), "--sections", "train", "--set", "train.tokens=4",
          "--set", "train.strategies=[single,auto]"])
    main(["--merge", str(first), str(second), "--out", str(merged)])
    data = json.loads(merged.read_text())
    assert len(data["layer"]) == 3 and len(data["train"]) == 2 and len(data["meta"]["runs"]) == 2
    main(["--markdown", str(merged)])
    assert "## Training step" in capsys.readouterr().out


def test_config_errors_name_the_culprit():
    with pytest.raises(ValueError, match="unknown benchmark settings"):
        BenchConfig.from_dict({"profile": "x", "tokens": [1]})
    with pytest.raises(ValueError, match="model shapes 'nope'"):
        BenchConfig.from_dict({"layer": {"models": ["nope"]}})


def test_stage_writes_the_dvc_report_and_logs_to_mlflow(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    from stages.benchmark import main as stage

    out = stage(["benchmark=tiny", f"paths.reports={tmp_path}", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                 "~benchmark.model", "~benchmark.train", "benchmark.layer.tokens=[2]", "benchmark.layer.routings=[random]",
                 "benchmark.layer.strategies=[base,single,auto]"])
    assert out == tmp_path / "benchmark" / "cpu.json"
    data = json.loads(out.read_text())
    assert [c["strategy"] for c in data["layer"]] == ["base", "single", "auto"]
    run = mlflow.search_runs(experiment_names=["meteora"], output_format="list")[0]
    assert run.data.tags["stage"] == "benchmark" and "target.cpu_auto_vs_single.worst" in run.data.metrics
