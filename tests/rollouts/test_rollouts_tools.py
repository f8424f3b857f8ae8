"""tools/inspect_rollouts.py and tools/bench_runtime.py run as users run them."""

from __future__ import annotations

import json
import subprocess

import pytest

from hpc_rlhf.rollouts import ShardWriter, commit_iteration


def _row(group, sample, prompt_len, response_len, policy_tokens, weight_version):
    return {
        "prompt_ids": [1] * prompt_len,
        "response_ids": [2] * response_len,
        "behaviour_log_probs": [-1.0] * response_len,
        "action_mask": [1] * policy_tokens + [0] * (response_len - policy_tokens),
        "prompt_id": group,
        "group_id": group,
        "sample_index": sample,
        "weight_version": weight_version,
    }


@pytest.fixture
def inspected_run(run_dir):
    """Iteration 0 complete with rewards, iteration 1 partial without."""
    writer = ShardWriter(run_dir)
    writer.write(0, "generator_0000", [_row(0, 0, 3, 4, 2, 5), _row(0, 1, 3, 6, 6, 5)])
    writer.write(0, "generator_0001", [_row(1, 0, 5, 2, 1, 6)])
    commit_iteration(run_dir, 0, ["generator_0000", "generator_0001"])
    writer.write_columns(0, "generator_0000", "rewards", {"reward": [1.0, 0.0], "score": [1.0, 0.0]})
    writer.write_columns(0, "generator_0001", "rewards", {"reward": [0.5], "score": [1.0]})
    writer.write(1, "generator_0000", [_row(7, 0, 2, 8, 8, 6)])
    return run_dir


def _run(python, repo_root, env, *args):
    return subprocess.run([python, *args], cwd=repo_root, env=env, capture_output=True, text=True, timeout=60)


def test_inspect_json_matches_hand_computed_summary(python, repo_root, subprocess_env, inspected_run):
    result = _run(python, repo_root, subprocess_env, "tools/inspect_rollouts.py", str(inspected_run), "--json")
    assert result.returncode == 0, result.stderr
    first, second = json.loads(result.stdout)
    assert first == {
        "iteration": 0,
        "complete": True,
        "shards": 2,
        "samples": 3,
        "groups": 2,
        "rewards_filled": 3,
        "mean_reward": pytest.approx(0.5),  # (1 + 0 + 0.5) / 3
        "mean_score": pytest.approx(2 / 3),
        "mean_prompt_length": pytest.approx(11 / 3),  # (3 + 3 + 5) / 3
        "max_prompt_length": 5,
        "mean_response_length": pytest.approx(4.0),  # (4 + 6 + 2) / 3
        "max_response_length": 6,
        "policy_tokens": 9,  # 2 + 6 + 1
        "weight_versions": [5, 6],
    }
    assert second["iteration"] == 1 and second["complete"] is False
    assert second["samples"] == 1 and second["mean_reward"] is None and second["rewards_filled"] == 0

    only = _run(
        python, repo_root, subprocess_env, "tools/inspect_rollouts.py", str(inspected_run), "--iteration", "1", "--json"
    )
    assert [s["iteration"] for s in json.loads(only.stdout)] == [1]


def test_inspect_table_and_errors(python, repo_root, subprocess_env, inspected_run, tmp_path):
    result = _run(python, repo_root, subprocess_env, "tools/inspect_rollouts.py", str(inspected_run))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["iter", "complete", "shards", "samples"]
    assert lines[1].split()[:7] == ["0", "yes", "2", "3", "2", "3", "0.5000"]
    assert lines[1].split()[-1] == "(2)" and "5..6" in lines[1]
    assert lines[2].split()[:4] == ["1", "no", "1", "1"]
    assert lines[-1] == "2 iteration(s), 4 sample(s)"

    shard = inspected_run / "rollouts" / "iter_000000" / "generator_0001.arrow"
    shard.write_bytes(shard.read_bytes()[:-8])
    broken = _run(python, repo_root, subprocess_env, "tools/inspect_rollouts.py", str(inspected_run))
    assert broken.returncode == 1 and "generator_0001.arrow" in broken.stderr
    missing = _run(python, repo_root, subprocess_env, "tools/inspect_rollouts.py", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_bench_shards_runs_and_reports_json(python, repo_root, subprocess_env, tmp_path):
    out = tmp_path / "bench.json"
    result = _run(
        python,
        repo_root,
        subprocess_env,
        "tools/bench_runtime.py",
        "shards",
        "--samples",
        "16",
        "--prompt-tokens",
        "8",
        "--response-tokens",
        "32",
        "--repeats",
        "2",
        "--json",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["benchmark"] == "shards" and report["config"]["samples"] == 16
    names = {(m["name"], m["unit"]) for m in report["results"]}
    assert ("write+commit", "samples/s") in names and ("read (sha256 verified)", "MB/s") in names
    for measurement in report["results"]:
        assert len(measurement["values"]) == 2 and measurement["best"] == max(measurement["values"]) > 0
    assert "write+commit" in result.stdout
