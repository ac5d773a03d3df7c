"""Evaluation on a tiny model: one batched generate (left padding, per-prompt budgets) gives the answers
of a plain greedy loop over one prompt at a time (full forward, argmax, no cache), for the base model and
for MeteoRA (whose gates must ignore the padding); every Table 1 score gets an interval."""

import pytest
import torch

from helpers import WORDS, meteora_with_random_gates, reference_greedy, save_peft_adapter, tiny_llama, word_tokenizer
from stages.answers import DecodeSettings, Method, answer_tests
from stages.evaluate import answer_with_routing, intervals_of
from stages.generation import greedy_generate


def prompts_and_budgets(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prompts = [" ".join(WORDS[int(i)] for i in torch.randint(0, 80, (int(n),), generator=g))
               for n in torch.randint(2, 12, (9,), generator=g)]
    budgets = [int(b) for b in torch.randint(2, 7, (9,), generator=g)]
    return prompts, budgets


@pytest.fixture(scope="module")
def meteora(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adapters")
    base = tiny_llama(seed=3)
    dirs = {f"t{i}": save_peft_adapter(base, tmp / f"t{i}", seed=20 + i) for i in range(3)}
    return meteora_with_random_gates(base, dirs, seed=4).eval()


def test_batched_generate_equals_one_prompt_at_a_time_base():
    model, tok = tiny_llama(seed=5), word_tokenizer()
    prompts, budgets = prompts_and_budgets(1)
    batched = greedy_generate(model, tok, prompts, budgets, batch_size=4)
    assert batched == [reference_greedy(model, tok, p, b) for p, b in zip(prompts, budgets)]
    assert any(batched)


def test_batched_generate_equals_one_prompt_at_a_time_meteora(meteora):
    tok = word_tokenizer()
    prompts, budgets = prompts_and_budgets(2)
    batched = greedy_generate(meteora, tok, prompts, budgets, batch_size=5)
    assert batched == [reference_greedy(meteora, tok, p, b) for p, b in zip(prompts, budgets)]


def test_method_decodes_every_task_in_one_pass_and_records_routing(meteora):
    tok = word_tokenizer()
    prompts, _ = prompts_and_budgets(3)
    tests = {t: [{"input": p, "metric": m} for p in prompts[3 * i:3 * i + 3]]
             for i, (t, m) in enumerate(zip(meteora.adapter_names, ["exact_match", "contains", "generation"]))}
    settings = DecodeSettings(batch_size=4, max_prompt_tokens=None,
                              max_new_tokens={"exact_match": 2, "contains": 3, "generation": 5})
    answers, routing = answer_with_routing(meteora, Method("meteora_top2", meteora, tok), tests, settings)
    for task, records in tests.items():
        budget = settings.max_new_tokens[records[0]["metric"]]
        assert answers[task] == [reference_greedy(meteora, tok, r["input"], budget) for r in records]
    assert set(routing["per_task"]) == set(tests) and len(routing["per_prompt"]["count"]) == 9
    assert answer_tests(Method("base", meteora, tok), tests, settings) == answers


def test_every_table1_score_and_claim_gets_an_interval():
    torch.manual_seed(0)
    methods = ["oracle", "lora_b", "meteora_top1"]
    per_task = {m: {t: {"per_example": (100.0 * (torch.rand(30) < 0.5)).tolist()} for t in ("a", "b")} for m in methods}
    results = {"methods": methods, "per_task": per_task, "composite": {}, "routing": None}
    out = intervals_of(results)
    for m in methods:
        ci = out["table1"][m]
        mean = sum(sum(s["per_example"]) / 30 for s in per_task[m].values()) / 2
        assert ci["estimate"] == pytest.approx(mean) and ci["level"] == 0.95
        assert ci["low"] < ci["estimate"] < ci["high"]
        assert set(out["per_task"][m]) == {"a", "b"}
    assert set(out["paired"]) == {"meteora_top1-oracle", "meteora_top1-lora_b"}
    diff = out["paired"]["meteora_top1-oracle"]["estimate"]
    assert diff == pytest.approx(out["table1"]["meteora_top1"]["estimate"] - out["table1"]["oracle"]["estimate"])
