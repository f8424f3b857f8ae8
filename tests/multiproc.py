"""Run a function on N local gloo ranks, each a fresh spawned process, and return its results in rank order.

    results = run_ranks(shard_sum, 2, batch, timeout_s=60)   # shard_sum(batch) on ranks 0 and 1 of one gloo world

`fn` must be a module-level function of an importable module (test modules are: setup.cfg puts the repository root
on the path), and its arguments and results picklable. Every rank gets torchrun-style variables (RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT on a free port), one OpenMP thread and no inherited launcher
variables, all set before `fn`'s module (and so torch) is imported; with `init_process_group=True` it runs inside the
gloo world. The first rank that raises or dies ends the run: the others are killed (with the processes they started)
and `RankFailed` carries its traceback; at the timeout every rank is killed and `TimeoutError` names the ranks still
running.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import queue
import signal
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

# Variables of an enclosing launcher (a SLURM job, mpiexec, torchrun) that must not leak into the local ranks.
LAUNCHER_PREFIXES = ("SLURM_", "OMPI_", "PMI", "TORCHELASTIC_")
LAUNCHER_VARIABLES = ("GROUP_RANK",)


class RankFailed(RuntimeError):
    """A rank raised (the message ends with its traceback) or its process died without a result."""

    def __init__(self, rank: int, detail: str) -> None:
        super().__init__(f"rank {rank} failed:\n{detail}")
        self.rank = rank
        self.detail = detail


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """The torchrun-style variables of one local rank."""
    return {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1"}


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 120.0,
              init_process_group: bool = True) -> list[Any]:
    """`fn(*args)` on ranks 0..world_size-1; returns the results in rank order."""
    payload = pickle.dumps((fn, args))  # an unpicklable function fails here, in the test, not in a child
    port = free_port()
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_rank_main, name=f"rank{rank}",
                                 args=(rank, world_size, port, payload, init_process_group, results))
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    try:
        return _collect(processes, results, time.monotonic() + timeout_s)
    finally:
        for process in processes:
            if process.is_alive():  # with what it started (an engine process, a compiler): the rank leads a group
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.kill()  # in case it had not made its group yet
            process.join()
        results.close()


def _collect(processes: list[multiprocessing.process.BaseProcess], results: Any, deadline: float) -> list[Any]:
    """Wait for one result per rank; raise at the first failure, death without a result, or the deadline."""
    collected: dict[int, Any] = {}
    while len(collected) < len(processes):
        try:
            rank, ok, data = results.get(timeout=0.1)
        except queue.Empty:
            dead = [rank for rank, process in enumerate(processes)
                    if rank not in collected and process.exitcode is not None]
            if dead:  # its result may have reached the pipe after the last look: read it before giving up
                try:
                    rank, ok, data = results.get(timeout=1.0)
                except queue.Empty:
                    raise RankFailed(dead[0], f"process exited with code {processes[dead[0]].exitcode} and sent no "
                                              "result") from None
            elif time.monotonic() > deadline:
                running = [rank for rank in range(len(processes)) if rank not in collected]
                raise TimeoutError(f"ranks {running} of {len(processes)} still running at the deadline; killed")
            else:
                continue
        if not ok:
            raise RankFailed(rank, data)
        collected[rank] = pickle.loads(data)
    return [collected[rank] for rank in range(len(processes))]


def _rank_main(rank: int, world_size: int, port: int, payload: bytes, init_process_group: bool, results: Any) -> None:
    """One rank: set its environment, then import and run the function; send back (rank, ok, pickled result or
    traceback)."""
    os.setsid()  # its own process group, so that a kill reaches the processes it starts too
    for name in list(os.environ):
        if name.startswith(LAUNCHER_PREFIXES) or name in LAUNCHER_VARIABLES:
            del os.environ[name]
    os.environ.update(rank_env(rank, world_size, port))
    try:
        fn, args = pickle.loads(payload)
        if init_process_group:
            import torch.distributed as dist  # after the environment is set: torch reads OMP_NUM_THREADS on import

            dist.init_process_group("gloo", rank=rank, world_size=world_size)
            value = fn(*args)
            # rank 0 hosts the store that new groups are made through: no rank leaves before every rank is done
            dist.barrier()
            dist.destroy_process_group()
        else:
            value = fn(*args)
        message = (rank, True, pickle.dumps(value))
    except BaseException:
        message = (rank, False, traceback.format_exc())
    results.put(message)
