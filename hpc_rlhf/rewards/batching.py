"""Dynamic batching for a reward service: concurrent requests that arrive close together are scored in one call.

A reward model scores a batch of 16 sequences in about the time it scores one, so a server that answers each request
on its own wastes the accelerator when many clients (the generator ranks of a job) ask at once. `BatchingScorer` sits
between the HTTP handlers and the reward callable: each handler submits its request and waits; one worker thread
takes the first waiting request, gathers the requests that arrive within `max_wait_s` of it while the total stays
within `batch_size` samples, scores them in one call and hands every request its own slice of the result.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from hpc_rlhf.rewards.result import RewardError, RewardResult

RewardCallable = Callable[..., RewardResult]


@dataclass
class _Request:
    """One handler's samples and the future its answer is set on."""

    queries: Sequence[str]
    prompts: Sequence[str]
    labels: Sequence[Any] | None
    answer: Future = field(default_factory=Future)


def slice_result(result: RewardResult, start: int, end: int) -> RewardResult:
    """Samples start..end-1 of a batch's result."""
    return RewardResult(rewards=result.rewards[start:end], scores=result.scores[start:end],
                        extra_logs={name: values[start:end] for name, values in result.extra_logs.items()})


class BatchingScorer:
    """A thread-safe reward callable that merges concurrent calls into calls of `reward_fn` of at most `batch_size`
    samples (a single larger request is scored alone). `requests` and `batches` count calls in and calls made."""

    def __init__(self, reward_fn: RewardCallable, batch_size: int = 16, max_wait_s: float = 0.01):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise RewardError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if not isinstance(max_wait_s, (int, float)) or max_wait_s < 0:
            raise RewardError(f"max_wait_s must be a non-negative number of seconds, got {max_wait_s!r}")
        self.reward_fn = reward_fn
        self.batch_size = batch_size
        self.max_wait_s = float(max_wait_s)
        self.requests = 0
        self.batches = 0
        self._counter_lock = threading.Lock()
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._worker = threading.Thread(target=self._run, name="reward-batcher", daemon=True)
        self._worker.start()

    def __call__(self, queries: Sequence[str], prompts: Sequence[str],
                 labels: Sequence[Any] | None = None) -> RewardResult:
        """This request's rewards, scored together with the requests that arrive within max_wait_s."""
        if not self._worker.is_alive():
            raise RewardError("the batching scorer is closed")
        request = _Request(queries, prompts, labels)
        with self._counter_lock:
            self.requests += 1
        self._queue.put(request)
        return request.answer.result()

    def stats(self) -> dict[str, int]:
        """Requests received and reward calls made so far (fewer calls than requests means batching happened)."""
        with self._counter_lock:
            return {"requests": self.requests, "batches": self.batches}

    def close(self) -> None:
        """Stop the worker after the requests already queued are answered."""
        self._queue.put(None)
        self._worker.join()

    def _run(self) -> None:
        held: _Request | None = None  # a request that did not fit the previous batch opens the next one
        while True:
            first = held if held is not None else self._queue.get()
            held = None
            if first is None:
                return
            batch, size, closing = [first], len(first.queries), False
            deadline = time.monotonic() + self.max_wait_s
            while size < self.batch_size:
                try:
                    following = self._queue.get(timeout=max(deadline - time.monotonic(), 0.0))
                except queue.Empty:
                    break
                if following is None:
                    closing = True
                    break
                if size + len(following.queries) > self.batch_size:
                    held = following
                    break
                batch.append(following)
                size += len(following.queries)
            self._score(batch)
            if closing:
                self._queue.put(None)  # answer what is still queued, then stop

    def _score(self, batch: list[_Request]) -> None:
        """One reward call for the whole batch; each request gets its slice, or the call's error."""
        queries = [text for request in batch for text in request.queries]
        prompts = [text for request in batch for text in request.prompts]
        labels = None
        if any(request.labels is not None for request in batch):
            labels = [label for request in batch
                      for label in (request.labels if request.labels is not None else [None] * len(request.queries))]
        with self._counter_lock:
            self.batches += 1
        try:
            result = self.reward_fn(queries, prompts, labels)
            if len(result) != len(queries):
                raise RewardError(f"the reward function returned {len(result)} rewards for {len(queries)} samples")
        except Exception as error:  # every waiting handler reports the reward function's failure
            for request in batch:
                request.answer.set_exception(error)
            return
        start = 0
        for request in batch:
            end = start + len(request.queries)
            request.answer.set_result(slice_result(result, start, end))
            start = end
