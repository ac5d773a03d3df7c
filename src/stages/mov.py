"""Stage mov: MoV / MoLoRA against (IA)3, LoRA and full fine-tuning on held-out tasks (the paper's Table 1
and its ablations).

Every method of `method.run` (entries of `method.methods`, :class:`meteora.methods.MixtureConfig`
fields; "base" is the frozen model) is put on a fresh copy of the base model, trained on the mixture of
the training tasks (loss on the answer tokens; the base frozen except for full fine-tuning), then
evaluated zero-shot on the held-out tasks (every example of their `method.eval.heldout_splits`: a
held-out task is never trained on) and on the training tasks' test sets. Tasks with answer choices are
scored by rank classification (T0's protocol); the others, if `method.eval.generate`, by greedy
generation. Every score keeps its per-example values, so the table carries 95% bootstrap intervals and
the ablations of `method.comparisons` paired differences (:mod:`stages.stats`). Routed methods record
router entropy and expert load per decoder block, and the expert load per task in one module.

Writes reports/mov/results.json (everything) and reports/mov/metrics.json (held-out / training-task
averages, intervals and % parameters per method, for `dvc exp show`); every method is a nested MLflow
run. Run: `python -m stages.mov [method=full] [method.run=[ia3,mov10]]`; parts of one sweep run in
separate processes (e.g. on one GPU) are merged with `python -m stages.mov merge OUT.json PART.json ...`.
"""

from __future__ import annotations

import copy
import datetime
import math
import platform
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from meteora.methods import MixtureConfig, apply_method, count_trainable, expert_layers
from meteora.router_input import attach_sequence_context
from stages.common import ConfigError, load_config, read_json, seed_everything, set_threads, stage_run, write_json
from stages.generation import greedy_generate, pad_batch
from stages.metrics import normalize, score_task
from stages.setup import load_base, load_task_split, task_list
from stages.stats import bootstrap, paired
from stages.training import TrainSettings, encode_records, train_lora

BASE = "base"
_BLOCK = re.compile(r"(?:^|\.)layers\.(\d+)\.")


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


def split_tasks(cfg: DictConfig) -> tuple[list[str], list[str]]:
    """(training tasks, held-out tasks) of the profile: held-out from `method.heldout_tasks`."""
    tasks = task_list(cfg)
    heldout = [str(t) for t in cfg.method.heldout_tasks]
    missing = [t for t in heldout if t not in tasks]
    if missing:
        raise ConfigError(f"method.heldout_tasks {missing} are not tasks of the profile {cfg.tasks.profile!r} ({tasks})")
    train = [t for t in tasks if t not in heldout]
    if not train or not heldout:
        raise ConfigError(f"the MoV experiment needs training and held-out tasks; got train={train}, held-out={heldout}")
    return train, heldout


def method_configs(cfg: DictConfig) -> dict[str, MixtureConfig | None]:
    """name -> MixtureConfig (None for "base") for every name of `method.run`, in order."""
    catalogue = OmegaConf.to_container(cfg.method.methods, resolve=True)
    out: dict[str, MixtureConfig | None] = {}
    for name in cfg.method.run:
        name = str(name)
        if name == BASE:
            out[name] = None
        elif name not in catalogue:
            raise ConfigError(f"method.run names {name!r}, which is not in method.methods ({sorted(catalogue)})")
        else:
            try:
                out[name] = MixtureConfig.from_dict(catalogue[name])
            except ValueError as err:
                raise ConfigError(f"method.methods.{name}: {err}") from err
    return out


# ---------------------------------------------------------------------------------------------
# Rank classification
# ---------------------------------------------------------------------------------------------


def _choice_ids(tokenizer, choices: Sequence[str]) -> list[list[int]]:
    return [tokenizer(c, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id] for c in choices]


@torch.no_grad()
def choice_loglikelihoods(
    model: nn.Module, tokenizer, prompt: str, choices: Sequence[str], max_prompt_tokens: int,
) -> list[tuple[float, int]]:
    """(summed log-likelihood, token count) of every choice as the continuation of the prompt.

    The prompt runs once; its KV cache is repeated for the choices, which run as one padded batch.
    """
    device = next(model.parameters()).device
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"][-max_prompt_tokens:]
    choice_ids = _choice_ids(tokenizer, choices)
    prefix = torch.tensor([prompt_ids], device=device)
    out = model(input_ids=prefix, attention_mask=torch.ones_like(prefix), use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    cache.batch_repeat_interleave(len(choices))
    first = F.log_softmax(out.logits[0, -1].float(), -1)  # predicts every choice's first token
    ids, mask = pad_batch(choice_ids, tokenizer.pad_token_id)
    ids, mask = ids.to(device), mask.to(device)
    full_mask = torch.cat([torch.ones(len(choices), len(prompt_ids), dtype=mask.dtype, device=device), mask], 1)
    rest = F.log_softmax(model(input_ids=ids, attention_mask=full_mask, past_key_values=cache).logits.float(), -1)
    scores = []
    for row, c in enumerate(choice_ids):
        later = rest[row, torch.arange(len(c) - 1, device=device), ids[row, 1:len(c)]].sum()
        scores.append(((first[c[0]] + later).item(), len(c)))
    return scores


@torch.no_grad()
def batched_loglikelihoods(
    model: nn.Module, tokenizer, records: Sequence[dict], max_prompt_tokens: int, batch_tokens: int,
) -> list[list[tuple[float, int]]]:
    """choice_loglikelihoods of every record, with every (prompt + choice) sequence of all records run as
    right-padded batches of at most `batch_tokens` tokens (padding included), longest first; the LM head
    is applied only where a choice token is predicted. For accelerators, where one sequence at a time
    leaves the device idle."""
    device = next(model.parameters()).device
    sequences = []  # (record, choice, ids, prompt length)
    for i, record in enumerate(records):
        prompt_ids = tokenizer(record["input"], add_special_tokens=False)["input_ids"][-max_prompt_tokens:]
        for j, c in enumerate(_choice_ids(tokenizer, record["choices"])):
            sequences.append((i, j, prompt_ids + c, len(prompt_ids)))
    sequences.sort(key=lambda s: -len(s[2]))
    scores: list[list[tuple[float, int]]] = [[(0.0, 0)] * len(r["choices"]) for r in records]
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    start = 0
    while start < len(sequences):
        rows = max(1, batch_tokens // len(sequences[start][2]))
        batch = sequences[start:start + rows]
        start += len(batch)
        ids, mask = pad_batch([s[2] for s in batch], tokenizer.pad_token_id)
        ids, mask = ids.to(device), mask.to(device)
        hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
        row_idx = torch.cat([torch.full((len(s[2]) - s[3],), r) for r, s in enumerate(batch)]).to(device)
        pos = torch.cat([torch.arange(s[3] - 1, len(s[2]) - 1) for s in batch]).to(device)
        logprobs = F.log_softmax(head(hidden[row_idx, pos]).float(), -1)
        picked = logprobs.gather(1, ids[row_idx, pos + 1].unsqueeze(1)).squeeze(1)
        sums = torch.zeros(len(batch), device=device, dtype=picked.dtype).index_add_(0, row_idx, picked).tolist()
        for (i, j, seq, n_prompt), total in zip(batch, sums):
            scores[i][j] = (total, len(seq) - n_prompt)
    return scores


def rank_classify(model, tokenizer, records: Sequence[dict], ev: Mapping) -> list[int]:
    """Index of the highest-likelihood choice of every record (T0's rank classification); `ev` holds
    max_prompt_tokens, length_normalize and batch_tokens (0: one record at a time, sharing its prompt)."""
    max_prompt, batch_tokens = int(ev["max_prompt_tokens"]), int(ev.get("batch_tokens") or 0)
    if batch_tokens:
        scored = batched_loglikelihoods(model, tokenizer, records, max_prompt, batch_tokens)
    else:
        scored = [choice_loglikelihoods(model, tokenizer, r["input"], r["choices"], max_prompt) for r in records]
    predictions = []
    for per_choice in scored:
        values = [ll / n if ev["length_normalize"] else ll for ll, n in per_choice]
        predictions.append(max(range(len(values)), key=values.__getitem__))
    return predictions


def gold_choices(record: dict) -> list[str]:
    """The record's choices that are among its targets (the gold answer of a multiple-choice task)."""
    targets = {normalize(t) for t in record["targets"]}
    gold = [c for c in record["choices"] if normalize(c) in targets]
    if not gold:
        raise ValueError(f"task {record['task']!r}: no choice among the targets {record['targets'][:3]}")
    return gold


def choice_baselines(records: Sequence[dict]) -> dict[str, float | None]:
    """Reference accuracies of a multiple-choice test set, 0-100: "chance" (a uniform guess),
    "majority" (always the most frequent gold label; only when every record offers the same choices,
    a label set) and "majority_position" (always the choice at the most frequent gold position)."""
    chance = 100.0 * sum(1 / len(r["choices"]) for r in records) / len(records)
    positions = Counter(r["choices"].index(gold_choices(r)[0]) for r in records)
    position = 100.0 * positions.most_common(1)[0][1] / len(records)
    if len({frozenset(r["choices"]) for r in records}) > 1:
        return {"chance": chance, "majority": None, "majority_position": position}
    counts = Counter(gold_choices(r)[0] for r in records)
    return {"chance": chance, "majority": 100.0 * counts.most_common(1)[0][1] / len(records),
            "majority_position": position}


def evaluate_task(model, tokenizer, records: Sequence[dict], ev: Mapping) -> dict | None:
    """Score one task. With choices: rank classification; `per_example` holds 100 / 0 per record,
    `predicted` the chosen indices, `top_prediction_share` how often the most frequent answer was given
    (100 = a constant answer) and `top_position_share` the same for its position. Without choices:
    greedy generation with the task's metric if `ev["generate"]`, else None."""
    if all(r.get("choices") for r in records):
        predicted = rank_classify(model, tokenizer, records, ev)
        correct = [100.0 * (normalize(r["choices"][p]) in {normalize(g) for g in gold_choices(r)})
                   for r, p in zip(records, predicted)]
        answers = Counter(r["choices"][p] for r, p in zip(records, predicted))
        return {"score": sum(correct) / len(correct), "n": len(correct), "per_example": correct, "predicted": predicted,
                "top_prediction_share": 100.0 * answers.most_common(1)[0][1] / len(records),
                "top_position_share": 100.0 * Counter(predicted).most_common(1)[0][1] / len(records),
                "protocol": "rank_classification"}
    if not ev["generate"]:
        return None
    metric = records[0]["metric"]
    predictions = greedy_generate(model, tokenizer, [r["input"] for r in records], int(ev["max_new_tokens"][metric]),
                                  int(ev["batch_size"]), int(ev["max_prompt_tokens"]))
    return {**score_task(metric, predictions, [r["targets"] for r in records]), "protocol": "generation"}


def average(per_task: Mapping[str, dict | None]) -> float | None:
    values = [s["score"] for s in per_task.values() if s is not None]
    return sum(values) / len(values) if values else None


def per_example(per_task: Mapping[str, dict | None]) -> dict[str, list[float]]:
    """task -> per-example scores of the rank-classified tasks (what the intervals resample)."""
    return {t: s["per_example"] for t, s in per_task.items() if s is not None and "per_example" in s}


# ---------------------------------------------------------------------------------------------
# Routing statistics
# ---------------------------------------------------------------------------------------------


def block_of(name: str) -> int | None:
    """The decoder-block index in a module name ("model.layers.7.mlp.down_proj" -> 7), or None."""
    match = _BLOCK.search(name)
    return int(match.group(1)) if match else None


class RoutingRecorder:
    """Per task, over the non-padding tokens of every routed layer: the mean routing probability of each
    expert ("load"), the share of tokens whose best expert it is ("top1") and the mean entropy of the
    routing distribution in nats. Sums stay on the device until :meth:`result`.

    Works for MoV layers and MoLoRA/MeteoRA layers (both expose `keep_routing` and `last_routing`).
    """

    def __init__(self, model: nn.Module, layers: Mapping[str, nn.Module]) -> None:
        self.context = attach_sequence_context(model)
        self.layers = dict(layers)
        self.sums: dict[tuple[str, str], list[torch.Tensor]] = {}
        self.task: str | None = None

    def _hook(self, name: str):
        def hook(module: nn.Module, args, output) -> None:
            routing = module.last_routing
            if routing is None or self.task is None:
                return
            logits = routing.logits.float().reshape(-1, routing.logits.shape[-1])
            mask = self.context.attention_mask
            steps = routing.logits.shape[-2] if routing.logits.dim() > 2 else 1
            weight = torch.ones(logits.shape[0], device=logits.device) if mask is None \
                else mask[:, -steps:].reshape(-1).to(logits.device, torch.float32)
            probs = torch.softmax(logits, -1)
            top1 = F.one_hot(probs.argmax(-1), probs.shape[-1]).float()
            entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1)
            stats = [weight @ probs, weight @ top1, (weight * entropy).sum(), weight.sum()]
            key = (self.task, name)
            self.sums[key] = stats if key not in self.sums else [a + b for a, b in zip(self.sums[key], stats)]
        return hook

    @contextmanager
    def recording(self, task: str) -> Iterator[None]:
        self.task = task
        handles = [layer.register_forward_hook(self._hook(name)) for name, layer in self.layers.items()]
        for layer in self.layers.values():
            layer.keep_routing = True
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for layer in self.layers.values():
                layer.keep_routing = False
                layer.last_routing = None
            self.task = None

    def result(self, module: str | None = None) -> dict:
        """{"per_block": {"load": [[E] per block], "top1": ..., "entropy": [nats per block], "blocks": [...],
        "modules": [...]}, "per_task": {task: [E]} (load in `module`), "module": module}; blocks average
        their modules, every task's tokens pooled."""
        pooled: dict[str, list[torch.Tensor]] = {}
        for (_, name), stats in self.sums.items():
            pooled[name] = stats if name not in pooled else [a + b for a, b in zip(pooled[name], stats)]
        by_block: dict[int, list[list[torch.Tensor]]] = {}
        for name, (load, top1, entropy, count) in pooled.items():
            count = count.clamp_min(1.0)
            by_block.setdefault(block_of(name) or 0, []).append([load / count, top1 / count, entropy / count])
        blocks = sorted(by_block)

        def mean(block: int, i: int) -> torch.Tensor:
            return torch.stack([stats[i] for stats in by_block[block]]).mean(0)

        per_task = {task: (stats[0] / stats[3].clamp_min(1.0)).tolist() for (task, name), stats in self.sums.items()
                    if name == module}
        return {"module": module, "per_task": per_task,
                "per_block": {"blocks": blocks, "modules": sorted({n.split(".")[-1] for n in pooled}),
                              "load": [mean(b, 0).tolist() for b in blocks], "top1": [mean(b, 1).tolist() for b in blocks],
                              "entropy": [float(mean(b, 2)) for b in blocks]}}


def routed_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's layers that route between more than one expert, by name."""
    return {n: m for n, m in expert_layers(model).items()
            if getattr(m, "num_experts", getattr(m, "num_adapters", 1)) > 1}


def specialisation_module(layers: Mapping[str, nn.Module], cfg: DictConfig) -> str | None:
    """The routed module `method.routing_module` of decoder block `method.routing_block` (the paper's
    expert-specialisation figure), or None if it does not route."""
    suffix = "." + str(cfg.method.routing_module)
    found = {block_of(n): n for n in layers if n.endswith(suffix) and block_of(n) is not None}
    if not found:
        return None
    blocks = sorted(found)
    return found[blocks[int(cfg.method.routing_block) % len(blocks)]]


# ---------------------------------------------------------------------------------------------
# Intervals
# ---------------------------------------------------------------------------------------------


def interval(scores: Mapping[str, Sequence[float]]) -> dict | None:
    """The 95% bootstrap interval of the mean over tasks (None without per-example scores)."""
    return bootstrap(scores).to_dict() if scores else None


def comparisons(methods: Sequence[Mapping], pairs: Sequence[Sequence[str]]) -> list[dict]:
    """Paired differences A - B of the held-out average (same examples) for every pair whose two methods ran."""
    by_name = {m["name"]: m for m in methods}
    out = []
    for a, b in pairs:
        if a in by_name and b in by_name:
            x, y = per_example(by_name[a]["heldout"]), per_example(by_name[b]["heldout"])
            if x and list(x) == list(y):
                diff = paired(x, y)
                out.append({"a": a, "b": b, "label": f"{by_name[a]['label']} - {by_name[b]['label']}",
                            **diff.to_dict(), "excludes_zero": diff.excludes_zero()})
    return out


def summary(methods: Sequence[Mapping]) -> dict:
    """metrics.json: per method the averages, their intervals and the % of parameters updated."""
    keys = ("heldout_average", "heldout_interval", "train_average", "train_interval", "percent")
    return {e["name"]: {k: e.get(k) for k in keys} for e in methods}


# ---------------------------------------------------------------------------------------------
# The experiment
# ---------------------------------------------------------------------------------------------


def router_aux_loss(model: nn.Module) -> float | None:
    """Sum over routed layers of the auxiliary router loss of the last training step, if any."""
    values = [layer.router_loss.last for layer in routed_layers(model).values()
              if getattr(layer, "router_loss", None) is not None and layer.router_loss.last is not None]
    return float(torch.stack(values).sum()) if values else None


def train_method(model: nn.Module, config: MixtureConfig, name: str, data: dict, cfg: DictConfig, pad_id: int,
                 log_fn: Callable[[dict, int], None] | None = None) -> dict:
    """Train `model` (config applied) on the training mixture (`log_fn(metrics, step)` gets every step's
    metrics); what the entry records of it."""
    lr = float(cfg.method.train.lr[config.kind])
    settings = TrainSettings.from_config(cfg.method.train, lr=lr, seed=int(cfg.seed))
    stats = train_lora(model, data["train_examples"], settings, pad_id=pad_id, desc=f"mov/{name}", log_fn=log_fn,
                       config_key="method.train")
    losses = stats["loss_curve"]
    window = max(1, len(losses) // 4)
    return {"lr": lr, "train_seconds": round(stats["seconds"], 1), "train_tokens_per_s": round(stats["tokens_per_s"], 1),
            "loss_first": sum(losses[:window]) / window, "loss_last": sum(losses[-window:]) / window,
            "losses": [round(v, 4) for v in losses], "router_aux_loss_last": router_aux_loss(model)}


def run_method(name: str, config: MixtureConfig | None, base_model: nn.Module, tokenizer, data: dict,
               cfg: DictConfig, log_fn: Callable[[dict, int], None] | None = None) -> dict:
    """Train (unless base) and evaluate one method on a fresh copy of the base model."""
    seed_everything(int(cfg.seed))
    model = copy.deepcopy(base_model)
    entry: dict = {"name": name, "label": "Base (zero-shot)" if config is None else config.label,
                   "config": None if config is None else config.to_dict()}
    if config is not None:
        model = apply_method(model, config)
        entry.update(count_trainable(model))
        entry.update(train_method(model, config, name, data, cfg, tokenizer.pad_token_id, log_fn))
    else:
        entry.update({"trainable": 0, "total": sum(p.numel() for p in model.parameters()), "percent": 0.0})
    model.eval().requires_grad_(False)
    layers = routed_layers(model)
    recorder = RoutingRecorder(model, layers) if layers else None
    ev = OmegaConf.to_container(cfg.method.eval, resolve=True)
    start = time.perf_counter()
    for split in ("heldout", "train"):
        per_task = {}
        for task, records in data[f"{split}_test"].items():
            with recorder.recording(task) if recorder else nullcontext():
                per_task[task] = evaluate_task(model, tokenizer, records, ev)
        entry[split] = per_task
        entry[f"{split}_average"] = average(per_task)
        entry[f"{split}_interval"] = interval(per_example(per_task))
    entry["eval_seconds"] = round(time.perf_counter() - start, 1)
    if recorder:
        entry["routing"] = recorder.result(specialisation_module(layers, cfg))
    return entry


def heldout_records(cfg: DictConfig, task: str) -> list[dict]:
    """Every example of a held-out task's `method.eval.heldout_splits`, at most `max_test_per_task`."""
    records = [r for split in cfg.method.eval.heldout_splits for r in load_task_split(cfg, task, str(split))]
    limit = cfg.method.eval.max_test_per_task
    return records[: int(limit)] if limit else records


def load_data(cfg: DictConfig, tokenizer, train_tasks: Sequence[str], heldout: Sequence[str]) -> dict:
    """Encoded training examples of the training tasks' mixture and the test records to score."""
    train, ev = cfg.method.train, cfg.method.eval
    records = [r for t in train_tasks for r in load_task_split(cfg, t, "train", train.samples_per_task)]
    return {
        "train_examples": encode_records(tokenizer, records, int(train.max_length)),
        "heldout_test": {t: heldout_records(cfg, t) for t in heldout},
        "train_test": {t: load_task_split(cfg, t, "test", ev.max_test_train_tasks) for t in train_tasks}
        if ev.max_test_train_tasks != 0 else {},
    }


def run_info(argv: Sequence[str] | None) -> dict:
    """Where and how this run ran (the JSON's run log)."""
    device = (f"{torch.cuda.get_device_name()} (CUDA)" if torch.cuda.is_available()
              else f"CPU, {torch.get_num_threads()} torch threads, {platform.processor() or platform.machine()}")
    import transformers

    return {"command": "python -m stages.mov " + " ".join(sys.argv[1:] if argv is None else argv), "device": device,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def finish(results: dict) -> dict:
    """Add the paired comparisons of `results["comparison_pairs"]` (after every method ran, or a merge)."""
    results["comparisons"] = comparisons(results["methods"], results.get("comparison_pairs", []))
    return results


def merge(out: str | Path, parts: Sequence[str | Path]) -> Path:
    """One results file from parts of one sweep run in separate processes (same tasks and settings); the
    methods in catalogue order."""
    loaded = [read_json(p) for p in parts]
    results = {k: v for k, v in loaded[0].items() if k not in ("methods", "comparisons")}
    for part in loaded[1:]:
        if part["heldout_tasks"] != results["heldout_tasks"] or part["train"] != results["train"]:
            raise ValueError("mov merge: the parts differ in held-out tasks or training settings")
    order = {n: i for i, n in enumerate(results.get("method_order", []))}
    methods = sorted((m for part in loaded for m in part["methods"]), key=lambda m: order.get(m["name"], len(order)))
    results["methods"] = methods
    results["run"] = {**results.get("run", {}), "parts": [p.get("run") for p in loaded]}
    return write_json(out, finish(results))


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["merge"]:
        print(f"mov: wrote {merge(argv[1], argv[2:])}")
        return
    cfg = load_config(argv)
    set_threads(cfg)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 weights, TF32 matrix products
    train_tasks, heldout = split_tasks(cfg)
    configs = method_configs(cfg)
    base_model, tokenizer = load_base(cfg)
    base_model.requires_grad_(False)
    data = load_data(cfg, tokenizer, train_tasks, heldout)
    pairs = [[str(a), str(b)] for a, b in cfg.method.get("comparisons") or []]
    results = {"model": str(cfg.model.name), "tasks_profile": str(cfg.tasks.profile), "train_tasks": train_tasks,
               "heldout_tasks": heldout, "train": OmegaConf.to_container(cfg.method.train, resolve=True),
               "eval": OmegaConf.to_container(cfg.method.eval, resolve=True), "run": run_info(argv),
               "heldout_baselines": {t: choice_baselines(r) for t, r in data["heldout_test"].items()
                                     if all(x.get("choices") for x in r)},
               "method_order": [BASE, *OmegaConf.to_container(cfg.method.methods)], "comparison_pairs": pairs,
               "methods": []}
    started = time.perf_counter()
    params = {"method": {k: OmegaConf.to_container(cfg.method[k], resolve=True) for k in ("run", "train", "eval")},
              "train_tasks": train_tasks, "heldout_tasks": heldout}
    with stage_run(cfg, "mov", params=params) as run:
        results["mlflow_run_id"] = run.run_id
        for name, config in configs.items():
            start = time.perf_counter()
            with run.nested(f"mov/{name}", tags={"stage": "mov", "method": name}) as child:
                if config is not None:
                    child.log_params({"mixture": config.to_dict()})
                entry = run_method(name, config, base_model, tokenizer, data, cfg, child.log_metrics)
                child.log_metrics({k: entry.get(k) for k in ("percent", "trainable", "heldout_average", "train_average",
                                                             "loss_first", "loss_last", "heldout_interval")})
            results["methods"].append(entry)
            print(f"mov: {entry['label']:<28} held-out {_fmt(entry['heldout_average'])} {_ci(entry['heldout_interval'])}"
                  f"  train-tasks {_fmt(entry['train_average'])}  params {entry['percent']:.3f}%  "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
        results["run"]["seconds"] = round(time.perf_counter() - started, 1)
        out = Path(cfg.paths.reports) / "mov"
        run.write_json(out / "results.json", finish(results))
        run.write_json(out / "metrics.json", {"methods": summary(results["methods"]),
                                              "comparisons": {c["label"]: c for c in results["comparisons"]}},
                       artifact=False)


def _fmt(value: float | None) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:6.2f}"


def _ci(ci: Mapping | None) -> str:
    return "" if not ci else f"[{ci['low']:.1f}, {ci['high']:.1f}]"


if __name__ == "__main__":
    main()
