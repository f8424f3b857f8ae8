"""A short run of tools/torture_slurm.py: the tiny 3-node job stopped twice at moments drawn from a seed (a USR1
to the batch shell, then SIGKILL of one rank followed by a new submission) ends bitwise equal to an uninterrupted
run, with no shard committed twice and nothing left behind."""

from __future__ import annotations

import pytest

from hpc_rlhf.slurm.torture import run_reference, torture

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
ITERATIONS = 20  # enough iterations after the first logged one that a stop drawn within 0.5 s lands mid-run


@pytest.mark.timeout(1200)
def test_torture_short(slurm_cluster, tmp_path):
    from hpc_rlhf.builtin_models.resolve import resolve_model_path

    resolve_model_path("builtin:tiny-llama-arith")  # once, before the ranks look for it
    run_reference(tmp_path / "reference", ITERATIONS, async_queue=1, save_steps=2, log=tmp_path / "reference.log")
    report = torture(slurm_cluster, tmp_path, seed=4, stops=2, iterations=ITERATIONS, kinds=("usr1_batch",
                     "kill_rank"), max_delay_s=0.5, timeout_s=1000, reference=tmp_path / "reference",
                     anchor="training")
    text = "\n".join(report.lines())
    print(text)
    assert report.interruptions, text
    assert report.ok, text
    assert [(item.stop, item.state) for item in report.interruptions] == [("usr1_batch", "requeued"),
                                                                          ("kill_rank", "FAILED")], text
    assert report.interruptions[1].detail == "SIGKILL to ranks [2]", text
    requeued = [item for item in report.interruptions if item.state == "requeued"]
    assert all(item.restart_s is not None and item.restart_s < 90 for item in requeued), text
