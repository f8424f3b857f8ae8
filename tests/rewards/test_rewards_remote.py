"""RemoteReward against a real ThreadingHTTPServer on 127.0.0.1: success, retries, failures, batching."""

from __future__ import annotations

import socket
import time

import pytest
import torch

from hpc_rlhf.rewards import RemoteReward, RewardError

pytestmark = pytest.mark.timeout(60)

QUERIES = ["1+1=2", "2+2=5", "3+3=6"]
PROMPTS = ["1+1=", "2+2=", "3+3="]
LABELS = ["2", "4", "6"]
FAST = {"timeout_s": 5.0, "backoff_s": 0.01}


def exact_match(payload: dict) -> list[float]:
    """The reference reward the scripted servers compute: 1 when the response equals the label."""
    triples = zip(payload["query"], payload["prompts"], payload["labels"], strict=True)
    return [float(query[len(prompt):] == label) for query, prompt, label in triples]


def test_success(scripted_server):
    from_server = scripted_server(lambda payload, _: _reply(200, {
        "rewards": exact_match(payload), "scores": [0.5] * len(payload["query"]),
        "extra_logs": {"latency": 0.25, "len": [len(q) for q in payload["query"]]}}))
    result = RemoteReward(from_server.url, **FAST)(QUERIES, PROMPTS, LABELS)
    assert from_server.requests == [{"query": QUERIES, "prompts": PROMPTS, "labels": LABELS}]
    assert torch.equal(result.rewards, torch.tensor([1.0, 0.0, 1.0]))
    assert torch.equal(result.scores, torch.tensor([0.5, 0.5, 0.5]))
    assert torch.equal(result.extra_logs["latency"], torch.tensor([0.25, 0.25, 0.25]))
    assert torch.equal(result.extra_logs["len"], torch.tensor([5.0, 5.0, 5.0]))


def test_bare_list_and_rewards_only_answers(scripted_server):
    bare = scripted_server(lambda payload, _: _reply(200, exact_match(payload)))
    only = scripted_server(lambda payload, _: _reply(200, {"rewards": exact_match(payload)}))
    for server in (bare, only):
        result = RemoteReward(server.url, **FAST)(QUERIES, PROMPTS, LABELS)
        assert torch.equal(result.rewards, torch.tensor([1.0, 0.0, 1.0]))
        assert torch.equal(result.scores, result.rewards)


def test_two_server_errors_then_success_takes_three_requests(scripted_server):
    server = scripted_server(lambda payload, index: _reply(500, "overloaded") if index < 2
                             else _reply(200, exact_match(payload)))
    result = RemoteReward(server.url, max_retries=3, **FAST)(QUERIES, PROMPTS, LABELS)
    assert len(server.requests) == 3
    assert torch.equal(result.rewards, torch.tensor([1.0, 0.0, 1.0]))


def test_backoff_doubles(scripted_server):
    server = scripted_server(lambda payload, index: _reply(503, "busy") if index < 2
                             else _reply(200, exact_match(payload)))
    start = time.monotonic()
    RemoteReward(server.url, timeout_s=5.0, max_retries=2, backoff_s=0.1)(QUERIES, PROMPTS, LABELS)
    assert time.monotonic() - start >= 0.1 + 0.2


def test_server_errors_beyond_max_retries_report_url_status_and_body(scripted_server):
    server = scripted_server(lambda payload, index: _reply(502, "x" * 190 + "ABCDEFGHIJKLMNOP" + "z" * 50))
    with pytest.raises(RewardError) as error:
        RemoteReward(server.url, max_retries=2, **FAST)(QUERIES, PROMPTS, LABELS)
    message = str(error.value)
    assert len(server.requests) == 3
    assert server.url in message and "HTTP 502" in message and "after 3 attempt(s)" in message
    assert "x" * 190 + "ABCDEFGHIJ..." in message and "K" not in message.split("ABCDEFGHIJ")[1]


def test_client_error_is_not_retried(scripted_server):
    server = scripted_server(lambda payload, index: _reply(400, '{"error": "labels missing"}'))
    with pytest.raises(RewardError) as error:
        RemoteReward(server.url, max_retries=3, **FAST)(QUERIES, PROMPTS, LABELS)
    assert len(server.requests) == 1
    assert "HTTP 400" in str(error.value) and "labels missing" in str(error.value)


def test_malformed_json_answer(scripted_server):
    server = scripted_server(lambda payload, index: _reply(200, "<html>rewards: 1, 0, 1</html>"))
    with pytest.raises(RewardError) as error:
        RemoteReward(server.url, max_retries=3, **FAST)(QUERIES, PROMPTS, LABELS)
    assert len(server.requests) == 1
    assert "not valid JSON" in str(error.value) and "<html>rewards" in str(error.value)


@pytest.mark.parametrize("answer, fragment", [
    ({"rewards": [1.0, 0.0]}, "rewards has 2 values, expected 3"),
    ({"rewards": [1.0, "0", 1.0]}, "rewards[1] is '0' (str), expected a number"),
    ({"rewards": [1.0, 0.0, 1.0], "scores": [1.0]}, "scores has 1 values, expected 3"),
    ({"rewards": {"a": 1}}, "rewards must be a list"),
    ({"reward": [1.0, 0.0, 1.0]}, "no 'rewards'"),
])
def test_bad_answers_name_the_field(scripted_server, answer, fragment):
    server = scripted_server(lambda payload, index: _reply(200, answer))
    with pytest.raises(RewardError) as error:
        RemoteReward(server.url, **FAST)(QUERIES, PROMPTS, LABELS)
    assert fragment in str(error.value) and server.url in str(error.value)
    assert len(server.requests) == 1


def test_slow_handler_times_out_and_is_retried(scripted_server):
    server = scripted_server(lambda payload, index: _reply(200, exact_match(payload), delay_s=1.5))
    start = time.monotonic()
    with pytest.raises(RewardError, match=r"no answer within timeout_s=0.2s"):
        RemoteReward(server.url, timeout_s=0.2, max_retries=1, backoff_s=0.01)(QUERIES, PROMPTS, LABELS)
    assert len(server.requests) == 2
    assert time.monotonic() - start < 1.4  # gave up on both attempts well before the handler answered


def test_connection_refused_is_retried_then_reported():
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(RewardError, match=r"failed after 3 attempt\(s\); last error: connection failed"):
        RemoteReward(f"http://127.0.0.1:{port}/", max_retries=2, **FAST)(QUERIES, PROMPTS, LABELS)


def test_big_batches_are_split_and_reassembled_in_order(scripted_server):
    server = scripted_server(lambda payload, index: _reply(200, {
        "rewards": [float(q) for q in payload["query"]], "extra_logs": {"request": index}}))
    queries = [str(i) for i in range(10)]
    result = RemoteReward(server.url, batch_size=4, **FAST)(queries, [""] * 10, [None] * 10)
    assert [len(request["query"]) for request in server.requests] == [4, 4, 2]
    assert [request["query"] for request in server.requests] == [queries[:4], queries[4:8], queries[8:]]
    assert result.rewards.tolist() == [float(i) for i in range(10)]
    assert result.extra_logs["request"].tolist() == [0.0] * 4 + [1.0] * 4 + [2.0] * 2


def test_bad_chunk_is_named_by_sample_range(scripted_server):
    server = scripted_server(lambda payload, index: _reply(200, [1.0] * (len(payload["query"]) - index)))
    with pytest.raises(RewardError, match=r"samples 2\.\.3\): rewards has 1 values, expected 2"):
        RemoteReward(server.url, batch_size=2, **FAST)(["a"] * 4, [""] * 4, None)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"url": "ftp://host/x"}, "url must look like http://host:port/path"),
    ({"url": "127.0.0.1:8000"}, "url must look like"),
    ({"url": "http://h/", "timeout_s": 0}, "timeout_s must be a positive number"),
    ({"url": "http://h/", "max_retries": -1}, "max_retries must be an integer >= 0"),
    ({"url": "http://h/", "batch_size": 0}, "batch_size must be an integer >= 1"),
    ({"url": "http://h/", "backoff_s": -1.0}, "backoff_s must be a non-negative number"),
])
def test_bad_settings(kwargs, fragment):
    with pytest.raises(RewardError, match=fragment):
        RemoteReward(**kwargs)


def test_labels_that_are_not_json_are_refused_before_sending(scripted_server):
    server = scripted_server(lambda payload, index: _reply(200, [0.0]))
    with pytest.raises(RewardError, match="cannot be sent as JSON"):
        RemoteReward(server.url, **FAST)(["a"], ["a"], [object()])
    assert server.requests == []


def _reply(status: int, body, delay_s: float = 0.0) -> tuple:
    """One scripted answer: HTTP status, body (JSON-encoded unless bytes/str), delay before answering."""
    return status, body, delay_s
