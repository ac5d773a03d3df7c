"""Stage mov: MoV / MoLoRA against (IA)3 and LoRA on held-out tasks (issue 6, the paper's Table 1).

Every method of `method.run` (entries of `method.methods`, :class:`meteora.methods.MixtureConfig`
fields; "base" is the frozen model) is put on a fresh copy of the base model, trained on the mixture of
the training tasks (base frozen, loss on the answer tokens), then evaluated zero-shot on the held-out
tasks and on the training tasks' test sets. Tasks with answer choices are scored by rank
classification (T0's protocol), the others by greedy generation; both with the evaluation stage's
metrics. For routed methods the average routing probability of each expert per task is recorded in
one module (the paper's expert-specialisation figure). Writes reports/mov/results.json (everything) and
reports/mov/metrics.json (held-out / training-task averages and % parameters per method, for `dvc exp show`);
every method is a nested MLflow run. Run: `python -m stages.mov [method=sweep_experts] [method.run=[ia3,mov10]]`.
"""

from __future__ import annotations

import copy
import math
import re
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from meteora.methods import MixtureConfig, apply_method, count_trainable
from meteora.router_input import attach_sequence_context
from stages.common import ConfigError, load_config, seed_everything, set_threads, start_run, write_json
from stages.generation import greedy_generate, pad_batch
from stages.metrics import normalize, score_task
from stages.setup import load_base, load_task_split, task_list
from stages.training import TrainSettings, encode_records, train_lora

BASE = "base"


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
# Evaluation
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def choice_loglikelihoods(
    model: nn.Module, tokenizer, prompt: str, choices: Sequence[str], max_prompt_tokens: int,
) -> list[tuple[float, int]]:
    """(summed log-likelihood, token count) of every choice as the continuation of the prompt.

    The prompt runs once; its KV cache is repeated for the choices, which run as one padded batch.
    """
    device = next(model.parameters()).device
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"][-max_prompt_tokens:]
    choice_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id] for c in choices]
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


def rank_classify(model, tokenizer, records: Sequence[dict], max_prompt_tokens: int, length_normalize: bool) -> list[str]:
    """The highest-likelihood choice of every record (T0's rank classification)."""
    predictions = []
    for record in records:
        scored = choice_loglikelihoods(model, tokenizer, record["input"], record["choices"], max_prompt_tokens)
        values = [ll / n if length_normalize else ll for ll, n in scored]
        predictions.append(record["choices"][max(range(len(values)), key=values.__getitem__)])
    return predictions


def gold_choices(record: dict) -> list[str]:
    """The record's choices that are among its targets (the gold answer of a multiple-choice task)."""
    targets = {normalize(t) for t in record["targets"]}
    gold = [c for c in record["choices"] if normalize(c) in targets]
    if not gold:
        raise ValueError(f"task {record['task']!r}: no choice among the targets {record['targets'][:3]}")
    return gold


def choice_baselines(records: Sequence[dict]) -> dict[str, float]:
    """Reference accuracies of a multiple-choice test set, 0-100: "chance" (a uniform guess) and, when
    every record offers the same choices (a label set), "majority" (always its most frequent gold label)."""
    chance = 100.0 * sum(1 / len(r["choices"]) for r in records) / len(records)
    if len({frozenset(r["choices"]) for r in records}) > 1:
        return {"chance": chance, "majority": None}
    counts = Counter(gold_choices(r)[0] for r in records)
    return {"chance": chance, "majority": 100.0 * counts.most_common(1)[0][1] / len(records)}


def evaluate_task(model, tokenizer, records: Sequence[dict], ev: DictConfig) -> dict | None:
    """Score one task: rank classification when it has choices (accuracy: the chosen choice is the
    gold one; `top_prediction_share`: how often the most frequent answer was given, 100 = a constant
    answer), else greedy generation with the task's metric if `ev.generate`, else None."""
    if all(r.get("choices") for r in records):
        predictions = rank_classify(model, tokenizer, records, int(ev.max_prompt_tokens), bool(ev.length_normalize))
        scores = score_task("exact_match", predictions, [gold_choices(r) for r in records])
        top_share = 100.0 * Counter(predictions).most_common(1)[0][1] / len(predictions)
        return {**scores, "top_prediction_share": top_share, "protocol": "rank_classification"}
    if not ev.generate:
        return None
    metric = records[0]["metric"]
    predictions = greedy_generate(model, tokenizer, [r["input"] for r in records], int(ev.max_new_tokens[metric]),
                                  int(ev.batch_size), int(ev.max_prompt_tokens))
    return {**score_task(metric, predictions, [r["targets"] for r in records]), "protocol": "generation"}


def average(per_task: Mapping[str, dict | None]) -> float | None:
    values = [s["score"] for s in per_task.values() if s is not None]
    return sum(values) / len(values) if values else None


class RoutingRecorder:
    """Accumulates one routed layer's softmax routing probabilities over non-padding tokens, per task.

    Works for MoV layers and MoLoRA/MeteoRA layers (both expose `keep_routing` and `last_routing`).
    """

    def __init__(self, model: nn.Module, layer: nn.Module) -> None:
        self.context = attach_sequence_context(model)
        self.layer = layer
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, float] = {}
        self.task: str | None = None

    def _hook(self, module: nn.Module, args, output) -> None:
        routing = module.last_routing
        if routing is None or self.task is None:
            return
        probs = torch.softmax(routing.logits.float(), dim=-1)  # (B, T, E)
        mask = self.context.attention_mask
        mask = torch.ones(probs.shape[:-1], device=probs.device) if mask is None else mask[:, -probs.shape[1]:].float()
        self.sums[self.task] = self.sums.get(self.task, 0) + (probs * mask[..., None]).sum((0, 1)).cpu()
        self.counts[self.task] = self.counts.get(self.task, 0.0) + float(mask.sum())

    @contextmanager
    def recording(self, task: str) -> Iterator[None]:
        self.task = task
        self.layer.keep_routing = True
        handle = self.layer.register_forward_hook(self._hook)
        try:
            yield
        finally:
            handle.remove()
            self.layer.keep_routing = False
            self.layer.last_routing = None
            self.task = None

    def result(self) -> dict[str, list[float]]:
        return {t: (self.sums[t] / max(self.counts[t], 1.0)).tolist() for t in self.sums}


def routed_layer(model: nn.Module, cfg: DictConfig) -> tuple[str, nn.Module] | None:
    """The module `method.routing_module` of decoder block `method.routing_block`, if it routes experts."""
    suffix = re.compile(rf"(?:^|\.)layers\.(\d+)\.{re.escape(str(cfg.method.routing_module))}$")
    found = {int(m.group(1)): name for name, _ in model.named_modules() if (m := suffix.search(name))}
    if not found:
        raise ConfigError(f"method.routing_module={cfg.method.routing_module!r} names no module of the decoder blocks")
    blocks = sorted(found)
    name = found[blocks[int(cfg.method.routing_block) % len(blocks)]]
    layer = model.get_submodule(name)
    experts = getattr(layer, "num_experts", getattr(layer, "num_adapters", 1))
    return (name, layer) if hasattr(layer, "last_routing") and experts > 1 else None


# ---------------------------------------------------------------------------------------------
# The experiment
# ---------------------------------------------------------------------------------------------


def run_method(name: str, config: MixtureConfig | None, base_model: nn.Module, tokenizer, data: dict,
               cfg: DictConfig) -> dict:
    """Train (unless base) and evaluate one method on a fresh copy of the base model."""
    seed_everything(int(cfg.seed))
    model = copy.deepcopy(base_model)
    entry: dict = {"name": name, "label": "Base (zero-shot)" if config is None else config.label,
                   "config": None if config is None else config.to_dict()}
    if config is not None:
        model = apply_method(model, config)
        entry.update(count_trainable(model))
        lr = float(cfg.method.train.lr[config.kind])
        settings = TrainSettings.from_config(cfg.method.train, lr=lr, seed=int(cfg.seed))
        stats = train_lora(model, data["train_examples"], settings, pad_id=tokenizer.pad_token_id, desc=f"mov/{name}")
        losses = stats["loss_curve"]
        window = max(1, len(losses) // 4)
        entry.update({"lr": lr, "train_seconds": round(stats["seconds"], 1),
                      "train_tokens_per_s": round(stats["tokens_per_s"], 1),
                      "loss_first": sum(losses[:window]) / window, "loss_last": sum(losses[-window:]) / window,
                      "losses": [round(v, 4) for v in losses]})
    else:
        entry.update({"trainable": 0, "total": sum(p.numel() for p in model.parameters()), "percent": 0.0})
    model.eval()
    located = routed_layer(model, cfg)
    recorder = RoutingRecorder(model, located[1]) if located else None
    start = time.perf_counter()
    for split in ("heldout", "train"):
        per_task = {}
        for task, records in data[f"{split}_test"].items():
            with recorder.recording(task) if recorder else nullcontext():
                per_task[task] = evaluate_task(model, tokenizer, records, cfg.method.eval)
        entry[split] = per_task
        entry[f"{split}_average"] = average(per_task)
    entry["eval_seconds"] = round(time.perf_counter() - start, 1)
    if recorder:
        entry["routing"] = {"module": located[0], "per_task": recorder.result()}
    return entry


def load_data(cfg: DictConfig, tokenizer, train_tasks: Sequence[str], heldout: Sequence[str]) -> dict:
    """Encoded training examples of the training tasks' mixture and the test records to score."""
    train, ev = cfg.method.train, cfg.method.eval
    records = [r for t in train_tasks for r in load_task_split(cfg, t, "train", train.samples_per_task)]
    return {
        "train_examples": encode_records(tokenizer, records, int(train.max_length)),
        "heldout_test": {t: load_task_split(cfg, t, "test", ev.max_test_per_task) for t in heldout},
        "train_test": {t: load_task_split(cfg, t, "test", ev.max_test_train_tasks) for t in train_tasks},
    }


def main(argv: Sequence[str] | None = None) -> None:
    cfg = load_config(argv)
    set_threads(cfg)
    train_tasks, heldout = split_tasks(cfg)
    configs = method_configs(cfg)
    base_model, tokenizer = load_base(cfg)
    base_model.requires_grad_(False)
    data = load_data(cfg, tokenizer, train_tasks, heldout)
    results = {"model": str(cfg.model.name), "tasks_profile": str(cfg.tasks.profile), "train_tasks": train_tasks,
               "heldout_tasks": heldout, "train": OmegaConf.to_container(cfg.method.train, resolve=True),
               "eval": OmegaConf.to_container(cfg.method.eval, resolve=True),
               "heldout_baselines": {t: choice_baselines(r) for t, r in data["heldout_test"].items()
                                     if all(x.get("choices") for x in r)},
               "methods": []}
    import mlflow

    with start_run(cfg, "mov", params={"method": {k: cfg.method[k] for k in ("run", "train", "eval")},
                                       "train_tasks": train_tasks, "heldout_tasks": heldout}) as run:
        results["mlflow_run_id"] = run.info.run_id
        for name, config in configs.items():
            start = time.perf_counter()
            with mlflow.start_run(run_name=f"mov/{name}", nested=True, tags={"stage": "mov", "method": name}):
                if config is not None:
                    mlflow.log_params({f"mixture.{k}": str(v) for k, v in config.to_dict().items()})
                entry = run_method(name, config, base_model, tokenizer, data, cfg)
                summary = {k: entry[k] for k in ("percent", "trainable", "heldout_average", "train_average",
                                                 "loss_first", "loss_last") if entry.get(k) is not None}
                mlflow.log_metrics({k: float(v) for k, v in summary.items()})
            results["methods"].append(entry)
            print(f"mov: {entry['label']:<24} held-out {_fmt(entry['heldout_average'])}  train-tasks "
                  f"{_fmt(entry['train_average'])}  params {entry['percent']:.3f}%  "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
        out = Path(cfg.paths.reports) / "mov"
        path = write_json(out / "results.json", results)
        write_json(out / "metrics.json", {e["name"]: {k: e.get(k) for k in ("heldout_average", "train_average", "percent")}
                                          for e in results["methods"]})
        mlflow.log_artifact(str(path))


def _fmt(value: float | None) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:6.2f}"


if __name__ == "__main__":
    main()
