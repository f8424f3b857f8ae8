"""The reward service: tools/serve_reward.py in a subprocess end to end with RemoteReward, and RewardServer's answers
to bad requests and failing reward functions."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from hpc_rlhf.rewards import RemoteReward, RewardError, RewardFunction
from hpc_rlhf.rewards.server import RewardServer, parse_request
from tests.rewards.serving import serve_reward

pytestmark = pytest.mark.timeout(60)

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVE_REWARD = REPO_ROOT / "tools" / "serve_reward.py"


@pytest.fixture
def served(length_reward_file):
    """tools/serve_reward.py serving the length reward file on a free port; yields its URL."""
    with serve_reward("--reward-func", str(length_reward_file)) as url:
        yield url


def test_served_reward_file_matches_calling_it_directly(served, length_reward_file):
    queries = ["ab=cd", "x=", "q=long answer", "k=v"]
    prompts = ["ab=", "x=", "q=", "k="]
    labels = ["cd", "y", "long answer", "w"]
    remote = RemoteReward(served, timeout_s=10.0, backoff_s=0.01, batch_size=3)(queries, prompts, labels)
    local = RewardFunction(str(length_reward_file))(queries, prompts, labels)
    assert remote.rewards.tolist() == [2.0, 0.0, 11.0, 1.0]
    assert remote.scores.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert torch.equal(remote.rewards, local.rewards) and torch.equal(remote.scores, local.scores)
    assert torch.equal(remote.extra_logs["response_len"], local.extra_logs["response_len"])
    # batch_size counted per request: 3 then 1.
    assert remote.extra_logs["batch_size"].tolist() == [3.0, 3.0, 3.0, 1.0]
    with urllib.request.urlopen(served + "health", timeout=10) as response:
        assert json.loads(response.read())["status"] == "ok"


def test_serve_reward_refuses_a_missing_file(tmp_path):
    done = subprocess.run([sys.executable, str(SERVE_REWARD), "--reward-func", str(tmp_path / "none.py"),
                           "--port", "0"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "none.py" in done.stderr and "does not exist" in done.stderr


@pytest.fixture
def in_thread_server(write_reward_file):
    """A RewardServer in a thread over a reward file that fails for the label 'boom'."""
    path = write_reward_file("def reward_func(queries, prompts, labels):\n"
                             "    if 'boom' in labels:\n        raise RuntimeError('label boom is not allowed')\n"
                             "    return [float(len(q)) for q in queries]\n")
    server = RewardServer(RewardFunction(str(path)), port=0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.parametrize("body, fragment", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (json.dumps({"prompts": ["a"], "labels": ["b"]}).encode(), "field 'query' must be a list"),
    (json.dumps({"query": ["a", "b"], "prompts": ["a"]}).encode(), "field 'prompts' has 1 entries for 2 queries"),
    (json.dumps({"query": ["a"], "prompts": ["a"], "labels": ["x", "y"]}).encode(), "field 'labels' has 2 entries"),
    (json.dumps({"query": [1], "prompts": ["a"]}).encode(), "query[0] must be a string"),
])
def test_bad_requests_get_400_naming_the_field(in_thread_server, body, fragment):
    status, answer = _post(in_thread_server.url, body)
    assert status == 400 and fragment in answer["error"]


def test_failing_reward_function_gets_500_and_the_client_reports_it(in_thread_server):
    status, answer = _post(in_thread_server.url, json.dumps(
        {"query": ["a"], "prompts": ["a"], "labels": ["boom"]}).encode())
    assert status == 500 and "label boom is not allowed" in answer["error"]
    with pytest.raises(RewardError, match="HTTP 500.*label boom is not allowed"):
        RemoteReward(in_thread_server.url, max_retries=1, backoff_s=0.01)(["a"], ["a"], ["boom"])
    # The server keeps serving after a failure, and missing labels are allowed.
    status, answer = _post(in_thread_server.url, json.dumps({"query": ["abc", "de"], "prompts": ["", ""]}).encode())
    assert status == 200 and answer["rewards"] == [3.0, 2.0] and answer["scores"] == [3.0, 2.0]


def test_unknown_paths_get_404(in_thread_server):
    status, answer = _post(in_thread_server.url + "score", b"{}")
    assert status == 404 and "POST rewards to /" in answer["error"]


def test_parse_request_allows_missing_labels():
    assert parse_request(b'{"query": ["a"], "prompts": ["p"]}') == (["a"], ["p"], None)
