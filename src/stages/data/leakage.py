"""The leakage check: no test example may appear in any train split or in any few-shot prefix."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from stages.data.composite import composite_prefix
from stages.data.examples import normalize_text

Records = Mapping[str, Sequence[Mapping[str, Any]]]  # task (or composite name) -> records


class LeakageError(ValueError):
    """A test example that also appears in training data or in a few-shot prefix."""


def find_leaks(train: Records, test: Records, composites: Records) -> list[str]:
    """Descriptions of every test prompt found (whitespace-normalised) in a train split of any task
    or inside the worked examples of a composite prompt."""
    in_train = {normalize_text(r["input"]): task for task, records in train.items() for r in records}
    prefixes = {
        normalize_text(composite_prefix(r)): name for name, records in composites.items() for r in records
    }
    leaks = []
    for task, records in test.items():
        for i, record in enumerate(records):
            key = normalize_text(record["input"])
            if key in in_train:
                leaks.append(f"test example {i} of {task!r} is in the train split of {in_train[key]!r}")
            leaks += [
                f"test example {i} of {task!r} is in the few-shot prefix of {name!r}"
                for prefix, name in prefixes.items() if key in prefix
            ]
    return leaks


def check_leakage(train: Records, test: Records, composites: Records) -> None:
    """Raise LeakageError naming the leaked examples (see `find_leaks`)."""
    leaks = find_leaks(train, test, composites)
    if leaks:
        more = f" (and {len(leaks) - 5} more)" if len(leaks) > 5 else ""
        raise LeakageError("; ".join(leaks[:5]) + more)
