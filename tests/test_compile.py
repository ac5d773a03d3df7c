"""MeteoRA under torch.compile(fullgraph=True): a tiny LLaMA gives the eager logits and gate gradients.

Backend "aot_eager": it traces forward and backward through the operator's fake implementation and
autograd formula as inductor would, without inductor's C++ compilation (minutes on a CPU).
"""
import pytest
import torch

from helpers import tiny_llama
from meteora import attach_meteora
from meteora.adapters import random_adapter_bank


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def meteora_llama(seed: int, strategy: str):
    model = tiny_llama(seed=seed, hidden=64, layers=2)
    gen = torch.Generator().manual_seed(seed)
    bank = random_adapter_bank(model, num_adapters=5, rank=4, generator=gen)
    meteora = attach_meteora(model, bank, top_k=2, strategy=strategy)
    with torch.no_grad():
        for gate in meteora.gate_parameters():
            gate.normal_(0.0, 0.5, generator=gen)
    return meteora


def test_compiled_fullgraph_matches_eager_logits_and_gate_gradients():
    meteora = meteora_llama(0, "auto")
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    task_ids = torch.tensor([1, 3])
    meteora.keep_routing(True)

    def loss_fn(input_ids):
        logits = meteora(input_ids=input_ids, use_cache=False).logits
        return logits, logits.float().square().mean() + meteora.gate_loss(task_ids)

    logits, loss = loss_fn(ids)
    loss.backward()
    eager_grads = [g.grad.clone() for g in meteora.gate_parameters()]
    meteora.zero_grad(set_to_none=True)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    c_logits, c_loss = compiled(ids)
    c_loss.backward()
    assert torch.allclose(c_logits, logits, atol=1e-5, rtol=1e-5)
    assert torch.allclose(c_loss, loss, atol=1e-6, rtol=1e-5)
    for eager, gate in zip(eager_grads, meteora.gate_parameters()):
        assert gate.grad is not None and eager.abs().sum() > 0
        assert torch.allclose(gate.grad, eager, atol=1e-6, rtol=1e-4)


def test_compiled_decode_without_gradients_matches_eager():
    """Inference (no_grad), as generate runs; the operator is traced without autograd."""
    meteora = meteora_llama(2, "fused")
    ids = torch.randint(0, 96, (1, 3), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        eager = meteora(input_ids=ids, use_cache=False).logits
        compiled = torch.compile(lambda i: meteora(input_ids=i, use_cache=False).logits, fullgraph=True, backend="aot_eager")
        assert torch.allclose(compiled(ids), eager, atol=1e-5, rtol=1e-5)


def _constants(code) -> set:
    """Every constant of a code object and of the code objects nested in it."""
    found = set()
    for const in code.co_consts:
        found |= _constants(const) if hasattr(const, "co_consts") else {const}
    return found


@pytest.mark.parametrize("strategy", ["fused", "bmm"])
def test_inference_calls_write_no_module_attribute(monkeypatch, strategy):
    """With the routing not kept, a forward writes nothing on the layers: eager (counted through
    __setattr__), and compiled (the frame torch.compile made replays no write of ``last_routing``; such a
    side effect would run after every call and void the modules' dict-tag guards). Keeping the routing
    writes it, so the counter does see writes."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from meteora.layer import MeteoRALinear

    meteora = meteora_llama(4, strategy)
    ids = torch.randint(0, 96, (1, 3), generator=torch.Generator().manual_seed(5))
    writes = []
    plain_setattr = MeteoRALinear.__setattr__

    def counting_setattr(self, name, value):
        writes.append(name)
        plain_setattr(self, name, value)

    def step(input_ids):
        return meteora(input_ids=input_ids, use_cache=False).logits

    with torch.no_grad():
        eager = step(ids)
        compiled = torch.compile(step, fullgraph=True, backend="eager")
        assert torch.allclose(compiled(ids), eager, atol=1e-5, rtol=1e-5)
        (entry,) = _debug_get_cache_entry_list(step.__code__)
        assert "last_routing" not in _constants(entry.code)
        monkeypatch.setattr(MeteoRALinear, "__setattr__", counting_setattr)
        assert torch.allclose(step(ids), eager)
        assert writes == []
        meteora.keep_routing(True)
        step(ids)
    assert "last_routing" in writes


def test_compiled_inference_guards_few_layer_attributes():
    """Every attribute the traced forward reads is a guard checked on each call of the compiled model (the
    host time of compiled decode): the inference path reads the stack, B and the routing settings, and
    neither A, the base linear, the gate nor a helper method."""
    meteora = meteora_llama(6, "fused")
    ids = torch.randint(0, 96, (1, 3), generator=torch.Generator().manual_seed(7))

    def step(input_ids):
        return meteora(input_ids=input_ids, use_cache=False).logits

    with torch.no_grad():
        explained = torch._dynamo.explain(step)(ids)
    assert explained.graph_break_count == 0
    marker = "._modules['q_proj']"
    read = {g.name.split(marker, 1)[1] for g in explained.out_guards if marker in g.name}
    assert "._stack" in read and "._parameters['lora_b_rows']" in read  # the guards are those of the layers
    for unwanted in ("lora_a", "_modules['base']", "_modules['gate']", "_fast_inference", "_records_grad", "_keep("):
        assert not any(unwanted in name for name in read), (unwanted, sorted(read))
