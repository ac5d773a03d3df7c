"""Gate training on several processes: the CPU stand-in (gloo) for DDP/FSDP on GPUs.

A tiny random LLaMA with three PEFT adapters is trained by the real train_gates stage: once in one
process, and once through the launcher (torchrun, 2 processes, FSDP with gradient checkpointing and
gradient accumulation) resuming a checkpoint that a single-process run left at half-way. Same seed,
same global batches: the gates, the optimizer state and the logged losses must agree. DDP gets the
same check from scratch, and evaluation's sharded generation must give the single-process outputs.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers import save_peft_adapter, tiny_llama
from meteora import attach_meteora
from stages.common import ConfigError, compose
from stages.distributed import shard_indices
from stages.launch import TrainerSettings, setup_distributed, torchrun_argv

REPO = Path(__file__).resolve().parents[1]
TASKS = ["fixture_choice", "fixture_count", "fixture_generate"]  # conf/tasks/tiny.yaml, in adapter order
WORDS = {task: [f"w{t}_{j}" for j in range(8)] for t, task in enumerate(TASKS)}
PROFILE = ["model=tiny_random", "tasks=tiny"]  # the stages read the model and adapters written below
TRAIN = [
    "gate.steps=4", "gate.batch_size=4", "gate.max_length=24", "gate.lr=0.05", "gate.warmup_ratio=0.0",
    "gate.log_every=1", "gate.checkpoint_every=2", "gate.resume=true", "gate.gradient=full",
]
EVAL = [  # batches of one prompt: the outputs cannot depend on which prompts share a padded batch
    "eval.methods=[meteora]", "eval.meteora_top_ks=[]", "eval.batch_size=1", "eval.max_test_per_task=5",
    "eval.max_new_tokens.generation=5", "eval.composite.names=[composite-3]", "eval.composite.max_new_tokens_per_task=3",
]


# --- fixtures: a project folder with a tiny model, adapters and training data ---------------------------

def word_tokenizer():
    """A word-level tokenizer over the fixture's words (no hub): ids < the tiny model's vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["<unk>", "<pad>", "</s>", "[INST]", "[/INST]", *[w for words in WORDS.values() for w in words]]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """artifacts/model, artifacts/adapters/<task>, random artifacts/gates, data/tasks/<task>/{train,test}.jsonl,
    data/composite/composite-3.jsonl."""
    root = tmp_path_factory.mktemp("shared")
    base = tiny_llama(seed=0)
    base.save_pretrained(root / "artifacts" / "model")
    word_tokenizer().save_pretrained(root / "artifacts" / "model")
    rng = np.random.default_rng(0)
    for t, task in enumerate(TASKS):
        save_peft_adapter(base, root / "artifacts" / "adapters" / task, rank=4, seed=10 + t)
        for split, n in (("train", 12), ("test", 5)):
            lines = []
            for _ in range(n):
                words = rng.choice(WORDS[task], size=int(rng.integers(3, 9))).tolist()
                answer = " ".join(rng.choice(WORDS[task], size=2).tolist())
                lines.append(json.dumps({"task": task, "input": f"[INST] {' '.join(words)} [/INST]\n", "target": answer,
                                         "targets": [answer], "choices": None, "metric": "generation"}))
            path = root / "data" / "tasks" / task / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join(lines) + "\n")
    composite = [{"name": "composite-3", "tasks": TASKS, "metrics": ["generation"] * 3,
                  "input": "[INST] " + " ".join(w for t in TASKS for w in rng.choice(WORDS[t], size=2)) + " [/INST]\n",
                  "questions": [f"[INST] {' '.join(rng.choice(WORDS[t], size=3))} [/INST]\n" for t in TASKS],
                  "targets": ["w0_0", "w1_0", "w2_0"], "targets_all": [["w0_0"], ["w1_0"], ["w2_0"]]} for _ in range(3)]
    (root / "data" / "composite").mkdir()
    (root / "data" / "composite" / "composite-3.jsonl").write_text("".join(json.dumps(r) + "\n" for r in composite))
    with contextlib.chdir(root):  # the stages load the base model as artifacts/model: the gates' manifest names it
        lm = AutoModelForCausalLM.from_pretrained("artifacts/model")
    model = attach_meteora(lm, {t: root / "artifacts" / "adapters" / t for t in TASKS})
    with torch.no_grad():
        for gate in model.gate_parameters():
            gate.normal_(0, 2.0, generator=torch.Generator().manual_seed(gate.numel()))
    model.save_gates(root / "artifacts" / "gates")
    return root


def overrides(shared: Path, *more: str) -> list[str]:
    """The test profile, one MLflow store for all runs (its tables are made once), and `more`."""
    return [*PROFILE, f"mlflow.tracking_uri=sqlite:///{shared / 'mlflow.db'}", *more]


def project(shared: Path, path: Path, inputs: tuple[str, ...] = ("model", "adapters")) -> Path:
    """A DVC-like workspace: the repo's conf/, the shared inputs, its own outputs."""
    (path / "artifacts").mkdir(parents=True)
    (path / "conf").symlink_to(REPO / "conf")
    (path / "data").symlink_to(shared / "data")
    for name in inputs:
        (path / "artifacts" / name).symlink_to(shared / "artifacts" / name)
    return path


def launch(cwd: Path, stage: str, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, "-m", "stages.launch", stage, *overrides], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"launcher failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def run_in_process(cwd: Path, monkeypatch, stage: str, argv: list[str]) -> None:
    monkeypatch.chdir(cwd)
    importlib.import_module(f"stages.{stage}").main(argv)


def outputs(workspace: Path) -> tuple[dict, dict, dict]:
    gates = load_file(str(workspace / "artifacts" / "gates" / "gates.safetensors"))
    (path,) = (workspace / "artifacts" / "checkpoints" / "gates").glob("*/checkpoint.pt")  # one configuration
    checkpoint = torch.load(path, weights_only=True)
    report = json.loads((workspace / "reports" / "train_gates.json").read_text())
    return gates, checkpoint, report


def assert_same_training(a: Path, b: Path) -> None:
    gates_a, ckpt_a, report_a = outputs(a)
    gates_b, ckpt_b, report_b = outputs(b)
    assert gates_a.keys() == gates_b.keys() and len(gates_a) == 2 * 7
    for name in gates_a:
        torch.testing.assert_close(gates_b[name], gates_a[name], rtol=1e-4, atol=1e-5, msg=name)
    assert ckpt_a["step"] == ckpt_b["step"] == 4
    for index, entry in ckpt_a["optimizer"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ckpt_b["optimizer"]["state"][index][key], entry[key], rtol=1e-4, atol=1e-7)
    history_a, history_b = ckpt_a["history"], ckpt_b["history"]
    assert [h["step"] for h in history_b] == [1, 2, 3, 4]
    for h_a, h_b in zip(history_a, history_b):
        for key in ("lm_loss", "gate_loss", "routing_accuracy", "grad_norm", "tokens"):
            assert h_b[key] == pytest.approx(h_a[key], rel=1e-4, abs=1e-6), (h_a["step"], key)
    manifest_a, manifest_b = (json.loads((p / "artifacts" / "gates" / "manifest.json").read_text()) for p in (a, b))
    assert manifest_a == manifest_b and manifest_a["adapters"] == TASKS
    assert report_b["final"] == pytest.approx(report_a["final"], rel=1e-4)


# --- the launcher and its settings -------------------------------------------------------------------

def test_trainer_profiles_compose_with_the_paper_profiles():
    cfg = compose(["model=llama3_8b", "tasks=paper28", "trainer=fsdp", "trainer.devices=4"])
    settings = TrainerSettings.from_config(cfg)
    assert (settings.engine, settings.world_size, settings.mixed_precision) == ("fsdp", 4, "bf16")
    assert settings.gradient_checkpointing and len(cfg.tasks.names) == 28
    settings = TrainerSettings.from_config(compose(["model=llama2_13b", "tasks=paper28", "trainer=ddp", "trainer.devices=8"]))
    assert (settings.engine, settings.world_size) == ("ddp", 8)
    assert TrainerSettings.from_config(compose([])) == TrainerSettings()


def test_torchrun_command_and_invalid_layouts():
    argv = torchrun_argv("train_gates", ["--params", "params.yaml"], TrainerSettings(engine="fsdp", devices=4))
    assert argv[1:] == ["-m", "torch.distributed.run", "--nproc_per_node=4", "--nnodes=1", "--standalone",
                        "-m", "stages.train_gates", "--params", "params.yaml"]
    two_nodes = TrainerSettings(engine="fsdp", devices=8, nodes=2, node_rank=1, master_addr="10.0.0.1")
    assert "--node_rank=1" in torchrun_argv("evaluate", [], two_nodes) and two_nodes.world_size == 16
    with pytest.raises(ConfigError, match="engine=single runs one process"):
        TrainerSettings(engine="single", devices=2).validate()
    with pytest.raises(ConfigError, match="launch"):
        setup_distributed(compose(["trainer=ddp", "trainer.devices=2"]))  # not started by torchrun


def test_shard_indices_partition_the_examples():
    for n in (0, 1, 5, 16, 17):
        for world in (1, 2, 3, 8):
            shares = [list(shard_indices(n, r, world)) for r in range(world)]
            assert sorted(i for s in shares for i in s) == list(range(n))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


# --- end to end ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def single_run(shared, tmp_path_factory) -> Path:
    """The reference: one process, uninterrupted."""
    workspace = project(shared, tmp_path_factory.mktemp("single"))
    with pytest.MonkeyPatch.context() as monkeypatch:
        run_in_process(workspace, monkeypatch, "train_gates", overrides(shared, *TRAIN))
    return workspace


def test_fsdp_on_two_processes_resumes_a_single_process_checkpoint_and_matches(shared, single_run, tmp_path, monkeypatch):
    from stages.train_gates import GateTrainer

    workspace = project(shared, tmp_path / "fsdp")
    real_step = GateTrainer.train_step

    def stop_after_two(self):
        if self.step == 2:  # the checkpoint of step 2 is on disk
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(GateTrainer, "train_step", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_in_process(workspace, monkeypatch, "train_gates", overrides(shared, *TRAIN))
    monkeypatch.undo()
    result = launch(workspace, "train_gates", *overrides(shared, *TRAIN, "trainer=fsdp", "trainer.devices=2",
                                                         "trainer.mixed_precision=fp32", "trainer.gradient_accumulation=2"))
    assert "torch.distributed.run --nproc_per_node=2" in result.stdout
    assert "resumed from" in result.stdout + result.stderr
    assert_same_training(single_run, workspace)
    report = outputs(workspace)[2]
    assert report["trainer"]["engine"] == "fsdp" and report["trainer"]["world_size"] == 2
    assert report["steps_run"] == 2


def test_ddp_on_two_processes_matches_one_process(shared, single_run, tmp_path):
    workspace = project(shared, tmp_path / "ddp")
    launch(workspace, "train_gates", *overrides(shared, *TRAIN, "trainer=ddp", "trainer.devices=2",
                                                "trainer.mixed_precision=fp32", "trainer.gradient_checkpointing=false"))
    assert_same_training(single_run, workspace)
    assert outputs(workspace)[2]["trainer"]["world_size"] == 2


def test_evaluation_shared_out_over_two_processes_writes_the_single_process_json(shared, tmp_path, monkeypatch):
    one = project(shared, tmp_path / "one", inputs=("model", "adapters", "gates"))
    run_in_process(one, monkeypatch, "evaluate", overrides(shared, *EVAL))
    two = project(shared, tmp_path / "two", inputs=("model", "adapters", "gates"))
    launch(two, "evaluate", *overrides(shared, *EVAL, "trainer=ddp", "trainer.devices=2"))
    for path in ("reports/eval/results.json", "reports/eval/traces.json", "artifacts/eval/predictions.json"):
        a, b = (json.loads((w / path).read_text()) for w in (one, two))
        if "timing_s" in a:
            a.pop("timing_s"), b.pop("timing_s")
        assert a == b, path
    results = json.loads((one / "reports/eval/results.json").read_text())
    assert results["profile"]["test_examples_per_task"] == dict.fromkeys(TASKS, 5)
    assert results["routing"]["per_task"].keys() == set(TASKS) and results["composite"]["composite-3"]["meteora"]
    assert results["chained"]["composite-3"]["meteora"]["segment_routing"]["segment"].keys() == set(TASKS)
