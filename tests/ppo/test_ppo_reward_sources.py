"""Training jobs whose rewards come from a real HTTP reward service and from a multi-turn environment."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from hpc_rlhf.rollouts import RolloutReader

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def reward_server():
    """tools/serve_reward.py serving the arithmetic reward on 127.0.0.1 (a free port)."""
    proc = subprocess.Popen([sys.executable, "tools/serve_reward.py", "--reward-func", "hpc_rlhf/tasks/arithmetic.py",
                             "--port", "0", "--log-requests"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline()
        url = next(word for word in line.split() if word.startswith("http://"))
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.timeout(300)
def test_remote_reward_service_scores_the_rollouts(tmp_path, jobs, reward_server):
    url, proc = reward_server
    run_dir = tmp_path / "run"
    jobs.run(run_dir, "--reward.reward_func_path=", f"--reward.remote_url={url}", "--train.max_iterations=2")
    reader = RolloutReader(run_dir)
    for iteration in range(2):
        table = reader.read(iteration, require_filled=["reward", "score"])
        rewards = table.column("reward").to_pylist()
        assert len(rewards) == 4 and all(min(abs(r - v) for v in (0.0, 0.1, 1.0)) < 1e-6 for r in rewards)
    assert all(jobs.finite(r["train/policy_loss"]) for r in jobs.metrics(run_dir) if "train/policy_loss" in r)


AGENT = '''
"""A deterministic guessing environment: answer the sum; a wrong answer gets one hint and another turn."""


class AgentInstance:
    def reset(self, state):
        return {"observation": state["observation"]}

    def step(self, state):
        answer = state["action_text"].strip().split("<")[0].strip()
        correct = answer == str(state["label"])
        if correct or state["turn"] >= 1:
            return {"rewards": 1.0 if correct else 0.0, "environment_feedback": "", "done": True}
        return {"rewards": 0.0, "environment_feedback": "no. again: ", "done": False}
'''


@pytest.mark.timeout(300)
def test_multi_turn_environment_tokens_are_masked(tmp_path, jobs):
    agent = tmp_path / "agent.py"
    agent.write_text(textwrap.dedent(AGENT))
    run_dir = tmp_path / "run"
    jobs.run(run_dir, "--reward.reward_func_path=", f"--rollout.agent_func_path={agent}", "--rollout.max_turns=2",
             "--train.max_iterations=2", "--rollout.batch_size=4", "--rollout.record_behaviour_log_probs=true")
    from transformers import AutoTokenizer
    from hpc_rlhf.builtin_models.resolve import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("builtin:tiny-llama-arith"))
    feedback = tokenizer("no. again: ", add_special_tokens=False)["input_ids"]
    rows = RolloutReader(run_dir).read(0).to_pylist()
    multi = [r for r in rows if 0 in r["action_mask"]]
    assert multi, "with a weak model some first answers are wrong and get a second turn"
    for row in multi:
        mask, response = row["action_mask"], row["response_ids"]
        start = mask.index(0)
        env = response[start:start + len(feedback)]
        assert env == feedback and mask[start:start + len(feedback)] == [0] * len(feedback)
        assert all(m == 1 for m in mask[start + len(feedback):]), "the second answer is the policy's again"
        assert all(lp == 0.0 for lp, m in zip(row["behaviour_log_probs"], mask) if m == 0)
    assert all(r["reward"] in (0.0, 1.0) for r in rows)
    trained = [r for r in jobs.metrics(run_dir) if "train/policy_loss" in r]
    assert len(trained) == 2 and all(jobs.finite(r["train/policy_loss"]) for r in trained)
