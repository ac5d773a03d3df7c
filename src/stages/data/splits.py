"""Seeded train/test splits of one task's examples."""

from __future__ import annotations

import random
from collections.abc import Sequence

from stages.data.examples import Example


def _dedupe(examples: Sequence[Example]) -> list[Example]:
    """Examples with a distinct source question (the first occurrence kept)."""
    seen: set[str] = set()
    out = []
    for example in examples:
        if example.source not in seen:
            seen.add(example.source)
            out.append(example)
    return out


def split_examples(
    task: str,
    examples: Sequence[Example],
    *,
    seed: int,
    test_fraction: float,
    n_train: int,
    n_test: int,
    max_input_chars: int | None = None,
    test_examples: Sequence[Example] | None = None,
) -> tuple[list[Example], list[Example]]:
    """(train, test) of a task: duplicates of a source question dropped, prompts longer than
    `max_input_chars` dropped, then a shuffle seeded by (seed, task) so that one task's settings never
    move another's split. Without `test_examples` (no test split) a `test_fraction` of the examples
    is held out; then at most `n_train` / `n_test` are kept. The held-out part does not depend on
    `n_train` / `n_test`, so shrinking them keeps test examples out of train."""
    rng = random.Random(f"{seed}/{task}")
    keep = (lambda e: len(e.input) <= max_input_chars) if max_input_chars else (lambda e: True)
    pool = [e for e in _dedupe(examples) if keep(e)]
    if test_examples is None:
        rng.shuffle(pool)
        n_hold = max(1, round(test_fraction * len(pool)))
        test, train = pool[:n_hold], pool[n_hold:]
    else:
        test = [e for e in _dedupe(test_examples) if keep(e)]
        held = {e.source for e in test}
        train = [e for e in pool if e.source not in held]
        rng.shuffle(train)
        rng.shuffle(test)
    train, test = train[:n_train], test[:n_test]
    if not train or not test:
        limit = f" of at most {max_input_chars} characters" if max_input_chars else ""
        raise ValueError(
            f"task {task!r}: {len(train)} train and {len(test)} test examples{limit} "
            f"(from {len(examples)} examples); raise tasks.split.max_input_chars or check the data"
        )
    return train, test
