"""Fixtures shared by the metrics tests: a fake terminal stream, a logger factory and a raw metrics.jsonl reader."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hpc_rlhf.run.metrics import METRICS_FILE, MetricsLogger


class FakeTerminal(io.StringIO):
    """A text stream that says it is a TTY, so tqdm draws its animated bar into it."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def fake_terminal() -> Callable[[], FakeTerminal]:
    return FakeTerminal


@pytest.fixture
def make_logger(tmp_path: Path) -> Callable[..., MetricsLogger]:
    """An enabled logger on tmp_path (no TensorBoard, a non-TTY stream) unless the keywords say otherwise."""

    def make(**overrides: Any) -> MetricsLogger:
        kwargs: dict[str, Any] = dict(enabled=True, use_tensorboard=False, progress_bar=True, total_steps=10,
                                      stream=io.StringIO())
        kwargs.update(overrides)
        run_dir = kwargs.pop("run_dir", tmp_path)
        return MetricsLogger(run_dir, **kwargs)

    return make


def _strict_constant(name: str) -> None:
    raise AssertionError(f"metrics.jsonl must be strict JSON, found {name}")


@pytest.fixture
def jsonl_rows() -> Callable[[Path], list[dict[str, Any]]]:
    """Every line of RUN_DIR/metrics.jsonl parsed as strict JSON (NaN and Infinity are refused)."""

    def read(run_dir: Path) -> list[dict[str, Any]]:
        text = (Path(run_dir) / METRICS_FILE).read_text(encoding="utf-8")
        assert text.endswith("\n")
        return [json.loads(line, parse_constant=_strict_constant) for line in text.splitlines()]

    return read
