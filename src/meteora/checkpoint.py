"""Gates on disk: ``gates.safetensors`` (module name -> gate weight (N, d_in)) and ``manifest.json``.

The manifest records the adapter names in gate-output order, so gates can never be loaded against
another adapter set or order (gate output i means adapter i).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

GATES_FILE = "gates.safetensors"
MANIFEST_FILE = "manifest.json"
FORMAT = "meteora-gates"
FORMAT_VERSION = 1


class GateManifestError(ValueError):
    """Gates that do not belong to this model: other adapters, another order, other modules."""


def save_gate_state(
    directory: str | os.PathLike,
    state: dict[str, torch.Tensor],
    adapter_names: list[str],
    base_model: str,
    top_k: int,
    temperature: float,
) -> None:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({name: w.detach().contiguous().cpu() for name, w in state.items()}, str(directory / GATES_FILE))
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "adapters": list(adapter_names),
        "base_model": base_model,
        "top_k": int(top_k),
        "temperature": float(temperature),
        "modules": sorted(state),
    }
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(directory: str | os.PathLike) -> dict:
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise GateManifestError(f"gates {directory}: missing {MANIFEST_FILE}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise GateManifestError(f"gates {directory}: {MANIFEST_FILE} is not valid JSON ({err})") from err
    if manifest.get("format") != FORMAT:
        raise GateManifestError(f"gates {directory}: {MANIFEST_FILE} is not a MeteoRA gate manifest")
    return manifest


def load_gate_state(directory: str | os.PathLike, adapter_names: list[str], modules: set[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """Read gates saved by :func:`save_gate_state` after checking them against the model's adapters
    (names and order) and modules; returns (module name -> weight, manifest)."""
    from safetensors.torch import load_file

    manifest = read_manifest(directory)
    saved = list(manifest["adapters"])
    if saved != list(adapter_names):
        if sorted(saved) == sorted(adapter_names):
            raise GateManifestError(
                f"gates {directory} were trained with the adapters in another order: {saved}; this model has {list(adapter_names)}. "
                "Attach the adapters in the manifest's order."
            )
        raise GateManifestError(f"gates {directory} were trained for adapters {saved}; this model has {list(adapter_names)}")
    if set(manifest["modules"]) != modules:
        missing, extra = sorted(modules - set(manifest["modules"])), sorted(set(manifest["modules"]) - modules)
        raise GateManifestError(f"gates {directory} do not match this model's MeteoRA modules (missing {missing[:3]}, extra {extra[:3]})")
    state = load_file(str(Path(directory) / GATES_FILE))
    return state, manifest
