"""One run directory holds one run: a start with another config is refused before anything is written, a requeue or
resume of the same run passes, and --overwrite-run-dir moves the earlier run aside instead of deleting it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hpc_rlhf.config.loading import config_to_dict, load_config
from hpc_rlhf.run.directory import CONFIG_FILE, RunDirConflict, check_run_dir, record_run_config

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny_cpu.yaml"


def config(run_dir: Path, *overrides: str) -> dict:
    return config_to_dict(load_config(TINY, [f"--train.run_dir={run_dir}", *overrides]).config)


def earlier_run(run_dir: Path, *overrides: str) -> dict[str, bytes]:
    """A finished run's record: its config and a metrics file beside it; returns every file's bytes."""
    record_run_config(run_dir, config(run_dir, *overrides))
    (run_dir / "metrics.jsonl").write_text('{"step": 0, "rollout/reward_mean": 0.25}\n')
    (run_dir / "rollouts").mkdir()
    (run_dir / "rollouts" / "shard.arrow").write_bytes(b"arrow")
    return snapshot(run_dir)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_fresh_directory_records_the_config(tmp_path):
    run_dir = tmp_path / "run"
    assert record_run_config(run_dir, config(run_dir)) == (run_dir, "new")
    assert yaml.safe_load((run_dir / CONFIG_FILE).read_text()) == config(run_dir)


def test_a_requeue_of_the_same_run_passes_and_rewrites_nothing(tmp_path):
    run_dir = tmp_path / "run"
    before = earlier_run(run_dir)
    mtime = (run_dir / CONFIG_FILE).stat().st_mtime_ns
    assert record_run_config(run_dir, config(run_dir)) == (run_dir, "same")
    assert snapshot(run_dir) == before and (run_dir / CONFIG_FILE).stat().st_mtime_ns == mtime


def test_a_resume_that_changes_only_volatile_keys_keeps_the_replaced_config(tmp_path):
    """Run length, eval and logging may change between restarts of one run (as for checkpoints)."""
    run_dir = tmp_path / "run"
    before = earlier_run(run_dir)
    longer = config(run_dir, "--train.max_iterations=160", "--eval.steps=10")
    assert record_run_config(run_dir, longer) == (run_dir, "updated")
    assert yaml.safe_load((run_dir / CONFIG_FILE).read_text()) == longer
    assert (run_dir / "config_history" / "config-1.yaml").read_bytes() == before[CONFIG_FILE]
    assert {k: v for k, v in snapshot(run_dir).items() if k != CONFIG_FILE and "history" not in k} == {
        k: v for k, v in before.items() if k != CONFIG_FILE}
    record_run_config(run_dir, config(run_dir, "--train.max_iterations=200"))
    assert (run_dir / "config_history" / "config-2.yaml").exists()


def test_another_config_is_refused_naming_the_directory_and_the_keys(tmp_path):
    run_dir = tmp_path / "run"
    before = earlier_run(run_dir)
    other = config(run_dir, "--train.seed=7", "--actor.learning_rate=1e-3")
    with pytest.raises(RunDirConflict) as refused:
        record_run_config(run_dir, other)
    message = str(refused.value)
    assert "\n" not in message
    earlier_lr = config(run_dir)["actor"]["learning_rate"]  # the default config's, whatever it is tuned to
    assert message.startswith(f"train.run_dir: {run_dir} holds a run with a different config (actor.learning_rate: "
                              f"{earlier_lr} there, 0.001 now; train.seed: 1 there, 7 now)")
    assert "new --train.run_dir" in message and "--overwrite-run-dir" in message
    assert snapshot(run_dir) == before  # nothing written
    with pytest.raises(RunDirConflict):
        check_run_dir(run_dir, other)
    many = config(run_dir, "--train.seed=7", "--actor.learning_rate=1e-3", "--rollout.temperature=0.5",
                  "--rollout.top_p=0.9", "--algo.eps_clip_low=0.1")
    with pytest.raises(RunDirConflict, match="and 2 more"):
        check_run_dir(run_dir, many)


def test_overwrite_moves_the_earlier_run_aside(tmp_path):
    run_dir = tmp_path / "run"
    before = earlier_run(run_dir)
    other = config(run_dir, "--train.seed=7")
    assert check_run_dir(run_dir, other, overwrite=True) is not None  # the check alone moves nothing
    assert snapshot(run_dir) == before
    _, outcome = record_run_config(run_dir, other, overwrite=True)
    assert outcome == f"moved:{run_dir / 'previous' / '1'}"
    assert snapshot(run_dir / "previous" / "1") == before
    assert sorted(p.name for p in run_dir.iterdir()) == [CONFIG_FILE, "previous"]
    assert yaml.safe_load((run_dir / CONFIG_FILE).read_text()) == other
    # A requeue of the new run, still with the flag on its command line, keeps it (and moves nothing).
    (run_dir / "metrics.jsonl").write_text("{}\n")
    assert record_run_config(run_dir, other, overwrite=True)[1] == "same"
    assert (run_dir / "metrics.jsonl").exists() and not (run_dir / "previous" / "2").exists()
    record_run_config(run_dir, config(run_dir, "--train.seed=8"), overwrite=True)
    assert snapshot(run_dir / "previous" / "2")["metrics.jsonl"] == b"{}\n"


def test_an_unreadable_record_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / CONFIG_FILE).write_text("train: [unclosed\n")
    with pytest.raises(RunDirConflict, match="cannot read"):
        record_run_config(run_dir, config(run_dir))
    assert record_run_config(run_dir, config(run_dir), overwrite=True)[1].startswith("moved:")


def test_the_train_entry_refuses_before_touching_anything(tmp_path):
    """The run fails for another reason too (a missing dataset): the earlier run's config must survive, and the
    refusal is one line."""
    run_dir = tmp_path / "run"
    before = earlier_run(run_dir)
    env = dict(os.environ, HPC_RLHF_CACHE=str(tmp_path / "cache"))
    env.pop("HPC_RLHF_DEBUG", None)
    result = subprocess.run([sys.executable, "-m", "hpc_rlhf.train", "--config", str(TINY),
                             f"--train.run_dir={run_dir}", "--train.seed=2", f"--data.prompt_data={tmp_path}/x.jsonl"],
                            cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"python -m hpc_rlhf.train: error: train.run_dir: {run_dir} holds a run with a "
                               f"different config (")
    assert "data.prompt_data:" in lines[0] and "train.seed: 1 there, 2 now" in lines[0]
    assert snapshot(run_dir) == before
