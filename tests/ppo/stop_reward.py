"""The arithmetic reward, plus a stop request sent to this process by its Nth call (once per marker file): a stop
that arrives while a colocated async rank generates in its thread and trains in its main thread."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from hpc_rlhf.tasks import arithmetic

STOP_AT_CALL_ENV = "TEST_STOP_AT_REWARD_CALL"  # "N:MARKER": on call N, if MARKER does not exist, create it and stop
_calls = 0


def reward_func(queries: list[str], prompts: list[str], labels: list[str], **kwargs) -> dict:
    global _calls
    _calls += 1
    stop_at, _, marker = os.environ.get(STOP_AT_CALL_ENV, "0:").partition(":")
    if _calls == int(stop_at) and not Path(marker).exists():
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGUSR1)  # what SLURM sends before the time limit
    return arithmetic.reward_func(queries, prompts, labels, **kwargs)
