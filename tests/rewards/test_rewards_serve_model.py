"""Serving a reward model: tools/serve_reward.py --reward-pretrain on 127.0.0.1 answers what the in-process RewardModel
scores, and merges concurrent requests into fewer forward passes; BatchingScorer's rules on its own."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from hpc_rlhf.rewards import RemoteReward, RewardError, RewardModel, RewardResult
from hpc_rlhf.rewards.batching import BatchingScorer
from tests.rewards.serving import serve_reward

pytestmark = pytest.mark.timeout(120)

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVE_REWARD = REPO_ROOT / "tools" / "serve_reward.py"
QUERIES = ["<s>1+1=2</s>", "3+4=7", "12*3=36</s>", "9-9=0", "a longer query: 100+200=300</s>"]
PROMPTS = ["<s>1+1=", "3+4=", "12*3=", "9-9=", "a longer query: 100+200="]


@pytest.fixture(scope="module")
def served_model(tiny_text_reward_model_dir):
    """tools/serve_reward.py serving the tiny text reward model on a free port, batching up to 16 samples that arrive
    within 500 ms; yields its URL."""
    with serve_reward("--reward-pretrain", str(tiny_text_reward_model_dir), "--batch-size", "16",
                      "--max-wait-ms", "500", "--device", "cpu") as url:
        yield url


def _health(url: str) -> dict:
    with urllib.request.urlopen(url + "health", timeout=10) as response:
        return json.loads(response.read())


def test_scores_over_http_equal_the_in_process_reward_model(served_model, tiny_text_reward_model_dir):
    remote = RemoteReward(served_model, timeout_s=30.0, backoff_s=0.01)(QUERIES, PROMPTS, None)
    local = RewardModel(tiny_text_reward_model_dir, micro_batch_size=16)(QUERIES, PROMPTS, None)
    # The same five sequences in one forward pass on both sides, and JSON carries float32 values exactly.
    assert torch.equal(remote.rewards, local.rewards) and torch.equal(remote.scores, local.scores)
    assert len(set(local.rewards.tolist())) == len(QUERIES)  # distinct scores: a mixed-up order would show
    assert remote.extra_logs == {}
    health = _health(served_model)
    assert health["status"] == "ok" and str(tiny_text_reward_model_dir) in health["reward"]


def test_concurrent_requests_share_forward_passes(served_model, tiny_text_reward_model_dir):
    before = _health(served_model)
    start = threading.Barrier(len(QUERIES), timeout=30)
    answers: dict[int, RewardResult] = {}

    def ask(index: int) -> None:
        client = RemoteReward(served_model, timeout_s=30.0, backoff_s=0.01)
        start.wait()
        answers[index] = client([QUERIES[index]], [PROMPTS[index]], ["label"])

    threads = [threading.Thread(target=ask, args=(index,)) for index in range(len(QUERIES))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    after = _health(served_model)
    requests, batches = after["requests"] - before["requests"], after["batches"] - before["batches"]
    assert requests == len(QUERIES)
    assert batches < requests
    local = RewardModel(tiny_text_reward_model_dir)(QUERIES, PROMPTS, None).rewards
    served = torch.cat([answers[index].rewards for index in range(len(QUERIES))])
    # Right padding keeps each score independent of its batch, up to float rounding in differently shaped matmuls.
    torch.testing.assert_close(served, local, atol=1e-5, rtol=1e-5)


def test_serve_reward_refuses_a_model_without_tokenizer_and_model_flags_with_a_function(tiny_reward_model_dir,
                                                                                       length_reward_file):
    done = subprocess.run([sys.executable, str(SERVE_REWARD), "--reward-pretrain", str(tiny_reward_model_dir),
                           "--port", "0"], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and "no tokenizer saved beside it" in done.stderr
    done = subprocess.run([sys.executable, str(SERVE_REWARD), "--reward-func", str(length_reward_file),
                           "--batch-size", "4"], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and "--batch-size only apply to --reward-pretrain" in done.stderr


class Recorder:
    """A reward function that records each call's batch; rewards are the query lengths."""

    def __init__(self, fail_on: str | None = None):
        self.calls: list[tuple[list[str], list | None]] = []
        self.fail_on = fail_on

    def __call__(self, queries, prompts, labels=None) -> RewardResult:
        self.calls.append((list(queries), None if labels is None else list(labels)))
        if self.fail_on in queries:
            raise RuntimeError(f"cannot score {self.fail_on!r}")
        rewards = torch.tensor([float(len(query)) for query in queries])
        return RewardResult(rewards=rewards, scores=-rewards, extra_logs={"len": rewards.clone()})


def _ask_all(scorer: BatchingScorer, requests: list[tuple[list[str], list | None]]) -> list:
    """Send every request from its own thread at once; each answer or the exception it raised, in order."""
    answers: list = [None] * len(requests)

    def ask(index: int) -> None:
        queries, labels = requests[index]
        try:
            answers[index] = scorer(queries, queries, labels)
        except Exception as error:
            answers[index] = error

    threads = [threading.Thread(target=ask, args=(index,)) for index in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return answers


def test_batching_scorer_merges_until_the_batch_is_full_and_slices_answers():
    recorder = Recorder()
    scorer = BatchingScorer(recorder, batch_size=4, max_wait_s=30.0)  # only a full batch ends the wait early
    try:
        answers = _ask_all(scorer, [(["a"], ["x"]), (["bb", "ccc"], None), (["dddd"], ["y"])])
        assert len(recorder.calls) == 1
        queries, labels = recorder.calls[0]
        assert sorted(queries) == ["a", "bb", "ccc", "dddd"] and len(labels) == 4
        assert sorted(label for label in labels if label is not None) == ["x", "y"]
        assert [answer.rewards.tolist() for answer in answers] == [[1.0], [2.0, 3.0], [4.0]]
        assert answers[1].scores.tolist() == [-2.0, -3.0] and answers[1].extra_logs["len"].tolist() == [2.0, 3.0]
        assert scorer.stats() == {"requests": 3, "batches": 1}
    finally:
        scorer.close()


def test_batching_scorer_holds_what_does_not_fit_and_scores_a_big_request_alone():
    recorder = Recorder()
    scorer = BatchingScorer(recorder, batch_size=3, max_wait_s=0.2)
    try:
        assert scorer(["a", "b", "c", "d", "e"], [""] * 5).rewards.tolist() == [1.0] * 5
        assert [len(queries) for queries, _ in recorder.calls] == [5]
        recorder.calls.clear()
        answers = _ask_all(scorer, [(["aa", "bb"], None), (["cc", "dd"], None)])
        assert [answer.rewards.tolist() for answer in answers] == [[2.0, 2.0], [2.0, 2.0]]
        assert [len(queries) for queries, _ in recorder.calls] == [2, 2]  # 2 + 2 > batch_size
    finally:
        scorer.close()


def test_batching_scorer_gives_every_request_of_a_failed_batch_the_error_and_keeps_serving():
    recorder = Recorder(fail_on="boom")
    scorer = BatchingScorer(recorder, batch_size=3, max_wait_s=30.0)
    try:
        answers = _ask_all(scorer, [(["boom"], None), (["ok"], None), (["fine"], None)])
        assert len(recorder.calls) == 1
        assert all(isinstance(answer, RuntimeError) and "cannot score 'boom'" in str(answer) for answer in answers)
        started = time.monotonic()
        scorer.max_wait_s = 0.0
        assert scorer(["ok"], [""]).rewards.tolist() == [2.0]
        assert time.monotonic() - started < 5
    finally:
        scorer.close()
    with pytest.raises(RewardError, match="closed"):
        scorer(["a"], [""])
    with pytest.raises(RewardError, match="batch_size must be an integer >= 1"):
        BatchingScorer(recorder, batch_size=0)
