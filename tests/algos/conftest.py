"""Fixtures for the algorithm-library tests."""

from __future__ import annotations

from typing import Callable

import pytest
import torch


def _right_padded_mask(lengths: list[int], width: int | None = None) -> torch.Tensor:
    """[B, width] int mask with lengths[i] leading ones in row i."""
    width = max(lengths) if width is None else width
    return (torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).long()


@pytest.fixture
def right_padded_mask() -> Callable[..., torch.Tensor]:
    """Builds a right-padded action mask from per-row lengths."""
    return _right_padded_mask
