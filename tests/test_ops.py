"""Every forward strategy of meteora.ops.moe_lora against an independent float64 computation."""
import itertools
import zlib

import pytest
import torch

from meteora.ops import mix_adapters, moe_lora
from meteora.routing import route

CPU_STRATEGIES = ["reference", "loop", "bmm", "fused", "auto"]


def float64_oracle(x, gate, lora_a, lora_b, scaling, top_k, temperature):
    """Token by token, in float64: logits, the k best (lower index on ties), softmax, sum of w s B A x."""
    x, gate, lora_a, lora_b, scaling = (t.double() for t in (x, gate, lora_a, lora_b, scaling))
    flat = x.reshape(-1, x.shape[-1])
    out, chosen, margins = [], [], []
    for token in flat:
        logits = gate @ token
        order = sorted(range(len(logits)), key=lambda i: (-float(logits[i]), i))
        top = order[:top_k]
        w = torch.softmax(logits[top] / temperature, dim=0)
        out.append(sum(w[j] * scaling[i] * (lora_b[i] @ (lora_a[i] @ token)) for j, i in enumerate(top)))
        chosen.append(top)
        nxt = logits[order[top_k]] if top_k < len(order) else torch.tensor(float("inf"))
        margins.append(float(logits[order[top_k - 1]] - nxt))
    shape = (*x.shape[:-1], lora_b.shape[1])
    return torch.stack(out).reshape(shape), torch.tensor(chosen), torch.tensor(margins)


def make_inputs(n, ranks, d_in, d_out, leading, seed, dtype):
    """Random adapters of mixed ranks, zero-padded to the largest (as the adapter bank stores them)."""
    g = torch.Generator().manual_seed(seed)
    r_max = max(ranks)
    lora_a = torch.zeros(n, r_max, d_in)
    lora_b = torch.zeros(n, d_out, r_max)
    for i in range(n):
        r = ranks[i % len(ranks)]
        lora_a[i, :r] = torch.randn(r, d_in, generator=g) / d_in**0.5
        lora_b[i, :, :r] = torch.randn(d_out, r, generator=g)
    x = torch.randn(*leading, d_in, generator=g)
    gate = torch.randn(n, d_in, generator=g)
    scaling = torch.rand(n, generator=g) + 0.5
    return [t.to(dtype) for t in (x, gate, lora_a, lora_b)] + [scaling]


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12))


CASES = [
    # n, ranks, top_k, d_in, d_out, leading, temperature
    (1, [4], 1, 24, 40, (5,), 1.0),
    (2, [4, 8], 2, 40, 24, (2, 3), 5.0),
    (7, [4, 8, 16], 3, 48, 20, (1,), 300.0),
    (7, [16, 4], 2, 20, 48, (3, 100), 1.0),
    (28, [8, 4, 16], 2, 32, 56, (2, 150), 1.0),
    (28, [8], 1, 56, 32, (7,), 5.0),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"N{c[0]}-k{c[2]}-T{c[6]}-{'x'.join(map(str, c[5]))}")
def test_strategies_match_float64(case, dtype):
    n, ranks, top_k, d_in, d_out, leading, temperature = case
    seed = zlib.crc32(repr((case, dtype)).encode())
    x, gate, lora_a, lora_b, scaling = make_inputs(n, ranks, d_in, d_out, leading, seed, dtype)
    expected, chosen, margins = float64_oracle(x, gate, lora_a, lora_b, scaling, top_k, temperature)
    # Compare on tokens whose routing is not decided by rounding: the k-th and (k+1)-th logits apart.
    clear = margins > (1e-6 if dtype == torch.float32 else 0.25)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for strategy in CPU_STRATEGIES:
        delta, routing = moe_lora(x, gate, lora_a, lora_b, scaling, top_k, temperature, strategy)
        assert delta.shape == (*leading, d_out) and delta.dtype == dtype
        assert routing.indices.shape == (*leading, top_k) and routing.logits.shape == (*leading, n)
        idx = routing.indices.reshape(-1, top_k)
        assert torch.equal(idx[clear].sort(-1).values, chosen[clear].sort(-1).values), strategy
        got = delta.reshape(-1, d_out)[clear]
        assert rel_err(got, expected.reshape(-1, d_out)[clear]) < tol, strategy
        w = routing.weights.reshape(-1, top_k)
        assert torch.allclose(w.sum(-1), torch.ones(w.shape[0]), atol=1e-5)


def test_strategies_agree_on_ties():
    """Duplicated gate rows give exactly equal logits: every strategy picks the lower index."""
    x, gate, lora_a, lora_b, scaling = make_inputs(6, [4], 16, 12, (40,), 1, torch.float32)
    gate[3] = gate[1]
    gate[5] = gate[1]
    routing = route(x @ gate.T, top_k=2)
    first_two = routing.indices
    assert not ((first_two == 3) & (first_two[:, :1] != 1)).any()  # 3 never beats its twin 1
    results = [moe_lora(x, gate, lora_a, lora_b, scaling, 1, strategy=s) for s in CPU_STRATEGIES]
    for delta, r in results[1:]:
        assert torch.equal(r.indices, results[0][1].indices)
        assert torch.allclose(delta, results[0][0], atol=1e-5, rtol=1e-4)
    all_tied = route(torch.zeros(4, 5), top_k=3)
    assert all_tied.indices.tolist() == [[0, 1, 2]] * 4


def test_all_tokens_pick_one_adapter():
    x, gate, lora_a, lora_b, scaling = make_inputs(5, [8], 16, 20, (30,), 2, torch.float32)
    gate = torch.zeros_like(gate)
    gate[2] = x.mean(0) * 50  # adapter 2 wins on every token
    x = x + x.mean(0) * 3
    expected, chosen, _ = float64_oracle(x, gate, lora_a, lora_b, scaling, 1, 1.0)
    assert (chosen[:, 0] == 2).all()
    for strategy in CPU_STRATEGIES:
        delta, _ = moe_lora(x, gate, lora_a, lora_b, scaling, 1, strategy=strategy)
        assert rel_err(delta, expected) < 1e-5


@pytest.mark.parametrize("strategy", ["reference", "loop", "bmm", "fused"])
def test_gradcheck_gate_and_input(strategy):
    x, gate, lora_a, lora_b, scaling = (t.double() for t in make_inputs(4, [2, 3], 6, 5, (3,), 3, torch.float32))
    gate.requires_grad_(True)
    x.requires_grad_(True)

    def f(x_, gate_):
        return moe_lora(x_, gate_, lora_a, lora_b, scaling, 2, 2.0, strategy)[0]

    assert torch.autograd.gradcheck(f, (x, gate), eps=1e-6, atol=1e-6)


def test_soft_and_unnormalized_modes():
    x, gate, lora_a, lora_b, scaling = make_inputs(4, [4], 12, 10, (9,), 4, torch.float64)
    probs = torch.softmax(x @ gate.T / 2.0, -1)
    full = torch.einsum("tn,n,nor,nrd,td->to", probs, scaling.double(), lora_b, lora_a, x)
    soft, routing = moe_lora(x, gate, lora_a, lora_b, scaling, top_k=4, temperature=2.0, mode="soft")
    assert torch.allclose(soft, full) and routing.indices.shape == (9, 4)
    part, routing = moe_lora(x, gate, lora_a, lora_b, scaling, top_k=2, temperature=2.0, mode="topk_unnormalized")
    assert torch.allclose(routing.weights.double(), probs.gather(-1, routing.indices))
    assert (routing.weights.sum(-1) < 1).all()
    keep = torch.zeros_like(probs).scatter(-1, routing.indices, 1.0)
    assert torch.allclose(part, torch.einsum("tn,n,nor,nrd,td->to", probs * keep, scaling.double(), lora_b, lora_a, x))


def test_sentence_gate_input_and_trainable_adapters():
    x, gate, lora_a, lora_b, scaling = make_inputs(3, [4], 8, 6, (2, 5), 5, torch.float64)
    sentence = x.mean(1, keepdim=True).expand_as(x)
    _, routing = moe_lora(x, gate, lora_a, lora_b, scaling, 1, gate_input=sentence)
    assert (routing.indices == routing.indices[:, :1]).all()  # one choice per sequence
    lora_a.requires_grad_(True)
    lora_b.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: moe_lora(x, gate, a, b, scaling, 3, mode="soft")[0], (lora_a, lora_b))


def test_bad_shapes_and_settings_are_named():
    x, gate, lora_a, lora_b, scaling = make_inputs(3, [4], 8, 6, (5,), 6, torch.float32)
    with pytest.raises(ValueError, match="gate_weight"):
        moe_lora(x, gate[:2], lora_a, lora_b, scaling, 1)
    with pytest.raises(ValueError, match="lora_b"):
        moe_lora(x, gate, lora_a, lora_b[:, :, :2], scaling, 1)
    with pytest.raises(ValueError, match="d_in"):
        moe_lora(x[:, :5], gate, lora_a, lora_b, scaling, 1)
    with pytest.raises(ValueError, match="top_k"):
        moe_lora(x, gate, lora_a, lora_b, scaling, 4)
    with pytest.raises(ValueError, match="strategy"):
        moe_lora(x, gate, lora_a, lora_b, scaling, 1, strategy="magic")
    with pytest.raises(ValueError, match="temperature"):
        moe_lora(x, gate, lora_a, lora_b, scaling, 1, temperature=0.0)


def test_mix_adapters_with_given_routing():
    x, gate, lora_a, lora_b, scaling = make_inputs(4, [4], 10, 7, (6,), 7, torch.float64)
    idx = torch.tensor(list(itertools.islice(itertools.cycle([[0, 3], [2, 1]]), 6)))
    w = torch.rand(6, 2, dtype=torch.float64)
    expected = torch.stack([sum(w[t, j] * scaling[i] * lora_b[i] @ lora_a[i] @ x[t] for j, i in enumerate(idx[t].tolist())) for t in range(6)])
    for strategy in ["reference", "loop", "bmm", "fused"]:
        assert torch.allclose(mix_adapters(x, idx, w, lora_a, lora_b, scaling, strategy), expected)


@pytest.mark.parametrize("case", [c for c in CASES if torch.Size(c[5]).numel() <= 10], ids=lambda c: f"N{c[0]}-k{c[2]}")
def test_triton_strategy_through_the_op(case):
    """The op's "triton" strategy (kernels under TRITON_INTERPRET=1, see conftest) against float64."""
    n, ranks, top_k, d_in, d_out, leading, temperature = case
    x, gate, lora_a, lora_b, scaling = make_inputs(n, ranks, d_in, d_out, leading, 99, torch.float32)
    expected, _, _ = float64_oracle(x, gate, lora_a, lora_b, scaling, top_k, temperature)
    delta, _ = moe_lora(x, gate, lora_a, lora_b, scaling, top_k, temperature, "triton")
    assert rel_err(delta, expected) < 1e-5
