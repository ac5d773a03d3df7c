"""Task data of the pipeline: BIG-bench and hub tasks in the paper's prompt format, seeded splits,
composite tasks and the train/test leakage check."""

from stages.data.bigbench import BigBenchError, fetch_archive, parse_task, read_task_files
from stages.data.composite import build_composite
from stages.data.examples import Example, format_prompt
from stages.data.hub import HubUnavailableError, ensure_hub, load_hub_task
from stages.data.leakage import LeakageError, check_leakage
from stages.data.splits import split_examples

__all__ = [
    "BigBenchError",
    "Example",
    "HubUnavailableError",
    "LeakageError",
    "build_composite",
    "check_leakage",
    "ensure_hub",
    "fetch_archive",
    "format_prompt",
    "load_hub_task",
    "parse_task",
    "read_task_files",
    "split_examples",
]
