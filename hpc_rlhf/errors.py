"""Errors a user can fix, and the one debug switch that decides how they are shown.

`--debug` on an entry point sets HPC_RLHF_DEBUG=1, which every rank inherits; with it, errors show their tracebacks,
without it they are one line. This module imports nothing of the project, so any module may raise UsageError.
"""

from __future__ import annotations

import os

DEBUG_ENV = "HPC_RLHF_DEBUG"


class UsageError(Exception):
    """A problem the user can fix (a path, the run directory, the machine): printed as one line per problem, exit 2."""


def debug_enabled() -> bool:
    """Whether errors should show their tracebacks (--debug, or HPC_RLHF_DEBUG=1 in the environment)."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")
