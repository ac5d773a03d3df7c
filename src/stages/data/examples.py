"""One task example in the paper's prompt format, and its JSONL record."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

METRICS = ("exact_match", "contains", "generation")
INST_OPEN, INST_CLOSE = "[INST]", "[/INST]"
_SPACES = re.compile(r"\s+")


def format_prompt(body: str, choices: Sequence[str] | None = None, suffix: str = "") -> str:
    """`[INST] {body}{choice lines}{suffix} [/INST]\\n` (stripped inside), one `\\nchoice: {option}`
    line per option."""
    text = body + "".join(f"\nchoice: {c}" for c in choices or ()) + suffix
    return f"{INST_OPEN} {text.strip()} {INST_CLOSE}\n"


def normalize_text(text: str) -> str:
    """Whitespace-collapsed, stripped text: the key under which two prompts count as the same."""
    return _SPACES.sub(" ", text).strip()


def unique(items: Sequence[str]) -> list[str]:
    """Items in order, first occurrence kept, empty strings dropped."""
    seen: set[str] = set()
    out = []
    for item in items:
        if item and item not in seen:
            seen.add(item)
            out.append(item)
    return out


@dataclass(frozen=True)
class Example:
    """A formatted example: `input` is the full prompt, `target` the answer, `targets` all acceptable
    answers (the answer first), `choices` the options of a multiple-choice task, `source` the raw
    question it came from (duplicates share it), `subtask` its BIG-bench sub-folder if any."""

    task: str
    input: str
    target: str
    targets: tuple[str, ...]
    choices: tuple[str, ...] | None
    source: str
    subtask: str | None = None

    def record(self, metric: str) -> dict[str, Any]:
        """The JSONL record of `data/tasks/<task>/{train,test}.jsonl`."""
        if metric not in METRICS:
            raise ValueError(f"task {self.task!r}: unknown metric {metric!r}; expected one of {METRICS}")
        return {
            "task": self.task,
            "input": self.input,
            "target": self.target,
            "targets": list(self.targets),
            "choices": list(self.choices) if self.choices is not None else None,
            "metric": metric,
            "subtask": self.subtask,
        }
