"""RemoteReward against real ThreadingHTTPServers on 127.0.0.1: success, retries, failures, batching, several
servers."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch

from hpc_rlhf.rewards import RemoteReward, RewardError
from hpc_rlhf.rewards.remote import split_evenly, split_urls

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


def _echo(payload: dict, index: int) -> tuple:
    """Rewards = the queries read as numbers, so the joined result shows the order."""
    return _reply(200, {"rewards": [float(q) for q in payload["query"]], "extra_logs": {"request": index}})


@pytest.mark.parametrize("as_string", [True, False])
def test_several_servers_get_contiguous_parts_and_results_come_back_in_order(scripted_server, as_string):
    servers = [scripted_server(_echo) for _ in range(3)]
    urls = [server.url for server in servers]
    queries = [str(i) for i in range(10)]
    remote = RemoteReward(",".join(urls) if as_string else urls, batch_size=2, **FAST)
    assert remote.urls == urls
    result = remote(queries, [""] * 10, None)
    assert result.rewards.tolist() == [float(i) for i in range(10)]
    # Parts of 4, 3 and 3 samples, each sent in requests of at most batch_size, in order.
    assert [request["query"] for request in servers[0].requests] == [["0", "1"], ["2", "3"]]
    assert [request["query"] for request in servers[1].requests] == [["4", "5"], ["6"]]
    assert [request["query"] for request in servers[2].requests] == [["7", "8"], ["9"]]
    assert result.extra_logs["request"].tolist() == [0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0]


def test_several_servers_are_asked_in_parallel(scripted_server):
    """Every server waits until all three have a request: sequential requests would break the barrier."""
    barrier = threading.Barrier(3, timeout=10)

    def wait_for_all(payload, index):
        barrier.wait()
        return _echo(payload, index)

    servers = [scripted_server(wait_for_all) for _ in range(3)]
    result = RemoteReward([server.url for server in servers], **FAST)([str(i) for i in range(6)], [""] * 6, None)
    assert result.rewards.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert [len(server.requests) for server in servers] == [1, 1, 1]


def test_a_batch_smaller_than_the_server_count_uses_the_first_servers(scripted_server):
    servers = [scripted_server(_echo) for _ in range(3)]
    result = RemoteReward([server.url for server in servers], **FAST)(["7", "8"], ["", ""], ["a", "b"])
    assert result.rewards.tolist() == [7.0, 8.0]
    assert [server.requests for server in servers] == [[{"query": ["7"], "prompts": [""], "labels": ["a"]}],
                                                       [{"query": ["8"], "prompts": [""], "labels": ["b"]}], []]


def test_a_failing_server_is_named_and_retried_on_its_own(scripted_server):
    good = scripted_server(_echo)
    bad = scripted_server(lambda payload, index: _reply(503, "busy"))
    with pytest.raises(RewardError) as error:
        RemoteReward([good.url, bad.url], max_retries=2, **FAST)(["1", "2", "3", "4"], [""] * 4, None)
    message = str(error.value)
    assert message.startswith(f"remote reward {bad.url}: failed after 3 attempt(s)") and "HTTP 503" in message
    assert good.url not in message
    assert len(bad.requests) == 3 and len(good.requests) == 1


def test_every_failing_server_is_reported(scripted_server):
    good = scripted_server(_echo)
    refused = scripted_server(lambda payload, index: _reply(400, '{"error": "no labels"}'))
    short = scripted_server(lambda payload, index: _reply(200, [1.0]))
    with pytest.raises(RewardError) as error:
        RemoteReward([refused.url, good.url, short.url], **FAST)([str(i) for i in range(6)], [""] * 6, None)
    message = str(error.value)
    assert message.startswith("2 of 3 remote reward servers failed:")
    assert f"remote reward {refused.url}: HTTP 400" in message and "no labels" in message
    assert f"remote reward {short.url} (samples 4..5): rewards has 1 values, expected 2" in message


def test_split_urls_and_split_evenly():
    assert split_urls("http://a/") == ["http://a/"]
    assert split_urls(" http://a/ , http://b:8/x ") == ["http://a/", "http://b:8/x"]
    assert split_urls(["http://a/", "http://b/"]) == ["http://a/", "http://b/"]
    with pytest.raises(RewardError, match=r"entry 1 is ''"):
        split_urls("http://a/,,http://b/")
    with pytest.raises(RewardError, match="list is empty"):
        RemoteReward([])
    with pytest.raises(RewardError, match=r"url must look like http://host:port/path, got 'ftp://b/'"):
        RemoteReward("http://a/,ftp://b/")
    assert split_evenly(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert split_evenly(2, 3) == [(0, 1), (1, 2)]
    assert split_evenly(6, 1) == [(0, 6)]


def _reply(status: int, body, delay_s: float = 0.0) -> tuple:
    """One scripted answer: HTTP status, body (JSON-encoded unless bytes/str), delay before answering."""
    return status, body, delay_s
