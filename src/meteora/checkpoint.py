"""Gates on disk: ``gates.safetensors`` (module name -> gate weight (N, d_in)) and ``manifest.json``.

The manifest records the adapter names in gate-output order, so gates can never be loaded against
another adapter set or order (gate output i means adapter i). A save is atomic (both files are written
into a temporary directory, the manifest last, which then replaces the old one); a load checks the
manifest, the file's keys, every tensor's shape, dtype and values against the model before anything
is copied, so gates load completely or not at all.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from .io import atomic_directory, complete_interrupted_swap

GATES_FILE = "gates.safetensors"
MANIFEST_FILE = "manifest.json"
FORMAT = "meteora-gates"
FORMAT_VERSION = 1
MANIFEST_KEYS = ("format", "format_version", "adapters", "base_model", "top_k", "temperature", "modules")


class GateManifestError(ValueError):
    """Gates that cannot be loaded into this model: unreadable or damaged files, other adapters, another
    order, other modules, shapes or dtypes, another base model. The message names the file."""


def save_gate_state(
    directory: str | os.PathLike,
    state: dict[str, torch.Tensor],
    adapter_names: list[str],
    base_model: str,
    top_k: int,
    temperature: float,
) -> None:
    """Write ``state`` (module name -> gate weight (N, d_in)) and the manifest into ``directory``, atomically."""
    from safetensors import torch as safetensors_torch

    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "adapters": list(adapter_names),
        "base_model": base_model,
        "top_k": int(top_k),
        "temperature": float(temperature),
        "modules": sorted(state),
    }
    with atomic_directory(directory) as tmp:
        safetensors_torch.save_file({name: w.detach().contiguous().cpu() for name, w in state.items()}, str(tmp / GATES_FILE))
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(directory: str | os.PathLike) -> dict:
    """The manifest of a gate directory, with every key present; raises :class:`GateManifestError`."""
    complete_interrupted_swap(directory)
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise GateManifestError(f"gates {directory}: missing {MANIFEST_FILE} (run train_gates, or point to a folder written by save_gates)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise GateManifestError(f"gates {path} is not valid JSON ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise GateManifestError(f"gates {path} is not a MeteoRA gate manifest (no \"format\": \"{FORMAT}\")")
    for key in MANIFEST_KEYS:
        if key not in manifest:
            raise GateManifestError(f"gates {path} lacks the key {key!r}; save the gates again with save_gates")
    if manifest["format_version"] > FORMAT_VERSION:
        raise GateManifestError(f"gates {path}: format_version {manifest['format_version']} is newer than this "
                                f"library reads ({FORMAT_VERSION})")
    return manifest


def _read_checked(path: Path, expected: dict[str, torch.Tensor], cast: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of ``path``, after checking keys, shapes and dtypes against ``expected`` (module ->
    the model's gate weight) from the file's header, and finite values once read. ``cast``: a floating
    dtype other than the model's is allowed and the values are cast to it (checked finite after the cast)."""
    from safetensors import safe_open

    if not path.is_file():
        raise GateManifestError(f"gates {path}: the file is missing (run train_gates again)")
    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = set(fh.keys())
            missing, extra = sorted(set(expected) - keys), sorted(keys - set(expected))
            if missing or extra:
                raise GateManifestError(
                    f"gates {path} lacks modules {missing[:3]} and has modules this model does not {extra[:3]} "
                    f"({len(missing)} missing, {len(extra)} extra); the gates belong to another model or target modules"
                )
            for name, weight in expected.items():
                sliced = fh.get_slice(name)
                shape, dtype = tuple(sliced.get_shape()), sliced.get_dtype()
                if shape != tuple(weight.shape):
                    raise GateManifestError(f"gates {path}, module {name}: shape {shape}, but this model's gate is {tuple(weight.shape)}")
                want = str(weight.dtype).removeprefix("torch.")
                have = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}.get(dtype, dtype)
                if have != want and not (cast and have in ("float16", "bfloat16", "float32", "float64")):
                    raise GateManifestError(
                        f"gates {path}, module {name}: saved as {have}, but this model's gate is {want}; "
                        "load the base model in the dtype the gates were trained in, or load with cast=True"
                    )
            state = {name: fh.get_tensor(name).to(weight.dtype) for name, weight in expected.items()}
    except GateManifestError:
        raise
    except Exception as err:  # safetensors raises several types for a damaged or truncated file
        raise GateManifestError(f"gates {path} is not a readable safetensors file, truncated or damaged ({err}); "
                                "run train_gates again") from err
    for name, tensor in state.items():
        if not torch.isfinite(tensor).all():
            raise GateManifestError(f"gates {path}, module {name}: holds NaN or infinite values; run train_gates again")
    return state


def load_gate_state(
    directory: str | os.PathLike,
    adapter_names: list[str],
    expected: dict[str, torch.Tensor],
    base_model: str,
    allow_other_base: bool = False,
    cast: bool = False,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Read gates saved by :func:`save_gate_state` after checking them against the model: adapters (names
    and order), modules (manifest and file), each tensor's shape, dtype and values, and the base model
    (an error, or a warning with ``allow_other_base``). ``expected``: module name -> the model's gate
    weight; ``cast``: gates saved in another floating dtype are cast to the model's. Returns (module name
    -> weight, manifest); raises :class:`GateManifestError`."""
    manifest = read_manifest(directory)
    manifest_path = Path(directory) / MANIFEST_FILE
    saved = list(manifest["adapters"])
    if saved != list(adapter_names):
        if sorted(saved) == sorted(adapter_names):
            raise GateManifestError(
                f"gates {directory} were trained with the adapters in another order: {saved}; this model has {list(adapter_names)}. "
                "Attach the adapters in the manifest's order."
            )
        raise GateManifestError(f"gates {directory} were trained for adapters {saved}; this model has {list(adapter_names)}")
    if set(manifest["modules"]) != set(expected):
        missing, extra = sorted(set(expected) - set(manifest["modules"])), sorted(set(manifest["modules"]) - set(expected))
        raise GateManifestError(f"gates {manifest_path} do not match this model's MeteoRA modules "
                                f"(missing {missing[:3]}, extra {extra[:3]})")
    if manifest["base_model"] != base_model:
        message = f"gates {manifest_path} were trained on base model {manifest['base_model']!r}; this model is {base_model!r}"
        if not allow_other_base:
            raise GateManifestError(f"{message}. Pass allow_other_base=True if it is the same model under another name.")
        warnings.warn(f"{message} (loaded anyway: allow_other_base=True)", UserWarning, stacklevel=3)
    return _read_checked(Path(directory) / GATES_FILE, expected, cast), manifest
