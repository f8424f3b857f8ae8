"""A small HTTP reward service over a reward function or reward model, standard library only
(`tools/serve_reward.py` runs it).

    POST /        {"query": [...], "prompts": [...], "labels": [...]?}  ->  {"rewards": [...], "scores": [...],
                                                                            "extra_logs": {name: [...]}}
    GET /health   {"status": "ok", "reward": description, ...counters such as "requests" and "batches"}

A malformed request gets 400 with a message naming the field; a reward function that raises gets 500 with its error,
so `RemoteReward` retries server faults and reports client faults at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import traceback
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from hpc_rlhf.rewards.result import RewardError, RewardResult

logger = logging.getLogger(__name__)

RewardCallable = Callable[..., RewardResult]
MAX_REQUEST_BYTES = 256 * 1024 * 1024


def parse_request(body: bytes) -> tuple[list[str], list[str], list[Any] | None]:
    """(queries, prompts, labels) from a request body, or a RewardError naming the bad field."""
    try:
        payload = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RewardError(f"request body is not valid JSON: {error}") from None
    if not isinstance(payload, dict):
        raise RewardError(f"request body must be a JSON object, got {type(payload).__name__}")
    fields: dict[str, list] = {}
    for name in ("query", "prompts", "labels"):
        value = payload.get(name)
        if value is None and name == "labels":
            continue
        if not isinstance(value, list):
            raise RewardError(f"field {name!r} must be a list, got {type(value).__name__}")
        fields[name] = value
    for name in ("query", "prompts"):
        for index, text in enumerate(fields[name]):
            if not isinstance(text, str):
                raise RewardError(f"{name}[{index}] must be a string, got {type(text).__name__}")
    return fields["query"], fields["prompts"], fields.get("labels")


class RewardRequestHandler(BaseHTTPRequestHandler):
    """Answers reward requests with the server's `reward_fn`."""

    server: RewardServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path.rstrip("/") in ("/health", ""):
            stats = self.server.stats() if self.server.stats is not None else {}
            self._send_json(HTTPStatus.OK, {"status": "ok", "reward": self.server.description, **stats})
        else:
            self._send_json(HTTPStatus.NOT_FOUND, {"error": f"unknown path {self.path!r}; POST / or GET /health"})

    def do_POST(self) -> None:
        if self.path.rstrip("/") != "":
            self._send_json(HTTPStatus.NOT_FOUND, {"error": f"unknown path {self.path!r}; POST rewards to /"})
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if not 0 < length <= MAX_REQUEST_BYTES:
            self._send_json(HTTPStatus.BAD_REQUEST, {"error": f"need a JSON body with a Content-Length between 1 and "
                                                              f"{MAX_REQUEST_BYTES} bytes"})
            return
        body = self.rfile.read(length)
        try:
            queries, prompts, labels = parse_request(body)
            if labels is not None and len(labels) != len(queries):
                raise RewardError(f"field 'labels' has {len(labels)} entries for {len(queries)} queries")
            if len(prompts) != len(queries):
                raise RewardError(f"field 'prompts' has {len(prompts)} entries for {len(queries)} queries")
        except RewardError as error:
            self._send_json(HTTPStatus.BAD_REQUEST, {"error": str(error)})
            return
        try:
            with self.server.reward_lock:
                result = self.server.reward_fn(queries, prompts, labels)
        except Exception as error:  # the reward function's own fault: report it, keep serving
            logger.error("reward function failed:\n%s", traceback.format_exc())
            self._send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(error).__name__}: {error}"})
            return
        self._send_json(HTTPStatus.OK, result.to_json())

    def _send_json(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        logger.info("%s - %s", self.address_string(), format % args)


class RewardServer(ThreadingHTTPServer):
    """A threaded HTTP server holding the reward function its handlers call, one call at a time (user reward
    functions need not be thread-safe; requests still read and write concurrently). A `thread_safe` reward_fn, such
    as a BatchingScorer that merges concurrent requests, is called by every handler at once; `stats` adds counters
    to GET /health."""

    daemon_threads = True

    def __init__(self, reward_fn: RewardCallable, host: str = "127.0.0.1", port: int = 0, description: str = "",
                 *, thread_safe: bool = False, stats: Callable[[], dict[str, int]] | None = None):
        self.reward_fn = reward_fn
        self.reward_lock = contextlib.nullcontext() if thread_safe else threading.Lock()
        self.description = description
        self.stats = stats
        super().__init__((host, port), RewardRequestHandler)

    @property
    def url(self) -> str:
        """The address to POST rewards to (with the real port when started on port 0)."""
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in str(host) else host
        return f"http://{host}:{port}/"
