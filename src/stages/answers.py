"""Table 1's and Table 2's test sets, the methods that answer them, batched greedy decoding and scoring
(shared by the stages baselines and evaluate).

A method (base, PEFT oracle, LoRA-B, MeteoRA top-k) is a :class:`Method`: its name and the model
context that answers; a single PEFT adapter answers merged into the base weights (:func:`merged_adapter`:
a LoRA model decodes at the bare model's cost, the base weights restored exactly afterwards).
:func:`answer_tests` decodes every task's test prompts in one pass (batches of one decoding budget,
sorted by length); :func:`answer_composite` the numbered answers of a composite set.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from stages.common import ConfigError, read_jsonl
from stages.generation import sharded_generate
from stages.metrics import score_composite, score_task
from stages.setup import load_task_split


def load_tests(cfg: DictConfig, tasks: Sequence[str]) -> dict[str, list[dict]]:
    """The first `eval.max_test_per_task` test records of every task."""
    return {t: load_task_split(cfg, t, "test", cfg.eval.max_test_per_task) for t in tasks}


def load_composites(cfg: DictConfig, tasks: Sequence[str], quiet: bool = False, chained: bool = False) -> dict[str, list[dict]]:
    """The composite sets whose sub-tasks all have an adapter here (others are skipped, with a note):
    `eval.composite.names` / `max_samples` (paper format), or `eval.chained.*` with `chained`."""
    settings = cfg.eval.chained if chained else cfg.eval.composite
    out = {}
    for name in settings.names or list(cfg.tasks.composites):
        path = Path(cfg.paths.data) / "composite" / f"{name}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"composite set {name!r}: {path} does not exist (run the build_datasets stage)")
        records = read_jsonl(path)[: int(settings.max_samples)]
        missing = sorted({t for r in records for t in r["tasks"]} - set(tasks))
        if missing:
            if not quiet:
                print(f"skipping {name}: no adapter for its sub-tasks {missing}")
            continue
        out[name] = records
    return out


def check_trace_index(cfg: DictConfig, chained: dict[str, list[dict]]) -> None:
    """Fail before any decoding when `eval.trace.index` names no sample of the traced chained set."""
    name, index = cfg.eval.trace.composite, int(cfg.eval.trace.index)
    if name in chained and not 0 <= index < len(chained[name]):
        raise ConfigError(f"eval.trace.index={index}: {name} has {len(chained[name])} chained samples here "
                          f"(eval.chained.max_samples={cfg.eval.chained.max_samples})")


@dataclass(frozen=True)
class DecodeSettings:
    """How a set of prompts is decoded: batch size, prompt cut (last tokens kept), new-token budgets."""

    batch_size: int
    max_prompt_tokens: int | None
    max_new_tokens: dict[str, int]  # per metric type (Table 1) or {"composite": n} (Table 2)

    @classmethod
    def tests(cls, ev: DictConfig) -> DecodeSettings:
        """Table 1: `eval.batch_size`, `eval.max_prompt_tokens`, `eval.max_new_tokens` per metric."""
        return cls(int(ev.batch_size), ev.max_prompt_tokens, {str(k): int(v) for k, v in ev.max_new_tokens.items()})

    @classmethod
    def composite(cls, ev: DictConfig, num_subtasks: int) -> DecodeSettings:
        """Table 2: `eval.composite.*`, the budget being `max_new_tokens_per_task` x sub-tasks."""
        c = ev.composite
        return cls(int(c.batch_size), c.max_prompt_tokens, {"composite": int(c.max_new_tokens_per_task) * num_subtasks})


@contextlib.contextmanager
def merged_adapter(model, adapter: str) -> Iterator[None]:
    """PEFT's LoRA `adapter` of `model` (a PeftModel) merged into the base weights while the block runs, so
    that the model decodes as the bare model does (PEFT's merge: W + s B A in the weights' dtype); on exit
    the adapter is unmerged and the base weights are copied back from a saved copy, bit for bit."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    if not layers:
        raise ValueError(f"cannot merge adapter {adapter!r}: the model has no LoRA layers")
    saved = [m.get_base_layer().weight.detach().clone() for m in layers]
    model.set_adapter(adapter)
    model.merge_adapter()
    try:
        yield
    finally:
        model.unmerge_adapter()
        with torch.no_grad():
            for m, weight in zip(layers, saved):
                m.get_base_layer().weight.copy_(weight)


@dataclass
class Method:
    """One row of Table 1: its name and the model context that answers, built once.

    `adapter`: `model` is a PEFT model that answers with this one adapter, merged (:func:`merged_adapter`).
    `oracle`: `model` is a PEFT model holding every task's adapter under the task's name; each task's
    prompts (a chained sample's segments: each segment) are answered with that task's adapter, merged."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    oracle: bool = False
    adapter: str | None = None

    def answering(self, task: str | None = None) -> contextlib.AbstractContextManager:
        """The model ready to answer `task`'s prompts: its adapter merged in (oracle), the method's one
        adapter merged in, or the model as it is."""
        name = task if self.oracle else self.adapter
        return merged_adapter(self.model, name) if name is not None else contextlib.nullcontext()


def test_items(tests: dict[str, list[dict]]) -> list[tuple[str, int]]:
    """(task, index) of every test prompt, in the order :func:`answer_tests` decodes them."""
    return [(task, i) for task, records in tests.items() for i in range(len(records))]


def answer_tests(method: Method, tests: dict[str, list[dict]], settings: DecodeSettings,
                 on_batch: Callable[[list[int]], None] | None = None) -> dict[str, list[str]]:
    """Greedy answers of `method` to all tasks' test prompts in one pass (the oracle: one pass per task,
    its adapter merged); `on_batch` gets the indices (into :func:`test_items`) of each batch's rows."""
    items = test_items(tests)
    groups = [(t, [j for j, (task, _) in enumerate(items) if task == t]) for t in tests] if method.oracle \
        else [(None, list(range(len(items))))]
    texts = [""] * len(items)
    for task, rows in groups:
        prompts = [tests[items[j][0]][items[j][1]]["input"] for j in rows]
        budgets = [settings.max_new_tokens[tests[items[j][0]][items[j][1]]["metric"]] for j in rows]
        report = None if on_batch is None else (lambda batch, rows=rows: on_batch([rows[b] for b in batch]))
        with method.answering(task):
            answers = sharded_generate(method.model, method.tokenizer, prompts, budgets, settings.batch_size,
                                       settings.max_prompt_tokens, on_batch=report)
        for j, text in zip(rows, answers):
            texts[j] = text
    out = {task: [""] * len(records) for task, records in tests.items()}
    for (t, i), text in zip(items, texts):
        out[t][i] = text
    return out


def answer_composite(method: Method, records: list[dict], settings: DecodeSettings,
                     on_batch: Callable[[list[int]], None] | None = None) -> list[str]:
    """Greedy numbered answers of `method` to one composite set."""
    if method.oracle:
        raise ValueError("the oracle answers one task at a time; a numbered composite answer has several")
    with method.answering():
        return sharded_generate(method.model, method.tokenizer, [r["input"] for r in records],
                                settings.max_new_tokens["composite"], settings.batch_size, settings.max_prompt_tokens,
                                on_batch=on_batch)


def score_tests(tests: dict[str, list[dict]], predictions: dict[str, list[str]]) -> dict[str, dict]:
    """Every task's scores (with per-example scores) against its targets."""
    return {
        task: score_task(records[0]["metric"], predictions[task], [r["targets"] or [r["target"]] for r in records])
        for task, records in tests.items()
    }


def score_composite_set(records: list[dict], texts: list[str]) -> dict:
    """One composite set's numbered answers scored per sub-task."""
    return score_composite(texts, [r["targets"] for r in records], records[0]["metrics"], records[0]["tasks"])


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
