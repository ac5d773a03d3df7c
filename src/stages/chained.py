"""Chained composite-n: the n sub-questions of a composite sample asked in ONE sequence, sub-question i
appended (after a separator) to the model's own answer to sub-question i-1, the whole history in the
context; each sub-answer is scored on its own task with Table 1's metric and decoding budget.

This is where MeteoRA's gates must switch adapters inside one sequence. The routing of a finished
chain is read from one forward over it (causal: each token's routing is what it was while decoding),
and each segment (its question and its answer) is scored by the share of its tokens whose majority
top-1 adapter is the segment's task.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from meteora import MeteoRAModel
from stages.answers import Method, mean
from stages.distributed import map_sharded
from stages.generation import pad_batch, prepare_tokenizer
from stages.metrics import score_task

# the methods a chained set compares, in the order of the tables
CHAINED_METHODS = ("meteora", "oracle", "lora_b", "base")


@dataclass
class Chain:
    """One chained sample: its token ids (question 1, answer 1, separator + question 2, answer 2, ...),
    per segment the (question start, answer start, end) offsets into `ids`, and the decoded answers."""

    ids: list[int] = field(default_factory=list)
    spans: list[tuple[int, int, int]] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)


def chain_questions(records: Sequence[dict]) -> list[list[str]]:
    """The sub-questions of composite records (the `questions` field written by build_datasets)."""
    if any("questions" not in r for r in records):
        raise ValueError(f"composite set {records[0].get('name')!r} has no 'questions' field: "
                         "rebuild it with the build_datasets stage")
    return [list(r["questions"]) for r in records]


@torch.no_grad()
def chained_generate(model: torch.nn.Module, tokenizer, questions: Sequence[Sequence[str]], budgets: Sequence[int],
                     batch_size: int, separator: str = "\n\n",
                     segment: Callable[[int], contextlib.AbstractContextManager] | None = None) -> list[Chain]:
    """Greedy chained answers: for segment i, every sample's history plus `separator` and question i is
    decoded (batches of `batch_size`, left padding, longest first) for at most `budgets[i]` new tokens;
    the answer (cut at the first EOS) joins the history. `segment(i)`: the context that segment i is
    decoded in (the oracle: segment i's task's adapter merged in)."""
    prepare_tokenizer(tokenizer)
    n = len(budgets)
    if any(len(q) != n for q in questions):
        raise ValueError(f"every chained sample needs {n} questions (one per budget)")
    device = next(model.parameters()).device
    chains = [Chain() for _ in questions]
    for i in range(n):
        starts = []
        for chain, q in zip(chains, questions):
            starts.append(len(chain.ids))
            chain.ids += tokenizer(q[i] if i == 0 else separator + q[i], add_special_tokens=False)["input_ids"]
        order = sorted(range(len(chains)), key=lambda b: -len(chains[b].ids))
        with contextlib.ExitStack() as stack:
            if segment is not None:
                stack.enter_context(segment(i))
            answers = [_generate(model, tokenizer, [chains[b].ids for b in order[s:s + batch_size]], int(budgets[i]),
                                 device) for s in range(0, len(order), batch_size)]
        for rows, new_ids in zip((order[s:s + batch_size] for s in range(0, len(order), batch_size)), answers):
            for b, answer in zip(rows, new_ids):
                chain = chains[b]
                answer_start = len(chain.ids)
                chain.ids += answer
                chain.spans.append((starts[b], answer_start, len(chain.ids)))
                chain.answers.append(tokenizer.decode(answer, skip_special_tokens=True))
    return chains


def _generate(model: torch.nn.Module, tokenizer, histories: list[list[int]], budget: int, device) -> list[list[int]]:
    """Greedy new tokens of a batch of histories (left padding), each cut at its first EOS."""
    batch = tokenizer.pad({"input_ids": histories}, return_tensors="pt")
    batch = {k: v.to(device) for k, v in batch.items()}
    generated = model.generate(**batch, max_new_tokens=budget, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    out = []
    for new in generated[:, batch["input_ids"].shape[1]:].tolist():
        out.append(new[: next((j for j, t in enumerate(new) if t == tokenizer.eos_token_id), len(new))])
    return out


def answer_chained(method: Method, records: Sequence[dict], budgets: dict[str, int], batch_size: int,
                   separator: str) -> list[Chain]:
    """`method`'s chains for composite records, each segment's budget that of its task's metric (Table 1);
    the oracle answers each segment with that segment's task's adapter. Samples are shared out over the
    ranks of a process group."""
    tasks = list(records[0]["tasks"])
    segment_budgets = [budgets[m] for m in records[0]["metrics"]]

    def run(part: list[list[str]]) -> list[Chain]:
        with method.answering():  # the one adapter merged (the oracle merges per segment)
            return chained_generate(method.model, method.tokenizer, part, segment_budgets, batch_size, separator,
                                    segment=(lambda i: method.answering(tasks[i])) if method.oracle else None)

    return map_sharded(run, chain_questions(records))


def run_chained_sets(method: Method, sets: Mapping[str, Sequence[dict]], budgets: dict[str, int], eval_cfg,
                     results: dict, before: Callable[[str], None] | None = None,
                     extra: Callable[[str, Sequence[dict], list[Chain]], dict] | None = None) -> None:
    """Answer and score every chained set with `method` (`eval_cfg`: the `eval` config node, its
    `chained.batch_size` and `chained.separator`), recording into `results`: the answers under
    ``predictions["chained/<method>"][set]``, the scores under ``chained[set][method]`` and the seconds
    under ``timing["chained/<set>/<method>"]``. `before(set)` runs first (MeteoRA's temperature);
    `extra(set, records, chains)` adds keys to the scores, timed with them (MeteoRA's routing)."""
    for name, records in sets.items():
        started = time.perf_counter()
        if before is not None:
            before(name)
        chains = answer_chained(method, records, budgets, int(eval_cfg.chained.batch_size),
                                str(eval_cfg.chained.separator))
        results["predictions"].setdefault(f"chained/{method.name}", {})[name] = [c.answers for c in chains]
        scores = score_chains(records, chains)
        if extra is not None:
            scores.update(extra(name, records, chains))
        results["chained"].setdefault(name, {"tasks": records[0]["tasks"]})[method.name] = scores
        results["timing"][f"chained/{name}/{method.name}"] = round(time.perf_counter() - started, 1)


def score_chains(records: Sequence[dict], chains: Sequence[Chain]) -> dict:
    """Every sub-answer scored on its own task (all acceptable targets): {"subtasks": {task: score
    dict with per_example}, "average": mean primary score over the sub-tasks}."""
    subtasks = {}
    for i, task in enumerate(records[0]["tasks"]):
        subtasks[task] = score_task(records[0]["metrics"][i], [c.answers[i] for c in chains],
                                    [r["targets_all"][i] or [r["targets"][i]] for r in records])
    return {"subtasks": subtasks, "average": mean(s["score"] for s in subtasks.values())}


@torch.no_grad()
def chain_routing(model: MeteoRAModel, tokenizer, records: Sequence[dict], chains: Sequence[Chain], batch_size: int,
                  trace_index: int | None = None) -> dict:
    """MeteoRA's per-token routing over finished chains: per segment, the share of its tokens (question
    and answer, and answer alone) whose majority top-1 adapter (over the modules) is the segment's task,
    averaged over samples; and, for sample `trace_index`, the full trace that Figure 4 draws."""
    tasks = list(records[0]["tasks"])
    names = list(model.adapter_names)
    device = next(model.parameters()).device
    per_segment: dict[str, list[float]] = {t: [] for t in tasks}
    per_answer: dict[str, list[float]] = {t: [] for t in tasks}
    trace: dict = {}
    model.keep_routing(True)
    try:
        for s in range(0, len(chains), batch_size):
            part = chains[s:s + batch_size]
            ids, mask = pad_batch([c.ids for c in part], tokenizer.pad_token_id)
            model(input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=1)
            top1 = torch.stack([idx[..., 0] for idx in model.routing_trace().values()])  # (M, B, T)
            share = F.one_hot(top1, len(names)).float().mean(0)  # (B, T, N)
            for b, chain in enumerate(part):
                majority = share[b, : len(chain.ids)].argmax(-1)
                for task, (q, a, end) in zip(tasks, chain.spans):
                    label = names.index(task)
                    per_segment[task].append(float((majority[q:end] == label).float().mean()))
                    if end > a:
                        per_answer[task].append(float((majority[a:end] == label).float().mean()))
                if s + b == trace_index:
                    trace = {
                        "adapters": names,
                        "tokens": tokenizer.convert_ids_to_tokens(chain.ids),
                        "share": [[round(v, 4) for v in row] for row in share[b, : len(chain.ids)].tolist()],
                        "top1": majority.tolist(),
                        "boundaries": [{"position": q, "task": t} for t, (q, _, _) in zip(tasks, chain.spans)],
                        "answer_spans": [[a, end] for _, a, end in chain.spans],
                        "answers": chain.answers,
                        "segment_accuracy": {t: per_segment[t][-1] for t in tasks},
                    }
    finally:
        model.keep_routing(False)
    return {"segment": {t: mean(v) for t, v in per_segment.items()},
            "answer": {t: mean(v) for t, v in per_answer.items()},
            "per_sample_segment": per_segment, "trace": trace}
