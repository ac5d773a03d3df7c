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
    x, _, lora_a, lora_b, scaling = make_inputs(4, [4], 10, 7, (6,), 7, torch.float64)
    idx = torch.tensor(list(itertools.islice(itertools.cycle([[0, 3], [2, 1]]), 6)))
    w = torch.rand(6, 2, dtype=torch.float64)
    expected = torch.stack(
        [sum(w[t, j] * scaling[i] * lora_b[i] @ lora_a[i] @ x[t] for j, i in enumerate(idx[t].tolist())) for t in range(6)]
    )
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


def op_samples(dtype, n=5, d_in=12, d_out=10, tokens=6):
    """Arguments of torch.ops.meteora.moe_lora: every routing mode, a sentence gate input, a base output."""
    x, gate, lora_a, lora_b, scaling = make_inputs(n, [2, 3], d_in, d_out, (tokens,), 20, dtype)
    scaling = scaling.to(torch.float64 if dtype == torch.float64 else torch.float32)
    gen = torch.Generator().manual_seed(21)
    gate_x, base = torch.randn(tokens, d_in, generator=gen).to(dtype), torch.randn(tokens, d_out, generator=gen).to(dtype)
    yield (x, None, gate, lora_a, lora_b, scaling, None, 2, 1.0, "topk")
    yield (x, gate_x, gate, lora_a, lora_b, scaling, base, n, 2.0, "soft")
    yield (x, None, gate, lora_a, lora_b, scaling, base, n - 1, 0.5, "topk_unnormalized")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_registered_op(dtype):
    """Schema, fake implementation, autograd registration and tracing of the operator (torch.library.opcheck)."""
    for args in op_samples(dtype):
        args = [a.clone().requires_grad_(i in (0, 2, 3, 4, 6)) if isinstance(a, torch.Tensor) else a for i, a in enumerate(args)]
        torch.library.opcheck(torch.ops.meteora.moe_lora.default, tuple(args))


def test_op_gradients_match_float64_autograd():
    """The registered autograd formula (every input and every differentiable output) against autograd through
    the float64 reference, for each routing mode."""
    for args in op_samples(torch.float64, n=4, d_in=5, d_out=4, tokens=3):
        x, gate_x, gate, lora_a, lora_b, scaling, base, top_k, temperature, mode = args
        tensors = [t for t in (x, gate_x, gate, lora_a, lora_b, base) if t is not None]

        def f(*ts, gate_x=gate_x, base=base, scaling=scaling, top_k=top_k, temperature=temperature, mode=mode):
            it = iter(ts)
            x_, gx_, g_, a_, b_ = next(it), next(it) if gate_x is not None else None, next(it), next(it), next(it)
            base_ = next(it) if base is not None else None
            out, logits, _, weights, _ = torch.ops.meteora.moe_lora(x_, gx_, g_, a_, b_, scaling, base_, top_k, temperature, mode)
            return out, logits, weights

        assert torch.autograd.gradcheck(f, tuple(t.clone().requires_grad_() for t in tensors), eps=1e-6, atol=1e-6)


ALL_STRATEGIES = ["reference", "loop", "bmm", "triton", "fused", "auto"]  # triton via TRITON_INTERPRET=1 (conftest)


def test_float64_through_every_strategy():
    """float64 stays float64 in every strategy (the Triton kernels take no float64: the dispatch falls back)."""
    x, gate, lora_a, lora_b, scaling = make_inputs(6, [4, 8], 16, 12, (2, 4), 30, torch.float64)
    expected, _, margins = float64_oracle(x, gate, lora_a, lora_b, scaling, 2, 1.0)
    assert (margins > 1e-9).all()
    for strategy in ALL_STRATEGIES:
        for tokens in (x[:1, :1], x):  # one token and several
            delta, routing = moe_lora(tokens, gate, lora_a, lora_b, scaling, 2, strategy=strategy)
            assert delta.dtype == torch.float64 and routing.weights.dtype == torch.float64, strategy
            assert rel_err(delta, expected[: tokens.shape[0], : tokens.shape[1]]) < 1e-12, strategy


@pytest.mark.parametrize("leading", [(0,), (2, 0)])
def test_zero_tokens_give_empty_results_on_every_strategy(leading):
    x, gate, lora_a, lora_b, scaling = make_inputs(4, [4], 8, 6, leading, 31, torch.float32)
    base = torch.randn(*leading, 6)
    for strategy in ALL_STRATEGIES:
        for mode, top_k in (("topk", 2), ("soft", 4)):
            delta, routing = moe_lora(x, gate, lora_a, lora_b, scaling, top_k, strategy=strategy, mode=mode)
            assert delta.shape == (*leading, 6) and routing.indices.shape == (*leading, top_k), strategy
            out, _ = moe_lora(x, gate, lora_a, lora_b, scaling, top_k, strategy=strategy, mode=mode, out=base)
            assert out.shape == (*leading, 6), strategy
        idx, w = torch.zeros(*leading, 2, dtype=torch.long), torch.ones(*leading, 2)
        assert mix_adapters(x, idx, w, lora_a, lora_b, scaling, strategy).shape == (*leading, 6)


def test_bad_dtypes_and_top_k_are_named():
    x, gate, lora_a, lora_b, scaling = make_inputs(3, [4], 8, 6, (5,), 32, torch.float32)
    with pytest.raises(TypeError, match=r"x .*torch\.int64"):
        moe_lora(torch.randint(0, 5, (5, 8)), gate, lora_a, lora_b, scaling, 1)
    with pytest.raises(TypeError, match=r"x .*torch\.int32"):
        mix_adapters(x.int(), torch.zeros(5, 1, dtype=torch.long), torch.ones(5, 1), lora_a, lora_b, scaling)
    with pytest.raises(TypeError, match="lora_a"):
        moe_lora(x, gate, lora_a.long(), lora_b, scaling, 1)
    with pytest.raises(TypeError, match="top_k"):
        moe_lora(x, gate, lora_a, lora_b, scaling, 1.5)
    with pytest.raises(ValueError, match="out"):
        moe_lora(x, gate, lora_a, lora_b, scaling, 1, out=torch.zeros(5, 7))


def test_layer_checks_at_construction():
    from torch import nn

    from meteora import MeteoRALinear

    _, _, lora_a, lora_b, scaling = make_inputs(3, [4], 8, 6, (1,), 33, torch.float32)
    base = nn.Linear(8, 6)
    with pytest.raises(TypeError, match="top_k"):
        MeteoRALinear(base, lora_a, lora_b, scaling, top_k=1.5)
    with pytest.raises(ValueError, match="strategy"):
        MeteoRALinear(base, lora_a, lora_b, scaling, strategy="magic")
    with pytest.raises(TypeError, match="lora_b"):
        MeteoRALinear(base, lora_a, lora_b.int(), scaling)
    layer = MeteoRALinear(base, lora_a, lora_b, scaling)
    # B is stored once, as the (N r, d_out) matrix the operator multiplies by; lora_b is a view of it.
    assert torch.equal(layer.lora_b, lora_b)
    assert layer.lora_b.permute(0, 2, 1).reshape(-1, 6).data_ptr() == layer.lora_b.data_ptr()


def test_auto_dispatch_table():
    from meteora.ops import AUTO_TABLE, STRATEGIES, AutoRule, auto_strategy, resolve_strategy

    assert all(rule.strategy in STRATEGIES and rule.strategy != "auto" for rule in AUTO_TABLE)
    expected = {("cpu", False, 1): "fused", ("cpu", True, 1): "fused", ("cpu", False, 0): "fused", ("cpu", False, 2): "fused",
                ("cpu", False, 4096): "fused", ("cuda", False, 1): "fused", ("cuda", True, 8192): "fused", ("mps", False, 1): "fused"}
    for device, dtype, grad, tokens in itertools.product(
        ("cpu", "cuda", "mps"), (torch.float32, torch.bfloat16, torch.float16, torch.float64), (False, True), (0, 1, 2, 16, 4096, 8192)
    ):
        strategy = auto_strategy(device, dtype, grad, tokens)
        assert strategy in STRATEGIES and strategy != "auto"
        if (device, grad, tokens) in expected:
            assert strategy == expected[device, grad, tokens], (device, dtype, grad, tokens)
    assert resolve_strategy("auto", torch.zeros(1, 1, 8)) == "fused"
    assert resolve_strategy("auto", torch.zeros(3, 8), grad=True) == "fused"
    assert resolve_strategy("loop", torch.zeros(1, 8)) == "loop"
    table = (AutoRule("cpu", (torch.float64,), None, 0, 10, "reference"), AutoRule("cpu", None, None, 0, None, "loop"))
    assert auto_strategy("cpu", torch.float64, False, 10, table) == "reference"
    assert auto_strategy("cpu", torch.float64, False, 11, table) == "loop"
    with pytest.raises(LookupError, match="cuda"):
        auto_strategy("cuda", torch.float32, False, 1, table)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_mix_op(dtype):
    """The inference half, torch.ops.meteora.moe_lora_mix, from products made by the caller."""
    for x, gate_x, gate, lora_a, lora_b, scaling, base, top_k, temperature, mode in op_samples(dtype):
        gate_logits = (x if gate_x is None else gate_x) @ gate.T
        hidden = x @ lora_a.reshape(-1, x.shape[-1]).T
        torch.library.opcheck(torch.ops.meteora.moe_lora_mix.default,
                              (gate_logits, hidden, lora_b, scaling, base, top_k, temperature, mode))
        grads = [t if t is None else t.clone().requires_grad_() for t in (gate_logits, hidden, lora_b, base)]
        torch.library.opcheck(torch.ops.meteora.moe_lora_mix.default, (*grads[:3], scaling, grads[3], top_k, temperature, mode))


def test_mix_op_gradients_match_float64_autograd():
    """The mix operator's autograd formula (gate logits, h, B and base; every differentiable output) by
    finite differences in float64, for each routing mode."""
    samples = op_samples(torch.float64, n=4, d_in=5, d_out=4, tokens=3)
    for x, gate_x, gate, lora_a, lora_b, scaling, base, top_k, temperature, mode in samples:
        gate_logits = (x if gate_x is None else gate_x) @ gate.T
        hidden = x @ lora_a.reshape(-1, x.shape[-1]).T
        inputs = [gate_logits, hidden, lora_b] + ([base] if base is not None else [])

        def f(g, h, b, *rest, scaling=scaling, top_k=top_k, temperature=temperature, mode=mode):
            out, logits, _, weights = torch.ops.meteora.moe_lora_mix(g, h, b, scaling, rest[0] if rest else None, top_k, temperature, mode)
            return out, logits, weights

        assert torch.autograd.gradcheck(f, tuple(t.clone().requires_grad_() for t in inputs), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("bias", [False, True])
def test_layer_weights_share_one_buffer_and_inference_makes_one_product(bias, monkeypatch):
    """W, W_g and A of MeteoRALinear are views of one buffer (no extra memory) through .double(), deepcopy
    and a replaced parameter (restack); inference through the stacked product gives the float64 answer,
    and the same as the gradient path."""
    import copy

    import meteora.layer
    from meteora import MeteoRALinear

    x, gate, lora_a, lora_b, scaling = make_inputs(6, [4, 8], 24, 40, (3, 5), 30, torch.float32)
    torch.manual_seed(31)
    layer = MeteoRALinear(torch.nn.Linear(24, 40, bias=bias), lora_a, lora_b, scaling, top_k=2, strategy="fused")
    with torch.no_grad():
        layer.gate.weight.copy_(gate)
    base = x.double() @ layer.base.weight.double().T + (layer.base.bias.double() if bias else 0)
    expected = base + float64_oracle(x, gate, lora_a, lora_b, scaling, 2, 1.0)[0]
    mixes = []
    for name in ("moe_lora_mix_op", "dense_stacked_mix"):  # the mixtures read from the stacked product
        real = getattr(meteora.layer, name)
        monkeypatch.setattr(meteora.layer, name, lambda *a, real=real: mixes.append(1) or real(*a))

    def shared(module) -> bool:
        params = [module.base.weight, module.gate.weight, module.lora_a] + ([module.base.bias] if bias else [])
        return len({p.untyped_storage().data_ptr() for p in params[:3]}) == 1 and module._stack_is_live()

    def check(module, dtype, tol, stacked=True) -> torch.Tensor:
        before = len(mixes)
        with torch.no_grad():
            out = module(x.to(dtype))
        assert out.dtype == dtype and rel_err(out, expected) < tol
        assert len(mixes) - before == int(stacked)
        return out

    assert shared(layer)
    out = check(layer, torch.float32, 1e-5)
    with_grad = layer(x)
    assert with_grad.requires_grad and torch.allclose(with_grad, out, atol=1e-5, rtol=1e-5)
    layer.double()
    assert shared(layer) and layer.gate.weight.requires_grad
    check(layer, torch.float64, 1e-12)
    twin = copy.deepcopy(layer)
    assert shared(twin) and twin.base.weight.data_ptr() != layer.base.weight.data_ptr()
    check(twin, torch.float64, 1e-12)
    layer.gate.weight = torch.nn.Parameter(layer.gate.weight.detach().clone())  # no longer a view: three products
    assert not shared(layer)
    check(layer, torch.float64, 1e-12, stacked=False)
    layer.restack()
    assert shared(layer)
    check(layer, torch.float64, 1e-12)
