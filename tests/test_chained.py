"""Chained composite-n on a tiny model: batched chained decoding equals a plain greedy loop over each
sample's growing history (full forward, argmax, no cache, no padding), for the base model, MeteoRA and
the per-segment PEFT oracle; the per-segment routing equals a count over each chain's own forward; each
sub-answer is scored on its own task."""

import copy

import pytest
import torch

from helpers import WORDS, meteora_with_random_gates, reference_greedy_ids, save_peft_adapter, tiny_llama, word_tokenizer
from stages.answers import Method
from stages.chained import Chain, answer_chained, chain_questions, chain_routing, chained_generate, score_chains
from stages.evaluate import intervals_of

SEPARATOR = " w0 "


def random_questions(seed: int, samples: int = 5, segments: int = 3) -> list[list[str]]:
    g = torch.Generator().manual_seed(seed)
    return [[" ".join(WORDS[int(i)] for i in torch.randint(1, 80, (int(n),), generator=g))
             for n in torch.randint(2, 9, (segments,), generator=g)] for _ in range(samples)]


def reference_chain(model, tok, questions: list[str], budgets: list[int], models: list | None = None) -> Chain:
    """One sample alone: each segment's question joins the history, then the greedy answer (cut at EOS);
    segment i answered by `models[i]` when given."""
    chain = Chain()
    for i, (q, budget) in enumerate(zip(questions, budgets)):
        start = len(chain.ids)
        chain.ids += tok(q if i == 0 else SEPARATOR + q, add_special_tokens=False)["input_ids"]
        new = reference_greedy_ids(models[i] if models else model, chain.ids, budget, tok.eos_token_id)
        new = new[:-1] if new and new[-1] == tok.eos_token_id else new
        answer_start = len(chain.ids)
        chain.ids += new
        chain.spans.append((start, answer_start, len(chain.ids)))
        chain.answers.append(tok.decode(new, skip_special_tokens=True))
    return chain


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chained")
    base = tiny_llama(seed=7)
    return base, {f"t{i}": save_peft_adapter(base, tmp / f"t{i}", seed=40 + i) for i in range(3)}


@pytest.fixture(scope="module")
def meteora(adapters):
    base, dirs = adapters
    return meteora_with_random_gates(base, dirs, seed=8).eval()


def test_batched_chains_equal_one_sample_at_a_time_base():
    model, tok = tiny_llama(seed=9).eval(), word_tokenizer()
    questions, budgets = random_questions(1), [3, 5, 2]
    chains = chained_generate(model, tok, questions, budgets, batch_size=2, separator=SEPARATOR)
    expected = [reference_chain(model, tok, q, budgets) for q in questions]
    assert [c.answers for c in chains] == [c.answers for c in expected]
    assert [(c.ids, c.spans) for c in chains] == [(c.ids, c.spans) for c in expected]
    assert any(a for c in chains for a in c.answers)
    for chain, q in zip(chains, questions):  # each span holds its question, then its answer
        for i, (start, answer_start, _) in enumerate(chain.spans):
            assert tok.decode(chain.ids[start:answer_start]).split()[-len(q[i].split()):] == q[i].split()


def test_batched_chains_equal_one_sample_at_a_time_meteora(meteora):
    tok = word_tokenizer()
    questions, budgets = random_questions(2, samples=4), [4, 2, 3]
    chains = chained_generate(meteora, tok, questions, budgets, batch_size=3, separator=SEPARATOR)
    assert [c.ids for c in chains] == [reference_chain(meteora, tok, q, budgets).ids for q in questions]


def peft_with_all(base, dirs):
    from peft import PeftModel

    names = list(dirs)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(dirs[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(str(dirs[name]), adapter_name=name)
    return peft_model.eval()


def merged_copy(base, adapter_dir):
    """An independent single-adapter model: PEFT's merge_and_unload on a fresh copy of the base."""
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir)).merge_and_unload().eval()


def test_oracle_answers_each_segment_with_its_own_adapter(adapters):
    base, dirs = adapters
    names = list(dirs)
    peft_model = peft_with_all(base, dirs)
    tok = word_tokenizer()
    questions = random_questions(3, samples=3)
    records = [{"tasks": names, "metrics": ["exact_match", "contains", "generation"], "questions": q} for q in questions]
    budgets = {"exact_match": 2, "contains": 3, "generation": 4}
    chains = answer_chained(Method("oracle", peft_model, tok, oracle=True), records, budgets, 2, SEPARATOR)
    singles = [merged_copy(base, dirs[n]) for n in names]
    expected = [reference_chain(None, tok, q, [2, 3, 4], models=singles) for q in questions]
    assert [c.ids for c in chains] == [c.ids for c in expected]
    plain = [reference_chain(base.eval(), tok, q, [2, 3, 4]) for q in questions]  # the adapters matter here
    assert [c.ids for c in plain] != [c.ids for c in expected]


def test_merged_adapter_is_peft_and_restores_the_base_exactly(adapters):
    """While merged, the PEFT model's logits are the adapter's (unmerged, float64 check); afterwards every
    base weight is bit for bit what it was, and the other adapters answer as before."""
    from stages.answers import merged_adapter

    base, dirs = adapters
    names = list(dirs)
    peft_model = peft_with_all(base, dirs)
    ids = torch.randint(1, 80, (2, 9), generator=torch.Generator().manual_seed(5))
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    with torch.no_grad():
        peft_model.set_adapter(names[1])
        unmerged = peft_model(input_ids=ids).logits
        with merged_adapter(peft_model, names[1]):
            merged = peft_model(input_ids=ids).logits
        peft_model.set_adapter(names[0])
        other = peft_model(input_ids=ids).logits
    assert torch.allclose(merged, unmerged, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(merged, other, atol=1e-3)
    assert all(torch.equal(p, before[n]) for n, p in peft_model.named_parameters())
    with torch.no_grad():
        assert torch.equal(peft_model(input_ids=ids).logits, other)


def test_segment_routing_counts_each_chains_own_tokens(meteora):
    tok = word_tokenizer()
    questions, budgets = random_questions(4, samples=5), [3, 4, 2]
    chains = chained_generate(meteora, tok, questions, budgets, batch_size=5, separator=SEPARATOR)
    tasks = list(meteora.adapter_names)
    records = [{"tasks": tasks} for _ in chains]
    got = chain_routing(meteora, tok, records, chains, batch_size=3, trace_index=1)
    expected: dict[str, list[float]] = {t: [] for t in tasks}
    meteora.keep_routing(True)
    with torch.no_grad():
        for chain in chains:  # alone, no padding: count the modules' top-1 votes of every token
            meteora(input_ids=torch.tensor([chain.ids]))
            votes = torch.stack([idx[0, :, 0] for idx in meteora.routing_trace().values()])  # (M, T)
            majority = [max(range(len(tasks)), key=lambda a: (int((votes[:, t] == a).sum()), -a))
                        for t in range(len(chain.ids))]
            for label, (q, _, end) in enumerate(chain.spans):
                expected[tasks[label]].append(sum(m == label for m in majority[q:end]) / (end - q))
    meteora.keep_routing(False)
    for task in tasks:
        assert got["per_sample_segment"][task] == pytest.approx(expected[task], abs=1e-6)
        assert got["segment"][task] == pytest.approx(sum(expected[task]) / len(expected[task]))
    trace = got["trace"]
    assert len(trace["tokens"]) == len(trace["share"]) == len(trace["top1"]) == len(chains[1].ids)
    assert [b["position"] for b in trace["boundaries"]] == [q for q, _, _ in chains[1].spans]
    assert trace["answers"] == chains[1].answers


def test_each_sub_answer_is_scored_on_its_own_task():
    records = [
        {"tasks": ["a", "b", "c"], "metrics": ["exact_match", "contains", "generation"],
         "targets": ["yes", "red", "the cat sat"], "targets_all": [["yes"], ["red", "crimson"], ["the cat sat"]]},
        {"tasks": ["a", "b", "c"], "metrics": ["exact_match", "contains", "generation"],
         "targets": ["no", "blue", "a dog ran"], "targets_all": [["no"], ["blue"], ["a dog ran"]]},
    ]
    chains = [Chain(answers=["yes", "it is crimson", "the cat sat"]), Chain(answers=["yes", "green", "a dog"])]
    scores = score_chains(records, chains)
    assert scores["subtasks"]["a"]["per_example"] == [100.0, 0.0]
    assert scores["subtasks"]["b"]["per_example"] == [100.0, 0.0]
    assert scores["subtasks"]["c"]["per_example"][0] == pytest.approx(100.0)
    assert 0.0 < scores["subtasks"]["c"]["per_example"][1] < 100.0
    assert scores["average"] == pytest.approx(sum(s["score"] for s in scores["subtasks"].values()) / 3)


def test_chained_sets_without_questions_are_named():
    with pytest.raises(ValueError, match="composite-3.*no 'questions'.*build_datasets"):
        chain_questions([{"name": "composite-3", "input": "x"}])


def test_chained_averages_and_differences_get_intervals():
    torch.manual_seed(1)

    def method() -> dict:
        return {"subtasks": {t: {"per_example": (100.0 * (torch.rand(12) < 0.5)).tolist()} for t in ("a", "b")}}

    chained = {"composite-3": {"tasks": ["a", "b"], **{m: method() for m in ("meteora", "oracle", "lora_b", "base")}}}
    out = intervals_of({"methods": [], "per_task": {}, "composite": {}, "chained": chained, "routing": None})
    cis = out["chained"]["composite-3"]
    assert set(cis) == {"meteora", "oracle", "lora_b", "base", "meteora-lora_b", "meteora-base", "meteora-oracle"}
    per_sample = [sum(v) / 2 for v in zip(*(s["per_example"] for s in chained["composite-3"]["meteora"]["subtasks"].values()))]
    assert cis["meteora"]["estimate"] == pytest.approx(sum(per_sample) / 12)
    assert cis["meteora-lora_b"]["estimate"] == pytest.approx(cis["meteora"]["estimate"] - cis["lora_b"]["estimate"])


def test_oracle_answers_each_task_with_its_own_adapter(adapters):
    """Table 1's oracle: every task's prompts decoded by that task's adapter (merged), the batch indices
    reported into the one list of all prompts."""
    from stages.answers import DecodeSettings, answer_tests
    from stages.generation import greedy_generate

    base, dirs = adapters
    tok = word_tokenizer()
    tests = {name: [{"input": " ".join(q), "metric": "generation"} for q in random_questions(10 + i, samples=3)]
             for i, name in enumerate(dirs)}
    seen: list[int] = []
    out = answer_tests(Method("oracle", peft_with_all(base, dirs), tok, oracle=True), tests,
                       DecodeSettings(2, None, {"generation": 4}), on_batch=seen.extend)
    for name, records in tests.items():
        assert out[name] == greedy_generate(merged_copy(base, dirs[name]), tok, [r["input"] for r in records], 4)
    assert sorted(seen) == list(range(9)) and any(a for v in out.values() for a in v)
