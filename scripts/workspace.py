"""A side workspace for re-running stages by hand beside the pipeline's own outputs: artifacts/<kind>/<name>
with links to the pipeline's artifacts it reuses, reports/<kind>/<name> for what the re-run writes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def side_workspace(kind: str, name: str, linked: Sequence[str]) -> tuple[Path, Path]:
    """(artifacts, reports) folders of the workspace `kind`/`name`, each of `linked` (``model``,
    ``adapters``...) a link to the pipeline's artifacts/<that>; the pipeline's folders must exist."""
    artifacts, reports = ROOT / "artifacts" / kind / name, ROOT / "reports" / kind / name
    for item in linked:
        if not (ROOT / "artifacts" / item).is_dir():
            raise FileNotFoundError(f"artifacts/{item} does not exist: run the pipeline first (make reproduce)")
    artifacts.mkdir(parents=True, exist_ok=True)
    reports.mkdir(parents=True, exist_ok=True)
    for item in linked:
        link = artifacts / item
        if not link.exists():
            link.symlink_to(ROOT / "artifacts" / item, target_is_directory=True)
    return artifacts, reports


def trained_meteora(cfg, tasks: Sequence[str]):
    """(MeteoRA model in eval mode, tokenizer): the pipeline's base model in the decoding dtype with
    `tasks`' adapters and the gates of `paths.artifacts`/gates, as the evaluate stage loads them."""
    from stages.setup import build_meteora, decode_dtype

    model, tokenizer = build_meteora(cfg, list(tasks), top_k=int(cfg.meteora.top_k),
                                     temperature=float(cfg.meteora.temperature), dtype=decode_dtype(cfg))
    model.load_gates(Path(cfg.paths.artifacts) / "gates", use_manifest_settings=False, cast=True)
    return model.eval(), tokenizer
