"""Stage baselines: Table 1's rows that do not depend on the gates, decoded once per profile.

Methods (`eval.methods` among base, oracle, lora_b): the base model; PEFT with every task's own adapter
chosen by hand (the oracle, an upper reference: it is told the task); the LoRA-B baseline (one LoRA on
the task mixture), which also answers the composite sets (Table 2). All three answer the chained
composite sets (:mod:`stages.chained`; the oracle with each segment's own adapter). Decoding in
`eval.dtype`, each single adapter merged into the base weights while it answers
(:func:`stages.answers.merged_adapter`: a LoRA model decodes at the bare model's cost). A gate sweep (`meteora.*`, `gate.*`)
leaves this stage cached. Writes reports/eval/baselines.json (scores with per-example values, the
predictions, and a digest of the test prompts that evaluate checks before merging).
Run: `python -m stages.baselines [eval.max_test_per_task=5 ...]`.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from stages.answers import (
    DecodeSettings,
    Method,
    answer_composite,
    answer_tests,
    load_composites,
    load_tests,
    score_composite_set,
    score_tests,
    table1_row,
)
from stages.chained import run_chained_sets
from stages.common import ConfigError, load_config, seed_everything, set_threads, stage_run
from stages.setup import adapter_dir, decode_dtype, load_base, task_list

BASELINES = ("base", "oracle", "lora_b")


def digest(records: Sequence[dict]) -> str:
    """Identity of a list of test prompts and targets (evaluate refuses baselines of other prompts)."""
    h = hashlib.sha256()
    for r in records:
        h.update(r["input"].encode())
        h.update(b"\0")
        h.update(str(r.get("targets") or r.get("target")).encode())
        h.update(b"\1")
    return h.hexdigest()[:16]


def baselines(cfg: DictConfig) -> dict:
    """Decode and score every configured baseline; the results mapping of reports/eval/baselines.json."""
    methods = [m for m in cfg.eval.methods if m in BASELINES]
    unknown = sorted(set(cfg.eval.methods) - set(BASELINES) - {"meteora"})
    if unknown:
        raise ConfigError(f"eval.methods: unknown {unknown}; known: {[*BASELINES, 'meteora']}")
    tasks = task_list(cfg)
    tests = load_tests(cfg, tasks)
    composites = load_composites(cfg, tasks)
    chained_sets = load_composites(cfg, tasks, quiet=True, chained=True)
    decode = DecodeSettings.tests(cfg.eval)
    dtype = decode_dtype(cfg)
    per_task, composite, chained, predictions, timing = {}, {}, {}, {}, {}

    def record(name: str, preds: dict[str, list[str]], started: float) -> None:
        predictions[name] = preds
        per_task[name] = score_tests(tests, preds)
        timing[name] = round(time.perf_counter() - started, 1)
        print(f"baselines: {name}: average {table1_row(per_task[name])['average']:.2f} ({timing[name]} s)")

    def record_chained(method: Method) -> None:
        run_chained_sets(method, chained_sets, decode.max_new_tokens, cfg.eval,
                         {"predictions": predictions, "chained": chained, "timing": timing})

    if "base" in methods:
        started = time.perf_counter()
        model, tokenizer = load_base(cfg, dtype)
        base = Method("base", model, tokenizer)
        record("base", answer_tests(base, tests, decode), started)
        record_chained(base)
        del model, base
    if "oracle" in methods or "lora_b" in methods:
        from peft import PeftModel

        started = time.perf_counter()
        model, tokenizer = load_base(cfg, dtype)
        # adapters in the model's dtype (PEFT would keep them in float32 beside a bfloat16 model and cast
        # every activation to float32 and back: about 3x the decoding time on CPU)
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir(cfg, tasks[0])), adapter_name=tasks[0],
                                               autocast_adapter_dtype=False)
        if "oracle" in methods:
            for task in tasks[1:]:
                peft_model.load_adapter(str(adapter_dir(cfg, task)), adapter_name=task, autocast_adapter_dtype=False)
            oracle = Method("oracle", peft_model, tokenizer, oracle=True)  # one task at a time, its adapter merged
            record("oracle", answer_tests(oracle, tests, decode), started)
            record_chained(oracle)
        if "lora_b" in methods:
            started = time.perf_counter()
            peft_model.load_adapter(str(Path(cfg.paths.artifacts) / "lora_b"), adapter_name="lora_b",
                                    autocast_adapter_dtype=False)
            lora_b = Method("lora_b", peft_model, tokenizer, adapter="lora_b")
            record("lora_b", answer_tests(lora_b, tests, decode), started)
            record_chained(lora_b)
            for name, records in composites.items():
                started = time.perf_counter()
                texts = answer_composite(lora_b, records, DecodeSettings.composite(cfg.eval, len(records[0]["tasks"])))
                predictions.setdefault("composite/lora_b", {})[name] = texts
                composite[name] = {"tasks": records[0]["tasks"], "lora_b": score_composite_set(records, texts)}
                timing[f"{name}/lora_b"] = round(time.perf_counter() - started, 1)
        del peft_model, model
    return {
        "methods": [m for m in BASELINES if m in per_task],
        "tests": {t: {"n": len(r), "digest": digest(r)} for t, r in tests.items()},
        "composites": {n: {"n": len(r), "digest": digest(r)} for n, r in composites.items()},
        "chained_sets": {n: {"n": len(r), "digest": digest(r)} for n, r in chained_sets.items()},
        "dtype": dtype,
        "per_task": per_task,
        "table1": {m: table1_row(per_task[m]) for m in per_task},
        "composite": composite,
        "chained": chained,
        "timing_s": timing,
        "predictions": predictions,
    }


def main(argv: Sequence[str] | None = None) -> None:
    cfg = load_config(argv)
    seed_everything(int(cfg.seed))
    set_threads(cfg)
    with stage_run(cfg, "baselines", params={"eval": cfg.eval, "tasks": list(cfg.tasks.names)}) as run:
        started = time.perf_counter()
        results = baselines(cfg)
        results["timing_s"]["total"] = round(time.perf_counter() - started, 1)
        run.write_json(Path(cfg.paths.reports) / "eval" / "baselines.json", results)
        run.log_metrics({f"table1.{m}": row["average"] for m, row in results["table1"].items()})
        run.log_metrics({f"composite.{n}.lora_b": c["lora_b"]["average"] for n, c in results["composite"].items()})


if __name__ == "__main__":
    main()
