"""Colocated asynchronous training: the next iteration is generated in a thread while this rank trains on the last.

With `layout.colocate: true` and `rollout.async_queue: 1`, tick t generates iteration t and trains iteration t - 1
(the async schedule of `loop.py`). Their inputs are disjoint: generation reads the engine's own copy of the weights
(version t - 1, loaded at the end of the previous tick), the update writes the actor's; generation writes the shard of
iteration t, training reads the shards of t - 1. So both run at once on the one rank, and the weights reach the
engine only after both have finished. Neither half fills a GPU on a small model (decoding steps are bound by
launches and scheduling, the update by the host), so the tick takes about the longer of the two instead of their sum.

On a GPU the generation thread queues its kernels on a CUDA stream of its own: it first waits for the trainers'
stream (the weight copies of the last sync), and the trainers' stream waits for it before the next sync overwrites
the weights it read. The thread holds no collectives: the config checks refuse what would put one there (tensor-
parallel generators, dynamic filtering), and an engine that captures CUDA graphs on first use of a shape (the hf
engine's static decode) runs serially, since a capture must not see another thread's work on the device.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional

import torch


def overlap_refusal(engine: Any) -> Optional[str]:
    """Why this rank's engine cannot generate beside the update, or None when it can."""
    if getattr(engine, "captures_graphs_on_first_use", False):
        return ("the hf engine captures a CUDA graph the first time it meets a batch shape, which another thread's "
                "work on the device would break; it generates serially (set vllm.child_process: true to give it a "
                "process of its own, vllm.enforce_eager: true to overlap without graphs, or install vLLM)")
    return None


class BackgroundGeneration:
    """Runs one tick's generation in a thread, on its own CUDA stream on a GPU; `join` returns its metrics or raises
    its exception."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._thread: Optional[threading.Thread] = None
        self._result: dict[str, float] = {}
        self._error: Optional[BaseException] = None

    def start(self, generate: Callable[[], dict[str, float]]) -> None:
        if self._thread is not None:
            raise RuntimeError("the previous tick's generation was not joined")
        self._result, self._error = {}, None
        trainers_stream = torch.cuda.current_stream(self.device) if self.stream is not None else None
        self._thread = threading.Thread(target=self._run, args=(generate, trainers_stream), daemon=True,
                                        name="hpc_rlhf-generation")
        self._thread.start()

    def _run(self, generate: Callable[[], dict[str, float]], trainers_stream: Optional[torch.cuda.Stream]) -> None:
        try:
            if self.stream is None:
                self._result = generate()
                return
            torch.cuda.set_device(self.device)  # the current device is per thread
            self.stream.wait_stream(trainers_stream)
            with torch.cuda.stream(self.stream):
                self._result = generate()
        except BaseException as error:  # re-raised in the training thread by join()
            self._error = error

    def join(self, *, raise_error: bool = True) -> dict[str, float]:
        """Wait for the generation; its metrics, or its exception raised here (unless `raise_error` is False: the
        caller is already failing with an error of its own)."""
        if self._thread is None:
            raise RuntimeError("no generation was started")
        self._thread.join()
        self._thread = None
        if self.stream is not None:  # the trainers' next work (the weight sync) queues behind the generation's
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        if self._error is not None and raise_error:
            raise self._error
        return self._result
