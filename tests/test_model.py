"""MeteoRA on a tiny LLaMA: PEFT is the oracle for one chosen adapter; gates save/load; errors are named."""
import copy
import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from helpers import save_peft_adapter, tiny_llama
from meteora import AdapterError, GateManifestError, attach_meteora, load_adapter_bank, validate_adapter


@pytest.fixture(scope="module")
def base():
    return tiny_llama(seed=11)


@pytest.fixture(scope="module")
def adapter_dirs(base, tmp_path_factory):
    """Three adapters of different ranks; the third uses rsLoRA and adapts only q and v."""
    root = tmp_path_factory.mktemp("adapters")
    return [
        save_peft_adapter(base, root / "task_a", rank=4, alpha=8, seed=1),
        save_peft_adapter(base, root / "task_b", rank=8, alpha=16, seed=2),
        save_peft_adapter(base, root / "task_c", rank=2, alpha=4, seed=3, targets=["q_proj", "v_proj"], use_rslora=True),
    ]


@pytest.fixture()
def input_ids():
    return torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(5))


def peft_logits(base, adapter_dir, input_ids):
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir)).eval()
    with torch.no_grad():
        return model(input_ids).logits


@pytest.mark.parametrize("index", [0, 1, 2])
def test_single_and_oracle_modes_equal_peft(base, adapter_dirs, input_ids, index):
    expected = peft_logits(base, adapter_dirs[index], input_ids)
    meteora = attach_meteora(copy.deepcopy(base), adapter_dirs, top_k=2).eval()
    with torch.no_grad():
        with meteora.single_adapter(index):
            single = meteora(input_ids).logits
        for strategy in ["reference", "loop", "bmm", "fused"]:
            meteora.set_strategy(strategy)
            with meteora.oracle(adapter_dirs[index].name):
                oracle = meteora(input_ids).logits
            assert torch.allclose(oracle, expected, atol=1e-5, rtol=1e-4), strategy
    assert torch.allclose(single, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(expected, base(input_ids).logits, atol=1e-3)  # the adapter does something


@pytest.mark.parametrize("index", [0, 2])
def test_gate_forced_to_one_adapter_equals_peft(base, adapter_dirs, input_ids, index):
    """Zero gates tie every logit; the lowest index wins, so the adapter put first is the one used."""
    order = [adapter_dirs[index]] + [d for i, d in enumerate(adapter_dirs) if i != index]
    meteora = attach_meteora(copy.deepcopy(base), order, top_k=1).eval()
    with torch.no_grad():
        for gate in meteora.gate_parameters():
            gate.zero_()
        got = meteora(input_ids).logits
    assert torch.allclose(got, peft_logits(base, adapter_dirs[index], input_ids), atol=1e-5, rtol=1e-4)


def test_gates_train_alone_and_traces(base, adapter_dirs, input_ids):
    meteora = attach_meteora(copy.deepcopy(base), adapter_dirs, top_k=2)
    trainable = {n for n, p in meteora.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith("gate.weight") for n in trainable)
    assert len(trainable) == 2 * 7  # 2 layers x 7 projections
    meteora.keep_routing(True)
    out = meteora(input_ids, labels=input_ids)
    mask = torch.ones_like(input_ids)
    mask[1, :3] = 0
    task_ids = torch.tensor([0, 2])
    loss = out.loss + 50 * meteora.gate_loss(task_ids, mask)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in meteora.named_parameters() if n in trainable)
    assert all(p.grad is None for n, p in meteora.named_parameters() if n not in trainable)
    trace = meteora.routing_trace()
    assert len(trace) == 14 and all(t.shape == (2, 9, 2) for t in trace.values())
    acc = meteora.routing_accuracy(task_ids, mask)
    assert 0.0 <= acc["overall"] <= 1.0 and sorted(acc["per_layer"]) == [0, 1]
    # The gate loss is the cross-entropy of each gate against the sample's task id, averaged over gates.
    expected = 0.0
    for layer in meteora.meteora_layers().values():
        logits = layer.last_routing.logits.detach()
        valid = mask.bool()
        targets = task_ids[:, None].expand(2, 9)[valid]
        expected += float(torch.nn.functional.cross_entropy(logits[valid], targets))
    assert meteora.gate_loss(task_ids, mask).item() == pytest.approx(expected / 14, rel=1e-5)


def test_generate_and_bf16(base, adapter_dirs):
    meteora = attach_meteora(copy.deepcopy(base).to(torch.bfloat16), adapter_dirs, top_k=2).eval()
    layer = next(iter(meteora.meteora_layers().values()))
    assert layer.lora_a.dtype == torch.bfloat16 and layer.gate.weight.dtype == torch.bfloat16
    out = meteora.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


def test_float32_gates_load_into_bf16_model_only_when_cast(base, adapter_dirs, tmp_path):
    trained = attach_meteora(copy.deepcopy(base), adapter_dirs, top_k=2)
    with torch.no_grad():
        for gate in trained.gate_parameters():
            gate.normal_()
    trained.save_gates(tmp_path / "gates")
    served = attach_meteora(copy.deepcopy(base).to(torch.bfloat16), adapter_dirs, top_k=2)
    with pytest.raises(GateManifestError, match="saved as float32.*cast=True"):
        served.load_gates(tmp_path / "gates")
    served.load_gates(tmp_path / "gates", cast=True)
    for name, layer in served.meteora_layers().items():
        source = trained.meteora_layers()[name].gate.weight
        assert layer.gate.weight.dtype == torch.bfloat16
        assert torch.equal(layer.gate.weight, source.to(torch.bfloat16))


def test_gates_round_trip_and_refuse_other_adapters(base, adapter_dirs, tmp_path):
    meteora = attach_meteora(copy.deepcopy(base), adapter_dirs, top_k=2, temperature=3.0)
    with torch.no_grad():
        for gate in meteora.gate_parameters():
            gate.normal_()
    meteora.save_gates(tmp_path / "gates")
    manifest = json.loads((tmp_path / "gates" / "manifest.json").read_text())
    assert manifest["adapters"] == ["task_a", "task_b", "task_c"] and manifest["top_k"] == 2 and manifest["temperature"] == 3.0
    other = attach_meteora(copy.deepcopy(base), adapter_dirs, top_k=1)
    other.load_gates(tmp_path / "gates")
    assert other.top_k == 2 and other.temperature == 3.0
    for (name, a), b in zip(meteora.meteora_layers().items(), other.meteora_layers().values()):
        assert torch.equal(a.gate.weight, b.gate.weight), name
    reordered = attach_meteora(copy.deepcopy(base), list(reversed(adapter_dirs)))
    with pytest.raises(GateManifestError, match="another order"):
        reordered.load_gates(tmp_path / "gates")
    fewer = attach_meteora(copy.deepcopy(base), adapter_dirs[:2])
    with pytest.raises(GateManifestError, match="trained for adapters"):
        fewer.load_gates(tmp_path / "gates")


def test_bank_pads_ranks_exactly(base, adapter_dirs):
    bank = load_adapter_bank(adapter_dirs, base)
    assert bank.names == ["task_a", "task_b", "task_c"]
    q = bank.modules["model.layers.0.self_attn.q_proj"]
    assert q.lora_a.shape == (3, 8, 32) and q.lora_b.shape == (3, 32, 8)
    assert torch.count_nonzero(q.lora_a[0, 4:]) == 0 and torch.count_nonzero(q.lora_b[2, :, 2:]) == 0
    assert torch.allclose(q.scaling, torch.tensor([2.0, 2.0, 4.0 / 2**0.5]))
    down = bank.modules["model.layers.1.mlp.down_proj"]
    assert torch.count_nonzero(down.lora_a[2]) == 0  # task_c does not adapt down_proj


def test_errors_name_the_folder_and_module(base, adapter_dirs, tmp_path):
    with pytest.raises(AdapterError, match="not a directory"):
        load_adapter_bank([tmp_path / "nowhere"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AdapterError, match="empty: missing adapter_config.json"):
        load_adapter_bank([empty])
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "adapter_config.json").write_text((adapter_dirs[0] / "adapter_config.json").read_text())
    with pytest.raises(AdapterError, match="no_weights: missing adapter_model.safetensors"):
        load_adapter_bank([no_weights])
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text((adapter_dirs[0] / "adapter_config.json").read_text())
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(AdapterError, match="corrupt: adapter_model.safetensors is not a readable safetensors file"):
        load_adapter_bank([corrupt])
    wider = save_peft_adapter(tiny_llama(seed=1, hidden=48), tmp_path / "wider", seed=4)
    with pytest.raises(AdapterError, match=r"wider, module model\.layers\.0\..*another model size"):
        validate_adapter(wider, base)
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "adapter_config.json").write_text((adapter_dirs[0] / "adapter_config.json").read_text())
    state = load_file(str(adapter_dirs[0] / "adapter_model.safetensors"))
    state = {k.replace("layers.1.", "layers.7."): v for k, v in state.items()}
    save_file(state, str(unknown / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="unknown: target module 'model.layers.7"):
        attach_meteora(copy.deepcopy(base), [adapter_dirs[0], unknown])
    with pytest.raises(AdapterError, match="duplicate adapter name 'task_a'"):
        load_adapter_bank([adapter_dirs[0], adapter_dirs[0]])


def test_gate_loss_is_one_cross_entropy_over_all_gates(base, adapter_dirs):
    """The paper's objective: one cross-entropy over every gate's logits concatenated (all gates, all
    non-padding tokens), i.e. the mean over gates and tokens; checked against a float64 loop."""
    meteora = attach_meteora(copy.deepcopy(base), adapter_dirs, top_k=2)
    with torch.no_grad():
        for gate in meteora.gate_parameters():
            gate.normal_(0, 2.0)
    meteora.keep_routing(True)
    input_ids = torch.randint(0, 96, (3, 7), generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(input_ids)
    mask[0, :2] = 0
    mask[2, :5] = 0
    task_ids = torch.tensor([2, 0, 1])
    meteora(input_ids, attention_mask=mask)
    total, count, per_gate = 0.0, 0, {}
    for name, layer in meteora.meteora_layers().items():
        logits = layer.last_routing.logits.detach().double()
        gate_total = 0.0
        for b in range(3):
            for t in range(7):
                if mask[b, t]:
                    gate_total -= float(torch.log_softmax(logits[b, t], -1)[task_ids[b]])
        per_gate[name] = gate_total / int(mask.sum())
        total, count = total + gate_total, count + int(mask.sum())
    loss = meteora.gate_loss(task_ids, mask)
    assert loss.item() == pytest.approx(total / count, rel=1e-5)
    got = meteora.gate_loss_per_gate(task_ids, mask)
    assert got.keys() == per_gate.keys()
    assert all(got[name].item() == pytest.approx(value, rel=1e-5) for name, value in per_gate.items())
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in meteora.gate_parameters())


def _gated_state(meteora):
    return [(layer.forced_adapter, layer.forced_single) for layer in meteora.meteora_layers().values()]


def test_contexts_nest_and_restore_what_they_found(base, adapter_dirs, input_ids):
    meteora = attach_meteora(copy.deepcopy(base), adapter_dirs, top_k=2).eval()
    with torch.no_grad():
        for gate in meteora.gate_parameters():
            gate.normal_()
        gated = meteora(input_ids).logits
        with meteora.single_adapter(1):
            single = meteora(input_ids).logits
            with meteora.oracle(2):
                oracle = meteora(input_ids).logits
                with meteora.single_adapter(0):
                    meteora(input_ids)
                assert torch.equal(meteora(input_ids).logits, oracle)
            assert torch.equal(meteora(input_ids).logits, single)
        assert torch.equal(meteora(input_ids).logits, gated)
        with pytest.raises(RuntimeError, match="inside"), meteora.oracle(0):
            raise RuntimeError("inside")
    assert _gated_state(meteora) == [(None, False)] * 14
    assert not torch.allclose(single, oracle, atol=1e-3) and not torch.allclose(single, gated, atol=1e-3)


def test_a_second_attach_is_refused(base, adapter_dirs):
    model = copy.deepcopy(base)
    meteora = attach_meteora(model, adapter_dirs[:2])
    for target in (model, meteora):
        with pytest.raises(ValueError, match=r"already has MeteoRA attached \(14 layers"):
            attach_meteora(target, adapter_dirs)
    assert meteora.adapter_names == ["task_a", "task_b"] and len(meteora.meteora_layers()) == 14


def _copy_adapter(source, target, config_change=None, state_change=None):
    target.mkdir()
    config = json.loads((source / "adapter_config.json").read_text())
    if config_change:
        config_change(config)
    (target / "adapter_config.json").write_text(json.dumps(config))
    state = load_file(str(source / "adapter_model.safetensors"))
    if state_change:
        state_change(state)
    save_file(state, str(target / "adapter_model.safetensors"))
    return target


Q0_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def test_broken_adapter_folders_are_named(base, adapter_dirs, tmp_path):
    source = adapter_dirs[0]
    bad_json = _copy_adapter(source, tmp_path / "bad_json")
    (bad_json / "adapter_config.json").write_text("{r: 4")
    with pytest.raises(AdapterError, match=r"bad_json: adapter_config\.json is not valid JSON"):
        load_adapter_bank([bad_json])
    a_only = _copy_adapter(source, tmp_path / "a_only", state_change=lambda s: s.pop(Q0_A.replace("lora_A", "lora_B")))
    with pytest.raises(AdapterError, match=r"a_only, module model\.layers\.0\.self_attn\.q_proj: has lora_A but not both"):
        load_adapter_bank([a_only])
    extra = _copy_adapter(source, tmp_path / "extra",
                          state_change=lambda s: s.__setitem__("base_model.model.lm_head.weight", torch.randn(2, 2)))
    with pytest.raises(AdapterError, match=r"extra: unsupported tensor 'base_model\.model\.lm_head\.weight'"):
        load_adapter_bank([extra])
    dora = _copy_adapter(source, tmp_path / "dora", config_change=lambda c: c.update(use_dora=True))
    with pytest.raises(AdapterError, match="dora: DoRA adapters are not supported"):
        load_adapter_bank([dora])
    ia3 = _copy_adapter(source, tmp_path / "ia3", config_change=lambda c: c.update(peft_type="IA3"))
    with pytest.raises(AdapterError, match="ia3: peft_type is 'IA3'"):
        load_adapter_bank([ia3])


def test_adapter_rank_other_than_its_config_is_named(base, adapter_dirs, tmp_path):
    """The scaling is alpha / r with PEFT's r from the config: weights of another rank would be scaled wrongly."""
    wrong_r = _copy_adapter(adapter_dirs[0], tmp_path / "wrong_r", config_change=lambda c: c.update(r=8))
    with pytest.raises(AdapterError, match=r"wrong_r.*adapter_model\.safetensors, module model\.layers\.0\..*rank 4.*r = 8"):
        load_adapter_bank([wrong_r])
    pattern = _copy_adapter(adapter_dirs[0], tmp_path / "pattern", config_change=lambda c: c.update(r=8, rank_pattern=dict.fromkeys(
                               ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 4)))
    assert load_adapter_bank([pattern]).names == ["pattern"]  # rank_pattern gives every module its own r


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_adapter_weights_are_named(base, adapter_dirs, tmp_path, value):
    def poison(state):
        state[Q0_A][1, 2] = value

    bad = _copy_adapter(adapter_dirs[1], tmp_path / "bad", state_change=poison)
    with pytest.raises(AdapterError,
                       match=r"bad.*adapter_model\.safetensors, module model\.layers\.0\.self_attn\.q_proj: lora_A has 1 non-finite"):
        attach_meteora(copy.deepcopy(base), [adapter_dirs[0], bad])
