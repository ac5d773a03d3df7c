"""Stage evaluate: MeteoRA on every task's test set, the composite tasks, routing accuracy and traces,
merged with the baselines' rows (stage baselines) into the tables' results.

MeteoRA top-k for each k of `eval.meteora_top_ks` (and `meteora.top_k`); nothing tells MeteoRA the task.
Composite-n (Table 2): MeteoRA vs LoRA-B, each sub-task scored from the numbered answer. Chained
composite-n (:mod:`stages.chained`): MeteoRA vs base, oracle and LoRA-B, with per-segment routing and the
trace Figure 4 draws. Decoding in `eval.dtype` (gates trained in another dtype are cast). The baselines'
results must come from the same test prompts (checked by digest). Writes
reports/eval/{results,summary,traces}.json (with 95% bootstrap intervals) and the predictions.
Run: `python -m stages.evaluate [eval.max_test_per_task=5 ...]` (after `python -m stages.baselines` with
the same settings).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from meteora import MeteoRAModel
from stages.answers import (
    DecodeSettings,
    Method,
    answer_composite,
    answer_tests,
    check_trace_index,
    load_composites,
    load_tests,
    mean,
    score_composite_set,
    score_tests,
    table1_row,
    test_items,
)
from stages.baselines import BASELINES, digest
from stages.chained import CHAINED_METHODS, chain_routing, run_chained_sets
from stages.common import ConfigError, load_config, read_json, seed_everything, set_threads, stage_run
from stages.distributed import destroy_distributed, is_main_process
from stages.launch import setup_distributed
from stages.setup import build_meteora, check_top_k, decode_dtype, selected_tasks
from stages.stats import bootstrap, bootstrap_ratio, paired
from stages.traces import Top1RoutingRecorder, answer_trace


def meteora_method(k: int) -> str:
    return f"meteora_top{k}"


def baselines_path(cfg: DictConfig) -> Path:
    return Path(cfg.paths.reports) / "eval" / "baselines.json"


def load_baselines(cfg: DictConfig, tests: dict[str, list[dict]], composites: dict[str, list[dict]],
                   chained: dict[str, list[dict]], dtype: str) -> dict:
    """reports/eval/baselines.json restricted to this run's tasks, after checking that it scored the
    same test prompts and composite sets (same count and digest) in the same `dtype`; a mismatch names
    the set. Nothing when `eval.methods` names no baseline."""
    if not set(cfg.eval.methods) & set(BASELINES):
        return {"methods": [], "per_task": {}, "composite": {}, "chained": {}, "timing_s": {}, "predictions": {}}
    path = baselines_path(cfg)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run the baselines stage first (python -m stages.baselines)")
    base = read_json(path)
    if base.get("dtype") != dtype:
        raise ConfigError(f"{path} was decoded in {base.get('dtype')}, this run decodes in {dtype} "
                          "(eval.dtype): re-run the baselines stage with the same eval settings")
    for kind, sets, recorded in (("task", tests, base["tests"]), ("composite set", composites, base["composites"]),
                                 ("chained set", chained, base.get("chained_sets", {}))):
        for name, records in sets.items():
            seen = recorded.get(name)
            if seen is None or seen["n"] != len(records) or seen["digest"] != digest(records):
                raise ConfigError(f"{path}: {kind} {name!r} was scored on other prompts ({seen}) than this run's "
                                  f"{len(records)}: re-run the baselines stage with the same eval settings")
    keep = list(tests)
    return {
        "methods": base["methods"],
        "per_task": {m: {t: s[t] for t in keep} for m, s in base["per_task"].items()},
        "composite": {n: c for n, c in base["composite"].items() if n in composites},
        "chained": {n: c for n, c in base["chained"].items() if n in chained},
        "timing_s": base["timing_s"],
        "predictions": {m: ({t: p[t] for t in keep} if "/" not in m else p)
                        for m, p in base["predictions"].items()},
    }


def answer_with_routing(model: MeteoRAModel, method: Method, tests: dict[str, list[dict]], settings: DecodeSettings,
                        ) -> tuple[dict[str, list[str]], dict]:
    """MeteoRA's answers and its top-1 routing accuracy on the prompts' tokens, the label of a prompt
    being its task's adapter: overall (mean over layers), per task, per layer, per prompt (what the
    bootstrap resamples), and the confusion matrix: per task, the share of its prompt tokens whose top-1
    adapter is each adapter (mean over modules; rows sum to 1)."""
    items = test_items(tests)
    labels = [list(model.adapter_names).index(t) for t, _ in items]
    with Top1RoutingRecorder(model, labels) as recorder:
        answers = answer_tests(method, tests, settings, on_batch=recorder.set_rows)
    correct, count = {}, {}
    for j, (task, _) in enumerate(items):
        correct[task] = correct.get(task, 0) + recorder.correct[j]
        count[task] = count.get(task, 0.0) + recorder.count[j]
    chosen: dict[str, torch.Tensor] = {}
    for j, (task, _) in enumerate(items):
        chosen[task] = chosen.get(task, 0) + recorder.chosen[j]
    total_correct, total_count = sum(correct.values()), sum(count.values())
    routing = {
        "overall": float(total_correct.mean() / total_count),
        "per_task": {t: float(c.mean() / count[t]) for t, c in correct.items()},
        "per_layer": {str(layer): float(c / total_count) for layer, c in enumerate(total_correct)},
        "per_prompt": {"correct": [float(recorder.correct[j].mean()) for j in range(len(items))],
                       "count": [recorder.count[j] for j in range(len(items))]},
        "confusion": {"tasks": list(tests), "adapters": list(model.adapter_names),
                      "shares": [[round(float(v), 4) for v in chosen[t] / count[t]] for t in tests]},
    }
    return answers, routing


def composite_with_traces(model: MeteoRAModel, method: Method, records: list[dict], settings: DecodeSettings,
                          ) -> tuple[list[str], list[dict]]:
    """MeteoRA's numbered answers to one composite set and the routing trace of every answer
    (see :func:`stages.traces.answer_trace`)."""
    with Top1RoutingRecorder(model, [None] * len(records)) as recorder:
        texts = answer_composite(method, records, settings, on_batch=recorder.set_rows)
    traces = [answer_trace(method.tokenizer, recorder.answer_ids.get(i, []), recorder.answer_share.get(i, []),
                           r["tasks"], model.adapter_names) for i, r in enumerate(records)]
    return texts, traces


def evaluate(cfg: DictConfig) -> dict:
    """MeteoRA's rows merged with the baselines'; returns the results dict (with "predictions" and "traces")."""
    tasks = selected_tasks(cfg)
    tests = load_tests(cfg, tasks)
    composites = load_composites(cfg, tasks)
    chained_sets = load_composites(cfg, tasks, quiet=True, chained=True)
    check_trace_index(cfg, chained_sets)
    dtype = decode_dtype(cfg)
    base = load_baselines(cfg, tests, composites, chained_sets, dtype)
    decode = DecodeSettings.tests(cfg.eval)
    gate_top_k = int(cfg.meteora.top_k)
    for k in cfg.eval.meteora_top_ks:
        check_top_k(int(k), len(tasks), "eval.meteora_top_ks")
    check_top_k(int(cfg.eval.composite.top_k), len(tasks), "eval.composite.top_k")
    top_ks = sorted({int(k) for k in cfg.eval.meteora_top_ks} | {gate_top_k})
    per_task, predictions, timing = dict(base["per_task"]), dict(base["predictions"]), dict(base["timing_s"])
    comp = {name: dict(c) for name, c in base["composite"].items()}
    chained = {name: dict(c) for name, c in base["chained"].items()}
    routing_by_k, traces = {}, {}
    if "meteora" in cfg.eval.methods:
        model, tokenizer = build_meteora(cfg, tasks, top_k=gate_top_k, temperature=float(cfg.meteora.temperature),
                                         dtype=dtype)
        manifest = model.load_gates(Path(cfg.paths.artifacts) / "gates", use_manifest_settings=False, cast=True)
        print(f"evaluate: MeteoRA gates for {manifest['adapters']}")
        model.eval()
        for k in top_ks:
            started = time.perf_counter()
            model.set_top_k(k)
            name = meteora_method(k)
            predictions[name], routing_by_k[k] = answer_with_routing(model, Method(name, model, tokenizer), tests, decode)
            per_task[name] = score_tests(tests, predictions[name])
            timing[name] = round(time.perf_counter() - started, 1)
            print(f"evaluate: {name}: average {table1_row(per_task[name])['average']:.2f} ({timing[name]} s)")
        model.set_top_k(int(cfg.eval.composite.top_k))
        for name, records in composites.items():
            started = time.perf_counter()
            model.set_temperature(float(cfg.eval.composite.temperature.get(name, cfg.meteora.temperature)))
            settings = DecodeSettings.composite(cfg.eval, len(records[0]["tasks"]))
            texts, answer_traces = composite_with_traces(model, Method("meteora", model, tokenizer), records, settings)
            predictions.setdefault("composite/meteora", {})[name] = texts
            scores = score_composite_set(records, texts)
            segments: dict[str, list[float]] = {}
            for trace in answer_traces:
                for task, acc in trace.get("segment_accuracy", {}).items():
                    segments.setdefault(task, []).append(acc)
            scores["segment_routing_accuracy"] = {t: mean(v) for t, v in segments.items()}
            comp.setdefault(name, {"tasks": records[0]["tasks"]})["meteora"] = scores
            timing[f"{name}/meteora"] = round(time.perf_counter() - started, 1)
            index = int(cfg.eval.trace.index)
            if name == cfg.eval.trace.composite and index < len(answer_traces) and answer_traces[index]:
                traces[f"numbered/{name}"] = {"title": f"MeteoRA routing across a {name} numbered answer",
                                              "tasks": records[0]["tasks"], **answer_traces[index]}
        def chained_temperature(name: str) -> None:
            model.set_temperature(float(cfg.eval.composite.temperature.get(name, cfg.meteora.temperature)))

        def chained_routing(name: str, records: Sequence[dict], chains: list) -> dict:
            index = int(cfg.eval.trace.index) if name == cfg.eval.trace.composite else None
            routing = chain_routing(model, tokenizer, records, chains, int(cfg.eval.chained.batch_size), index)
            if routing["trace"]:
                traces[name] = {"title": f"MeteoRA routing across a chained {name} sequence (test sample {index})",
                                "tasks": records[0]["tasks"], **routing["trace"]}
            return {"segment_routing": {"segment": routing["segment"], "answer": routing["answer"],
                                        "per_sample_segment": routing["per_sample_segment"]}}

        run_chained_sets(Method("meteora", model, tokenizer), chained_sets, decode.max_new_tokens, cfg.eval,
                         {"predictions": predictions, "chained": chained, "timing": timing},
                         before=chained_temperature, extra=chained_routing)
        model.set_temperature(float(cfg.meteora.temperature))
    methods_run = [m for m in (*BASELINES, *map(meteora_method, top_ks)) if m in per_task]
    return {
        "profile": {
            "model": str(OmegaConf.select(cfg, "model.name", default="")),
            "tasks": tasks,
            "gate_top_k": gate_top_k,
            "num_adapters": len(tasks),
            "test_examples_per_task": {t: len(r) for t, r in tests.items()},
            "composite_samples": {n: len(r) for n, r in composites.items()},
            "chained_samples": {n: len(r) for n, r in chained_sets.items()},
            "dtype": dtype,
        },
        "methods": methods_run,
        "metric_per_task": {t: r[0]["metric"] for t, r in tests.items()},
        "table1": {m: table1_row(per_task[m]) for m in methods_run},
        "per_task": {m: per_task[m] for m in methods_run},
        "composite": comp,
        "chained": chained,
        "chained_methods": list(CHAINED_METHODS),
        "routing": routing_by_k.get(gate_top_k),
        "routing_overall_by_top_k": {str(k): r["overall"] for k, r in routing_by_k.items()},
        "traces": traces,
        "timing_s": timing,
        "predictions": predictions,
    }


def intervals_of(results: dict) -> dict:
    """95% percentile-bootstrap intervals (resampling test examples, :mod:`stages.stats`) of every
    score of the tables: Table 1 averages and per-task scores, the paired differences MeteoRA - oracle
    and MeteoRA - LoRA-B, the composite averages (and MeteoRA - LoRA-B there), routing accuracy."""
    def examples(method: str) -> dict[str, list[float]]:
        return {t: s["per_example"] for t, s in results["per_task"][method].items()}

    def composite_examples(comp: dict) -> dict[str, list[float]]:  # also a chained set's method
        per_sub = [s["per_example"] for s in comp["subtasks"].values()]
        return {"all": [sum(v) / len(v) for v in zip(*per_sub)]}  # sub-tasks share the prompt: resample prompts

    methods = results["methods"]
    out: dict = {
        "table1": {m: bootstrap(examples(m)).to_dict() for m in methods},
        "per_task": {m: {t: bootstrap({t: v}).to_dict() for t, v in examples(m).items()} for m in methods},
        "paired": {},
        "composite": {},
    }
    for m in (m for m in methods if m.startswith("meteora_top")):
        for other in ("oracle", "lora_b"):
            if other in methods:
                out["paired"][f"{m}-{other}"] = paired(examples(m), examples(other)).to_dict()
    for name, comp in results["composite"].items():
        per = {m: composite_examples(comp[m]) for m in ("meteora", "lora_b") if m in comp}
        out["composite"][name] = {m: bootstrap(v).to_dict() for m, v in per.items()}
        if len(per) == 2:
            out["composite"][name]["meteora-lora_b"] = paired(per["meteora"], per["lora_b"]).to_dict()
    out["chained"] = {}
    for name, chain in results.get("chained", {}).items():
        per = {m: composite_examples(chain[m]) for m in CHAINED_METHODS if m in chain}
        out["chained"][name] = {m: bootstrap(v).to_dict() for m, v in per.items()}
        for other in ("lora_b", "base", "oracle"):
            if "meteora" in per and other in per:
                out["chained"][name][f"meteora-{other}"] = paired(per["meteora"], per[other]).to_dict()
    routing = results.get("routing")
    if routing and "per_prompt" in routing:
        out["routing"] = bootstrap_ratio(routing["per_prompt"]["correct"], routing["per_prompt"]["count"]).to_dict()
    return out


def summary_of(results: dict) -> dict:
    """The headline numbers (DVC metrics, `dvc exp show` columns): Table 1 averages, MeteoRA at
    meteora.top_k, its gap to the oracle, routing accuracy, composite averages."""
    t1 = {m: round(v["average"], 2) for m, v in results["table1"].items()}
    meteora = t1.get(meteora_method(results["profile"]["gate_top_k"]))
    out = {"table1": t1, "meteora": meteora}
    if meteora is not None and "oracle" in t1:
        out["oracle_minus_meteora"] = round(t1["oracle"] - meteora, 2)
    if results["routing"]:
        out["routing_accuracy"] = round(results["routing"]["overall"], 4)
    out["composite"] = {
        name: {m: round(v[m]["average"], 2) for m in ("meteora", "lora_b") if m in v}
        for name, v in results["composite"].items()
    }
    out["chained"] = {
        name: {m: round(v[m]["average"], 2) for m in CHAINED_METHODS if m in v}
        for name, v in results.get("chained", {}).items()
    }
    out["intervals"] = {
        "chained": {n: {m: _rounded(ci) for m, ci in d.items()} for n, d in results["intervals"].get("chained", {}).items()},
        "table1": {m: _rounded(ci) for m, ci in results["intervals"]["table1"].items()},
        "paired": {k: _rounded(ci) for k, ci in results["intervals"]["paired"].items()},
        "composite": {n: {m: _rounded(ci) for m, ci in d.items()} for n, d in results["intervals"]["composite"].items()},
    }
    if "routing" in results["intervals"]:
        out["intervals"]["routing_accuracy"] = _rounded(results["intervals"]["routing"], 4)
    out["test_examples_per_task"] = results["profile"]["test_examples_per_task"]
    return out


def _rounded(ci: dict, digits: int = 2) -> dict:
    return {k: round(v, digits) for k, v in ci.items() if k != "level"} | {"level": ci["level"]}


def main(argv: Sequence[str] | None = None) -> None:
    cfg = load_config(argv)
    setup_distributed(cfg)  # several devices (stages.launch): the test prompts are shared out, rank 0 writes
    try:
        run(cfg)
    finally:
        destroy_distributed()


def run(cfg: DictConfig) -> None:
    seed_everything(int(cfg.seed))
    set_threads(cfg)
    with stage_run(cfg, "evaluate", params={"eval": cfg.eval, "meteora": cfg.meteora}) as mlrun:
        started = time.perf_counter()
        results = evaluate(cfg)
        if not is_main_process():
            return
        results["timing_s"]["total"] = round(time.perf_counter() - started, 1)
        predictions, traces = results.pop("predictions"), results.pop("traces")
        results["intervals"] = intervals_of(results)
        summary = summary_of(results)
        reports = Path(cfg.paths.reports) / "eval"
        mlrun.write_json(reports / "results.json", results)
        mlrun.write_json(reports / "summary.json", summary)
        mlrun.write_json(reports / "traces.json", traces)
        mlrun.write_json(Path(cfg.paths.artifacts) / "eval" / "predictions.json", predictions, artifact=False)
        mlrun.log_metrics({"table1": summary["table1"], "composite": summary["composite"], "chained": summary["chained"],
                           "routing_accuracy": summary.get("routing_accuracy")})


if __name__ == "__main__":
    main()
