"""Stage score_adapters (one DVC stage per task: `python -m stages.score_adapters --task <task>`): the base
model and the task's adapter (artifacts/adapters/<task>/) scored by greedy decoding on the first
`adapter.eval.n_examples` test examples, with 95% bootstrap intervals of both and of adapter - base.

Its own stage so that re-scoring (`adapter.eval.*`) never retrains an adapter. Writes
reports/adapters/<task>.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from stages.adapters import check_task
from stages.answers import DecodeSettings, Method, answer_tests, score_tests
from stages.common import load_config, seed_everything, set_threads, stage_run
from stages.setup import adapter_dir, decode_dtype, load_base, load_task_split
from stages.stats import bootstrap, paired


def score_adapter(cfg: DictConfig, task: str) -> dict:
    """Base model vs the task's adapter on the start of the task's test split."""
    from peft import PeftModel

    tests = {task: load_task_split(cfg, task, "test", int(cfg.adapter.eval.n_examples))}
    metric = tests[task][0]["metric"]
    ev = cfg.adapter.eval
    decode = DecodeSettings(int(ev.batch_size), int(cfg.model.max_length), {metric: int(ev.max_new_tokens)})
    model, tokenizer = load_base(cfg, decode_dtype(cfg))
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir(cfg, task)), adapter_name=task)
    report: dict = {"task": task, "metric": metric, "eval_examples": len(tests[task]), "dtype": decode_dtype(cfg)}
    for side in ("adapter", "base"):
        if side == "base":
            with peft_model.disable_adapter():
                answers = answer_tests(Method(side, peft_model, tokenizer), tests, decode)
        else:  # merged into the base weights, as the baselines' oracle answers
            answers = answer_tests(Method(side, peft_model, tokenizer, adapter=task), tests, decode)
        scores = score_tests(tests, answers)[task]
        scores["interval"] = bootstrap({task: scores["per_example"]}).to_dict()
        scores["examples"] = [{"target": r["target"], "output": o} for r, o in list(zip(tests[task], answers[task]))[:3]]
        report[side] = scores
    diff = paired({task: report["adapter"]["per_example"]}, {task: report["base"]["per_example"]})
    report["adapter_minus_base"] = diff.to_dict()
    report["beats_base"] = diff.low > 0
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.score_adapters", add_help=False)
    parser.add_argument("--task", required=True, help="the task whose adapter to score")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    cfg = load_config(rest)
    set_threads(cfg)
    seed_everything(int(cfg.seed))
    check_task(cfg, args.task)
    with stage_run(cfg, f"score_adapters@{args.task}", {"task": args.task, "eval": cfg.adapter.eval},
                   tags={"task": args.task}) as run:
        start = time.perf_counter()
        report = score_adapter(cfg, args.task)
        report["seconds"] = round(time.perf_counter() - start, 1)
        run.write_json(Path(cfg.paths.reports) / "adapters" / f"{args.task}.json", report)
        run.log_metrics({"base_score": report["base"]["score"], "adapter_score": report["adapter"]["score"]})
    print(f"score_adapters {args.task}: base {report['base']['score']:.1f} -> adapter {report['adapter']['score']:.1f} "
          f"(difference {report['adapter_minus_base']['low']:+.1f} .. {report['adapter_minus_base']['high']:+.1f})")


if __name__ == "__main__":
    main()
