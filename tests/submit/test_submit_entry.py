"""The callable submitit runs on every task: it answers submitit's checkpoint hook with a prompt requeue, and its
module imports install the stop handlers before torch is loaded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import hpc_rlhf.slurm as slurm
from hpc_rlhf.config.schema import Config
from hpc_rlhf.submit import RankEntry

REPO = Path(__file__).resolve().parents[2]


def test_checkpoint_hook_requeues_with_the_configured_limit(monkeypatch):
    cfg = Config()
    cfg.slurm.max_requeue = 7
    calls = []
    monkeypatch.setattr(slurm, "requeue_promptly_and_exit", lambda limit: calls.append(limit))
    RankEntry(cfg).checkpoint()
    assert calls == [7]


def test_importing_the_rank_entry_in_a_slurm_task_catches_stop_signals():
    code = ("import signal, sys; import hpc_rlhf.launch; "
            "print(signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, None), 'torch' in sys.modules)")
    env = dict(os.environ, SLURM_STEP_ID="0")  # as in a task of a SLURM step
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    handled, _torch_loaded = out.stdout.split()
    assert handled == "True"
