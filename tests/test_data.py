"""Task data: BIG-bench parsing, the prompt format, seeded splits, composite construction, the leakage
check, the build_datasets stage on the fixture, and the clear errors of hub-only sources offline."""

from __future__ import annotations

import json
import random
import tarfile
from pathlib import Path

import pytest

from stages.build_datasets import build, check_task_names
from stages.common import ConfigError, compose, read_jsonl
from stages.data import (
    BigBenchError,
    HubUnavailableError,
    LeakageError,
    build_composite,
    check_leakage,
    format_prompt,
    load_hub_task,
    parse_task,
    read_task_files,
    split_examples,
)
from stages.data.bigbench import parse_task_json
from stages.data.composite import QUESTIONS_HEADER, composite_prefix
from stages.data.hub import format_record
from stages.hub import HubDownloadError, download

FIXTURE = Path(__file__).parent / "fixtures" / "bigbench"
WORDS = ["amber", "birch", "cedar", "delta", "ember", "fjord", "grove", "heron", "iris", "jade", "kelp"]


def random_sentence(rng: random.Random, n: int = 6) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


# --- prompt format and task.json parsing -------------------------------------------------------------


def test_format_prompt_wraps_body_choices_and_suffix():
    prompt = format_prompt("Q: pick one", ["x y", "z"], "\nA: ")
    assert prompt == "[INST] Q: pick one\nchoice: x y\nchoice: z\nA: [/INST]\n"
    assert format_prompt("  hello \n") == "[INST] hello [/INST]\n"


def test_string_and_list_targets():
    rng = random.Random(1)
    q1, q2, a1 = random_sentence(rng), random_sentence(rng), random_sentence(rng, 2)
    task = {"examples": [{"input": q1, "target": a1}, {"input": q2, "target": ["three", "3"]}]}
    first, second = parse_task_json("t", task, "t/task.json")
    # BIG-bench's default prefixes Q:/A: when the task names none
    assert first.input == f"[INST] Q: {q1}\nA: [/INST]\n"
    assert (first.target, first.targets, first.choices) == (a1, (a1,), None)
    assert (second.target, second.targets) == ("three", ("three", "3"))


def test_target_scores_give_choices_and_best_answer():
    task = {
        "task_prefix": "Decide.\n",
        "example_input_prefix": "\nClaim: ",
        "example_output_prefix": "\nVerdict: ",
        "append_choices_to_input": False,  # the paper lists the options anyway
        "examples": [{"input": "the sky is green", "target_scores": {"True": 0, "False": 1, "Neither": 0.5}}],
    }
    (ex,) = parse_task_json("t", task, "t/task.json")
    assert ex.input == ("[INST] Decide.\n\nClaim: the sky is green\nchoice: True\nchoice: False\n"
                        "choice: Neither\nVerdict: [/INST]\n")
    assert (ex.target, ex.targets, ex.choices) == ("False", ("False",), ("True", "False", "Neither"))


def test_target_and_target_scores_answer_setting():
    task = {"examples": [{"input": "Is ice cold?", "target": "Yes. Ice is frozen water.",
                          "target_scores": {"Yes": 1, "No": 0}}]}
    (as_target,) = parse_task_json("t", task, "x", answer="target")
    (as_choice,) = parse_task_json("t", task, "x", answer="choice")
    assert as_target.target == "Yes. Ice is frozen water." and as_target.targets == ("Yes. Ice is frozen water.", "Yes")
    assert as_choice.target == "Yes" and "Yes. Ice is frozen water." in as_choice.targets


@pytest.mark.parametrize(
    "task, message",
    [
        ({"name": "x"}, "'examples' is missing"),
        ({"examples": [{"target": "a"}]}, "example 0: 'input' is missing"),
        ({"examples": [{"input": "q"}]}, "example 0: has neither 'target' nor 'target_scores'"),
        ({"examples": [{"input": "q", "target": 3}]}, "'target' must be a string"),
        ({"examples": [{"input": "q", "target_scores": {}}]}, "'target_scores' must be a non-empty mapping"),
    ],
)
def test_malformed_task_json_names_the_file(task, message):
    with pytest.raises(BigBenchError, match=message) as err:
        parse_task_json("broken", task, "tasks/broken/task.json")
    assert "tasks/broken/task.json" in str(err.value)


def test_fixture_subfolders_are_read_and_parent_without_examples_skipped():
    files = read_task_files(["fixture_choice", "fixture_count"], directory=FIXTURE)
    assert sorted(files["fixture_choice"]) == ["", "easy", "hard"]
    examples = parse_task("fixture_choice", files["fixture_choice"])
    assert {e.subtask for e in examples} == {"easy", "hard"}
    assert all(e.choices and e.target in e.choices for e in examples)
    only_hard = parse_task("fixture_choice", files["fixture_choice"], subtasks=["hard"])
    assert {e.subtask for e in only_hard} == {"hard"}
    with pytest.raises(BigBenchError, match=r"no sub-folder \['medium'\].*available: \['easy', 'hard'\]"):
        parse_task("fixture_choice", files["fixture_choice"], subtasks=["medium"])
    counts = parse_task("fixture_count", files["fixture_count"])
    assert any(len(e.targets) == 2 for e in counts) and any(len(e.targets) == 1 for e in counts)


def test_unknown_task_and_bad_json_are_named(tmp_path):
    with pytest.raises(BigBenchError, match="unknown BIG-bench task 'fixture_chioce'.*did you mean fixture_choice"):
        read_task_files(["fixture_chioce"], directory=FIXTURE)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "task.json").write_text("{not json")
    with pytest.raises(BigBenchError, match=r"bad/task.json: malformed task.json"):
        read_task_files(["bad"], directory=tmp_path)


def test_archive_is_read_like_the_sdist(tmp_path):
    """Tasks are read straight out of a .tar.gz laid out like bigbench-1.0.0.tar.gz."""
    archive = tmp_path / "bigbench-1.0.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(FIXTURE, arcname="bigbench-1.0.0/bigbench/benchmark_tasks")
    from_archive = read_task_files(["fixture_choice", "fixture_generate"], archive=archive)
    from_dir = read_task_files(["fixture_choice", "fixture_generate"], directory=FIXTURE)
    assert from_archive == from_dir
    with pytest.raises(BigBenchError, match="unknown BIG-bench task 'nope'"):
        read_task_files(["nope"], archive=archive)


def _serve(root: Path):
    """A PEP 503 index served from `root` on localhost: (server, base URL)."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def test_archive_is_fetched_from_the_index_checked_and_missing_versions_say_what_to_do(tmp_path, monkeypatch):
    """fetch_archive takes the sdist from the index page pip uses, checks its sha256, and where the index
    lists no such version says where to put the file."""
    import hashlib

    from stages.data.bigbench import fetch_archive

    for proxy in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):  # localhost, never through a proxy
        monkeypatch.delenv(proxy, raising=False)
    index = tmp_path / "index"
    (index / "bigbench").mkdir(parents=True)
    payload = b"not really a tarball, but bytes with a known digest " * 50
    (index / "bigbench" / "bigbench-1.0.0.tar.gz").write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    server, url = _serve(index)
    try:
        page = index / "bigbench" / "index.html"
        page.write_text('<a href="bigbench-0.0.1.tar.gz#sha256=' + "0" * 64 + '">bigbench-0.0.1.tar.gz</a>')
        target = tmp_path / "raw" / "bigbench-1.0.0.tar.gz"
        with pytest.raises(BigBenchError, match=r"not listed.*put bigbench-1.0.0.tar.gz at .*raw/bigbench-1.0.0.tar.gz"):
            fetch_archive(target, index_url=url)
        page.write_text(f'<a href="{url}/bigbench/bigbench-1.0.0.tar.gz#sha256={"f" * 64}">bigbench-1.0.0.tar.gz</a>')
        with pytest.raises(BigBenchError, match="does not match"):
            fetch_archive(target, index_url=url)
        assert not target.exists() and not target.with_name(target.name + ".partial").exists()
        page.write_text(f'<a href="{url}/bigbench/bigbench-1.0.0.tar.gz#sha256={digest}">bigbench-1.0.0.tar.gz</a>')
        assert fetch_archive(target, index_url=url) == target and target.read_bytes() == payload
    finally:
        server.shutdown()


# --- splits, composites, leakage ---------------------------------------------------------------------


def _examples(task: str, n: int, seed: int, duplicate_every: int = 0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        q = f"{random_sentence(rng)} #{i}"
        rows.append({"input": q, "target": random_sentence(rng, 2)})
        if duplicate_every and i % duplicate_every == 0:
            rows.append({"input": q, "target": "duplicate"})
    return parse_task_json(task, {"examples": rows}, f"{task}/task.json")


def test_split_is_seeded_disjoint_and_test_independent_of_train_size():
    examples = _examples("alpha", 60, seed=3, duplicate_every=5)
    kwargs = dict(seed=0, test_fraction=0.25, n_test=10, max_input_chars=None)
    train, test = split_examples("alpha", examples, n_train=30, **kwargs)
    again_train, again_test = split_examples("alpha", examples, n_train=30, **kwargs)
    small_train, small_test = split_examples("alpha", examples, n_train=5, **kwargs)
    assert (train, test) == (again_train, again_test)
    assert small_test == test and small_train == train[:5]
    assert len(train) == 30 and len(test) == 10
    assert not {e.source for e in train} & {e.source for e in test}
    assert all(e.target != "duplicate" for e in train + test)  # duplicates of a question dropped
    other_train, _ = split_examples("beta", examples, n_train=30, **kwargs)
    assert [e.source for e in other_train] != [e.source for e in train]  # seeded per task


def test_split_with_test_split_and_length_filter():
    examples = _examples("alpha", 30, seed=4)
    held = examples[:5]
    train, test = split_examples("alpha", examples, seed=0, test_fraction=0.2, n_train=100, n_test=100,
                                 test_examples=held)
    assert sorted(e.source for e in test) == sorted(e.source for e in held)
    assert len(train) == 25 and not {e.source for e in train} & {e.source for e in held}
    limit = sorted(len(e.input) for e in examples)[10]
    short_train, short_test = split_examples("alpha", examples, seed=0, test_fraction=0.2, n_train=100, n_test=100,
                                             max_input_chars=limit)
    assert all(len(e.input) <= limit for e in short_train + short_test)
    with pytest.raises(ValueError, match="task 'alpha': 0 train and 0 test examples of at most 5 characters"):
        split_examples("alpha", examples, seed=0, test_fraction=0.2, n_train=9, n_test=9, max_input_chars=5)


def _split_records(tasks, seed=0):
    train, test = {}, {}
    for i, task in enumerate(tasks):
        tr, te = split_examples(task, _examples(task, 20, seed=seed + i), seed=0, test_fraction=0.25,
                                n_train=15, n_test=5)
        train[task] = [e.record("exact_match") for e in tr]
        test[task] = [e.record("exact_match") for e in te]
    return train, test


def test_composite_orders_questions_and_numbers_worked_answers():
    tasks = ["gamma", "alpha", "beta"]  # a fixed order that is not alphabetical
    train, test = _split_records(tasks)
    records = build_composite("composite-3", tasks, train, test, n_samples=4, n_shots=2, seed=0)
    assert len(records) == 4
    test_inputs = {t: {r["input"].strip(): r for r in test[t]} for t in tasks}
    for record in records:
        prefix = composite_prefix(record)
        assert prefix.startswith("Example 1:\n\n") and "\n\n\nExample 2:\n\n" in prefix
        assert prefix.count("[INST]") == 2 * len(tasks)
        questions = record["input"].split(QUESTIONS_HEADER, 1)[1].strip().split("\n\n")
        assert len(questions) == len(tasks)
        for i, (task, question) in enumerate(zip(tasks, questions)):
            source = test_inputs[task][question]  # the i-th question is a test example of the i-th task
            assert record["targets"][i] == source["target"] and record["targets_all"][i] == source["targets"]
        for shot in prefix.split("Example ")[1:]:
            answers = [line for line in shot.strip().splitlines() if line[:2] in ("1.", "2.", "3.")]
            assert [a.split(". ", 1)[0] for a in answers] == ["1", "2", "3"]
            blocks = [b for b in shot.split("\n\n") if b.startswith("[INST]")]
            for task, block, answer in zip(tasks, blocks, answers):
                train_match = [r for r in train[task] if r["input"].strip() == block]
                assert train_match and answer == f"{answers.index(answer) + 1}. {train_match[0]['target']}"
        assert record["input"].endswith("[/INST]\n\n") and record["metrics"] == ["exact_match"] * 3
    # samples use different questions
    assert len({r["input"] for r in records}) == 4


def test_leakage_check_catches_train_and_prefix_leaks():
    tasks = ["alpha", "beta", "gamma"]
    train, test = _split_records(tasks, seed=10)
    composites = {"composite-3": build_composite("composite-3", tasks, train, test, n_samples=3, n_shots=2, seed=1)}
    check_leakage(train, test, composites)
    leaked = {**train, "beta": train["beta"] + [test["alpha"][2]]}
    with pytest.raises(LeakageError, match="test example 2 of 'alpha' is in the train split of 'beta'"):
        check_leakage(leaked, test, composites)
    record = dict(composites["composite-3"][0])
    record["input"] = test["gamma"][1]["input"] + "\n\n" + record["input"]
    with pytest.raises(LeakageError, match="test example 1 of 'gamma' is in the few-shot prefix of 'composite-3'"):
        check_leakage(train, test, {"composite-3": [record]})


# --- the stage on the fixture profile ------------------------------------------------------------------


def _tiny_cfg(tmp_path, *overrides):
    return compose(["tasks=tiny", "model=tiny_random", f"paths.data={tmp_path}/data",
                    f"tasks.bigbench.dir={FIXTURE}", *overrides])


def test_build_datasets_on_fixture(tmp_path):
    summary = build(_tiny_cfg(tmp_path))
    assert summary["leakage_check"] == "passed"
    for task in ("fixture_choice", "fixture_count", "fixture_generate"):
        train = read_jsonl(tmp_path / "data" / "tasks" / task / "train.jsonl")
        test = read_jsonl(tmp_path / "data" / "tasks" / task / "test.jsonl")
        assert len(train) == summary["tasks"][task]["train"] > 0 and len(test) == summary["tasks"][task]["test"] > 0
        for record in train + test:
            assert set(record) >= {"task", "input", "target", "targets", "choices", "metric"}
            assert record["input"].startswith("[INST] ") and record["input"].endswith(" [/INST]\n")
            assert record["target"] == record["targets"][0]
    (composite,) = read_jsonl(tmp_path / "data" / "composite" / "composite-3.jsonl")[:1]
    assert composite["tasks"] == ["fixture_choice", "fixture_count", "fixture_generate"]
    assert composite["metrics"] == ["contains", "exact_match", "generation"]
    again = tmp_path / "again"
    build(_tiny_cfg(again))
    for file in sorted((tmp_path / "data").rglob("*.jsonl")):
        assert file.read_bytes() == (again / "data" / file.relative_to(tmp_path / "data")).read_bytes()


def test_task_name_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown task 'fixture_chioce'.*did you mean fixture_choice"):
        check_task_names(_tiny_cfg(tmp_path, "tasks.names=[fixture_chioce]"))
    with pytest.raises(ConfigError, match="alphabetical"):
        check_task_names(_tiny_cfg(tmp_path, "tasks.names=[fixture_count,fixture_choice]"))


# --- hub-only sources fail at once, offline, with what to do ------------------------------------------


def test_hub_formats():
    gsm = format_record("gsm8k", {"format": "gsm8k"}, {"question": "2+3?", "answer": "2+3=5\n#### 5"})
    assert gsm.input == "[INST] 2+3? [/INST]\n" and gsm.targets == ("2+3=5\n#### 5", "5")
    spec = {"format": "translation", "src": "de", "tgt": "en", "instruction": "Übersetzen."}
    tr = format_record("news_commentary_de", spec, {"translation": {"de": "Hallo Welt", "en": "Hello world"}})
    assert tr.input == "[INST] Übersetzen.\nHallo Welt [/INST]\n" and tr.target == "Hello world"
    al = format_record("alpaca", {"format": "alpaca"}, {"instruction": "Sort", "input": "3 1 2", "output": "1 2 3"})
    assert al.input == "[INST] Sort\n3 1 2 [/INST]\n"


def test_hub_task_fails_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    spec = {"path": "openai/gsm8k", "name": "main", "train": "train", "test": "test", "format": "gsm8k"}
    with pytest.raises(HubUnavailableError, match="hub task 'gsm8k'.*tasks=default or tasks=bigbench22"):
        load_hub_task("gsm8k", spec)


def test_hub_download_fails_at_once_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_not_real")
    with pytest.raises(HubDownloadError, match="meta-llama/Meta-Llama-3-8B: HF_HUB_OFFLINE is set.*HF_TOKEN"):
        download("meta-llama/Meta-Llama-3-8B", tmp_path, what="the base model")
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr("stages.hub._token", lambda: None)
    with pytest.raises(HubDownloadError, match="no Hugging Face token"):
        download("NJUDeepEngine/MeteoRA-llama3-8b", tmp_path)


def test_paper_model_profile_fails_at_once_offline(monkeypatch, tmp_path):
    from stages.prepare_model import prepare

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_not_real")
    cfg = compose(["model=llama3_8b", f"paths.artifacts={tmp_path}/artifacts"])
    with pytest.raises(HubDownloadError, match="the base model from meta-llama/Meta-Llama-3-8B"):
        prepare(cfg)


def test_missing_gguf_is_named():
    from stages.prepare_model import ModelSourceError, gguf_path

    with pytest.raises(ModelSourceError, match="package 'no_such_package_xyz' is not installed.*--no-deps"):
        gguf_path("no_such_package_xyz", "model.gguf")
    with pytest.raises(ModelSourceError, match="GGUF file missing.gguf is missing from package 'stages'"):
        gguf_path("stages", "missing.gguf")


def test_fixture_is_valid_json():
    for file in FIXTURE.rglob("task.json"):
        assert isinstance(json.loads(file.read_text()), dict)


def test_paper_adapters_come_from_the_hub_and_fail_at_once_offline(monkeypatch, tmp_path):
    from stages.adapters import adapter_source, hub_adapter

    assert adapter_source(compose(["model=smollm2_135m"])) == "train"
    cfg = compose(["model=llama3_8b", f"paths.artifacts={tmp_path}"])
    assert adapter_source(cfg) == "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_not_real")
    message = "adapter folder llama3_8b_peft/winowhy from NJUDeepEngine/MeteoRA-llama3-8b"
    with pytest.raises(HubDownloadError, match=message):
        hub_adapter(cfg, "winowhy", tmp_path / "adapters" / "winowhy")


def test_load_config_from_params_file_and_from_conf(tmp_path):
    from omegaconf import OmegaConf

    from stages.common import load_config

    composed = compose(["tasks=tiny", "adapter.train.steps=3"])
    params = tmp_path / "params.yaml"
    params.write_text(OmegaConf.to_yaml(composed))
    assert load_config(["tasks=tiny", "adapter.train.steps=3"]) == composed
    from_file = load_config(["--params", str(params), "adapter.train.lr=0.5", "tasks.split.max_input_chars=90"])
    assert from_file.adapter.train.lr == 0.5 and from_file.tasks.split.max_input_chars == 90
    assert from_file.tasks.names == composed.tasks.names
    for bad in ("model=llama3_8b", "adapter.train.nope=1"):
        with pytest.raises(ConfigError, match="does not set an existing key"):
            load_config(["--params", str(params), bad])
    with pytest.raises(ConfigError, match="Could not find 'tasks/nope'"):
        load_config(["tasks=nope"])
