"""Fixtures for the tiny-model tests: one model folder built per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpc_rlhf.builtin_models.tiny import build_tiny_model, build_tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A default-size tiny model (policy + tokenizer, and reward/ beside it), seed 0."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The tiny character-level tokenizer, built in memory."""
    return build_tiny_tokenizer()
