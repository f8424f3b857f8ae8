"""The one debug switch: `--debug` on an entry point sets HPC_RLHF_DEBUG=1, which every rank inherits; with it,
errors show their tracebacks, without it they are one line."""

from __future__ import annotations

import os

DEBUG_ENV = "HPC_RLHF_DEBUG"


def debug_enabled() -> bool:
    """Whether errors should show their tracebacks (--debug, or HPC_RLHF_DEBUG=1 in the environment)."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")
