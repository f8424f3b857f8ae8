"""Fixtures for the dataset tests."""

from __future__ import annotations

import pytest

from hpc_rlhf.builtin_models.tiny import build_tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The tiny character-level tokenizer with its chat template, built in memory."""
    return build_tiny_tokenizer()
