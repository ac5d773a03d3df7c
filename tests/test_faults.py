"""Fault injection: saves that die half-way, files cut short, gates that do not fit the model.

Gates on disk: a save that fails leaves the old gates loadable and identical; a load checks everything
(file, manifest, model) before it copies anything."""
import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import meteora_with_random_gates, save_peft_adapter, tiny_llama
from meteora import GateManifestError, attach_meteora


@pytest.fixture(scope="module")
def gate_base():
    return tiny_llama(seed=21)


@pytest.fixture(scope="module")
def gate_adapters(gate_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("fault_adapters")
    return [save_peft_adapter(gate_base, root / f"task_{i}", rank=4, alpha=8, seed=30 + i) for i in range(3)]


def _gates(model):
    return {name: layer.gate.weight.detach().clone() for name, layer in model.meteora_layers().items()}


def _assert_gates_equal(model, expected):
    got = _gates(model)
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


@pytest.fixture()
def saved(gate_base, gate_adapters, tmp_path):
    """Gates saved once (directory, their weights) and a second model with other gates to save over them."""
    model = meteora_with_random_gates(gate_base, gate_adapters, seed=1)
    directory = tmp_path / "gates"
    model.save_gates(directory)
    return directory, _gates(model)


def test_gate_save_dying_inside_the_writer_keeps_the_old_gates(gate_base, gate_adapters, saved, monkeypatch):
    directory, old = saved
    import safetensors.torch

    real_save_file = safetensors.torch.save_file

    def dies_half_way(tensors, filename, *args, **kwargs):
        real_save_file(tensors, filename, *args, **kwargs)
        with open(filename, "r+b") as fh:  # the disk fills up half-way through the file
            fh.truncate(os.path.getsize(filename) // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", dies_half_way)
    newer = meteora_with_random_gates(gate_base, gate_adapters, seed=2)
    with pytest.raises(OSError, match="No space left"):
        newer.save_gates(directory)
    monkeypatch.undo()
    reader = meteora_with_random_gates(gate_base, gate_adapters, seed=3)
    reader.load_gates(directory)
    _assert_gates_equal(reader, old)
    assert sorted(p.name for p in directory.parent.iterdir()) == ["gates"]  # no temporary left behind


@pytest.mark.parametrize("failing_call", [1, 2])
def test_gate_save_dying_at_the_rename_keeps_the_old_gates(gate_base, gate_adapters, saved, monkeypatch, failing_call):
    directory, old = saved
    real_replace, calls = os.replace, {"n": 0}

    def replace(src, dst):
        calls["n"] += 1
        if calls["n"] == failing_call:
            raise OSError(5, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    newer = meteora_with_random_gates(gate_base, gate_adapters, seed=2)
    with pytest.raises(OSError, match="Input/output error"):
        newer.save_gates(directory)
    monkeypatch.undo()
    reader = meteora_with_random_gates(gate_base, gate_adapters, seed=3)
    reader.load_gates(directory)
    _assert_gates_equal(reader, old)


def test_truncated_gates_file_is_named(gate_base, gate_adapters, saved):
    directory, _ = saved
    path = directory / "gates.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    reader = meteora_with_random_gates(gate_base, gate_adapters, seed=3)
    before = _gates(reader)
    with pytest.raises(GateManifestError, match=rf"{path}.*(truncated|not a readable)"):
        reader.load_gates(directory)
    _assert_gates_equal(reader, before)


def _rewrite_gates(directory, change):
    path = directory / "gates.safetensors"
    state = load_file(str(path))
    change(state)
    save_file(state, str(path))


FIRST = "model.layers.0.self_attn.q_proj"
LAST = "model.layers.1.mlp.down_proj"


@pytest.mark.parametrize("case, change, message", [
    ("missing", lambda s: s.pop(LAST), rf"gates.safetensors.*lacks.*{LAST}"),
    ("extra", lambda s: s.__setitem__("model.layers.9.mlp.up_proj", s[FIRST].clone()),
     r"gates.safetensors.*model\.layers\.9\.mlp\.up_proj"),
    ("shape", lambda s: s.__setitem__(LAST, torch.randn(3, 7)), rf"gates.safetensors.*{LAST}.*shape \(3, 7\).*\(3, "),
    ("dtype", lambda s: s.__setitem__(LAST, s[LAST].to(torch.float16)), rf"gates.safetensors.*{LAST}.*float16.*float32"),
    ("non_finite", lambda s: s[LAST].__setitem__((0, 0), float("nan")), rf"gates.safetensors.*{LAST}.*NaN"),
])
def test_gates_that_do_not_fit_load_nothing(gate_base, gate_adapters, saved, case, change, message):
    """The last module in the file is the bad one: a load that copied as it went would have copied the rest."""
    directory, _ = saved
    _rewrite_gates(directory, change)
    reader = meteora_with_random_gates(gate_base, gate_adapters, seed=3)
    before = _gates(reader)
    with pytest.raises(GateManifestError, match=message):
        reader.load_gates(directory)
    _assert_gates_equal(reader, before)
    assert reader.top_k == 2


def test_manifest_missing_a_key_is_named(gate_base, gate_adapters, saved):
    directory, _ = saved
    manifest = json.loads((directory / "manifest.json").read_text())
    del manifest["temperature"]
    (directory / "manifest.json").write_text(json.dumps(manifest))
    reader = meteora_with_random_gates(gate_base, gate_adapters, seed=3)
    before = _gates(reader)
    with pytest.raises(GateManifestError, match=r"manifest\.json.*lacks the key 'temperature'"):
        reader.load_gates(directory)
    _assert_gates_equal(reader, before)


def test_gates_of_another_base_model_are_refused_unless_allowed(gate_base, gate_adapters, saved):
    directory, old = saved
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["base_model"] = "someone/another-model"
    (directory / "manifest.json").write_text(json.dumps(manifest))
    reader = meteora_with_random_gates(gate_base, gate_adapters, seed=3)
    before = _gates(reader)
    with pytest.raises(GateManifestError, match=r"manifest\.json.*someone/another-model.*allow_other_base=True"):
        reader.load_gates(directory)
    _assert_gates_equal(reader, before)
    with pytest.warns(UserWarning, match="someone/another-model"):
        reader.load_gates(directory, allow_other_base=True)
    _assert_gates_equal(reader, old)


def test_swap_killed_between_its_renames_is_completed_by_the_next_reader(gate_base, gate_adapters, saved):
    directory, weights = saved
    old = directory.parent / f".{directory.name}.old"
    os.replace(directory, old)  # the state a SIGKILL between atomic_directory's two renames leaves
    model = attach_meteora(copy.deepcopy(gate_base), gate_adapters, top_k=2)
    model.load_gates(directory)
    _assert_gates_equal(model, weights)
    assert directory.is_dir() and not old.exists()


KILLED_WRITER = """
import sys, torch
sys.path[:0] = [{tests!r}, {src!r}]
from helpers import tiny_llama
from meteora import attach_meteora
model = attach_meteora(tiny_llama(seed=21), {adapters!r}, top_k=2)
version = 0
while True:
    version += 1
    with torch.no_grad():
        for gate in model.gate_parameters():
            gate.fill_(float(version))
    model.save_gates({directory!r})
    print(version, flush=True)
"""


@pytest.mark.parametrize("delay", [0.0, 0.013, 0.029, 0.047, 0.071])
def test_gates_survive_a_sigkill_during_saves(gate_base, gate_adapters, tmp_path, delay):
    """A process that saves gates in a loop, killed with SIGKILL at some point of a save: the folder then
    loads completely, every gate holding the same version (never a mix, never half a file)."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parent
    directory = tmp_path / "gates"
    script = KILLED_WRITER.format(tests=str(root), src=str(root.parent / "src"),
                                  adapters=[str(a) for a in gate_adapters], directory=str(directory))
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "1", "the writer did not start"
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    model = attach_meteora(copy.deepcopy(gate_base), gate_adapters, top_k=2)
    model.load_gates(directory)
    values = {float(v) for w in _gates(model).values() for v in w.unique()}
    assert len(values) == 1 and values.pop() >= 1.0


# --- SIGKILL during training, then resume ----------------------------------------------------------

GATE_TRAINING = """
import json, sys, torch
sys.path[:0] = [{tests!r}, {src!r}]
from test_train_gates import gates, make_trainer
trainer = make_trainer(json.loads(sys.argv[1]), sys.argv[2], log_fn=lambda metrics, step: print(step, flush=True))
print("resumed" if trainer.try_resume() else "fresh", trainer.step, flush=True)
trainer.fit()
torch.save(gates(trainer), sys.argv[3])
"""

LORA_TRAINING = """
import sys, torch
sys.path[:0] = [{tests!r}, {src!r}]
from helpers import tiny_llama
from stages import trainer as loop, training
from test_training import LORA, random_data
real_collate, count = loop.collate, [0]
def collate(batch, pad_id):
    count[0] += 1
    print(count[0], flush=True)
    return real_collate(batch, pad_id)
loop.collate = collate
model = training.with_lora(tiny_llama(seed=4), LORA, seed=0)
settings = training.TrainSettings(steps=8, batch_size=3, lr=5e-3, warmup_steps=2, checkpoint_every=2, seed=0)
stats = training.train_lora(model, random_data(12, seed=3), settings, pad_id=0, checkpoint_dir=sys.argv[2])
print("resumed", stats["resumed_from"], flush=True)
torch.save({{k: v.detach() for k, v in model.named_parameters() if v.requires_grad}}, sys.argv[3])
"""


def _run_child(script: str, args: list[str], kill_at: int | None = None) -> list[str]:
    """Run a training child; with `kill_at`, SIGKILL it once it prints that step number."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent
    code = script.format(tests=str(root), src=str(root.parent / "src"))
    child = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in child.stdout:
            lines.append(line.strip())
            if kill_at is not None and line.strip() == str(kill_at):
                child.send_signal(signal.SIGKILL)
                break
    finally:
        child.wait(timeout=300)
    if kill_at is None:
        assert child.returncode == 0, lines
    else:
        assert child.returncode == -9, (child.returncode, lines)
    return lines


@pytest.mark.parametrize("kill_at", [3, 6])
def test_gate_training_killed_with_sigkill_resumes_to_the_same_gates(tmp_path, kill_at):
    import json

    from test_train_gates import NUM_TASKS

    adapters = {f"task{i}": str(save_peft_adapter(tiny_llama(seed=0), tmp_path / f"task{i}", seed=10 + i))
                for i in range(NUM_TASKS)}
    args = [json.dumps(adapters)]
    _run_child(GATE_TRAINING, [*args, str(tmp_path / "straight"), str(tmp_path / "straight.pt")])
    _run_child(GATE_TRAINING, [*args, str(tmp_path / "killed"), str(tmp_path / "unused.pt")], kill_at=kill_at)
    lines = _run_child(GATE_TRAINING, [*args, str(tmp_path / "killed"), str(tmp_path / "resumed.pt")])
    [state] = [line for line in lines if line.startswith(("resumed ", "fresh "))]
    assert state.startswith("resumed") and 2 <= int(state.split()[1]) <= kill_at, lines
    expected, got = torch.load(tmp_path / "straight.pt"), torch.load(tmp_path / "resumed.pt")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


@pytest.mark.parametrize("kill_at", [4, 7])
def test_lora_training_killed_with_sigkill_resumes_to_the_same_weights(tmp_path, kill_at):
    _run_child(LORA_TRAINING, ["-", str(tmp_path / "straight"), str(tmp_path / "straight.pt")])
    _run_child(LORA_TRAINING, ["-", str(tmp_path / "killed"), str(tmp_path / "unused.pt")], kill_at=kill_at)
    lines = _run_child(LORA_TRAINING, ["-", str(tmp_path / "killed"), str(tmp_path / "resumed.pt")])
    resumed_from = int(lines[-1].split()[1])
    assert lines[-1].startswith("resumed") and 2 <= resumed_from < kill_at
    expected, got = torch.load(tmp_path / "straight.pt"), torch.load(tmp_path / "resumed.pt")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
