"""Names of the floating-point dtypes a model or benchmark setting may ask for, once for the project."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                                  "float64": torch.float64}


def dtype_of(name: str, setting: str = "dtype") -> torch.dtype:
    """The torch dtype called `name`; an unknown name raises ValueError naming `setting`."""
    if name not in DTYPES:
        raise ValueError(f"{setting}={name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]
