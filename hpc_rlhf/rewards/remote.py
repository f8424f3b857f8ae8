"""Rewards from an HTTP service: POST JSON {"query", "prompts", "labels"}, answer {"rewards", "scores"?, "extra_logs"?}.

The payload keys are OpenRLHF's remote reward-model keys, so services written for it work unchanged; a bare JSON list
is read as rewards. Only the standard library is used (urllib), so the service can sit behind any HTTP server,
including `tools/serve_reward.py`.

Several servers (a list of URLs, or one string of comma-separated URLs, as OpenRLHF's --remote_rm_url): each batch is
cut into one contiguous part per server, as equal as possible; the parts are sent in parallel and their results joined
in order. Each server gets the same timeout and retries as a single one, and an error names the URL that failed.

Failures: connection errors, timeouts, 5xx and 429 answers are retried with exponential backoff
(backoff_s, 2 x backoff_s, 4 x ..., capped at max_backoff_s); other 4xx answers are the caller's fault and fail at once;
a 2xx answer that is not JSON, or has the wrong number of rewards or non-numbers, fails at once naming the field.
"""

from __future__ import annotations

import http.client
import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from hpc_rlhf.rewards.result import RewardError, RewardResult, check_batch, empty_result, to_reward_result

logger = logging.getLogger(__name__)

BODY_EXCERPT_CHARS = 200
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class _Attempt:
    """What one POST produced: a JSON-decoded body, or why it failed and whether trying again may help."""

    body: Any = None
    error: str | None = None
    retryable: bool = False


def split_urls(urls: str | Sequence[str]) -> list[str]:
    """The server URLs of a `remote_url` value: a list of URLs, or one string of comma-separated URLs."""
    items = urls.split(",") if isinstance(urls, str) else list(urls)
    for index, item in enumerate(items):
        if not isinstance(item, str) or not item.strip():
            raise RewardError(f"remote reward url {urls!r}: entry {index} is {item!r}; give one URL, a list of URLs "
                              f"or a comma-separated string of URLs")
    if not items:
        raise RewardError("remote reward url list is empty; give at least one URL")
    return [item.strip() for item in items]


def split_evenly(count: int, parts: int) -> list[tuple[int, int]]:
    """(start, end) of `parts` contiguous ranges covering range(count), sizes differing by at most one; empty
    ranges are left out (a batch smaller than the number of servers uses the first `count` servers)."""
    base, extra = divmod(count, parts)
    ranges, start = [], 0
    for index in range(parts):
        end = start + base + (1 if index < extra else 0)
        if end > start:
            ranges.append((start, end))
        start = end
    return ranges


def _excerpt(raw: bytes) -> str:
    """The first BODY_EXCERPT_CHARS characters of a response body, for error messages."""
    text = raw.decode("utf-8", errors="replace")
    return text[:BODY_EXCERPT_CHARS] + ("..." if len(text) > BODY_EXCERPT_CHARS else "")


@dataclass
class RemoteReward:
    """Client of one or several remote reward servers; call it like a reward function.

    `url` is one URL, a list of URLs or a comma-separated string of URLs (`urls` holds them, in order). timeout_s
    bounds each socket operation of one request (connect, send, each read); max_retries is the number of retries after
    the first attempt; a server's part of a batch larger than batch_size is sent as several requests, in order.
    """

    url: str | Sequence[str]
    timeout_s: float = 30.0
    max_retries: int = 3
    backoff_s: float = 1.0
    batch_size: int = 64
    max_backoff_s: float = 30.0

    def __post_init__(self) -> None:
        self.urls = split_urls("" if self.url is None else self.url)
        hosts = []
        for url in self.urls:
            parsed = urllib.parse.urlparse(url)
            if parsed.scheme not in ("http", "https") or not parsed.hostname:
                raise RewardError(f"remote reward url must look like http://host:port/path, got {url!r}")
            hosts.append(parsed.hostname)
        if not isinstance(self.timeout_s, (int, float)) or self.timeout_s <= 0:
            raise RewardError(f"RemoteReward.timeout_s must be a positive number of seconds, got {self.timeout_s!r}")
        for name in ("backoff_s", "max_backoff_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise RewardError(f"RemoteReward.{name} must be a non-negative number of seconds, got {value!r}")
        if not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise RewardError(f"RemoteReward.max_retries must be an integer >= 0, got {self.max_retries!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise RewardError(f"RemoteReward.batch_size must be an integer >= 1, got {self.batch_size!r}")
        # Environment proxies apply to real hosts; a service on this machine is always reached directly.
        self._openers = [urllib.request.build_opener(urllib.request.ProxyHandler({} if host in LOOPBACK_HOSTS
                                                                                 else None)) for host in hosts]

    def __call__(self, queries: Sequence[str], prompts: Sequence[str], labels: Sequence[Any] | None = None,
                 token_ids: Sequence[Sequence[int]] | None = None) -> RewardResult:
        """Rewards for one batch: one contiguous part per server, in parallel, each fetched in chunks of batch_size;
        `token_ids` is not sent."""
        labels = check_batch(queries, prompts, labels, f"remote reward {', '.join(self.urls)}")
        if not queries:
            return empty_result()
        ranges = split_evenly(len(queries), len(self.urls))
        if len(ranges) == 1:
            return self._score_range(0, queries, prompts, labels, *ranges[0])
        with ThreadPoolExecutor(max_workers=len(ranges), thread_name_prefix="remote-reward") as pool:
            futures = [pool.submit(self._score_range, server, queries, prompts, labels, start, end)
                       for server, (start, end) in enumerate(ranges)]
            errors = [future.exception() for future in futures]
        failed = [error for error in errors if error is not None]
        if len(failed) == 1:
            raise failed[0]
        if failed:
            lines = "\n  ".join(str(error) for error in failed)
            raise RewardError(f"{len(failed)} of {len(ranges)} remote reward servers failed:\n  {lines}")
        return RewardResult.concat([future.result() for future in futures])

    def _score_range(self, server: int, queries: Sequence[str], prompts: Sequence[str], labels: list[Any],
                     first: int, last: int) -> RewardResult:
        """Samples first..last-1 scored by server `server`, in requests of at most batch_size, in order."""
        url = self.urls[server]
        parts = []
        for start in range(first, last, self.batch_size):
            end = min(start + self.batch_size, last)
            payload = {"query": list(queries[start:end]), "prompts": list(prompts[start:end]),
                       "labels": labels[start:end]}
            body = self._post_with_retries(server, payload)
            source = f"remote reward {url} (samples {start}..{end - 1})"
            parts.append(to_reward_result(body, end - start, source))
        return RewardResult.concat(parts)

    def _post_with_retries(self, server: int, payload: dict[str, Any]) -> Any:
        """POST `payload` to server `server`, retrying transient failures; the decoded JSON body or a RewardError."""
        url = self.urls[server]
        try:
            data = json.dumps(payload).encode("utf-8")
        except (TypeError, ValueError) as error:
            raise RewardError(f"remote reward {url}: the batch cannot be sent as JSON ({error}); "
                              f"labels must be strings, numbers, lists, dicts or None") from error
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            outcome = self._post_once(server, data)
            if outcome.error is None:
                return outcome.body
            if not outcome.retryable:
                raise RewardError(f"remote reward {url}: {outcome.error}")
            if attempt + 1 < attempts:
                delay = min(self.backoff_s * 2 ** attempt, self.max_backoff_s)
                logger.warning("remote reward %s: attempt %d/%d failed (%s); retrying in %.2fs",
                               url, attempt + 1, attempts, outcome.error, delay)
                time.sleep(delay)
        raise RewardError(f"remote reward {url}: failed after {attempts} attempt(s); last error: {outcome.error}")

    def _post_once(self, server: int, data: bytes) -> _Attempt:
        """One POST to server `server`, classified: success with a JSON body, a retryable failure or a final one."""
        request = urllib.request.Request(self.urls[server], data=data, method="POST",
                                         headers={"Content-Type": "application/json", "Accept": "application/json"})
        try:
            with self._openers[server].open(request, timeout=self.timeout_s) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as error:
            raw = error.read() if error.fp is not None else b""
            retryable = error.code >= 500 or error.code == 429
            return _Attempt(error=f"HTTP {error.code}: {_excerpt(raw)!r}", retryable=retryable)
        except (OSError, http.client.HTTPException) as error:  # URLError, timeouts, refused or dropped connections
            reason = getattr(error, "reason", error)
            if isinstance(reason, TimeoutError) or isinstance(error, TimeoutError):
                return _Attempt(error=f"no answer within timeout_s={self.timeout_s}s", retryable=True)
            return _Attempt(error=f"connection failed: {type(reason).__name__}: {reason}", retryable=True)
        try:
            return _Attempt(body=json.loads(raw.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            return _Attempt(error=f"HTTP {status} answer is not valid JSON ({error}); body: {_excerpt(raw)!r}")
