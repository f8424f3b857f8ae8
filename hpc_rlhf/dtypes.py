"""Torch dtypes by the names configs and command lines use ("bfloat16", "bf16", "float32", ...).

A leaf module (it imports torch only), so generators, reward models and tools share one table.
"""

from __future__ import annotations

import torch

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32}


def torch_dtype(value: str | torch.dtype, what: str = "dtype") -> torch.dtype:
    """A torch dtype from a dtype or one of DTYPES' names; ValueError naming `what` otherwise."""
    if isinstance(value, torch.dtype):
        return value
    if value not in DTYPES:
        raise ValueError(f"{what} must be one of {sorted(DTYPES)}, got {value!r}")
    return DTYPES[value]
