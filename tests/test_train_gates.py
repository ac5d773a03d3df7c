"""Gate training on a tiny random LLaMA with tiny PEFT adapters: the loss falls on a learnable routing
task, a NaN loss stops with a clear error keeping the last good state, and a resumed run ends with the
same gates as an uninterrupted one."""

import math

import numpy as np
import pytest
import torch

from helpers import save_peft_adapter, tiny_llama
from meteora import attach_meteora
from stages.train_gates import GateSettings, GateTrainer, batch_schedule
from stages.trainer import IGNORE, CheckpointMismatchError, Encoded, NonFiniteLossError

NUM_TASKS = 3
PAD = 0


def routing_data(seed: int = 0, per_task: int = 24) -> tuple[list[Encoded], list[int]]:
    """Task t's prompts and answers draw their tokens from its own vocabulary band, so a gate can tell
    them apart; the LM loss is on the answers (2-3 tokens)."""
    rng = np.random.default_rng(seed)
    examples, task_ids = [], []
    for task in range(NUM_TASKS):
        low = 4 + 30 * task
        for _ in range(per_task):
            prompt = rng.integers(low, low + 6, size=int(rng.integers(5, 10))).tolist()
            answer = rng.integers(low, low + 6, size=int(rng.integers(2, 4))).tolist()
            examples.append(Encoded(prompt + answer, [IGNORE] * len(prompt) + answer))
            task_ids.append(task)
    return examples, task_ids


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    base = tiny_llama(seed=0)
    root = tmp_path_factory.mktemp("adapters")
    return {f"task{i}": save_peft_adapter(base, root / f"task{i}", seed=10 + i) for i in range(NUM_TASKS)}


def make_trainer(adapter_dirs, checkpoint_dir, log_fn=None, **overrides) -> GateTrainer:
    torch.manual_seed(0)
    model = attach_meteora(tiny_llama(seed=0), adapter_dirs, top_k=2)
    examples, task_ids = routing_data()
    settings = GateSettings(**{"steps": 8, "batch_size": 6, "lr": 0.05, "warmup_ratio": 0.0,
                               "log_every": 1, "checkpoint_every": 2, **overrides})
    return GateTrainer(model, examples, task_ids, settings, checkpoint_dir, pad_id=PAD,
                       fingerprint="test", log_fn=log_fn)


def gates(trainer: GateTrainer) -> dict[str, torch.Tensor]:
    return {n: layer.gate.weight.detach().clone() for n, layer in trainer.model.meteora_layers().items()}


def test_batch_schedule_is_seeded_and_balanced():
    task_ids = [0] * 50 + [1] * 5 + [2] * 5
    a = batch_schedule(task_ids, steps=100, batch_size=6, seed=3)
    assert np.array_equal(a, batch_schedule(task_ids, steps=100, batch_size=6, seed=3))
    counts = np.bincount(np.asarray(task_ids)[a.ravel()], minlength=3) / a.size
    assert np.all(np.abs(counts - 1 / 3) < 0.05)  # balanced although task 0 has 10x the data
    unbalanced = batch_schedule(task_ids, steps=100, batch_size=6, seed=3, balance=False)
    assert np.bincount(np.asarray(task_ids)[unbalanced.ravel()])[0] / unbalanced.size > 0.7


def test_gate_loss_falls_and_routing_is_learned(adapter_dirs, tmp_path):
    trainer = make_trainer(adapter_dirs, tmp_path, steps=40, lr=0.1, checkpoint_every=100)
    history = trainer.fit()
    first = np.mean([h["gate_loss"] for h in history[:3]])
    last = np.mean([h["gate_loss"] for h in history[-5:]])
    assert first > math.log(NUM_TASKS) * 0.8 and last < 0.5 * first
    assert np.mean([h["routing_accuracy"] for h in history[-5:]]) > 0.85
    assert all(math.isfinite(h["lm_loss"]) for h in history)
    assert any(k.startswith("routing_accuracy_layer_") for k in history[-1])


def test_nan_loss_stops_with_clear_error_and_keeps_last_good_state(adapter_dirs, tmp_path, monkeypatch):
    trainer = make_trainer(adapter_dirs, tmp_path)
    real_gate_loss, calls = trainer.model.gate_loss, {"n": 0}

    def failing_gate_loss(*args, **kwargs):
        calls["n"] += 1
        loss = real_gate_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(trainer.model, "gate_loss", failing_gate_loss)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 4 .*step 3"):
        trainer.fit()
    state = torch.load(trainer.checkpoint_path, weights_only=False)
    assert state["step"] == 3
    for name, weight in gates(trainer).items():
        assert torch.isfinite(state["weights"][name]).all()
        assert torch.equal(state["weights"][name], weight)


def test_resume_after_interruption_gives_the_same_gates(adapter_dirs, tmp_path):
    uninterrupted = make_trainer(adapter_dirs, tmp_path / "a")
    uninterrupted.fit()

    def interrupt(metrics, step):
        if step == 5:
            raise KeyboardInterrupt

    first = make_trainer(adapter_dirs, tmp_path / "b", log_fn=interrupt)
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    resumed = make_trainer(adapter_dirs, tmp_path / "b")
    with torch.no_grad():  # fresh gates that differ from the checkpoint's, to prove they get replaced
        for p in resumed.model.gate_parameters():
            p.normal_()
    assert resumed.try_resume() and resumed.step == 4
    resumed.fit()
    expected = gates(uninterrupted)
    for name, weight in gates(resumed).items():
        assert torch.equal(weight, expected[name]), name
    assert [h["step"] for h in resumed.history] == list(range(1, 9))


def test_checkpoint_of_another_configuration_is_refused_not_overwritten(adapter_dirs, tmp_path):
    make_trainer(adapter_dirs, tmp_path).fit()
    path = tmp_path / "checkpoint.pt"
    saved = path.read_bytes()
    other = make_trainer(adapter_dirs, tmp_path)
    other.fingerprint = "different"
    with pytest.raises(CheckpointMismatchError, match="another configuration"):
        other.try_resume()
    assert other.step == 0 and path.read_bytes() == saved
    path.write_bytes(saved[: len(saved) // 2])  # truncated: named, not a bare unpickling error
    with pytest.raises(CheckpointMismatchError, match="cannot read the training checkpoint"):
        make_trainer(adapter_dirs, tmp_path).try_resume()


def test_local_gradient_matches_full_losses_and_learns(adapter_dirs, tmp_path):
    """gradient=local computes the same losses as the paper's full back-propagation (same gates, same
    batch) and its routing is learned too."""
    full = make_trainer(adapter_dirs, tmp_path / "full", steps=1)
    local = make_trainer(adapter_dirs, tmp_path / "local", steps=1, gradient="local")
    full.model.keep_routing(True)
    local.model.keep_routing(True)
    a, b = full.train_step(), local.train_step()
    for key in ("lm_loss", "gate_loss", "routing_accuracy"):
        assert a[key] == pytest.approx(b[key], rel=1e-5), key
    trainer = make_trainer(adapter_dirs, tmp_path / "learn", steps=40, lr=0.1, checkpoint_every=100, gradient="local")
    history = trainer.fit()
    assert np.mean([h["routing_accuracy"] for h in history[-5:]]) > 0.85
    with pytest.raises(ValueError, match="gate.gradient"):
        make_trainer(adapter_dirs, tmp_path / "bad", gradient="none")


def test_bad_loop_settings_name_their_config_keys(adapter_dirs, tmp_path):
    """A batch too small for the micro-batches, or zero steps, is refused naming the settings to change."""
    with pytest.raises(ValueError, match=r"batch of 2 sequences \(gate\.batch_size\).*\(trainer\.gradient_accumulation\)"):
        model = attach_meteora(tiny_llama(seed=0), adapter_dirs, top_k=2)
        examples, task_ids = routing_data()
        GateTrainer(model, examples, task_ids, GateSettings(steps=2, batch_size=2, lr=0.05), tmp_path, pad_id=PAD,
                    gradient_accumulation=4)
    with pytest.raises(ValueError, match=r"gate\.steps=0: training needs at least one step"):
        make_trainer(adapter_dirs, tmp_path, steps=0)


def test_fingerprint_changes_with_the_adapters_and_the_data(tmp_path):
    """A checkpoint is resumed only by the same run: a retrained adapter (other bytes, same settings) or
    other training examples give another fingerprint, the same inputs the same one."""
    from omegaconf import OmegaConf

    from stages.train_gates import fingerprint

    base = tiny_llama(seed=0)
    for i in range(2):
        save_peft_adapter(base, tmp_path / "adapters" / f"task{i}", seed=20 + i)
    cfg = OmegaConf.create({"paths": {"artifacts": str(tmp_path)}, "gate": {"steps": 8}, "meteora": {"top_k": 1},
                            "model": {"name": "tiny"}, "seed": 0})
    tasks = ["task0", "task1"]
    examples, _ = routing_data()
    key = fingerprint(cfg, tasks, examples)
    assert key == fingerprint(cfg, tasks, routing_data()[0])
    assert key != fingerprint(cfg, tasks, examples[1:])
    assert key != fingerprint(cfg, tasks[::-1], examples)
    save_peft_adapter(base, tmp_path / "adapters" / "task1", seed=99)  # retrained: same files, other weights
    assert key != fingerprint(cfg, tasks, examples)


def bpe_tokenizer():
    """A byte-level BPE trained on template-shaped prompts: `[INST]` and `[/INST]` split into several
    tokens, some of which also carry the neighbouring space, as in real tokenizers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [f"[INST] question {i} about things [/INST]\nanswer {i}" for i in range(50)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>")


def test_template_positions_are_the_marker_tokens_also_after_truncation():
    from stages.train_gates import template_positions
    from stages.training import encode

    tokenizer = bpe_tokenizer()
    prompt = "[INST] Some question about things, with more words than the answer [/INST]\n"
    for max_length in (128, 12):  # 12: the prompt loses its start, and [INST] with it
        example = encode(tokenizer, prompt, "the answer", max_length)
        marked = template_positions(tokenizer, prompt, example)
        pieces = [tokenizer.decode([t]) for t in example.input_ids]
        prompt_length = sum(label == IGNORE for label in example.labels)
        assert "".join(pieces[i] for i in marked).replace(" ", "") == \
            ("[INST]" if max_length == 128 else "") + "[/INST]\n"
        others = [p for i, p in enumerate(pieces[:prompt_length]) if i not in marked]
        assert not any("INST" in p or "[" in p for p in others)
        assert max(marked) == prompt_length - 1  # the prompt's closing newline
    with pytest.raises(ValueError, match="not the encoding of its prompt"):
        template_positions(tokenizer, "[INST] another prompt [/INST]\n", example)


@pytest.mark.parametrize("gradient", ["full", "local"])
def test_unlabelled_positions_are_left_out_of_the_gate_cross_entropy(adapter_dirs, tmp_path, gradient):
    """With `unlabelled`, the gate loss is one cross-entropy over every gate's logits at the labelled,
    non-padding tokens only, computed here by hand from the kept routing; the training routing accuracy
    still counts every token."""
    examples, task_ids = routing_data()
    unlabelled = [[0, 1, len(e.input_ids) - 1] for e in examples]
    trainer = make_trainer(adapter_dirs, tmp_path, steps=1, gradient=gradient)
    objective = type(trainer.objective)(trainer.model, task_ids, 50.0, gradient, unlabelled=unlabelled)
    rows = np.array([0, 30, 60, 5])
    from stages.trainer import collate

    batch = collate([examples[i] for i in rows], PAD)
    trainer.model.keep_routing(True)
    _, metrics = objective.loss(batch, rows, {"answer": 1.0, "tokens": 1.0})
    logits, targets = [], []
    for routing in trainer.model._routings().values():
        for j, row in enumerate(rows):
            keep = [t for t in range(len(examples[row].input_ids)) if t not in unlabelled[row]]
            logits.append(routing.logits[j, keep].float())
            targets.append(torch.full((len(keep),), task_ids[row]))
    expected = torch.nn.functional.cross_entropy(torch.cat(logits), torch.cat(targets))
    assert metrics["gate_loss"] == pytest.approx(expected.item(), rel=1e-5)
    everything = trainer.model.routing_accuracy(objective.task_ids[rows], batch["attention_mask"])["overall"]
    assert metrics["routing_accuracy"] == pytest.approx(everything)
    with pytest.raises(ValueError, match="unlabelled positions for 2 examples"):
        type(trainer.objective)(trainer.model, task_ids, 50.0, gradient, unlabelled=unlabelled[:2])


def test_gate_initialisations(adapter_dirs):
    from stages.train_gates import init_gates

    torch.manual_seed(0)
    model = attach_meteora(tiny_llama(seed=0), adapter_dirs, top_k=2)
    before = [p.detach().clone() for p in model.gate_parameters()]
    init_gates(model, "uniform", 0.02)
    assert all(torch.equal(a, b) for a, b in zip(before, model.gate_parameters()))
    init_gates(model, "normal", 0.5)
    weights = torch.cat([p.detach().flatten() for p in model.gate_parameters()])
    assert abs(weights.std().item() - 0.5) < 0.05 and abs(weights.mean().item()) < 0.05
    init_gates(model, "zeros", 0.02)
    assert all(not p.any() for p in model.gate_parameters())
    with pytest.raises(ValueError, match="gate.init='xavier'"):
        init_gates(model, "xavier", 0.02)
