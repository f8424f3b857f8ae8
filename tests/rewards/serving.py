"""Start tools/serve_reward.py as a subprocess for a test, and stop it afterwards."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

SERVE_REWARD = Path(__file__).resolve().parents[2] / "tools" / "serve_reward.py"


@contextlib.contextmanager
def serve_reward(*args: str) -> Iterator[str]:
    """tools/serve_reward.py ARGS on a free port (--port 0); yields its URL, terminates it at the end."""
    process = subprocess.Popen([sys.executable, str(SERVE_REWARD), *args, "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        if not line.startswith("serving "):
            process.kill()
            raise AssertionError(f"serve_reward did not start: {line!r} {process.stderr.read()}")
        yield line.split(" on ")[-1].strip()
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
