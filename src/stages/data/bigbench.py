"""BIG-bench JSON tasks: fetching the bigbench==1.0.0 source archive once, reading `task.json` files
(top level and sub-folders) straight out of it, and turning their examples into prompts.

A task.json holds `examples`, each with `input` and either `target` (a string or a list of strings)
or `target_scores` (option -> score), plus optional formatting keys (`task_prefix`,
`example_input_prefix`, `example_output_prefix`) whose defaults follow BIG-bench's JSON task
conventions.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import tarfile
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from stages.data.examples import Example, format_prompt, normalize_text, unique

PACKAGE = "bigbench"
DEFAULT_INDEX = "https://pypi.org/simple"
_MEMBER = re.compile(r"^[^/]+/bigbench/benchmark_tasks/([^/]+)/(?:([^/]+)/)?task\.json$")
TOP = ""  # key of a task's top-level task.json among its files

TaskFiles = dict[str, dict[str, Any]]  # sub-folder ("" for the top level) -> parsed task.json


class BigBenchError(ValueError):
    """A BIG-bench task that is missing, malformed or cannot be fetched."""


def _sdist_link(version: str, index_url: str) -> tuple[str, str]:
    """(url, sha256) of bigbench-<version>.tar.gz on a PEP 503 simple index."""
    page = f"{index_url.rstrip('/')}/{PACKAGE}/"
    try:
        with urllib.request.urlopen(page, timeout=60) as response:
            html = response.read().decode("utf-8", "replace")
    except OSError as err:
        raise BigBenchError(f"cannot read the package index {page}: {err}") from err
    name = re.escape(f"{PACKAGE}-{version}.tar.gz")
    match = re.search(rf'href="([^"#]*{name})#sha256=([0-9a-f]{{64}})"', html)
    if match is None:
        raise BigBenchError(f"{PACKAGE}-{version}.tar.gz is not listed on {page}")
    return match.group(1), match.group(2)


def fetch_archive(path: str | Path, version: str = "1.0.0", index_url: str | None = None) -> Path:
    """The bigbench source archive at `path`, downloaded from the package index when it is not there.

    pip cannot fetch this sdist (`pip download` prepares its metadata, which declares a direct-URL
    dependency that pip refuses), so the file is taken from the index page pip uses, checked
    against the index's sha256, and written atomically. It is never installed.
    """
    path = Path(path)
    if path.is_file():
        return path
    index_url = index_url or os.environ.get("PIP_INDEX_URL") or DEFAULT_INDEX
    try:
        url, sha256 = _sdist_link(version, index_url)
    except BigBenchError as err:
        raise BigBenchError(f"{err}; put {PACKAGE}-{version}.tar.gz at {path} (the tasks.archive setting) and run again") from err
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=120) as response, partial.open("wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {path.name}") as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except OSError as err:
        partial.unlink(missing_ok=True)
        raise BigBenchError(f"cannot download {url}: {err}") from err
    if digest.hexdigest() != sha256:
        partial.unlink(missing_ok=True)
        raise BigBenchError(f"{url}: sha256 {digest.hexdigest()} does not match the index's {sha256}")
    partial.replace(path)
    return path


def _load_json(data: bytes, origin: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BigBenchError(f"{origin}: malformed task.json: {err}") from err
    if not isinstance(obj, dict):
        raise BigBenchError(f"{origin}: malformed task.json: the top level is not an object")
    return obj


def _unknown(task: str, known: Iterable[str], where: str) -> BigBenchError:
    close = difflib.get_close_matches(task, list(known), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return BigBenchError(f"unknown BIG-bench task {task!r}: no {task}/task.json in {where}{hint}")


def read_task_files(
    tasks: Sequence[str], archive: str | Path | None = None, directory: str | Path | None = None
) -> dict[str, TaskFiles]:
    """The parsed task.json files of `tasks`, from a benchmark_tasks-like `directory` or the sdist
    `archive` (read in one pass, nothing extracted). Sub-folder files are keyed by folder name."""
    wanted = set(tasks)
    found: dict[str, TaskFiles] = {t: {} for t in tasks}
    if directory is not None:
        root = Path(directory)
        if not root.is_dir():
            raise BigBenchError(f"BIG-bench task folder {root} does not exist")
        for task in tasks:
            for file in sorted((root / task).glob("task.json")) + sorted((root / task).glob("*/task.json")):
                sub = TOP if file.parent == root / task else file.parent.name
                found[task][sub] = _load_json(file.read_bytes(), str(file))
        known: Iterable[str] = [p.name for p in root.iterdir() if (p / "task.json").is_file()]
        where = str(root)
    else:
        if archive is None or not Path(archive).is_file():
            raise BigBenchError(f"BIG-bench archive {archive} does not exist")
        known = set()
        with tarfile.open(archive, "r:gz") as tar:
            for member in tqdm(tar, desc=f"read {Path(archive).name}", unit=" files", mininterval=2):
                match = _MEMBER.match(member.name)
                if not match:
                    continue
                task, sub = match.group(1), match.group(2) or TOP
                if sub == TOP:
                    known.add(task)
                if task in wanted and member.isfile():
                    data = tar.extractfile(member).read()
                    found[task][sub] = _load_json(data, f"{archive}:{member.name}")
        where = str(archive)
    for task in tasks:
        if not found[task]:
            raise _unknown(task, known, where)
    return found


def _targets(example: Mapping[str, Any], origin: str) -> tuple[list[str], dict[str, float] | None]:
    """(the `target` strings, the `target_scores` mapping or None) of one example, validated."""
    target = example.get("target")
    scores = example.get("target_scores")
    if target is None and scores is None:
        raise BigBenchError(f"{origin}: has neither 'target' nor 'target_scores'")
    if isinstance(target, str):
        targets = [target]
    elif target is None:
        targets = []
    elif isinstance(target, list) and target and all(isinstance(t, str) for t in target):
        targets = list(target)
    else:
        raise BigBenchError(f"{origin}: 'target' must be a string or a non-empty list of strings")
    if scores is not None:
        if not isinstance(scores, dict) or not scores or not all(
            isinstance(k, str) and isinstance(v, (int, float)) for k, v in scores.items()
        ):
            raise BigBenchError(f"{origin}: 'target_scores' must be a non-empty mapping option -> number")
        scores = {k: float(v) for k, v in scores.items()}
    return targets, scores


def parse_task_json(task: str, obj: Mapping[str, Any], origin: str, subtask: str | None = None,
                    answer: str = "target") -> list[Example]:
    """Examples of one task.json. The prompt body is task_prefix + input prefix + input (+ one
    `choice:` line per option of a multiple-choice example, whatever `append_choices_to_input` says,
    as the paper does) + output prefix, in `[INST] ... [/INST]\\n`.

    answer="target": the first `target` (the best-scored option when there is none);
    answer="choice": the best-scored option of `target_scores` (the first `target` when there is none).
    """
    if answer not in ("target", "choice"):
        raise BigBenchError(f"task {task!r}: answer must be 'target' or 'choice', not {answer!r}")
    examples = obj.get("examples")
    if not isinstance(examples, list):
        raise BigBenchError(f"{origin}: malformed task.json: 'examples' is missing or not a list")
    task_prefix = obj.get("task_prefix") or ""
    input_prefix = obj.get("example_input_prefix", "\nQ: ")
    output_prefix = obj.get("example_output_prefix", "\nA: ")
    input_prefix = "\nQ: " if input_prefix is None else input_prefix
    output_prefix = "\nA: " if output_prefix is None else output_prefix
    out = []
    for i, example in enumerate(examples):
        where = f"{origin}: example {i}"
        if not isinstance(example, dict) or not isinstance(example.get("input"), str):
            raise BigBenchError(f"{where}: 'input' is missing or not a string")
        targets, scores = _targets(example, where)
        best = [k for k, v in scores.items() if v == max(scores.values())] if scores else []
        if answer == "choice" and best:
            first = best[0]
        else:
            first = targets[0] if targets else best[0]
        choices = tuple(scores) if scores else None
        body = f"{task_prefix}{input_prefix}{example['input']}"
        prompt = format_prompt(body, choices, output_prefix)
        out.append(Example(
            task=task,
            input=prompt,
            target=first,
            targets=tuple(unique([first, *targets, *best])),
            choices=choices,
            source=normalize_text(example["input"]),
            subtask=subtask,
        ))
    return out


def parse_task(task: str, files: TaskFiles, subtasks: Sequence[str] | None = None,
               answer: str = "target", origin: str = "") -> list[Example]:
    """All examples of a task: its top-level task.json and every sub-folder (or only `subtasks`)."""
    if subtasks is None:
        selected = sorted(files)
    else:
        missing = [s for s in subtasks if s not in files]
        if missing:
            available = sorted(s for s in files if s != TOP)
            raise BigBenchError(f"task {task!r}: no sub-folder {missing} (available: {available})")
        selected = list(subtasks)
    examples = []
    for sub in selected:
        where = f"{origin or task}/{sub + '/' if sub else ''}task.json"
        if sub == TOP and "examples" not in files[sub] and len(files) > 1:
            continue  # a parent task.json that only describes its sub-tasks
        examples += parse_task_json(task, files[sub], where, sub or None, answer)
    if not examples:
        raise BigBenchError(f"task {task!r}: no examples in {origin or task}")
    return examples
