"""The paper's metrics: exact match, answer contained, BLEU (sacrebleu), ROUGE-L (rouge-score),
and parsing of the numbered answers of composite tasks.

All scores are on a 0-100 scale. A task's *primary* score (the one averaged in Table 1) is its
accuracy for classification tasks and its ROUGE-L F1 for generative ones.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import sacrebleu
from rouge_score import rouge_scorer

METRICS = ("exact_match", "contains", "generation")

_SPACES = re.compile(r"\s+")
_TRAILING = " \t\n.,;:!?\"'`"
_ITEM = re.compile(r"^\s*(\d{1,2})[.)](?:\s+(.*))?$")
_ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def normalize(text: str) -> str:
    """Lower-case, collapse whitespace, strip surrounding punctuation and quotes."""
    return _SPACES.sub(" ", text).strip(_TRAILING).lower()


def first_line(text: str) -> str:
    """The first non-empty line of a generation (closed-form answers are one line)."""
    for line in text.strip().splitlines():
        if line.strip():
            return line
    return ""


def exact_match(prediction: str, targets: Sequence[str]) -> float:
    """100 if the prediction's first line equals one of the targets after `normalize`, else 0."""
    answer = normalize(first_line(prediction))
    return 100.0 * any(answer == normalize(t) for t in targets)


def answer_contained(prediction: str, targets: Sequence[str]) -> float:
    """100 if one of the (normalised, non-empty) targets occurs in the normalised prediction as whole
    words: "correct" is not contained in "incorrect", nor "no" in "know"."""
    answer = normalize(prediction)
    return 100.0 * any(t and re.search(rf"(?<!\w){re.escape(t)}(?!\w)", answer) for t in map(normalize, targets))


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenisation, exp smoothing) against each first target."""
    if not predictions:
        return float("nan")
    return sacrebleu.corpus_bleu(list(predictions), [[refs[0] for refs in references]]).score


def rouge_l(prediction: str, targets: Sequence[str]) -> float:
    """ROUGE-L F1 of one prediction, best over its targets (rouge-score's `score_multi`)."""
    return 100.0 * _ROUGE.score_multi(list(targets), prediction)["rougeL"].fmeasure


def score_task(
    metric: str, predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> dict[str, float]:
    """Score one task's predictions; returns {"score": primary score, ...metric-specific keys}.

    metric is "exact_match", "contains" (accuracy) or "generation" (BLEU and ROUGE-L, primary ROUGE-L).
    "per_example" holds every example's primary score (n,), what the bootstrap intervals resample
    (BLEU is a corpus score: it has none).
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    n = len(predictions)
    if metric == "exact_match" or metric == "contains":
        fn = exact_match if metric == "exact_match" else answer_contained
        scores = [fn(p, t) for p, t in zip(predictions, references)]
        acc = sum(scores) / max(n, 1)
        return {"score": acc, "accuracy": acc, "n": n, "per_example": scores}
    if metric == "generation":
        scores = [rouge_l(p, t) for p, t in zip(predictions, references)]
        rl = sum(scores) / max(n, 1)
        return {"score": rl, "rouge_l": rl, "bleu": bleu(predictions, references), "n": n, "per_example": scores}
    raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")


def parse_numbered(text: str, n: int) -> list[str | None]:
    """Split a numbered-list answer "1. ... 2. ..." into its n items (None where an item is missing).

    An item runs from its "k." (or "k)") line to the next numbered line; numbers outside 1..n and
    repeated numbers (the model starting over) are ignored after the first occurrence.
    """
    items: dict[int, list[str]] = {}
    current: int | None = None
    for line in text.splitlines():
        m = _ITEM.match(line)
        if m and 1 <= int(m.group(1)) <= n and int(m.group(1)) not in items:
            current = int(m.group(1))
            items[current] = [m.group(2) or ""]
        elif m and (int(m.group(1)) in items or int(m.group(1)) > n):
            current = None
        elif current is not None:
            items[current].append(line)
    return [("\n".join(items[k]).strip() or None) if k in items else None for k in range(1, n + 1)]


def score_composite(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    metrics: Sequence[str],
    tasks: Sequence[str],
) -> dict:
    """Score a composite-n set: each prediction is parsed into n items, scored per sub-task.

    references[j][i] is the target of sub-task i (tasks[i], scored with metrics[i]) in sample j.
    Returns {"subtasks": {task: score dict}, "attempted": mean number of non-empty items,
    "attempted_share": that / n, "average": mean primary score over the sub-tasks}.
    """
    n = len(tasks)
    parsed = [parse_numbered(p, n) for p in predictions]
    subtasks = {}
    for i, task in enumerate(tasks):
        answers = [items[i] or "" for items in parsed]
        refs = [[r[i]] for r in references]
        subtasks[task] = score_task(metrics[i], answers, refs)
    attempted = sum(sum(a is not None for a in items) for items in parsed) / max(len(parsed), 1)
    average = sum(s["score"] for s in subtasks.values()) / n
    return {"subtasks": subtasks, "attempted": attempted, "attempted_share": attempted / n,
            "average": average}
