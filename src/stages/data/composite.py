"""Composite tasks: one prompt holds n questions of n tasks in a fixed order, after worked examples
drawn from the train splits; the model answers all of them as a numbered list `1. ... 2. ...`."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

QUESTIONS_HEADER = "Following the example above, generate answers to the questions below:"


def _block(prompts: Sequence[str]) -> str:
    return "\n\n".join(p.strip() for p in prompts)


def numbered(answers: Sequence[str]) -> str:
    """`1. a\\n2. b ...` with each answer on one line."""
    return "\n".join(f"{i}. {' '.join(a.split())}" for i, a in enumerate(answers, 1))


def build_composite(
    name: str,
    tasks: Sequence[str],
    train: Mapping[str, Sequence[Mapping[str, Any]]],
    test: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    n_samples: int,
    n_shots: int,
    seed: int,
    paper_tasks: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Composite records `{"name", "tasks", "paper_tasks", "input", "questions", "targets", "targets_all",
    "metrics"}` built from task records (see `Example.record`); `questions` are the sub-tasks' own test
    prompts, which the chained protocol (:mod:`stages.chained`) asks one after the other.

    The `n_shots` worked examples take one train record per task each, chosen at random among the
    shorter half of the train split (keeps the prompt within the model's context); the questions are
    test records, sample j taking the j-th of each task's seeded shuffle. `targets` holds one answer
    per sub-task; `targets_all` all acceptable answers per sub-task.
    """
    missing = [t for t in tasks if t not in train or t not in test]
    if missing:
        raise ValueError(f"{name}: sub-tasks {missing} are not among the built tasks")
    rng = random.Random(f"{seed}/{name}")
    shots: list[list[Mapping[str, Any]]] = []
    for task in tasks:
        short = sorted(train[task], key=lambda r: (len(r["input"]), r["input"]))
        short = short[: max(n_shots, len(short) // 2)]
        if len(short) < n_shots:
            raise ValueError(f"{name}: task {task!r} has {len(short)} train examples for {n_shots} shots")
        shots.append(rng.sample(short, n_shots))
    prefix = "".join(
        f"Example {s + 1}:\n\n{_block([shots[i][s]['input'] for i in range(len(tasks))])}\n\n"
        f"{numbered([shots[i][s]['target'] for i in range(len(tasks))])}\n\n\n"
        for s in range(n_shots)
    )
    questions = []
    for task in tasks:
        order = list(test[task])
        rng.shuffle(order)
        questions.append(order)
    n = min([n_samples, *(len(q) for q in questions)])
    records = []
    for j in range(n):
        picked = [questions[i][j] for i in range(len(tasks))]
        records.append({
            "name": name,
            "tasks": list(tasks),
            "paper_tasks": list(paper_tasks or tasks),
            "input": f"{prefix}{QUESTIONS_HEADER}\n\n{_block([r['input'] for r in picked])}\n\n",
            "questions": [r["input"] for r in picked],
            "targets": [r["target"] for r in picked],
            "targets_all": [list(r["targets"]) for r in picked],
            "metrics": [r["metric"] for r in picked],
        })
    return records


def composite_prefix(record: Mapping[str, Any]) -> str:
    """The worked-example part of a composite prompt (everything before the questions)."""
    return record["input"].split(QUESTIONS_HEADER, 1)[0]
