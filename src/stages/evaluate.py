"""Stage evaluate: every method on every task's test set, the composite tasks, routing accuracy and traces.

Methods (Table 1): the base model, PEFT with the task's own adapter chosen by hand (the oracle), the
LoRA-B baseline (one LoRA on the task mixture), MeteoRA top-k for each k of `eval.meteora_top_ks` (and
`gate.top_k`); nothing tells MeteoRA the task. Composite-n (Table 2): MeteoRA vs LoRA-B, each sub-task
scored from the numbered answer. Writes reports/eval/{results,summary,traces}.json and the predictions.
Run: `python -m stages.evaluate [eval.max_test_per_task=5 ...]`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from meteora import MeteoRAModel
from meteora.distributed import destroy_distributed, is_main_process
from stages.common import ConfigError, load_config, read_jsonl, seed_everything, set_threads, start_run, write_json
from stages.generation import sharded_generate
from stages.launch import setup_distributed
from stages.metrics import score_composite, score_task
from stages.setup import adapter_dir, build_meteora, load_base, load_task_split, selected_tasks
from stages.traces import RoutingRecorder, answer_trace

BASELINES = ("base", "oracle", "lora_b")


def meteora_method(k: int) -> str:
    return f"meteora_top{k}"


def load_tests(cfg: DictConfig, tasks: Sequence[str]) -> dict[str, list[dict]]:
    return {t: load_task_split(cfg, t, "test", cfg.eval.max_test_per_task) for t in tasks}


def load_composites(cfg: DictConfig, tasks: Sequence[str]) -> dict[str, list[dict]]:
    """The composite sets whose sub-tasks all have an adapter here (others are skipped, with a note)."""
    out = {}
    for name in cfg.eval.composite.names or list(cfg.tasks.composites):
        path = Path(cfg.paths.data) / "composite" / f"{name}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"composite set {name!r}: {path} does not exist (run the build_datasets stage)")
        records = read_jsonl(path)[: int(cfg.eval.composite.max_samples)]
        missing = sorted({t for r in records for t in r["tasks"]} - set(tasks))
        if missing:
            print(f"evaluate: skipping {name}: no adapter for its sub-tasks {missing}")
            continue
        out[name] = records
    return out


def check_trace_index(cfg: DictConfig, composites: dict[str, list[dict]]) -> None:
    """Fail before any decoding when `eval.trace.index` names no prompt of the traced composite set."""
    name, index = cfg.eval.trace.composite, int(cfg.eval.trace.index)
    if name in composites and not 0 <= index < len(composites[name]):
        raise ConfigError(f"eval.trace.index={index}: {name} has {len(composites[name])} prompts here "
                          f"(eval.composite.max_samples={cfg.eval.composite.max_samples})")


def generate_pooled(model, tokenizer, cfg: DictConfig, tests: dict[str, list[dict]],
                    adapter_names: Sequence[str] | None = None, oracle: bool = False,
                    ) -> tuple[dict[str, list[str]], dict | None]:
    """Greedy answers for all tasks' test prompts, batched across tasks of the same decoding budget.

    With `adapter_names` (a MeteoRA model) also returns the routing accuracy on the prompts' tokens,
    the label of a prompt being its task's adapter. `oracle` (a PEFT model holding every task's
    adapter under the task's name): each prompt is answered with its own task's adapter."""
    budgets = cfg.eval.max_new_tokens
    by_budget: dict[int, list[tuple[str, int]]] = {}
    for task, records in tests.items():
        for i, r in enumerate(records):
            by_budget.setdefault(int(budgets[r["metric"]]), []).append((task, i))
    out = {task: [""] * len(records) for task, records in tests.items()}
    routing = None
    for budget, items in by_budget.items():
        prompts = [tests[t][i]["input"] for t, i in items]
        generate = lambda on_batch=None: sharded_generate(  # noqa: E731
            model, tokenizer, prompts, budget, int(cfg.eval.batch_size), cfg.eval.max_prompt_tokens, on_batch=on_batch,
            adapter_names=[t for t, _ in items] if oracle else None)
        if adapter_names is None:
            texts = generate()
        else:
            with RoutingRecorder(model, [adapter_names.index(t) for t, _ in items]) as recorder:
                texts = generate(recorder.set_rows)
            routing = _merge_routing(routing, recorder, items)
        for (t, i), text in zip(items, texts):
            out[t][i] = text
    return out, (_finish_routing(routing) if routing else None)


def _merge_routing(acc: dict | None, recorder: RoutingRecorder, items: list[tuple[str, int]]) -> dict:
    """Sum the recorder's correct/total prompt tokens per task and per layer into `acc`."""
    acc = acc or {"correct": {}, "count": {}}
    for j, (task, _) in enumerate(items):
        acc["correct"][task] = acc["correct"].get(task, 0) + recorder.correct[j]
        acc["count"][task] = acc["count"].get(task, 0.0) + recorder.count[j]
    return acc


def _finish_routing(acc: dict) -> dict:
    """Token-weighted routing accuracy: overall (mean over layers), per task, per decoder layer."""
    total_correct = sum(acc["correct"].values())
    total_count = sum(acc["count"].values())
    return {
        "overall": float(total_correct.mean() / total_count),
        "per_task": {t: float(c.mean() / acc["count"][t]) for t, c in acc["correct"].items()},
        "per_layer": {str(layer): float(c / total_count) for layer, c in enumerate(total_correct)},
    }


def score_tasks(tests: dict[str, list[dict]], predictions: dict[str, list[str]]) -> dict[str, dict]:
    return {
        task: score_task(records[0]["metric"], predictions[task], [r["targets"] or [r["target"]] for r in records])
        for task, records in tests.items()
    }


def generate_composite(model, tokenizer, cfg: DictConfig, records: list[dict],
                       adapter_names: Sequence[str] | None = None) -> tuple[list[str], list[dict]]:
    """Greedy numbered answers to one composite set; with `adapter_names` (MeteoRA) also the routing
    trace of every answer (see :func:`stages.traces.answer_trace`)."""
    budget = int(cfg.eval.composite.max_new_tokens_per_task) * len(records[0]["tasks"])
    prompts = [r["input"] for r in records]
    args = (model, tokenizer, prompts, budget, int(cfg.eval.composite.batch_size), cfg.eval.composite.max_prompt_tokens)
    if adapter_names is None:
        return sharded_generate(*args), []
    with RoutingRecorder(model, [None] * len(records)) as recorder:
        texts = sharded_generate(*args, on_batch=recorder.set_rows)
    traces = [answer_trace(tokenizer, recorder.answer_ids.get(i, []), recorder.answer_share.get(i, []), r["tasks"],
                           adapter_names) for i, r in enumerate(records)]
    return texts, traces


def score_composites(composites: dict[str, list[dict]], predictions: dict[str, list[str]]) -> dict[str, dict]:
    return {
        name: score_composite(predictions[name], [r["targets"] for r in records], records[0]["metrics"], records[0]["tasks"])
        for name, records in composites.items()
    }


def mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def table1_row(per_task: dict[str, dict]) -> dict:
    """Averages over the tasks: primary score (Table 1), accuracy over the classification tasks,
    BLEU and ROUGE-L over the generative ones."""
    return {
        "average": mean(s["score"] for s in per_task.values()),
        "accuracy": mean(s.get("accuracy") for s in per_task.values()),
        "bleu": mean(s.get("bleu") for s in per_task.values()),
        "rouge_l": mean(s.get("rouge_l") for s in per_task.values()),
    }


def evaluate(cfg: DictConfig) -> dict:
    """Run every configured method; returns the results dict (with "predictions" and "traces")."""
    tasks = selected_tasks(cfg)
    tests = load_tests(cfg, tasks)
    composites = load_composites(cfg, tasks)
    check_trace_index(cfg, composites)
    methods = list(cfg.eval.methods)
    gate_top_k = min(int(cfg.gate.top_k), len(tasks))
    top_ks = sorted({min(int(k), len(tasks)) for k in cfg.eval.meteora_top_ks} | {gate_top_k})
    per_task, comp, predictions, timing, routing_by_k, traces = {}, {}, {}, {}, {}, {}

    def record(method: str, preds: dict, started: float) -> None:
        predictions[method] = preds
        per_task[method] = score_tasks(tests, preds)
        timing[method] = round(time.perf_counter() - started, 1)
        print(f"evaluate: {method}: average {table1_row(per_task[method])['average']:.2f} ({timing[method]} s)")

    def record_composite(method: str, name: str, texts: list[str], started: float) -> None:
        predictions.setdefault(f"composite/{method}", {})[name] = texts
        comp.setdefault(name, {})[method] = score_composites({name: composites[name]}, {name: texts})[name]
        timing[f"{name}/{method}"] = round(time.perf_counter() - started, 1)

    if "base" in methods:
        started = time.perf_counter()
        model, tokenizer = load_base(cfg)
        record("base", generate_pooled(model, tokenizer, cfg, tests)[0], started)
    if "oracle" in methods or "lora_b" in methods:
        from peft import PeftModel

        started = time.perf_counter()
        model, tokenizer = load_base(cfg)
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir(cfg, tasks[0])), adapter_name=tasks[0])
        if "oracle" in methods:
            for task in tasks[1:]:
                peft_model.load_adapter(str(adapter_dir(cfg, task)), adapter_name=task)
            record("oracle", generate_pooled(peft_model, tokenizer, cfg, tests, oracle=True)[0], started)
        if "lora_b" in methods:
            started = time.perf_counter()
            peft_model.load_adapter(str(Path(cfg.paths.artifacts) / "lora_b"), adapter_name="lora_b")
            peft_model.set_adapter("lora_b")
            record("lora_b", generate_pooled(peft_model, tokenizer, cfg, tests)[0], started)
            for name, records in composites.items():
                started = time.perf_counter()
                record_composite("lora_b", name, generate_composite(peft_model, tokenizer, cfg, records)[0], started)
        del peft_model, model
    if "meteora" in methods:
        model, tokenizer = build_meteora(cfg, tasks, top_k=gate_top_k, temperature=float(cfg.gate.temperature))
        manifest = model.load_gates(Path(cfg.paths.artifacts) / "gates", use_manifest_settings=False)
        print(f"evaluate: MeteoRA gates for {manifest['adapters']}")
        model.eval()
        for k in top_ks:
            started = time.perf_counter()
            model.set_top_k(k)
            preds, routing_by_k[k] = generate_pooled(model, tokenizer, cfg, tests, model.adapter_names)
            record(meteora_method(k), preds, started)
        model.set_top_k(min(int(cfg.eval.composite.top_k), len(tasks)))
        for name, records in composites.items():
            started = time.perf_counter()
            model.set_temperature(float(cfg.eval.composite.temperature.get(name, cfg.gate.temperature)))
            texts, answer_traces = generate_composite(model, tokenizer, cfg, records, model.adapter_names)
            record_composite("meteora", name, texts, started)
            segments = {}
            for trace in answer_traces:
                for task, acc in trace.get("segment_accuracy", {}).items():
                    segments.setdefault(task, []).append(acc)
            comp[name]["meteora"]["segment_routing_accuracy"] = {t: mean(v) for t, v in segments.items()}
            index = int(cfg.eval.trace.index)
            if name == cfg.eval.trace.composite and not answer_traces[index]:
                print(f"evaluate: {name} answer {index} is empty: no routing trace (Figure 4)")
            elif name == cfg.eval.trace.composite:
                traces[name] = {"title": f"MeteoRA routing across a {name} answer (test sample {index})",
                                "tasks": records[index]["tasks"], **answer_traces[index]}
    methods_run = [m for m in (*BASELINES, *map(meteora_method, top_ks)) if m in per_task]
    return {
        "profile": {
            "model": str(OmegaConf.select(cfg, "model.name", default="")),
            "tasks": tasks,
            "gate_top_k": gate_top_k,
            "num_adapters": len(tasks),
            "test_examples_per_task": {t: len(r) for t, r in tests.items()},
            "composite_samples": {n: len(r) for n, r in composites.items()},
        },
        "methods": methods_run,
        "metric_per_task": {t: r[0]["metric"] for t, r in tests.items()},
        "table1": {m: table1_row(per_task[m]) for m in methods_run},
        "per_task": per_task,
        "composite": {name: {"tasks": composites[name][0]["tasks"], **v} for name, v in comp.items()},
        "routing": routing_by_k.get(gate_top_k),
        "routing_overall_by_top_k": {str(k): r["overall"] for k, r in routing_by_k.items()},
        "traces": traces,
        "timing_s": timing,
        "predictions": predictions,
    }


def summary_of(results: dict) -> dict:
    """The headline numbers (DVC metrics, `dvc exp show` columns): Table 1 averages, MeteoRA at
    gate.top_k, its gap to the oracle, routing accuracy, composite averages."""
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
    return out


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
    main_process = is_main_process()
    run_context = start_run(cfg, "evaluate", params={"eval": cfg.eval, "gate": cfg.gate})
    with run_context if main_process else contextlib.nullcontext() as _:
        import mlflow

        started = time.perf_counter()
        results = evaluate(cfg)
        if not main_process:
            return
        results["timing_s"]["total"] = round(time.perf_counter() - started, 1)
        predictions, traces = results.pop("predictions"), results.pop("traces")
        summary = summary_of(results)
        reports = Path(cfg.paths.reports) / "eval"
        write_json(reports / "results.json", results)
        write_json(reports / "summary.json", summary)
        write_json(reports / "traces.json", traces)
        write_json(Path(cfg.paths.artifacts) / "eval" / "predictions.json", predictions)
        flat = {f"table1.{m}": v for m, v in summary["table1"].items()}
        flat.update({f"composite.{n}.{m}": v for n, d in summary["composite"].items() for m, v in d.items()})
        if "routing_accuracy" in summary:
            flat["routing_accuracy"] = summary["routing_accuracy"]
        mlflow.log_metrics({k: float(v) for k, v in flat.items() if v is not None})
        mlflow.log_dict(results, "eval/results.json")


if __name__ == "__main__":
    main()
