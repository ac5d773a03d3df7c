"""Routing levers, one at a time, chosen on a validation split taken from train (never the test split).

Every lever retrains the gates (`python -m stages.train_gates`) on the first `--train` train records of
each task, with the lever's overrides, in its own workspace (artifacts/levers/<lever> with links to the
pipeline's model and adapters); the gates are then scored on the remaining train records of each task
(the validation split: seen by the adapters' training, never by the gates'): MeteoRA top-2 top-1
routing accuracy on the prompt tokens, and the Table 1 average of its greedy answers (in eval.dtype),
each with its 95% bootstrap interval over the validation prompts, and the paired interval of the
difference to the baseline lever (the same prompts). Writes reports/eval/levers.{json,md}. Run after
`dvc repro` (the adapters must exist):

    .venv/bin/python scripts/routing_levers.py [--steps 100] [--train 160] [--only lever ...] [override ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import date

from workspace import ROOT, side_workspace, trained_meteora

sys.path.insert(0, str(ROOT / "src"))

# name -> overrides (on top of the shared `gate.steps` / `gate.samples_per_task`)
LEVERS: dict[str, list[str]] = {
    "baseline": [],
    "steps_x2": ["gate.steps={steps2}"],
    "batch_16": ["gate.batch_size=16"],
    "schedule_constant": ["gate.schedule=constant_with_warmup"],
    "temperature_0.5": ["meteora.temperature=0.5"],
    "gradient_full": ["gate.gradient=full"],
    "lr_0.02": ["gate.lr=0.02"],
    "lr_0.1": ["gate.lr=0.1"],
    "template_unlabelled": ["gate.label_template=false"],
    "init_normal": ["gate.init=normal"],
    "init_zeros": ["gate.init=zeros"],
}
BASELINE = "baseline"


def validate(settings: list[str], first: int) -> dict:
    """Routing accuracy and Table 1 average of the trained gates on train records [first:] per task."""
    from stages.answers import DecodeSettings, Method, score_tests, table1_row
    from stages.common import load_config, set_threads
    from stages.evaluate import answer_with_routing
    from stages.setup import load_task_split, selected_tasks

    cfg = load_config(settings)
    set_threads(cfg)
    tasks = selected_tasks(cfg)
    validation = {t: load_task_split(cfg, t, "train")[first:] for t in tasks}
    if any(not v for v in validation.values()):
        raise ValueError(f"no validation records after the first {first} train records of some task")
    model, tokenizer = trained_meteora(cfg, tasks)
    answers, routing = answer_with_routing(model, Method("meteora", model, tokenizer), validation,
                                           DecodeSettings.tests(cfg.eval))
    scores = score_tests(validation, answers)
    return {"routing": routing["overall"], "routing_per_task": routing["per_task"],
            "average": table1_row(scores)["average"], "examples_per_task": {t: len(v) for t, v in validation.items()},
            "per_example": {t: s["per_example"] for t, s in scores.items()}, "routing_per_prompt": routing["per_prompt"]}


def paired_ratio(a: dict, b: dict):
    """Routing accuracy A - B over the same prompts (per_prompt {"correct", "count"} of each), with its
    percentile-bootstrap interval resampling prompts (:mod:`stages.stats`' resamples, level and seed)."""
    import numpy as np

    from stages.stats import LEVEL, RESAMPLES, SEED, Interval

    ca, cb = np.asarray(a["correct"]), np.asarray(b["correct"])
    na, nb = np.asarray(a["count"]), np.asarray(b["count"])
    if ca.shape != cb.shape or not np.array_equal(na, nb):
        raise ValueError("paired routing: the two levers were scored on different validation prompts")
    idx = np.random.default_rng(SEED).integers(0, ca.size, size=(RESAMPLES, ca.size))
    diffs = (ca[idx].sum(1) - cb[idx].sum(1)) / na[idx].sum(1)
    low, high = np.quantile(diffs, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return Interval(float((ca.sum() - cb.sum()) / na.sum()), float(low), float(high))


def with_intervals(results: dict) -> dict:
    """Each lever's intervals (routing, average) and its paired differences to the baseline, where the
    per-example data were kept (rows measured before that carry none)."""
    from stages.stats import bootstrap, bootstrap_ratio, paired

    base = results.get(BASELINE, {})
    for name, row in results.items():
        if "per_example" not in row:
            continue
        per_prompt = row["routing_per_prompt"]
        row["intervals"] = {"routing": bootstrap_ratio(per_prompt["correct"], per_prompt["count"]).to_dict(),
                            "average": bootstrap(row["per_example"]).to_dict()}
        if name != BASELINE and "per_example" in base:
            row["intervals"]["routing_minus_baseline"] = paired_ratio(per_prompt, base["routing_per_prompt"]).to_dict()
            row["intervals"]["average_minus_baseline"] = paired(row["per_example"], base["per_example"]).to_dict()
    return results


def cell(row: dict, key: str, scale: float, digits: int) -> str:
    """`estimate [low, high]` of row["intervals"][key] on `scale`, or "-" where none was kept."""
    i = row.get("intervals", {}).get(key)
    if i is None:
        return "-" if key.endswith("baseline") else ""
    return f"{scale * i['estimate']:+.{digits}f} [{scale * i['low']:+.{digits}f}, {scale * i['high']:+.{digits}f}]" \
        if key.endswith("baseline") else f"[{scale * i['low']:.{digits}f}, {scale * i['high']:.{digits}f}]"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="scripts/routing_levers.py")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--train", type=int, default=160, help="train records per task the gates see")
    parser.add_argument("--only", nargs="*", default=None)
    args, extra = parser.parse_known_args(argv)  # extra: overrides for every run (e.g. cpu_threads=1)
    out_path = ROOT / "reports" / "eval" / "levers.json"
    results = json.loads(out_path.read_text()) if out_path.is_file() else {}
    for lever, overrides in LEVERS.items():
        if args.only and lever not in args.only:
            continue
        artifacts, reports = side_workspace("levers", lever, ("model", "adapters"))
        settings = [f"gate.steps={args.steps}", f"gate.samples_per_task={args.train}", "gate.resume=false",
                    *[o.format(steps2=2 * args.steps) for o in overrides], *extra,
                    f"paths.artifacts={artifacts}", f"paths.reports={reports}"]
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "stages.train_gates", *settings], cwd=ROOT, check=True)
        train = json.loads((reports / "train_gates.json").read_text())
        scored = validate(settings, args.train)
        results[lever] = {"command": "python -m stages.train_gates " + " ".join(settings[:-2]), **scored,
                          "train_s": train.get("time_s"), "train_routing_final": train.get("final", {}).get("routing_accuracy"),
                          "seconds": round(time.perf_counter() - started, 1), "date": date.today().isoformat()}
        out_path.write_text(json.dumps(with_intervals(results), indent=2) + "\n")
        print(f"{lever}: validation routing {100 * scored['routing']:.1f}%, average {scored['average']:.2f}", flush=True)
    results = with_intervals(results)
    out_path.write_text(json.dumps(results, indent=2) + "\n")
    rows = "\n".join(f"| {k} | `{' '.join(v['command'].split()[3:]) or '(defaults)'}` | {100 * v['routing']:.1f} "
                     f"{cell(v, 'routing', 100, 1)} | {cell(v, 'routing_minus_baseline', 100, 1)} | {v['average']:.2f} "
                     f"{cell(v, 'average', 1, 2)} | {cell(v, 'average_minus_baseline', 1, 2)} | {v['train_s']} | "
                     f"{v.get('date', '')} |" for k, v in results.items())
    (ROOT / "reports" / "eval" / "levers.md").write_text(
        f"**Routing levers** (validation split: train records {args.train}+ of every task, unseen by the gates; "
        f"{args.steps} steps unless the lever changes them; one run each). Brackets: 95% bootstrap intervals over "
        f"the validation prompts; the differences are paired with the `{BASELINE}` row (same prompts). Rows without "
        "intervals were measured before the per-example scores were kept.\n\n"
        "| lever | overrides | routing top-1 (%) | minus baseline (points) | Table 1 average | minus baseline | "
        "train s | measured |\n|---|---|---:|---:|---:|---:|---:|---:|\n" + rows + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
