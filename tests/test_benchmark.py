"""The benchmark harness (package ``benchmarks``) on tiny CPU shapes: every strategy and system computes what
it claims (float64 and PEFT's own outputs as oracles), results are well formed, thresholds are checked as
configured. No timing is asserted."""

import ast
import json
from pathlib import Path

import pytest
import torch
import yaml

from benchmarks.__main__ import main
from benchmarks.config import BenchConfig, Shapes, Target, from_mapping, load_config
from benchmarks.report import metrics, to_markdown
from benchmarks.run import run
from benchmarks.systems import build_system
from benchmarks.targets import check
from benchmarks.train import training_step

ROOT = Path(__file__).resolve().parents[1]
PROFILES = sorted((ROOT / "conf" / "benchmark").glob("*.yaml"))
TINY = ROOT / "conf" / "benchmark" / "tiny.yaml"
QUICK = [
    "layer.tokens=[3,5]",
    "layer.rounds=3",
    "model.layers=1",
    "model.new_tokens=2",
    "model.batches=[2]",
    "model.prefill_tokens=8",
    "model.repeats=2",
    "train.tokens=8",
    "train.layers=1",
]
SHAPES = Shapes(hidden=32, intermediate=64, heads=4, kv_heads=2, head_dim=8, vocab=64)


@pytest.fixture(scope="module")
def results():
    return run(load_config(TINY, QUICK), log=lambda line: None)


def test_every_layer_strategy_matches_float64_with_its_own_routing(results):
    cfg = load_config(TINY, QUICK)
    cells = results["layer"]
    assert len(cells) == len(cfg.layer.routings) * len(cfg.layer.tokens) * len(cfg.layer.strategies)
    assert {c["strategy"] for c in cells} == set(cfg.layer.strategies)
    for cell in cells:
        assert cell["error"] is None, cell
        assert cell["err"] < 1e-5, cell  # float32 against float64, same inputs and routing
        assert len(cell["ms_rounds"]) == cfg.layer.rounds and cell["ms"] == sorted(cell["ms_rounds"])[1], cell
        low, high = cell["x_single_ci"]  # the rounds of a cell are paired: each ratio is within its round's
        assert low <= cell["x_single"] <= high, cell
        if cell["strategy"] not in ("base", "single", "peft"):  # the mixtures pick the float64 gate's top-k
            assert cell["routing_match"] == 1.0, cell


def test_model_rows_cover_every_system_and_phase(results):
    rows = results["model"]
    cfg = load_config(TINY, QUICK)
    expected = {(s, "prefill", 1) for s in cfg.model.systems} | {(s, "decode", 2) for s in cfg.model.systems}
    assert {(r["system"], r["phase"], r["batch"]) for r in rows} == expected
    assert {r["mode"] for r in rows} == {"eager"}  # compiled and graphs run on CUDA only
    for row in rows:
        assert row["error"] is None and row["ms"] is not None, row
        assert len(row["ms_rounds"]) == cfg.model.repeats  # eager prefill and decode: interleaved rounds
        assert row["x_bare"] is not None and "x_bare_ci" in row, row  # paired (no interval under 3 rounds)


def test_train_rows_and_targets_and_markdown(results):
    assert [(r["system"], r["error"]) for r in results["train"]] == [("peft_lora", None), ("meteora", None)]
    again = json.loads(json.dumps(results))
    assert again["meta"]["device"] == "cpu" and again["meta"]["profile"] == "tiny"
    target = again["targets"]["cpu_meteora_layer_vs_single"]
    assert target["rows"] == len(load_config(TINY, QUICK).layer.tokens) * 2
    text = to_markdown(again)
    assert "### Layer: tiny, float32, random routing, eager" in text and "### Whole model, eager" in text
    assert "### Training step" in text and "cpu_meteora_layer_vs_single" in text
    flat = metrics(again)
    assert "target.cpu_meteora_layer_vs_single.worst" in flat and "model.meteora.decode.b2.eager.ms" in flat


@pytest.mark.parametrize("name", ["peft_lora", "peft_arrow", "meteora"])
def test_systems_are_the_bare_model_plus_adapters(name):
    cfg = BenchConfig(num_adapters=3, rank=2, alpha=4.0, shapes={"s": SHAPES})
    device = torch.device("cpu")
    bare = build_system("bare", cfg, SHAPES, 1, torch.float32, device)
    system = build_system(name, cfg, SHAPES, 1, torch.float32, device)
    ids = torch.randint(0, SHAPES.vocab, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = bare(input_ids=ids).logits
        got = system(input_ids=ids).logits
        assert not torch.allclose(got, expected, atol=1e-4)  # the adapters are applied
        if name == "meteora":
            base = system.model.model.layers[0].self_attn.q_proj.base.weight
            assert torch.equal(base, bare.model.layers[0].self_attn.q_proj.weight)
        else:
            with system.disable_adapter():  # PEFT's own switch: the base model's logits
                torch.testing.assert_close(system(input_ids=ids).logits, expected)


@pytest.mark.parametrize("name", ["peft_lora", "meteora"])
def test_a_training_step_moves_only_what_trains(name):
    cfg = BenchConfig(num_adapters=3, rank=2, alpha=4.0, shapes={"s": SHAPES})
    model = build_system(name, cfg, SHAPES, 1, torch.float32, torch.device("cpu")).train()
    ids = torch.randint(0, SHAPES.vocab, (1, 6), generator=torch.Generator().manual_seed(2))
    step = training_step(name, model, ids, torch.tensor([1]), gate_loss_weight=1.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trains = ("lora_A", "lora_B") if name == "peft_lora" else ("gate.weight",)
    assert moved and all(any(t in n for t in trains) for n in moved), sorted(moved)


def test_targets_take_the_worst_matching_row():
    results = {
        "model": [
            {"system": "meteora", "mode": "eager", "x": 1.1},
            {"system": "meteora", "mode": "eager", "x": 0.9},
            {"system": "meteora", "mode": "compiled", "x": 3.0},
            {"system": "bare", "mode": "eager", "x": 5.0},
        ]
    }
    eager = check(Target("model", "x", 1.0, {"system": "meteora", "mode": "eager"}), results)
    assert (eager["worst"], eager["met"], eager["rows"]) == (1.1, False, 2)
    assert check(Target("model", "x", 1.2, {"system": "meteora", "mode": "eager"}), results)["met"] is True
    assert check(Target("model", "x", 1.0, {"system": "peft_arrow"}), results)["met"] is None


def test_paired_ratio_is_the_median_round_with_a_bootstrap_interval():
    from benchmarks.timing import paired_ratio

    gen = torch.Generator().manual_seed(1)
    reference = (1.0 + torch.rand(9, generator=gen)).tolist()
    drift = (1.0 + torch.rand(9, generator=gen)).tolist()  # a machine that slows both sides alike
    values = [1.25 * r * d for r, d in zip(reference, drift)]
    references = [r * d for r, d in zip(reference, drift)]
    estimate, (low, high) = paired_ratio(values, references)
    assert estimate == pytest.approx(1.25) and low == pytest.approx(1.25) and high == pytest.approx(1.25)
    noisy = [v * (1.0 + 0.2 * (i % 3 - 1)) for i, v in enumerate(values)]  # ratios 1.0, 1.25 and 1.5
    ratios = sorted(n / r for n, r in zip(noisy, references))
    estimate, (low, high) = paired_ratio(noisy, references)
    assert estimate == pytest.approx(ratios[4]) and ratios[0] <= low < estimate < high <= ratios[-1]
    assert paired_ratio(values[:2], references[:2])[1] is None  # too few rounds for an interval
    assert paired_ratio(values[:3], references) == (None, None)  # a strategy that failed mid-way
    with pytest.raises(ValueError, match="rounds"):
        load_config(TINY, ["layer.rounds=0"])


def test_model_ratios_pair_rounds_and_divide_medians_without_rounds():
    from benchmarks.model import add_model_ratios

    gen = torch.Generator().manual_seed(2)
    drift = (1.0 + torch.rand(5, generator=gen)).tolist()  # each round slower or faster for every system
    bare = [2.0 * d for d in drift]
    rows = [
        {"system": "bare", "phase": "decode", "batch": 1, "mode": "compiled", "ms": 3.0, "ms_rounds": bare},
        {"system": "meteora", "phase": "decode", "batch": 1, "mode": "compiled", "ms": 3.3,
         "ms_rounds": [1.1 * b for b in bare]},
        {"system": "bare", "phase": "prefill", "batch": 1, "mode": "graphs", "ms": 8.0},  # one measurement
        {"system": "meteora", "phase": "prefill", "batch": 1, "mode": "graphs", "ms": 10.0},
    ]
    add_model_ratios(rows)
    decode, prefill = rows[1], rows[3]
    assert decode["x_bare"] == pytest.approx(1.1) and decode["x_bare_ci"] == pytest.approx([1.1, 1.1])
    assert prefill["x_bare"] == pytest.approx(1.25) and "x_bare_ci" not in prefill
    assert decode["x_peft_lora"] is None and rows[0]["x_bare"] == pytest.approx(1.0)


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.stem)
def test_every_profile_loads(profile):
    cfg = load_config(profile)
    assert cfg.out.startswith("reports/benchmark/") and cfg.out.endswith(".json")
    for target in cfg.targets.values():
        assert target.section in ("layer", "model", "train") and getattr(cfg, target.section) is not None


def test_the_default_profile_writes_the_file_dvc_tracks():
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["benchmark"]
    tracked = [next(iter(m)) if isinstance(m, dict) else m for m in stage.get("metrics", []) + stage.get("outs", [])]
    assert load_config(ROOT / "conf" / "benchmark" / "cpu.yaml").out in tracked


def test_bad_settings_name_the_culprit(tmp_path):
    with pytest.raises(ValueError, match="tokenz"):
        load_config(TINY, ["layer.tokenz=[1]"])
    with pytest.raises(ValueError, match="layer.tokens"):
        load_config(TINY, ["layer.tokens=many"])
    with pytest.raises(ValueError, match="model shapes 'nope'"):
        from_mapping({"layer": {"models": ["nope"]}})
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")


def test_weight_sets_time_distinct_layers_each_with_its_own_gates(monkeypatch):
    from benchmarks import layer

    cfg = load_config(TINY, ["layer.tokens=[3]", "layer.routings=[skewed]", "layer.weight_sets=2"])
    cfg.model = cfg.train = None
    device = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    sets = [layer.make_projections(cfg.shapes[cfg.layer.models[0]], cfg, torch.float32, device, gen) for _ in range(2)]
    assert not torch.equal(sets[0][0].weight, sets[1][0].weight)
    inputs, directions = layer.make_hidden(sets[0], 3, "skewed", torch.float32, device, gen)
    gates = [layer.routing_gates(projections, directions, "skewed") for projections in sets]
    builts = [{}, {}]
    real_time_ms, grad_enabled = layer.time_ms, []

    def time_ms(fn, *args):  # the timed calls are inference: MeteoRALinear's eager fast path, not autograd's
        grad_enabled.append(torch.is_grad_enabled())
        return real_time_ms(fn, *args)

    monkeypatch.setattr(layer, "time_ms", time_ms)
    values = layer.measure_strategy("meteora", list(zip(sets, gates, builts)), inputs, cfg, device)
    assert values["error"] is None and values["err"] < 1e-5 and values["ms"] > 0
    assert grad_enabled == [False] * cfg.layer.rounds
    for built, set_gates in zip(builts, gates):  # each set's MeteoRA layers route with that set's gates
        assert [torch.equal(m.gate.weight, g) for m, g in zip(built["meteora"], set_gates)] == [True] * len(set_gates)
    cells = run(cfg, log=lambda line: None)["layer"]
    assert {c["strategy"] for c in cells} == set(cfg.layer.strategies)
    assert all(c["error"] is None and c["err"] < 1e-5 for c in cells)
    with pytest.raises(ValueError, match="weight_sets"):
        load_config(TINY, ["layer.weight_sets=0"])


def test_a_failing_strategy_is_a_row_not_a_crash():
    cfg = load_config(TINY, ["layer.tokens=[2]", "layer.routings=[random]", "layer.strategies=[single,nope]"])
    cfg.model = cfg.train = None
    cells = run(cfg, log=lambda line: None)["layer"]
    assert [c["strategy"] for c in cells] == ["single", "nope"]
    assert cells[0]["error"] is None and "unknown benchmark strategy 'nope'" in cells[1]["error"]


def test_cli_writes_json_and_markdown(tmp_path, capsys):
    out = tmp_path / "b.json"
    main(
        [
            "--config",
            str(TINY),
            "--out",
            str(out),
            "--sections",
            "layer",
            "layer.tokens=[2]",
            "layer.strategies=[single,meteora]",
            "layer.routings=[random]",
        ]
    )
    data = json.loads(out.read_text())
    assert [c["strategy"] for c in data["layer"]] == ["single", "meteora"] and "model" not in data
    assert out.with_suffix(".md").read_text() == to_markdown(data)
    capsys.readouterr()
    main(["--markdown", str(out)])
    assert capsys.readouterr().out == to_markdown(data)


def test_the_core_has_no_command_line():
    for file in (ROOT / "src" / "meteora").rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert "argparse" not in names, f"{file} imports argparse"


def test_stage_writes_the_configured_report_and_logs_to_mlflow(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    from stages.benchmark import main as stage

    out = stage(
        [
            "benchmark=tiny",
            f"benchmark.out={tmp_path / 'cpu.json'}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "~benchmark.model",
            "~benchmark.train",
            "benchmark.layer.tokens=[2]",
            "benchmark.layer.routings=[random]",
            "benchmark.layer.strategies=[base,single,meteora]",
        ]
    )
    assert out == tmp_path / "cpu.json"
    data = json.loads(out.read_text())
    assert [c["strategy"] for c in data["layer"]] == ["base", "single", "meteora"]
    run_ = mlflow.search_runs(experiment_names=["meteora"], output_format="list")[0]
    assert run_.data.tags["stage"] == "benchmark" and "target.cpu_meteora_layer_vs_single.worst" in run_.data.metrics
