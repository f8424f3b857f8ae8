"""Run a generation engine in a child process and drive it through a pipe, behind the same `GenerationEngine` API.

Why: vLLM's in-process executors take over this process's torch.distributed world. In a disaggregated job the world
also holds actor / critic / reference ranks that never build an engine, so each generator rank instead hosts its
engine in a child process with a private world of just its engine's TP ranks (`factory.make_engine` arranges that).

A colocated rank may host its engine the same way (`vllm.child_process`): the engine then has an interpreter and a
CUDA context of its own, so that generation in a thread of the trainer (colocated async) waits on a pipe instead of
competing for the trainer's interpreter lock.

The child is started with the "spawn" method, applies `EngineSpec.env` to its own environment (so the parent's is
left alone), builds the engine from an importable factory and then serves one request at a time: generate,
load_weights (streamed in chunks of about `weight_chunk_bytes`), sleep, wake_up, close. Tensors travel through
torch.multiprocessing's pickler: CUDA tensors as IPC handles (no copy), host tensors through shared memory. Each weight
chunk is acknowledged once the child's device has finished copying it, so the parent may overwrite or free the
shared tensors as soon as `load_weights` returns. An exception in the child comes back with its traceback and is
raised here as a `GenerationError`.

The child ignores the stop signals (SIGUSR1/2, SIGTERM, SIGINT): SLURM and a terminal deliver them to every process
of a task, but the parent decides when its engine stops (it finishes the tick, checkpoints, then closes it); a child
whose parent dies sees the pipe close and exits.
"""

from __future__ import annotations

import functools
import importlib
import os
import signal
import time
import traceback
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.multiprocessing as torch_mp

from hpc_rlhf.generation.engine import GeneratedSample, GenerationError, SamplingParams

POLL_INTERVAL_S = 0.05
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)


@dataclass(frozen=True)
class EngineSpec:
    """How the child builds its engine: `factory` is "package.module:function", called with `kwargs`."""

    factory: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)


def resolve_factory(spec: str) -> Callable[..., Any]:
    """The callable named by "package.module:function" (or "package.module:Class.method"); a clear error when a part
    is missing."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise GenerationError(f"engine factory must look like 'package.module:function', got {spec!r}")
    module = importlib.import_module(module_name)
    try:
        return functools.reduce(getattr, attribute.split("."), module)
    except AttributeError:
        raise GenerationError(f"engine factory {spec!r}: module {module_name!r} has no attribute {attribute!r}") \
            from None


def serve_engine(spec: EngineSpec, conn: Any) -> None:
    """Child process body: build the engine, then answer requests until 'close' or until the parent goes away."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    os.environ.update(spec.env)
    try:
        engine = resolve_factory(spec.factory)(**spec.kwargs)
    except Exception:  # noqa: BLE001 - the parent raises it with this traceback
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ok", os.getpid()))
    while True:
        try:
            command, args = conn.recv()
        except (EOFError, OSError):
            engine.close()
            return
        try:
            if command == "close":
                engine.close()
                conn.send(("ok", None))
                return
            result = getattr(engine, command)(*args)
            if command == "load_weights" and torch.cuda.is_initialized():
                torch.cuda.synchronize()  # the copies have read the parent's tensors: it may change them now
            conn.send(("ok", result))
        except Exception:  # noqa: BLE001 - the parent raises it with this traceback
            conn.send(("error", traceback.format_exc()))


class ProcessHostedEngine:
    """A `GenerationEngine` whose model lives in a child process built from an `EngineSpec`."""

    def __init__(self, spec: EngineSpec, *, start_timeout_s: float = 1800.0, call_timeout_s: float | None = None,
                 weight_chunk_bytes: int = 256 * 2**20) -> None:
        self.spec = spec
        self.call_timeout_s = call_timeout_s
        self.weight_chunk_bytes = weight_chunk_bytes
        self._asleep = False
        self._closed = False
        context = torch_mp.get_context("spawn")
        self._conn, child_conn = context.Pipe(duplex=True)
        self.process = context.Process(target=serve_engine, args=(spec, child_conn), daemon=True,
                                       name=f"engine:{spec.factory}")
        self.process.start()
        child_conn.close()
        # Closes the child when this engine is collected or the interpreter exits, before multiprocessing's own exit
        # hook, whose SIGTERM the child ignores.
        self._finalizer = weakref.finalize(self, stop_child, self.process, self._conn)
        try:
            self.child_pid = self._receive("start", start_timeout_s)
        except GenerationError:
            self.close(timeout_s=10.0)
            raise

    # ----- the GenerationEngine API ------------------------------------------------------------------------
    def generate(self, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams,
                 images: Sequence[Sequence[bytes]] | None = None) -> list[list[GeneratedSample]]:
        prompts = [list(map(int, ids)) for ids in prompt_token_ids]
        if images is None:  # text prompts: the call the child has always received
            return self._call("generate", prompts, params)
        return self._call("generate", prompts, params, [list(row) for row in images])

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Stream (name, tensor) pairs to the child chunk by chunk; the whole stream is consumed even on error."""
        applied = 0
        chunk: list[tuple[str, torch.Tensor]] = []
        chunk_bytes = 0
        failure: GenerationError | None = None
        for name, tensor in named_tensors:
            if failure is not None:
                continue  # keep consuming: the stream may be a broadcast that other ranks take part in
            chunk.append((name, tensor))
            chunk_bytes += tensor.numel() * tensor.element_size()
            if chunk_bytes >= self.weight_chunk_bytes:
                failure, applied = self._send_chunk(chunk, applied)
                chunk, chunk_bytes = [], 0
        if chunk and failure is None:
            failure, applied = self._send_chunk(chunk, applied)
        if failure is not None:
            raise failure
        return applied

    def _send_chunk(self, chunk: list[tuple[str, torch.Tensor]],
                    applied: int) -> tuple[GenerationError | None, int]:
        try:
            return None, applied + int(self._call("load_weights", chunk))
        except GenerationError as exc:
            if not self.process.is_alive():
                raise
            return exc, applied

    def sleep(self, level: int = 1) -> None:
        self._call("sleep", level)
        self._asleep = True

    def wake_up(self) -> None:
        self._call("wake_up")
        self._asleep = False

    @property
    def asleep(self) -> bool:
        return self._asleep

    def close(self, timeout_s: float = 60.0) -> None:
        """Ask the child to release its engine and exit; kill it if it does not within `timeout_s`."""
        if self._closed:
            return
        self._closed = True
        self._finalizer.detach()
        stop_child(self.process, self._conn, timeout_s=timeout_s)

    # ----- plumbing -------------------------------------------------------------------------------------------
    def _call(self, command: str, *args: Any) -> Any:
        if self._closed:
            raise GenerationError(f"cannot {command}: the engine was closed")
        if not self.process.is_alive():
            raise GenerationError(f"cannot {command}: the engine process {self.process.pid} exited with code "
                                  f"{self.process.exitcode}")
        self._conn.send((command, args))
        return self._receive(command, self.call_timeout_s)

    def _receive(self, command: str, timeout_s: float | None) -> Any:
        """The child's answer to `command`; raises when it reports an error, dies, or exceeds `timeout_s`."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self._conn.poll(POLL_INTERVAL_S):
            if not self.process.is_alive() and not self._conn.poll(0):
                raise GenerationError(f"the engine process {self.process.pid} exited with code "
                                      f"{self.process.exitcode} during {command}")
            if deadline is not None and time.monotonic() > deadline:
                raise GenerationError(f"the engine process gave no answer to {command} within {timeout_s} s")
        try:
            status, value = self._conn.recv()
        except (EOFError, OSError) as exc:
            self.process.join(5.0)
            raise GenerationError(f"the engine process {self.process.pid} exited with code {self.process.exitcode} "
                                  f"during {command}") from exc
        if status == "error":
            raise GenerationError(f"the engine process failed in {command}:\n{value}")
        return value


def stop_child(process: Any, conn: Any, timeout_s: float = 60.0) -> None:
    """Ask an engine process to close its engine and exit; kill it if it has not within `timeout_s` (it ignores
    SIGTERM, see the module docstring)."""
    try:
        if process.is_alive():
            conn.send(("close", ()))
            if conn.poll(timeout_s):
                conn.recv()
    except (EOFError, OSError):
        pass
    process.join(timeout_s)
    if process.is_alive():
        process.kill()
        process.join(timeout_s)
    conn.close()
