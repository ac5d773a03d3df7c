"""The paper's six Hugging Face hub tasks (gsm8k, cnn_dailymail, news_commentary x3, alpaca) through
`datasets.load_dataset`, in the same prompt format as the BIG-bench tasks."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from stages.data.examples import Example, format_prompt, normalize_text, unique

_GSM8K_FINAL = re.compile(r"####\s*(.+)\s*$")


class HubUnavailableError(RuntimeError):
    """A hub dataset that cannot be loaded (offline machine, no cache, unknown name)."""


def _example(task: str, body: str, answer: str, extra_targets: tuple[str, ...] = ()) -> Example:
    return Example(task=task, input=format_prompt(body), target=answer,
                   targets=tuple(unique([answer, *extra_targets])), choices=None, source=normalize_text(body))


def format_record(task: str, spec: Mapping[str, Any], row: Mapping[str, Any]) -> Example:
    """One dataset row as an Example, by `spec["format"]`: gsm8k (question -> worked answer, the
    number after '####' also accepted), summary (article -> highlights), translation
    (`instruction` + source sentence -> target sentence), alpaca (instruction [+ input] -> output)."""
    kind = spec["format"]
    if kind == "gsm8k":
        final = _GSM8K_FINAL.search(row["answer"])
        return _example(task, row["question"], row["answer"], (final.group(1).strip(),) if final else ())
    if kind == "summary":
        return _example(task, f"Summarize the following article.\n{row['article']}", row["highlights"])
    if kind == "translation":
        pair = row["translation"]
        return _example(task, f"{spec['instruction']}\n{pair[spec['src']]}", pair[spec["tgt"]])
    if kind == "alpaca":
        body = row["instruction"] + (f"\n{row['input']}" if row.get("input") else "")
        return _example(task, body, row["output"])
    raise ValueError(f"hub task {task!r}: unknown format {kind!r}")


def _advice(task: str, spec: Mapping[str, Any], split: str, why: str) -> HubUnavailableError:
    return HubUnavailableError(
        f"hub task {task!r}: cannot load {spec['path']} ({spec.get('name')}, split {split}) with "
        f"datasets.load_dataset: {why}. This needs the Hugging Face hub (or a datasets cache holding it, "
        "HF_DATASETS_CACHE, with HF_HUB_OFFLINE=1): run build_datasets on a machine with hub access, or "
        "use an offline profile (tasks=default or tasks=bigbench22)."
    )


def ensure_hub(task: str, spec: Mapping[str, Any]) -> None:
    """Fail at once when the hub is unreachable (unless HF_HUB_OFFLINE asks for the local cache)."""
    from stages.hub import hub_offline_reason

    if not os.environ.get("HF_HUB_OFFLINE"):
        reason = hub_offline_reason()
        if reason is not None:
            raise _advice(task, spec, spec["train"], reason)


def _load_split(task: str, spec: Mapping[str, Any], split: str):
    import datasets

    ensure_hub(task, spec)
    try:
        return datasets.load_dataset(spec["path"], spec.get("name"), split=split)
    except Exception as err:  # datasets raises many types (ConnectionError, FileNotFoundError, ...)
        raise _advice(task, spec, split, f"{type(err).__name__}: {err}") from err


def load_hub_task(task: str, spec: Mapping[str, Any], limit: int | None = None
                  ) -> tuple[list[Example], list[Example] | None]:
    """(train examples, test examples or None when the dataset has no test split). `limit` caps the
    rows read per split (the pipeline keeps far fewer than e.g. cnn_dailymail's 287k)."""
    out = []
    for split in (spec["train"], spec.get("test")):
        if split is None:
            out.append(None)
            continue
        rows = _load_split(task, spec, split)
        if limit is not None and len(rows) > limit:
            rows = rows.shuffle(seed=0).select(range(limit))
        out.append([format_record(task, spec, row) for row in rows])
    return out[0], out[1]
