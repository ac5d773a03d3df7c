"""The shared LoRA trainer: answer-only loss (vs the HF `labels=` loss), label masking, resuming an
interrupted run from its checkpoint (same weights as an uninterrupted run), the NaN check."""

from __future__ import annotations

import random

import pytest
import torch

from helpers import tiny_llama
from stages import trainer as loop
from stages import training
from stages.objectives import answer_loss
from stages.trainer import IGNORE, CheckpointMismatchError, Encoded, NonFiniteLossError, collate
from stages.training import TrainSettings, train_lora, with_lora

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]}


def random_data(n: int, seed: int) -> list[Encoded]:
    rng = random.Random(seed)
    data = []
    for _ in range(n):
        prompt = [rng.randrange(96) for _ in range(rng.randint(3, 12))]
        answer = [rng.randrange(96) for _ in range(rng.randint(1, 5))]
        data.append(Encoded(prompt + answer, [IGNORE] * len(prompt) + answer))
    return data


def test_answer_loss_equals_hf_loss():
    model = tiny_llama(seed=1)
    batch = collate(random_data(5, seed=2), pad_id=0)
    expected = model(**batch).loss
    assert torch.allclose(answer_loss(model, batch), expected, rtol=1e-5, atol=1e-6)


class FakeTokenizer:
    eos_token_id = 7

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 50 + 10 for c in text]}


def test_encode_masks_prompt_and_keeps_its_end():
    enc = training.encode(FakeTokenizer(), "abcdefghij", "xyz", max_length=8)
    assert len(enc.input_ids) == 8 and enc.input_ids[-1] == 7
    assert enc.labels == [IGNORE] * 4 + enc.input_ids[4:]
    assert enc.input_ids[:4] == FakeTokenizer()("ghij")["input_ids"]  # the prompt's last tokens


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def test_interrupted_training_resumes_to_the_same_weights(tmp_path, monkeypatch):
    data = random_data(12, seed=3)
    settings = TrainSettings(steps=6, batch_size=3, lr=5e-3, warmup_steps=2, checkpoint_every=2, seed=0)

    straight = with_lora(tiny_llama(seed=4), LORA, seed=0)
    stats = train_lora(straight, data, settings, pad_id=0, checkpoint_dir=tmp_path / "a")
    assert stats["resumed_from"] == 0 and len(stats["loss_curve"]) == 6

    calls = {"n": 0}
    real_collate = loop.collate

    def crash_on_fifth_step(batch, pad_id):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_collate(batch, pad_id)

    monkeypatch.setattr(loop, "collate", crash_on_fifth_step)
    interrupted = with_lora(tiny_llama(seed=4), LORA, seed=0)
    with pytest.raises(KeyboardInterrupt):
        train_lora(interrupted, data, settings, pad_id=0, checkpoint_dir=tmp_path / "b")
    monkeypatch.setattr(loop, "collate", real_collate)

    resumed = with_lora(tiny_llama(seed=4), LORA, seed=0)
    stats_resumed = train_lora(resumed, data, settings, pad_id=0, checkpoint_dir=tmp_path / "b")
    assert stats_resumed["resumed_from"] == 4
    assert stats_resumed["loss_curve"][:4] == pytest.approx(stats["loss_curve"][:4])
    for name, value in _weights(straight).items():
        torch.testing.assert_close(_weights(resumed)[name], value)

    # other settings: the checkpoint is neither used nor overwritten (one folder per fingerprint)
    other = with_lora(tiny_llama(seed=4), LORA, seed=0)
    (tmp_path / "c").mkdir()
    train_lora(other, data, TrainSettings(**{**settings.__dict__, "steps": 5}), pad_id=0, checkpoint_dir=tmp_path / "c")
    [first] = list((tmp_path / "c").iterdir())
    kept = (first / training.STATE_FILE).read_bytes()
    assert train_lora(other, data, settings, pad_id=0, checkpoint_dir=tmp_path / "c")["resumed_from"] == 0
    assert len(list((tmp_path / "c").iterdir())) == 2 and (first / training.STATE_FILE).read_bytes() == kept


def test_unreadable_adapter_checkpoint_is_named(tmp_path):
    data = random_data(6, seed=7)
    settings = TrainSettings(steps=3, batch_size=2, lr=5e-3, checkpoint_every=2, seed=0)
    train_lora(with_lora(tiny_llama(seed=4), LORA, seed=0), data, settings, pad_id=0, checkpoint_dir=tmp_path)
    [folder] = list(tmp_path.iterdir())
    state = folder / training.STATE_FILE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    with pytest.raises(CheckpointMismatchError, match=rf"cannot read the training checkpoint {state}"):
        train_lora(with_lora(tiny_llama(seed=4), LORA, seed=0), data, settings, pad_id=0, checkpoint_dir=tmp_path)


def test_nan_loss_is_reported():
    model = with_lora(tiny_llama(seed=5), LORA, seed=0)
    with torch.no_grad():
        model.base_model.model.model.embed_tokens.weight[:] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"adapter t: non-finite loss at step 1 \(loss=nan\); the weights were not"):
        train_lora(model, random_data(4, seed=6), TrainSettings(steps=2, batch_size=2, lr=1e-3), pad_id=0,
                   desc="adapter t")
