"""MoV / MoLoRA (issue 6): (IA)3, mixtures of (IA)3 vectors and of LoRAs, routing inputs, training.

Oracles: the frozen base model, PEFT's own (IA)3 and LoRA, materialised float64 mixtures, torch's
gradcheck, and an explicit loop for the sentence mean.
"""
from __future__ import annotations

import copy

import pytest
import torch
from peft import IA3Config, LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from meteora.ia3 import IA3Linear, MoVLinear
from meteora.methods import LORA_TARGETS, MixtureConfig, apply_method, count_trainable, expert_layers
from meteora.molora import MoLoRALinear
from meteora.ops import lora_delta, moe_lora
from meteora.router_input import CausalMean, SequenceContext

VOCAB = 48


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, init: float = 0.02) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, initializer_range=init,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def tokens(batch: int = 3, steps: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, steps), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def randomize(params, seed: int = 2, scale: float = 0.5) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(1 + scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


# ---------------------------------------------------------------- (IA)3 and MoV


def test_ia3_all_ones_is_the_base_model_exactly():
    base = tiny_llama()
    ids = tokens()
    model = apply_method(copy.deepcopy(base), MixtureConfig(kind="ia3"))
    assert len([m for m in model.modules() if isinstance(m, IA3Linear)]) == 6
    assert torch.equal(logits(model, ids), logits(base, ids))


def test_ia3_matches_peft_ia3():
    base = tiny_llama()
    ids = tokens()
    ours = apply_method(copy.deepcopy(base), MixtureConfig(kind="ia3"))
    peft = get_peft_model(
        copy.deepcopy(base), IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    )
    randomize(m.ia3_l for m in ours.modules() if isinstance(m, IA3Linear))
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in peft.named_modules() if hasattr(m, "ia3_l")}
    for name, layer in ours.named_modules():
        if isinstance(layer, IA3Linear):
            with torch.no_grad():
                peft_layers[name].ia3_l["default"].copy_(layer.ia3_l.view_as(peft_layers[name].ia3_l["default"]))
    torch.testing.assert_close(logits(ours, ids), logits(peft, ids), rtol=1e-5, atol=1e-6)


def test_mov_with_one_expert_is_ia3():
    base = tiny_llama()
    ids = tokens()
    ia3 = apply_method(copy.deepcopy(base), MixtureConfig(kind="ia3"))
    randomize(m.ia3_l for m in ia3.modules() if isinstance(m, IA3Linear))
    mov = copy.deepcopy(base)
    for name, module in list(mov.named_modules()):
        if name in dict(ia3.named_modules()) and isinstance(ia3.get_submodule(name), IA3Linear):
            ref = ia3.get_submodule(name)
            layer = MoVLinear(module, ref.site, num_experts=1)
            with torch.no_grad():
                layer.vectors.copy_(ref.ia3_l[None])
            parent, _, child = name.rpartition(".")
            setattr(mov.get_submodule(parent), child, layer)
    torch.testing.assert_close(logits(mov, ids), logits(ia3, ids), rtol=0, atol=0)


class OneHot(nn.Module):
    """A router whose softmax is exactly one-hot on `expert` (the other logits underflow)."""

    def __init__(self, num_experts: int, expert: int) -> None:
        super().__init__()
        self.register_buffer("logits", torch.zeros(num_experts).index_fill(0, torch.tensor(expert), 1e4))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(*h.shape[:-1], -1)


@pytest.mark.parametrize("site", ["input", "output"])
def test_mov_one_hot_router_is_that_expert_alone(site):
    torch.manual_seed(3)
    base = nn.Linear(12, 10)
    mov = MoVLinear(base, site, num_experts=4)
    randomize([mov.vectors])
    mov.router = OneHot(4, expert=2)
    ia3 = IA3Linear(base, site)
    with torch.no_grad():
        ia3.ia3_l.copy_(mov.vectors[2])
    x = torch.randn(2, 5, 12)
    torch.testing.assert_close(mov(x), ia3(x), rtol=0, atol=0)


def test_mov_matches_a_materialised_float64_mixture():
    torch.manual_seed(4)
    base = nn.Linear(12, 10).double()
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    for mode, top_k in [("soft", 4), ("topk_unnormalized", 2)]:
        mov = MoVLinear(base, "output", num_experts=4, mode=mode, top_k=top_k)
        randomize([mov.vectors])
        h = base(x)
        probs = torch.softmax(h @ mov.router.weight.T, dim=-1)
        if mode != "soft":
            kth = probs.topk(top_k, dim=-1).values[..., -1:]
            probs = probs * (probs >= kth)
        expected = h * torch.einsum("bte,ed->btd", probs, mov.vectors)
        torch.testing.assert_close(mov(x), expected)


# ---------------------------------------------------------------- MoLoRA


def test_molora_with_one_expert_matches_peft_lora():
    base = tiny_llama(dtype=torch.float64)
    ids = tokens()
    ours = apply_method(copy.deepcopy(base), MixtureConfig(kind="lora", num_experts=1, rank=4, alpha=16))
    peft = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, target_modules=list(LORA_TARGETS))
    )
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in peft.named_modules() if hasattr(m, "lora_A")}
    gen = torch.Generator().manual_seed(5)
    layers = [(n, m) for n, m in ours.named_modules() if isinstance(m, MoLoRALinear)]
    assert len(layers) == 14
    for name, layer in layers:
        with torch.no_grad():
            layer.lora_b.copy_(0.3 * torch.randn(layer.lora_b.shape, generator=gen, dtype=torch.float64))
            peft_layers[name].lora_A["default"].weight.copy_(layer.lora_a[0])
            peft_layers[name].lora_B["default"].weight.copy_(layer.lora_b[0])
    assert not torch.allclose(logits(ours, ids), logits(base, ids))
    torch.testing.assert_close(logits(ours, ids), logits(peft, ids))


def test_molora_starts_as_the_base_model_and_counts_its_parameters():
    base = tiny_llama()
    ids = tokens()
    model = apply_method(copy.deepcopy(base), MixtureConfig(kind="lora", num_experts=3, rank=4))
    torch.testing.assert_close(logits(model, ids), logits(base, ids), rtol=0, atol=0)
    d = {"q_proj": (32, 32), "k_proj": (32, 16), "v_proj": (32, 16), "o_proj": (32, 32),
         "gate_proj": (32, 48), "up_proj": (32, 48), "down_proj": (48, 32)}
    per_layer = sum(3 * 4 * (i + o) + 3 * i for i, o in d.values())
    counts = count_trainable(model)
    assert counts["trainable"] == 2 * per_layer
    assert counts["total"] == sum(p.numel() for p in base.parameters()) + counts["trainable"]


def test_molora_op_one_hot_gate_input_is_that_expert_alone():
    torch.manual_seed(6)
    experts, rank, d_in, d_out = 4, 3, 8, 6
    x = torch.randn(5, d_in)
    lora_a, lora_b = torch.randn(experts, rank, d_in), torch.randn(experts, d_out, rank)
    gate = torch.zeros(experts, d_in)
    gate[1, 0] = 1.0
    gate_input = torch.zeros(5, d_in)
    gate_input[:, 0] = 1e4
    delta, routing = moe_lora(x, gate, lora_a, lora_b, 2.0, experts, mode="soft", gate_input=gate_input)
    torch.testing.assert_close(routing.weights, torch.eye(experts)[[1] * 5])
    torch.testing.assert_close(delta, lora_delta(x, lora_a[1], lora_b[1], 2.0))


def _materialised(x, gate, lora_a, lora_b, scaling, mode, top_k):
    """Every expert on every token (T, E, d_out) in float64, weighted by the paper's routing."""
    probs = torch.softmax(x @ gate.T, dim=-1)
    if mode != "soft":
        kth = probs.topk(top_k, dim=-1).values[..., -1:]
        probs = probs * (probs >= kth)
    hidden = torch.einsum("td,erd->ter", x, lora_a)
    per_expert = torch.einsum("ter,eor->teo", hidden, lora_b)
    return scaling * torch.einsum("te,teo->to", probs, per_expert)


@pytest.mark.parametrize("mode,top_k", [("soft", 4), ("topk_unnormalized", 2)])
def test_molora_op_matches_float64_and_gradcheck(mode, top_k):
    torch.manual_seed(7)
    experts, rank, d_in, d_out = 4, 3, 6, 5
    x = torch.randn(7, d_in, dtype=torch.float64, requires_grad=True)
    gate = torch.randn(experts, d_in, dtype=torch.float64, requires_grad=True)
    lora_a = torch.randn(experts, rank, d_in, dtype=torch.float64, requires_grad=True)
    lora_b = torch.randn(experts, d_out, rank, dtype=torch.float64, requires_grad=True)

    def op(x, gate, lora_a, lora_b):
        return moe_lora(x, gate, lora_a, lora_b, 4.0, top_k, strategy="fused", mode=mode)[0]

    # route() computes the routing weights in float32 even for float64 inputs: float32-level tolerances
    # wherever the routing moves (forward, d/dx, d/dgate); the experts' gradients are exact float64.
    expected = _materialised(x, gate, lora_a, lora_b, 4.0, mode, top_k)
    torch.testing.assert_close(op(x, gate, lora_a, lora_b), expected, rtol=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(lambda a, b: op(x, gate, a, b), (lora_a, lora_b))
    assert torch.autograd.gradcheck(lambda x_, g: op(x_, g, lora_a, lora_b), (x, gate), eps=1e-3, atol=1e-3, rtol=1e-3)


# ---------------------------------------------------------------- sentence routing


def test_causal_mean_skips_padding_and_matches_a_loop():
    context = SequenceContext()
    context.attention_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    h = torch.randn(2, 5, 4, dtype=torch.float64)
    out = CausalMean(context)(h)
    for b in range(2):
        for t in range(5):
            keep = [s for s in range(t + 1) if context.attention_mask[b, s]]
            expected = h[b, keep].mean(0) if keep else torch.zeros(4, dtype=torch.float64)
            torch.testing.assert_close(out[b, t], expected)


@pytest.mark.parametrize("kind", ["ia3", "lora"])
def test_sentence_routing_is_causal_and_cached_decoding_agrees(kind):
    model = apply_method(tiny_llama(), MixtureConfig(kind=kind, num_experts=3, router_input="sentence"))
    randomize([p for n, p in model.named_parameters() if n.endswith(("vectors", "lora_b"))], scale=0.3)
    ids = tokens(batch=2, steps=6)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    full = logits(model, ids, mask)
    with torch.no_grad():
        past = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True).past_key_values
        step = model(input_ids=ids[:, -1:], attention_mask=mask, past_key_values=past).logits
    torch.testing.assert_close(step[:, -1], full[:, -1], rtol=1e-5, atol=1e-5)
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % VOCAB  # the last token cannot move earlier routings
    torch.testing.assert_close(logits(model, changed, mask)[:, :-1], full[:, :-1], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- the configuration space


def test_config_labels_counts_and_errors():
    assert MixtureConfig(kind="ia3", num_experts=10).label == "MoV-10"
    assert MixtureConfig(kind="lora", num_experts=5, routing="top2", router_input="sentence").label == "MoLoRA-5 top-2, sentence"
    assert MixtureConfig(kind="lora").label == "LoRA (r=4)"
    assert MixtureConfig(kind="lora", num_experts=4, routing="top2").mode == "topk_unnormalized"
    assert MixtureConfig(kind="lora", num_experts=4, routing="top2", renormalize=True).mode == "topk"
    with pytest.raises(ValueError, match="num_experts=2"):
        MixtureConfig(kind="ia3", num_experts=2, routing="top3")
    with pytest.raises(ValueError, match="routing"):
        MixtureConfig(routing="hard")
    with pytest.raises(ValueError, match="bogus"):
        MixtureConfig.from_dict({"kind": "ia3", "bogus": 1})
    base = tiny_llama()
    ia3 = count_trainable(apply_method(copy.deepcopy(base), MixtureConfig(kind="ia3")))
    assert ia3["trainable"] == 2 * (16 + 16 + 48)
    mov = apply_method(copy.deepcopy(base), MixtureConfig(kind="ia3", num_experts=5))
    assert count_trainable(mov)["trainable"] == 2 * 5 * 2 * (16 + 16 + 48)  # vectors + routers
    assert len(expert_layers(mov)) == 6
    with pytest.raises(ValueError, match="targets"):
        apply_method(copy.deepcopy(base), MixtureConfig(kind="lora", targets=("nope",)))


def test_pretrained_adapters_are_meteora(tmp_path):
    from meteora import MeteoRAModel

    base = tiny_llama()
    folders = []
    for i in range(2):
        torch.manual_seed(10 + i)
        peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=list(LORA_TARGETS)))
        peft.save_pretrained(tmp_path / f"task{i}")
        folders.append(str(tmp_path / f"task{i}"))
    config = MixtureConfig(kind="lora", adapters=tuple(folders), routing="top1", renormalize=True)
    assert config.num_experts == 2 and config.label == "MeteoRA top-1"
    model = apply_method(copy.deepcopy(base), config)
    assert isinstance(model, MeteoRAModel)
    gates = sum(2 * i for i in (32, 32, 32, 32, 32, 32, 48)) * 2
    assert count_trainable(model)["trainable"] == gates
    with pytest.raises(ValueError, match="router_input"):
        apply_method(copy.deepcopy(base), MixtureConfig(kind="lora", adapters=tuple(folders), router_input="sentence"))


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("config", [
    MixtureConfig(kind="ia3", num_experts=2),
    MixtureConfig(kind="lora", num_experts=2, rank=2),
], ids=["mov2", "molora2"])
def test_tiny_llama_learns_two_synthetic_tasks(config):
    """Task t's sequences draw their tokens from its own third of the vocabulary, announced by a task
    token (0 or 1); the base is frozen, only experts and routers learn."""
    model = apply_method(tiny_llama(init=0.3), config).train()  # wide enough logits to learn with
    gen = torch.Generator().manual_seed(9)
    third = VOCAB // 3

    def batch(size: int = 16, steps: int = 10) -> torch.Tensor:
        task = torch.randint(0, 2, (size, 1), generator=gen)
        return torch.cat([task, third * (task + 1) + torch.randint(0, third, (size, steps - 1), generator=gen)], 1)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=0.1)
    fixed = batch(64)
    with torch.no_grad():
        before = model(input_ids=fixed, labels=fixed).loss.item()
    for _ in range(30):
        ids = batch()
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = model(input_ids=fixed, labels=fixed).loss.item()
    assert after < 0.9 * before, (before, after)
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.endswith("base.weight"))


# ---------------------------------------------------------------- the stage's rank classification


class CharTokenizer:
    """One token per character (ids 2..VOCAB-1), EOS 1, pad 0: enough for the stage's scoring code."""

    eos_token, eos_token_id, pad_token_id = "", 1, 0

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [2 + ord(c) % (VOCAB - 2) for c in text]}


@pytest.mark.parametrize("router_input", ["token", "sentence"])
def test_rank_classification_with_a_shared_prompt_cache_matches_full_sequences(router_input):
    from stages.mov import choice_loglikelihoods

    model = apply_method(tiny_llama(), MixtureConfig(kind="ia3", num_experts=3, router_input=router_input))
    randomize([p for n, p in model.named_parameters() if n.endswith("vectors")], scale=0.3)
    tok = CharTokenizer()
    prompt, choices = "which one?", ["ab", "c", "defg"]
    scored = choice_loglikelihoods(model, tok, prompt, choices, max_prompt_tokens=8)
    prompt_ids = tok(prompt)["input_ids"][-8:]
    for (loglik, n), choice in zip(scored, choices):
        ids = torch.tensor([prompt_ids + tok(choice)["input_ids"]])
        logprobs = torch.log_softmax(logits(model, ids)[0], -1)
        expected = sum(logprobs[len(prompt_ids) - 1 + j, ids[0, len(prompt_ids) + j]] for j in range(n))
        assert n == len(choice)
        assert loglik == pytest.approx(expected.item(), abs=1e-4)


def test_mov_report_writes_the_table_and_figures(tmp_path):
    from stages.mov_report import write_mov_report

    def entry(name, config, score, routing=None):
        return {"name": name, "label": MixtureConfig.from_dict(config).label if config else "Base (zero-shot)",
                "config": MixtureConfig.from_dict(config).to_dict() if config else None, "percent": 0.1, "trainable": 10,
                "heldout_average": score, "heldout": {"t2": {"score": score, "top_prediction_share": 100.0}},
                "train_average": 50.0, "routing": routing}

    results = {
        "model": "tiny", "train_tasks": ["t1"], "heldout_tasks": ["t2"], "heldout_baselines": {"t2": {"chance": 50.0, "majority": 60.0}},
        "train": {"steps": 1, "batch_size": 1, "max_length": 8}, "eval": {"max_test_per_task": 4},
        "methods": [entry("base", None, 40.0), entry("ia3", {"kind": "ia3"}, 45.0),
                    entry("mov2", {"kind": "ia3", "num_experts": 2}, 50.0,
                          {"module": "model.layers.1.mlp.down_proj", "per_task": {"t1": [0.3, 0.7], "t2": [0.6, 0.4]}}),
                    entry("mov2_top1", {"kind": "ia3", "num_experts": 2, "routing": "top1"}, 47.0)],
    }
    results["methods"][2]["routing"]["per_block"] = {"blocks": [0, 1], "modules": ["down_proj"], "load": [[0.5, 0.5], [0.9, 0.1]],
                                                     "top1": [[0.5, 0.5], [1.0, 0.0]], "entropy": [0.69, 0.3]}
    results["comparisons"] = [{"a": "mov2", "b": "ia3", "label": "MoV-2 - (IA)3", "estimate": 5.0, "low": 1.0, "high": 9.0,
                               "excludes_zero": True}]
    results["methods"][2]["heldout_interval"] = {"estimate": 50.0, "low": 40.0, "high": 60.0, "level": 0.95}
    paths = write_mov_report(results, tmp_path / "tables", tmp_path / "figures", tag="x")
    assert [p.name for p in paths] == ["mov_table1_x.md", "mov_experts_x.png", "mov_routing_x.png", "mov_specialisation_x.png",
                                       "mov_blocks_x.png"]
    table = paths[0].read_text()
    assert "| MoV-2 | 0.10 | 10 | 50.0 [40.0, 60.0] | 50.00 | 1 / 1 | 50.00 | — |" in table and "(uniform guess)" in table
    assert "| MoV-2 - (IA)3 | 5.00 | 1.00 | 9.00 | yes |" in table
    assert "| MoV-2 | 2 | 0.99545 |" in table or "| MoV-2 | 2 |" in table
    assert all(p.stat().st_size > 1000 for p in paths[1:])


# ---------------------------------------------------------------- batched scoring, router losses, statistics


@pytest.mark.parametrize("router_input", ["token", "sentence"])
def test_batched_rank_classification_matches_the_shared_prompt_cache(router_input):
    from stages.mov import batched_loglikelihoods, choice_loglikelihoods

    model = apply_method(tiny_llama(), MixtureConfig(kind="lora", num_experts=3, rank=2, router_input=router_input))
    randomize([p for n, p in model.named_parameters() if n.endswith("lora_b")], scale=0.3)
    tok = CharTokenizer()
    records = [{"input": "which one?", "choices": ["ab", "c", "defg"]}, {"input": "no", "choices": ["yes", "x"]},
               {"input": "a longer prompt here", "choices": ["q", "rs"]}]
    batched = batched_loglikelihoods(model, tok, records, max_prompt_tokens=12, batch_tokens=40)
    for record, got in zip(records, batched):
        expected = choice_loglikelihoods(model, tok, record["input"], record["choices"], max_prompt_tokens=12)
        assert [n for _, n in got] == [n for _, n in expected]
        assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in expected], abs=1e-4)


def test_router_losses_values_and_gradients():
    from meteora.router_input import RouterLoss, load_balancing_loss, router_z_loss

    logits = torch.randn(3, 5, 4, dtype=torch.float64)
    assert router_z_loss(logits).item() == pytest.approx(torch.logsumexp(logits, -1).pow(2).mean().item(), rel=1e-6)
    assert load_balancing_loss(torch.eye(4) * 50).item() == pytest.approx(1.0, abs=1e-6)  # one token per expert
    assert load_balancing_loss(torch.zeros(6, 4).index_fill(1, torch.tensor([2]), 50.0)).item() == pytest.approx(4.0, abs=1e-6)
    torch.manual_seed(5)
    base = nn.Linear(6, 6)
    x = torch.randn(2, 7, 6)
    plain = MoVLinear(base, "output", num_experts=4).train()
    regularised = copy.deepcopy(plain)
    regularised.router_loss = RouterLoss(z_loss=0.1, balance=0.2)
    out = regularised(x)
    torch.testing.assert_close(out, plain(x), rtol=0, atol=0)  # the forward value is unchanged
    out.square().sum().backward()
    logits = plain.router(base(x))
    (plain.mix(base(x)).square().sum() + RouterLoss(z_loss=0.1, balance=0.2).value(logits)).backward()
    torch.testing.assert_close(regularised.router.weight.grad, plain.router.weight.grad)
    assert regularised.router_loss.last.item() > 0


def test_molora_sentence_routing_and_router_options():
    torch.manual_seed(6)
    base = tiny_llama()
    config = MixtureConfig(kind="lora", num_experts=3, rank=2, router_input="sentence", router_init_scale=0.5,
                           router_z_loss=1e-2)
    model = apply_method(copy.deepcopy(base), config)
    fresh = apply_method(copy.deepcopy(base), MixtureConfig(kind="lora", num_experts=3, rank=2, router_input="sentence"))
    layer = next(m for m in model.modules() if isinstance(m, MoLoRALinear))
    ref = next(m for m in fresh.modules() if isinstance(m, MoLoRALinear))
    assert layer.gate.weight.abs().max() <= 0.5 * (1 / 32 ** 0.5) + 1e-6 and ref.gate.weight.abs().max() > layer.gate.weight.abs().max()
    randomize([layer.lora_b], scale=0.3)
    context = SequenceContext()
    layer.sentence_mean.context = context
    x = torch.randn(2, 5, layer.base.in_features)
    mean = torch.cumsum(x, 1) / torch.arange(1, 6)[None, :, None]
    delta, _ = moe_lora(x, layer.gate.weight, layer.lora_a, layer.lora_b, layer.scaling, 3, mode="soft", strategy="reference",
                        gate_input=mean)
    torch.testing.assert_close(layer.eval()(x), layer.base(x) + delta, rtol=1e-5, atol=1e-6)
    assert "router init x0.5" in config.label and "z-loss 0.01" in config.label


def test_full_fine_tuning_trains_every_weight():
    model = apply_method(tiny_llama(), MixtureConfig(kind="full"))
    assert count_trainable(model)["percent"] == 100.0
    assert MixtureConfig(kind="full").label == "Full fine-tuning"
    with pytest.raises(ValueError, match="no experts"):
        MixtureConfig(kind="full", num_experts=2)


def test_routing_recorder_per_block_load_and_entropy():
    from stages.mov import RoutingRecorder, routed_layers

    model = apply_method(tiny_llama(), MixtureConfig(kind="ia3", num_experts=3))
    layers = routed_layers(model)
    recorder = RoutingRecorder(model, layers)
    ids, mask = tokens(2, 6), torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    name = "model.layers.1.mlp.down_proj"
    layer = layers[name]
    seen = {}

    def keep(module, args, output) -> None:
        seen.setdefault("logits", module.last_routing.logits)

    layer.register_forward_hook(keep)
    with recorder.recording("t"):
        logits(model, ids, mask)
    result = recorder.result(name)
    probs = torch.softmax(seen["logits"].float(), -1)[mask.bool()]
    torch.testing.assert_close(torch.tensor(result["per_task"]["t"]), probs.mean(0))
    assert result["per_block"]["blocks"] == [0, 1]
    for load, entropy in zip(result["per_block"]["load"], result["per_block"]["entropy"]):
        assert sum(load) == pytest.approx(1.0, abs=1e-5) and 0 <= entropy <= torch.log(torch.tensor(3.0)).item() + 1e-6


def test_baselines_comparisons_and_merge(tmp_path):
    from stages.common import read_json, write_json
    from stages.mov import choice_baselines, comparisons, merge

    records = [{"task": "t", "choices": ["a", "b"], "targets": [g]} for g in "aab"] + \
              [{"task": "t", "choices": ["b", "a"], "targets": ["a"]}]
    assert choice_baselines(records) == {"chance": 50.0, "majority": 75.0, "majority_position": 50.0}
    varied = [{"task": "t", "choices": [f"x{i}", f"y{i}", f"z{i}"], "targets": [f"y{i}"]} for i in range(4)]
    assert choice_baselines(varied) == {"chance": pytest.approx(100 / 3), "majority": None, "majority_position": 100.0}
    gen = torch.Generator().manual_seed(7)

    def method(name, p):
        scores = (100.0 * (torch.rand(60, generator=gen) < p)).tolist()
        return {"name": name, "label": name.upper(), "heldout": {"t": {"score": sum(scores) / 60, "per_example": scores}}}

    methods = [method("a", 0.9), method("b", 0.2)]
    (diff,) = comparisons(methods, [["a", "b"], ["a", "missing"]])
    assert diff["excludes_zero"] and diff["low"] <= diff["estimate"] <= diff["high"]
    assert diff["estimate"] == pytest.approx(methods[0]["heldout"]["t"]["score"] - methods[1]["heldout"]["t"]["score"])
    common = {"heldout_tasks": ["t"], "train": {"steps": 1}, "method_order": ["base", "a", "b"], "comparison_pairs": [["a", "b"]]}
    write_json(tmp_path / "1.json", {**common, "methods": [methods[1]], "run": {"device": "x"}})
    write_json(tmp_path / "2.json", {**common, "methods": [methods[0]], "run": {"device": "y"}})
    merged = read_json(merge(tmp_path / "m.json", [tmp_path / "1.json", tmp_path / "2.json"]))
    assert [m["name"] for m in merged["methods"]] == ["a", "b"] and merged["comparisons"][0]["estimate"] == diff["estimate"]
