"""The CPU mixture extension (meteora/kernels/cpu_mix.cpp) against a float64 oracle: routing (ties, -inf and
NaN logits), every dtype and mode, a token's output independent of its batch, its use by MeteoRALinear and
the operator, and what happens when it cannot be built."""
import pytest
import torch

from meteora import MeteoRALinear
from meteora.kernels import cpu
from meteora.kernels.dense import dense_stacked_mix
from meteora.routing import route_unchecked

EXT = cpu.extension()
pytestmark = pytest.mark.skipif(EXT is None, reason="the CPU extension could not be built here")
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


def stacked_product(num_tokens, d_out, num_adapters, rank, dtype, seed, logits=None):
    """A random y (T, S) laid out as MeteoRALinear's stacked product (base | h | logits | padding), with the
    given gate logits if any, plus B rows (N, r, d_out) and scaling (N,)."""
    gen = torch.Generator().manual_seed(seed)
    width = d_out + num_adapters * rank + num_adapters + 3
    y = torch.randn(num_tokens, width, generator=gen)
    if logits is not None:
        y[:, d_out + num_adapters * rank:d_out + num_adapters * (rank + 1)] = logits
    b_rows = torch.randn(num_adapters, rank, d_out, generator=gen) / rank**0.5
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    scaling = (torch.rand(num_adapters, generator=gen) + 0.5).to(acc)
    return y.to(dtype), b_rows.to(dtype), scaling


def oracle(y, b_rows, scaling, top_k, temperature, mode):
    """float64 out = base + (coef * h) B_flat with the routing of y's own logits (rounded as y holds them)."""
    num_adapters, rank, d_out = b_rows.shape
    y64 = y.double()
    logits = y64[:, d_out + num_adapters * rank:d_out + num_adapters * (rank + 1)]
    routing = route_unchecked(logits, top_k, temperature, mode)
    coef = torch.zeros_like(logits).scatter_(1, routing.indices, routing.weights) * scaling.double()
    h = y64[:, d_out:d_out + num_adapters * rank].view(-1, num_adapters, rank)
    return y64[:, :d_out] + torch.einsum("te,ter,erd->td", coef, h, b_rows.double())


def rel_err(out, want):
    return ((out.double() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode,top_k,temperature", [("topk", 2, 1.0), ("topk", 3, 0.7), ("soft", 1, 1.5),
                                                    ("topk_unnormalized", 2, 1.0), ("topk_unnormalized", 1, 2.0)])
def test_extension_matches_float64(dtype, mode, top_k, temperature):
    """B read in either layout, (N, r, d_out) rows or a permuted (N, d_out, r) (in place at one token, copied
    at 9: more choices than adapters), or copied from any other layout."""
    rows = lambda b: b
    permuted = lambda b: b.transpose(1, 2).contiguous().transpose(1, 2)
    other = lambda b: torch.cat([b, b], dim=1)[:, :b.shape[1]]
    for num_tokens, seed, layout in ((1, 1, rows), (9, 2, rows), (1, 3, permuted), (9, 4, permuted), (5, 5, other)):
        y, b_rows, scaling = stacked_product(num_tokens, 40, 7, 4, dtype, seed)
        out = EXT.stacked_mix(y, layout(b_rows), scaling, top_k, temperature, cpu.MODES[mode])
        assert out.dtype == dtype and out.shape == (num_tokens, 40)
        assert rel_err(out, oracle(y, b_rows, scaling, top_k, temperature, mode)) < TOL[dtype]


@pytest.mark.parametrize("mode", ["topk", "soft"])
def test_a_tokens_output_does_not_depend_on_its_batch(mode):
    """Each token is routed and mixed on its own: the same bits alone, in a batch of 70 and in another order
    (sharded evaluation relies on it)."""
    y, b_rows, scaling = stacked_product(70, 40, 7, 4, torch.bfloat16, 3)
    batch = EXT.stacked_mix(y, b_rows, scaling, 2, 1.0, cpu.MODES[mode])
    order = torch.randperm(70, generator=torch.Generator().manual_seed(4))
    assert torch.equal(EXT.stacked_mix(y[order], b_rows, scaling, 2, 1.0, cpu.MODES[mode]), batch[order])
    for t in (0, 33, 69):
        assert torch.equal(EXT.stacked_mix(y[t:t + 1], b_rows, scaling, 2, 1.0, cpu.MODES[mode]), batch[t:t + 1])


def test_extension_routes_ties_and_infinities_as_torch():
    """Equal logits go to the lower index and a -inf logit gets weight 0 (chosen only where fewer than k finite
    ones are left): the oracle's (torch's) routing on the same logits. Each adapter's B differs, so a wrong
    choice shows in the output."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(12, 6, generator=gen).round()  # integers: ties in most rows
    logits[0] = torch.tensor([1.0, 3.0, 3.0, 3.0, 0.0, -1.0])
    logits[1, 2] = float("-inf")
    logits[2, :5] = float("-inf")
    for mode, top_k in (("topk", 2), ("topk_unnormalized", 3), ("topk", 1)):
        y, b_rows, scaling = stacked_product(12, 24, 6, 3, torch.float32, 6, logits)
        out = EXT.stacked_mix(y, b_rows, scaling, top_k, 1.0, cpu.MODES[mode])
        assert rel_err(out, oracle(y, b_rows, scaling, top_k, 1.0, mode)) < 1e-5


def test_extension_nan_logits_give_the_torch_forms_nans():
    """A NaN gate logit has no order: its token's output is NaN in the extension as in the torch-operation
    form, and the other tokens are unaffected."""
    logits = torch.randn(5, 6, generator=torch.Generator().manual_seed(7))
    logits[2, 3] = float("nan")
    y, b_rows, scaling = stacked_product(5, 24, 6, 3, torch.float32, 8, logits)
    want = dense_stacked_mix(y, b_rows, scaling, 2, 1.0, "topk")
    out = EXT.stacked_mix(y, b_rows, scaling, 2, 1.0, cpu.MODES["topk"])
    assert torch.equal(out.isnan(), want.isnan()) and out[2].isnan().all()
    assert torch.allclose(out[[0, 1, 3, 4]], want[[0, 1, 3, 4]], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode,top_k", [("topk", 2), ("soft", 1), ("topk_unnormalized", 3)])
@pytest.mark.parametrize("with_base", [True, False])
def test_routed_mix_returns_torchs_routing(mode, top_k, with_base):
    """The operator's CPU forward (dense_mix through the extension) returns torch's routing of the same
    logits (the chosen adapters exactly, the weights within float32 rounding, the logits as float32) and the
    float64 output, from strided inputs (column blocks of one product, a transposed base) with and without a
    base."""
    from meteora.kernels.dense import dense_mix

    for num_tokens in (3, 66):
        y, b_rows, scaling = stacked_product(num_tokens, 20, 6, 4, torch.float32, num_tokens)
        base, hidden, gate_logits = y[:, :20], y[:, 20:44], y[:, 44:50]
        if with_base:
            base = base.T.contiguous().T  # unit row stride: copied to rows inside
        out, logits, indices, weights = dense_mix(gate_logits, hidden, b_rows.permute(0, 2, 1), scaling,
                                                  base if with_base else None, top_k, 1.3, mode)
        want = route_unchecked(gate_logits.float(), top_k, 1.3, mode)
        assert torch.equal(logits, want.logits) and torch.equal(indices, want.indices.contiguous())
        assert weights.dtype == torch.float32 and torch.allclose(weights, want.weights, rtol=1e-6, atol=1e-7)
        expected = oracle(y, b_rows, scaling, top_k, 1.3, mode)
        if not with_base:
            expected = expected - y[:, :20].double()
        assert rel_err(out, expected) < 1e-5


def test_extension_rejects_inputs_it_cannot_read():
    y, b_rows, scaling = stacked_product(4, 24, 6, 3, torch.float32, 9)
    with pytest.raises(ValueError, match=r"too few columns for lora_b_rows \[6, 3, 24\]"):
        EXT.stacked_mix(y[:, :30], b_rows, scaling, 2, 1.0, 0)
    with pytest.raises(ValueError, match="not the CPU tensors"):  # h of 5 adapters for the B of 6
        EXT.routed_mix(y[:, 42:48], y[:, 24:39], None, b_rows, scaling, 2, 1.0, 0)
    with pytest.raises(ValueError, match="not the CPU tensors"):
        EXT.routed_mix(y[:, 42:48], y[:, 24:42].double(), None, b_rows, scaling, 2, 1.0, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_cpu_inference_calls_the_extension(dtype, monkeypatch):
    """MeteoRALinear's eager CPU inference goes through the extension and gives the path that keeps the
    routing (the operator, also through the extension), bit for bit."""
    calls = []
    real = cpu.stacked_mix
    monkeypatch.setattr(cpu, "stacked_mix", lambda *a: calls.append(1) or real(*a))
    gen = torch.Generator().manual_seed(10)
    lora_a, lora_b = torch.randn(5, 4, 32, generator=gen) / 6, torch.randn(5, 24, 4, generator=gen) / 2
    layer = MeteoRALinear(torch.nn.Linear(32, 24), lora_a, lora_b, torch.rand(5, generator=gen) + 0.5, top_k=2).to(dtype)
    for num_tokens in (1, 3, 69):
        x = torch.randn(1, num_tokens, 32, generator=gen).to(dtype)
        with torch.no_grad():
            layer.keep_routing = False
            out = layer(x)
            layer.keep_routing = True
            routed = layer(x)
        assert torch.equal(out, routed)  # the same computation on the same product
    assert len(calls) == 3


def test_a_failed_build_warns_and_the_layer_uses_torch_operations(monkeypatch):
    """Without a compiler the extension is None, with a warning that gives the reason; the layers then take
    the torch-operation form. METEORA_CPU_EXTENSION=0 turns it off without building."""
    import torch.utils.cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")

    cpu.extension.cache_clear()
    try:
        monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
        with pytest.warns(UserWarning, match="no C\\+\\+ compiler here"):
            assert cpu.extension() is None
        layer = MeteoRALinear(torch.nn.Linear(16, 8), torch.randn(3, 2, 16), torch.randn(3, 8, 2), torch.ones(3), top_k=1)
        with torch.no_grad():
            out = layer(torch.randn(4, 16))
        assert out.shape == (4, 8) and out.isfinite().all()
        cpu.extension.cache_clear()
        monkeypatch.setenv("METEORA_CPU_EXTENSION", "0")
        assert cpu.extension() is None
    finally:
        cpu.extension.cache_clear()
