"""The Triton kernels (run on CPU by Triton's interpreter) against an independent float64 reference.

METEORA_KERNEL_TEST_DEVICE=cuda runs the same tests compiled on a GPU (scripts/gpu_benchmark.sh does).
"""
import os

DEVICE = os.environ.get("METEORA_KERNEL_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process

import pytest  # noqa: E402
import torch  # noqa: E402

from meteora.kernels import dense, fused, fused_moe_lora, kernels_available, triton_mixture  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}

if DEVICE == "cuda":  # compile two configurations (few / many tokens) instead of autotuning every shape
    _configs = fused._route_expand_kernel.configs
    fused._route_expand_kernel.configs = [next(c for c in _configs if c.kwargs["BM"] == 16),
                                          next(c for c in _configs if c.kwargs["BM"] != 16)]


# ----------------------------------------------------------------------------- float64 oracle

def ref_route(logits: torch.Tensor, top_k: int, temperature: float, mode: str):
    """(T, N) float64 logits -> indices (T, k), weights (T, k); lower index wins ties."""
    if mode == "soft":
        num_tokens, num_adapters = logits.shape
        return torch.arange(num_adapters, device=logits.device).expand(num_tokens, num_adapters), torch.softmax(logits / temperature, -1)
    indices = torch.sort(logits, dim=-1, descending=True, stable=True)[1][:, :top_k]
    return indices, ref_weights(logits, indices, temperature, mode)


def ref_weights(logits, indices, temperature, mode):
    """Mixing weights of given chosen adapters, differentiable in logits."""
    if mode == "soft":
        return torch.softmax(logits / temperature, -1)
    if mode == "topk":
        return torch.softmax(logits.gather(1, indices) / temperature, -1)
    return torch.softmax(logits / temperature, -1).gather(1, indices)


def ref_mixture(x, indices, weights, lora_a, lora_b, scaling):
    """sum_j w_j s_j B_j (A_j x) per token, everything in float64."""
    x, lora_a, lora_b, scaling, weights = (t.double() for t in (x, lora_a, lora_b, scaling, weights))
    hidden = torch.einsum("td,tkrd->tkr", x, lora_a[indices])
    out = torch.einsum("tkor,tkr->tko", lora_b[indices], hidden)
    return (out * (weights * scaling[indices])[..., None]).sum(1)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make_inputs(num_tokens, d_in, d_out, num_adapters, rank, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, d_in, generator=gen)
    gate = torch.randn(num_adapters, d_in, generator=gen) / d_in**0.5
    lora_a = torch.randn(num_adapters, rank, d_in, generator=gen) / d_in**0.5
    lora_b = torch.randn(num_adapters, d_out, rank, generator=gen) / rank**0.5
    scaling = torch.rand(num_adapters, generator=gen) + 0.5
    return tuple(t.to(DEVICE, dtype) for t in (x, gate, lora_a, lora_b)) + (scaling.to(DEVICE),)


def dev(*tensors):
    return tuple(t.to(DEVICE) for t in tensors)


# ----------------------------------------------------------------------------- triton_mixture

@pytest.mark.parametrize(
    "num_tokens,d_in,d_out,num_adapters,rank,top_k,dtype",
    [
        (1, 64, 48, 3, 8, 1, torch.float32),
        (9, 100, 72, 7, 5, 2, torch.float32),
        (6, 96, 40, 5, 12, 3, torch.bfloat16),
        (17, 130, 66, 28, 8, 2, torch.bfloat16),
        (2, 64, 20, 3, 64, 2, torch.float32),
    ],
)
def test_triton_mixture_matches_float64(num_tokens, d_in, d_out, num_adapters, rank, top_k, dtype):
    x, _, lora_a, lora_b, scaling = make_inputs(num_tokens, d_in, d_out, num_adapters, rank, dtype)
    indices, weights = dev(torch.stack([torch.randperm(num_adapters)[:top_k] for _ in range(num_tokens)]),
                           torch.softmax(torch.randn(num_tokens, top_k), -1))
    delta = triton_mixture(x, indices, weights, lora_a, lora_b, scaling)
    assert delta.dtype == dtype and delta.shape == (num_tokens, d_out)
    assert rel_err(delta, ref_mixture(x, indices, weights, lora_a, lora_b, scaling)) < TOL[dtype]


def test_triton_mixture_all_tokens_one_adapter():
    x, _, lora_a, lora_b, scaling = make_inputs(11, 80, 56, 6, 7, torch.float32, seed=1)
    indices, weights = dev(torch.full((11, 1), 4), torch.ones(11, 1))
    delta = triton_mixture(x, indices, weights, lora_a, lora_b, scaling)
    expected = scaling[4].double() * (x.double() @ lora_a[4].double().T) @ lora_b[4].double().T
    assert rel_err(delta, expected) < 1e-5


def test_triton_mixture_gradients_match_float64():
    x, _, lora_a, lora_b, scaling = make_inputs(7, 72, 40, 5, 6, torch.float32, seed=2)
    indices, weights, upstream = dev(torch.stack([torch.randperm(5)[:2] for _ in range(7)]),
                                     torch.softmax(torch.randn(7, 2), -1), torch.randn(7, 40))
    x1, w1 = x.clone().requires_grad_(), weights.clone().requires_grad_()
    (triton_mixture(x1, indices, w1, lora_a, lora_b, scaling) * upstream).sum().backward()
    x2, w2 = x.double().requires_grad_(), weights.double().requires_grad_()
    (ref_mixture(x2, indices, w2, lora_a, lora_b, scaling) * upstream.double()).sum().backward()
    assert rel_err(x1.grad, x2.grad) < 1e-5
    assert rel_err(w1.grad, w2.grad) < 1e-5


def test_triton_mixture_refuses_trainable_adapters():
    x, _, lora_a, lora_b, scaling = make_inputs(2, 32, 16, 2, 4, torch.float32)
    with pytest.raises(NotImplementedError, match="lora_a / lora_b"):
        triton_mixture(x, *dev(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1)), lora_a.requires_grad_(), lora_b, scaling)


# ----------------------------------------------------------------------------- fused_moe_lora

@pytest.fixture(params=["gather", "few", "many"])
def regime(request, monkeypatch):
    """Run a test through each few-token Triton kernel (the per-token gather one, for top-k modes; the block
    one) and through the many-token cuBLAS regime."""
    monkeypatch.setattr(fused, "GATHER_TOKENS", 10**9 if request.param == "gather" else 0)
    monkeypatch.setattr(fused, "LARGE_TOKENS", 0 if request.param == "many" else 10**9)
    return request.param


def check_fused_forward(x, gate, lora_a, lora_b, scaling, top_k, temperature, mode, outputs):
    """The routing must be the reference's on the kernel's own logits (exactly), and everything else
    must match float64 to the dtype's tolerance."""
    delta, logits, indices, weights = outputs
    tol = TOL[x.dtype]
    logits64 = x.double() @ gate.double().T
    assert logits.dtype == torch.float32 and rel_err(logits, logits64) < tol
    ref_indices, ref_w = ref_route(logits.double(), top_k, temperature, mode)
    assert torch.equal(indices, ref_indices)
    assert (weights.double() - ref_w).abs().max().item() < 1e-5
    expected = ref_mixture(x, indices, ref_w, lora_a, lora_b, scaling)
    assert delta.dtype == x.dtype and rel_err(delta, expected) < tol


@pytest.mark.parametrize(
    "num_tokens,d_in,d_out,num_adapters,rank,top_k,dtype",
    [
        (1, 520, 72, 7, 5, 2, torch.float32),  # T = 1; d_in split over several programs
        (5, 300, 40, 3, 8, 1, torch.bfloat16),
        (16, 96, 130, 28, 8, 2, torch.float32),
        (40, 130, 66, 6, 12, 3, torch.bfloat16),  # many-token configuration
        (33, 64, 24, 64, 4, 2, torch.float32),  # N = 64
        (3, 64, 32, 3, 64, 2, torch.bfloat16),  # rank 64
    ],
)
def test_fused_topk_matches_float64(num_tokens, d_in, d_out, num_adapters, rank, top_k, dtype, regime):
    args = make_inputs(num_tokens, d_in, d_out, num_adapters, rank, dtype, seed=num_tokens)
    outputs = fused_moe_lora(*args, top_k, 1.0, "topk")
    check_fused_forward(*args, top_k, 1.0, "topk", outputs)


@pytest.mark.parametrize(
    "mode,num_tokens,top_k,temperature",
    [("soft", 3, 1, 1.0), ("soft", 37, 1, 5.0), ("topk_unnormalized", 6, 2, 1.0), ("topk_unnormalized", 35, 3, 2.0), ("topk", 4, 2, 15.0)],
)
def test_fused_other_modes_match_float64(mode, num_tokens, top_k, temperature, regime):
    args = make_inputs(num_tokens, 90, 50, 5, 6, torch.float32, seed=3)
    outputs = fused_moe_lora(*args, top_k, temperature, mode)
    check_fused_forward(*args, top_k, temperature, mode, outputs)


@pytest.mark.parametrize("mode,top_k,dtype", [("topk", 2, torch.float32), ("soft", 1, torch.float32), ("topk", 3, torch.bfloat16)])
def test_fused_mix_reads_column_blocks_of_one_stacked_product(mode, top_k, dtype, regime):
    """The inference path of MeteoRALinear: one product x [W; W_g; A]^T, whose column blocks (strided
    views) are the base output, the gate logits and h; the kernels read them in place."""
    num_tokens, d_in, d_out, num_adapters, rank = 9, 64, 40, 5, 4
    x, gate, lora_a, lora_b, scaling = make_inputs(num_tokens, d_in, d_out, num_adapters, rank, dtype, seed=7)
    (weight,) = dev((torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(8)) / d_in**0.5).to(dtype))
    y = x @ torch.cat([weight, gate, lora_a.reshape(-1, d_in)]).T
    base, gate_logits, hidden = y[:, :d_out], y[:, d_out:d_out + num_adapters], y[:, d_out + num_adapters:]
    assert not gate_logits.is_contiguous() and not hidden.is_contiguous()
    out, logits, indices, weights = fused.fused_mix(gate_logits, hidden, lora_b, scaling, base, top_k, 1.0, mode)
    check_fused_forward(x, gate, lora_a, lora_b, scaling, top_k, 1.0, mode,
                        (out.float().sub(base.float()).to(dtype), logits, indices, weights))


def stacked_layer(num_tokens, d_in, d_out, num_adapters, rank, top_k, dtype, mode="topk", seed=0):
    """A MeteoRALinear on DEVICE (stacked weights, a bias) and an input for it."""
    from meteora import MeteoRALinear

    x, gate, lora_a, lora_b, scaling = make_inputs(num_tokens, d_in, d_out, num_adapters, rank, dtype, seed=seed)
    base = torch.nn.Linear(d_in, d_out).to(DEVICE, dtype)
    layer = MeteoRALinear(base, lora_a, lora_b, scaling, top_k=top_k, mode=mode, temperature=1.5)
    with torch.no_grad():
        layer.gate.weight.copy_(gate)
    assert layer._stack_is_live()
    return layer, x


@pytest.mark.parametrize("mode,top_k,dtype", [("topk", 2, torch.float32), ("soft", 1, torch.float32),
                                              ("topk_unnormalized", 3, torch.bfloat16)])
def test_stacked_mix_matches_the_routed_path(mode, top_k, dtype, regime):
    """MeteoRALinear's eager inference path (StackedMix: the kernels read the stacked product at column
    offsets and write no routing) gives the output of the path that keeps the routing, bit for bit, on
    the first call (through Triton) and on later ones (direct launches on a GPU), and matches float64."""
    layer, x = stacked_layer(11, 64, 40, 5, 4, top_k, dtype, mode, seed=16)
    y = torch.nn.functional.linear(x, layer._stack, layer._stack_bias)
    d_out, nr = 40, 5 * 4
    reference, logits, indices, _ = fused.fused_mix(y[:, d_out + nr:d_out + nr + 5], y[:, d_out:d_out + nr], layer.lora_b,
                                                    layer.scaling, y[:, :d_out], top_k, 1.5, mode)
    for _ in range(2):  # many tokens write into y's base block: a fresh product per call
        product = y.clone()
        out = layer._stacked_mix(product, layer.lora_b_rows, layer.scaling, top_k, 1.5, mode)
        assert out.shape == (11, d_out) and out.dtype == dtype and torch.equal(out, reference)
        in_place = fused.LARGE_TOKENS <= 11
        assert (out.data_ptr() == product.data_ptr()) == in_place and out.is_contiguous() != in_place
    ref_indices, ref_w = ref_route(logits.double(), top_k, 1.5, mode)
    assert torch.equal(indices, ref_indices)
    base64 = x.double() @ layer.base.weight.double().T + layer.base.bias.double()
    expected = base64 + ref_mixture(x, ref_indices, ref_w, layer.lora_a, layer.lora_b, layer.scaling)
    assert rel_err(out, expected) < TOL[dtype]
    if DEVICE == "cuda":  # the layer itself takes this path, and the plan is kept
        with torch.no_grad():
            assert layer._fast_inference(x) and torch.equal(layer(x), reference)
        assert len(layer._stacked_mix._plans) == 1
        layer.keep_routing = True
        assert not layer._fast_inference(x)
    else:
        assert not layer._fast_inference(x)


def test_stacked_mix_keeps_a_plan_of_direct_launches(monkeypatch, regime):
    """After a first launch that yields a compiled kernel, later calls of that shape go through the kept
    plan (the compiled kernel's launch with its constexprs appended), with the first call's output. The
    compiled kernel is stood in for by the interpreter, as on CPU no compiled kernel comes back."""
    layer, x = stacked_layer(7, 48, 24, 4, 4, 2, torch.float32, seed=18)
    y = torch.nn.functional.linear(x, layer._stack, layer._stack_bias)
    real_first_launch, direct = fused._first_launch, []

    def first_launch(kernel, grid, args, constexprs):
        real_first_launch(kernel, grid, args, constexprs)
        tuned = isinstance(kernel, fused.triton.runtime.Autotuner)
        meta = {**constexprs, **kernel.best_config.all_kwargs()} if tuned else constexprs
        tail = ("constexprs",)

        class Compiled:
            def __getitem__(self, dims):
                assert dims == (tuple(grid(meta)) + (1, 1))[:3]

                def run(*launch_args):
                    assert launch_args[-1:] == tail
                    direct.append(dims)
                    (kernel.fn if tuned else kernel)[grid](*launch_args[:-1], **meta)

                return run

        return Compiled(), tail, meta

    monkeypatch.setattr(fused, "_first_launch", first_launch)
    first = layer._stacked_mix(y.clone(), layer.lora_b_rows, layer.scaling, 2, 1.0, "topk")  # many tokens write into y
    assert direct == [] and len(layer._stacked_mix._plans) == 1
    again = layer._stacked_mix(y.clone(), layer.lora_b_rows, layer.scaling, 2, 1.0, "topk")
    assert len(direct) == 1 and torch.equal(again, first)


@pytest.mark.parametrize("mode,top_k,dtype", [("topk", 2, torch.float32), ("soft", 1, torch.float64),
                                              ("topk_unnormalized", 3, torch.bfloat16), ("topk", 1, torch.float64)])
def test_dense_stacked_mix_is_the_routed_path_bit_for_bit(mode, top_k, dtype, monkeypatch):
    """Eager inference off the kernels without the CPU extension (float64 on a GPU; a CPU where it cannot be
    built) reads the one stacked product with dense.dense_stacked_mix: the output of the path that keeps the
    routing (the operator's dense form), the same bits, and the float64 reference within rounding."""
    if DEVICE == "cuda" and dtype != torch.float64:
        pytest.skip("on a GPU these dtypes take StackedMix (tested above)")
    layer, x = stacked_layer(13, 48, 24, 6, 4, top_k, dtype, mode, seed=21)
    monkeypatch.setattr("meteora.kernels.cpu.extension", lambda: None)
    calls = []
    real = dense.dense_stacked_mix
    monkeypatch.setattr("meteora.layer.dense_stacked_mix", lambda *args: calls.append(1) or real(*args))
    with torch.no_grad():
        out = layer(x.view(1, 13, 48))
        assert calls and layer.last_routing is None
        layer.keep_routing = True
        routed = layer(x.view(1, 13, 48))
        assert len(calls) == 1 and layer.last_routing is not None
    assert torch.equal(out, routed)
    r = layer.last_routing
    x64, b64 = x.double(), layer.lora_b.double()
    coef = dense.routing_coef(r.indices.reshape(13, -1), r.weights.reshape(13, -1).double(), layer.scaling.double(), 6,
                              mode == "soft")
    h = (x64 @ layer.lora_a.double().reshape(24, 48).T).view(13, 6, 4)
    base64 = torch.nn.functional.linear(x64, layer.base.weight.double(), layer.base.bias.double())
    want = base64 + torch.einsum("te,ter,edr->td", coef, h, b64)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    assert (out.view(13, 24).double() - want).norm() <= tol * want.norm()


def test_stacked_mix_plans_are_dropped_by_copies_and_moves():
    """Plans hold compiled kernels of one device: a deep copy or a pickle starts without them, and .to()
    clears them."""
    import copy
    import pickle

    layer, _ = stacked_layer(3, 32, 16, 3, 4, 2, torch.float32, seed=17)
    layer._stacked_mix._plans[(3, 2, "topk", torch.float32)] = lambda *args: None  # as a first launch leaves it
    for other in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert other._stacked_mix._plans == {} and other._stack_is_live()
    assert len(layer._stacked_mix._plans) == 1
    layer.to(torch.float64)
    assert layer._stacked_mix._plans == {}


def test_fused_ties_go_to_the_lower_index(regime):
    x, gate, lora_a, lora_b, scaling = make_inputs(8, 64, 32, 6, 4, torch.bfloat16, seed=4)
    gate[2] *= 4
    gate[5] = gate[2]  # adapters 2 and 5 tie on every token
    outputs = fused_moe_lora(x, gate, lora_a, lora_b, scaling, 2, 1.0, "topk")
    logits, indices = outputs[1], outputs[2]
    assert torch.equal(logits[:, 2], logits[:, 5])
    check_fused_forward(x, gate, lora_a, lora_b, scaling, 2, 1.0, "topk", outputs)
    both = (indices == 2).any(1) & (indices == 5).any(1)
    assert both.any() and torch.all(indices[both, 0] == 2) and torch.all(indices[both, 1] == 5)


def test_fused_all_tokens_one_adapter():
    x, gate, lora_a, lora_b, scaling = make_inputs(20, 80, 48, 5, 8, torch.float32, seed=5)
    gate[3] = x.mean(0) * 50  # every token's top-1 is adapter 3
    outputs = fused_moe_lora(x, gate, lora_a, lora_b, scaling, 1, 1.0, "topk")
    assert torch.all(outputs[2] == 3)
    check_fused_forward(x, gate, lora_a, lora_b, scaling, 1, 1.0, "topk", outputs)


def test_fused_adds_base_in_the_epilogue(regime):
    """base (a strided view, as a slice of a wider output) added to delta; base itself left as it was."""
    x, gate, lora_a, lora_b, scaling = make_inputs(6, 64, 40, 4, 4, torch.float32, seed=6)
    (wide,) = dev(torch.randn(6, 56))
    base = wide[:, 8:48]
    kept = base.clone()
    result, *_ = fused_moe_lora(x, gate, lora_a, lora_b, scaling, 2, 1.0, "topk", base=base)
    delta, *_ = fused_moe_lora(x, gate, lora_a, lora_b, scaling, 2, 1.0, "topk")
    assert torch.equal(base, kept) and result.data_ptr() != base.data_ptr()
    assert rel_err(result, kept + delta) < 1e-6


@pytest.mark.parametrize("num_adapters", [5, 7])
def test_fused_nan_logits_pick_adapters_in_range(num_adapters, regime):
    """NaN logits match no maximum; the chosen index must still be below N (N not a power of two)."""
    x, gate, lora_a, lora_b, scaling = make_inputs(4, 32, 16, num_adapters, 4, torch.float32, seed=10)
    x[1, 3] = float("nan")
    _, logits, indices, _ = fused_moe_lora(x, gate, lora_a, lora_b, scaling, 2, 1.0, "topk")
    assert torch.isnan(logits[1]).all()
    assert int(indices.min()) >= 0 and int(indices.max()) < num_adapters


def test_failed_first_launch_never_poisons_the_cache(monkeypatch):
    """A first launch that yields no compiled kernel (as under a tracer) caches nothing; a later one that
    does is cached and then launched directly."""
    monkeypatch.setattr(fused, "INTERPRET", False)
    monkeypatch.setattr(fused, "_COMPILED", {})
    calls = []

    class Compiled:
        def __getitem__(self, grid):
            return lambda *args: calls.append(("direct", grid, args))

    class Param:
        def __init__(self, name, is_constexpr):
            self.name, self.is_constexpr = name, is_constexpr

    class Kernel:
        def __init__(self, results):
            self.results = results
            self.params = [Param("a", False), Param("C", True)]

        def __getitem__(self, grid):
            def launch(*args, **meta):
                calls.append(("triton", args, meta))
                return self.results.pop(0)

            return launch

    kernel = Kernel([None, Compiled()])
    grid = lambda meta: (3,)
    fused._launch(kernel, grid, ("k",), (1,), {"C": 2})
    assert fused._COMPILED == {} and calls[-1][0] == "triton"
    fused._launch(kernel, grid, ("k",), (1,), {"C": 2})
    assert len(fused._COMPILED) == 1 and calls[-1][0] == "triton"
    fused._launch(kernel, grid, ("k",), (5,), {"C": 2})
    assert calls[-1] == ("direct", (3, 1, 1), (5, 2))


@pytest.mark.parametrize("mode,top_k", [("topk", 2), ("soft", 1), ("topk_unnormalized", 2)])
def test_kernels_and_dense_form_agree_with_a_gate_input(mode, top_k, regime):
    """The operator's two implementations, forward and backward, with the gate reading another input."""
    x, gate, lora_a, lora_b, scaling = make_inputs(7, 48, 40, 5, 4, torch.float32, seed=11)
    gate_x, base, g_out, g_logits = dev(*(torch.randn(7, n, generator=torch.Generator().manual_seed(n)) for n in (48, 40, 40, 5)))
    args = (x, gate_x, gate, lora_a, lora_b, scaling, base, top_k, 1.5, mode)
    got, want = fused.fused_forward(*args), dense.dense_forward(*args)
    for name, a, b in zip(("out", "logits", "indices", "weights", "hidden"), got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert torch.equal(a, b) if name == "indices" else rel_err(a, b) < 1e-5, name
    g_weights = dev(torch.randn(got[3].shape, generator=torch.Generator().manual_seed(12)))[0]
    needs = [True] * 5
    common = (x, gate_x, gate, lora_a, lora_b, scaling, got[4], got[1], got[2])
    grads = fused.fused_backward(g_out, g_logits, g_weights, *common, top_k, 1.5, mode, needs)
    expected = dense.dense_backward(g_out, g_logits, g_weights, *common, got[3], 1.5, mode, needs)
    for name, a, b in zip(("x", "gate_x", "gate", "lora_a", "lora_b"), grads, expected):
        assert rel_err(a, b) < 1e-5, name


@pytest.mark.parametrize("mode,top_k", [("topk", 2), ("soft", 1), ("topk_unnormalized", 2)])
def test_fused_gradients_match_float64(mode, top_k, regime):
    """Gradients of x, the gate and both adapters through delta, the logits and the weights."""
    num_tokens, d_in, d_out, num_adapters, rank, temperature = 9, 530, 36, 5, 6, 2.0  # d_in split in two
    x, gate, lora_a, lora_b, scaling = make_inputs(num_tokens, d_in, d_out, num_adapters, rank, torch.float32, seed=7)
    ins = [t.clone().requires_grad_() for t in (x, gate, lora_a, lora_b)]
    delta, logits, indices, weights = fused_moe_lora(*ins, scaling, top_k, temperature, mode)
    gen = torch.Generator().manual_seed(8)
    g_delta, g_logits, g_weights = dev(*(torch.randn(t.shape, generator=gen) for t in (delta, logits, weights)))
    ((delta * g_delta).sum() + (logits * g_logits).sum() + (weights * g_weights).sum()).backward()

    ref = [t.double().requires_grad_() for t in (x, gate, lora_a, lora_b)]
    ref_logits = ref[0] @ ref[1].T
    ref_w = ref_weights(ref_logits, indices, temperature, mode)
    ref_delta = ref_mixture(ref[0], indices, ref_w, ref[2], ref[3], scaling)
    ((ref_delta * g_delta.double()).sum() + (ref_logits * g_logits.double()).sum() + (ref_w * g_weights.double()).sum()).backward()
    for name, got, want in zip(("x", "gate", "lora_a", "lora_b"), ins, ref):
        assert rel_err(got.grad, want.grad) < 1e-5, name


def test_fused_gradients_bf16_gate_only(regime):
    """Gate training in bf16: x and gate gradients within bf16 tolerance; adapters frozen."""
    x, gate, lora_a, lora_b, scaling = make_inputs(24, 96, 64, 7, 8, torch.bfloat16, seed=9)
    x1, g1 = x.clone().requires_grad_(), gate.clone().requires_grad_()
    delta, logits, indices, _ = fused_moe_lora(x1, g1, lora_a, lora_b, scaling, 2, 1.0, "topk")
    upstream, targets = dev(torch.randn(delta.shape).bfloat16(), torch.randint(0, 7, (24,)))
    ((delta.float() * upstream.float()).sum() + 10 * torch.nn.functional.cross_entropy(logits, targets)).backward()
    x2, g2 = x.double().requires_grad_(), gate.double().requires_grad_()
    ref_logits = x2 @ g2.T
    ref_delta = ref_mixture(x2, indices, ref_weights(ref_logits, indices, 1.0, "topk"), lora_a, lora_b, scaling)
    ((ref_delta * upstream.double()).sum() + 10 * torch.nn.functional.cross_entropy(ref_logits, targets)).backward()
    assert rel_err(x1.grad, x2.grad) < 2e-2
    assert rel_err(g1.grad, g2.grad) < 2e-2


def test_kernels_available_and_argument_errors():
    x, gate, lora_a, lora_b, scaling = make_inputs(2, 32, 16, 3, 4, torch.float32)
    assert kernels_available(x) and not kernels_available(x.double())
    with pytest.raises(ValueError, match="top_k=4"):
        fused_moe_lora(x, gate, lora_a, lora_b, scaling, 4)
    with pytest.raises(ValueError, match="routing mode"):
        fused_moe_lora(x, gate, lora_a, lora_b, scaling, 1, mode="dense")
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        fused_moe_lora(x.double(), gate.double(), lora_a.double(), lora_b.double(), scaling, 1)


# ----------------------------------------------------------------------------- the operator on the device

on_gpu = pytest.mark.skipif(DEVICE != "cuda", reason="the operator's CUDA implementation (tests/test_ops.py covers CPU)")


@on_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_on_the_device(dtype):
    x, gate, lora_a, lora_b, scaling = make_inputs(6, 64, 40, 5, 4, dtype, seed=13)
    (base,) = dev(torch.randn(6, 40).to(dtype))
    for args in ((x, None, gate, lora_a, lora_b, scaling, None, 2, 1.0, "topk"),
                 (x, x.flip(0), gate, lora_a, lora_b, scaling, base, 5, 2.0, "soft")):
        args = tuple(a.clone().requires_grad_(i in (0, 2)) if isinstance(a, torch.Tensor) and i != 5 else a for i, a in enumerate(args))
        checks = ("test_schema", "test_faketensor", "test_autograd_registration")
        torch.library.opcheck(torch.ops.meteora.moe_lora.default, args, test_utils=checks)


@on_gpu
def test_float64_through_every_strategy_on_the_device():
    from meteora.ops import moe_lora

    x, gate, lora_a, lora_b, scaling = make_inputs(9, 48, 24, 6, 4, torch.float64, seed=14)
    expected, _ = moe_lora(x.cpu(), gate.cpu(), lora_a.cpu(), lora_b.cpu(), scaling.cpu(), 2, strategy="reference")
    for strategy in ("reference", "loop", "bmm", "triton", "fused", "auto"):
        delta, _ = moe_lora(x, gate, lora_a, lora_b, scaling, 2, strategy=strategy)
        assert delta.dtype == torch.float64 and rel_err(delta.cpu(), expected) < 1e-12, strategy


@on_gpu
def test_compiled_fullgraph_on_the_device_matches_eager():
    """torch.compile (inductor, fullgraph) of the operator on the GPU, forward and the gate's gradient."""
    from meteora.ops import moe_lora

    x, gate, lora_a, lora_b, scaling = make_inputs(12, 64, 48, 5, 4, torch.bfloat16, seed=15)
    (base,) = dev(torch.randn(12, 48).bfloat16())

    def step(gate_w):
        out, routing = moe_lora(x, gate_w, lora_a, lora_b, scaling, 2, out=base)
        return out, (out.float().square().mean() + torch.nn.functional.cross_entropy(routing.logits, routing.indices[:, 0]))

    g1, g2 = gate.clone().requires_grad_(), gate.clone().requires_grad_()
    out, loss = step(g1)
    loss.backward()
    c_out, c_loss = torch.compile(step, fullgraph=True)(g2)
    c_loss.backward()
    assert torch.equal(c_out, out) and rel_err(g2.grad, g1.grad) < 1e-3


