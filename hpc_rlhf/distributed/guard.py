"""Failure propagation: a rank that raises stops the whole job with its own error, within seconds, instead of hanging.

Without this, one rank's exception leaves every other rank blocked in its next collective until the (30 minute)
collective timeout. The mechanism, for torch.distributed worlds:
- the job's TCPStore (hosted by rank 0) holds a failure record; the first rank to fail writes its reason there
  (compare-and-set, so the first reason wins and later secondary errors do not overwrite it);
- every rank runs a `FailureWatchdog` daemon thread that polls the record on its own store connection and, when another
  rank has failed, prints that rank's reason and ends the process with `os._exit` (the main thread may be stuck inside a
  C++ collective, so nothing softer works); losing the store means rank 0 died, which ends the process too;
- rank 0 hosts the store, so before it exits (after a failure or at normal shutdown) it waits, for a bounded grace
  period, until every other rank has read the record or finished.
`run_guarded(fn, control)` wraps a rank's main function: an exception (its traceback with --debug) calls
`control.abort(reason)`. Under MPI, `MPIControlPlane.abort` uses `MPI_Abort`, which ends every rank itself.

A rank that dies without a word (SIGKILL, out of memory, a lost node) publishes nothing; its peers see only a lost
connection in their next collective. Every watchdog therefore counts a heartbeat in the store, and a rank whose error
is a lost connection first looks for a peer whose heartbeat has stopped and names that one as the job's failure.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol, TypeVar

import torch.distributed as dist

from hpc_rlhf.errors import debug_enabled

FAILURE_PREFIX = "hpc_rlhf/failure/"
FAILURE_EXIT_CODE = 1
STORE_ERRORS = (RuntimeError, OSError)  # what a store call raises once its host (rank 0) is gone
# How a collective fails when a peer process is gone (gloo, NCCL, sockets): the error is the peer's, not ours.
LOST_PEER_PATTERNS = ("connection reset by peer", "connection closed by peer", "broken pipe", "remote process exited",
                      "connection refused", "socket closed")
HEARTBEAT_WAIT_S = 2.0  # a live watchdog beats every poll interval (0.2 s); a dead rank never again
T = TypeVar("T")


class Abortable(Protocol):
    """What `run_guarded` needs from a control plane."""

    def abort(self, reason: str) -> NoReturn: ...


@dataclass(frozen=True)
class FailureReport:
    """The first failure of the job: which rank, and its error as one line."""

    rank: int
    reason: str

    def encode(self) -> bytes:
        return json.dumps({"rank": self.rank, "reason": self.reason}).encode()

    @classmethod
    def decode(cls, data: bytes) -> FailureReport:
        record = json.loads(data)
        return cls(rank=int(record["rank"]), reason=str(record["reason"]))

    def describe(self) -> str:
        return f"rank {self.rank} failed: {self.reason}"


class FailureBoard:
    """The failure record and the stop/finish counters, kept under one prefix of the job's store."""

    def __init__(self, store: dist.Store) -> None:
        self.store = dist.PrefixStore(FAILURE_PREFIX, store)

    def publish(self, report: FailureReport) -> FailureReport:
        """Record `report` unless a failure is already recorded; return the record that stands (the first one)."""
        return FailureReport.decode(self.store.compare_set("first", "", report.encode()))

    def poll(self) -> FailureReport | None:
        """The recorded failure, or None while every rank is healthy."""
        if self.store.check(["first"]):
            return FailureReport.decode(self.store.get("first"))
        return None

    def count_stopped(self, increment: int = 0) -> int:
        """Ranks that have read the failure record and are exiting."""
        return int(self.store.add("stopped", increment))

    def count_finished(self, increment: int = 0) -> int:
        """Ranks that have shut down normally (their watchdog is stopped)."""
        return int(self.store.add("finished", increment))

    def beat(self, rank: int) -> int:
        """Count one heartbeat of `rank` (its watchdog calls this every poll)."""
        return int(self.store.add(f"beat/{rank}", 1))

    def silent_ranks(self, world_size: int, exclude: int, wait_s: float = HEARTBEAT_WAIT_S) -> list[int]:
        """Ranks whose heartbeat did not move during `wait_s` seconds (dead), among those that had beaten before.

        A rank without any heartbeat yet (no watchdog, or still starting) is not judged.
        """
        others = [r for r in range(world_size) if r != exclude]
        before = {r: int(self.store.add(f"beat/{r}", 0)) for r in others}
        time.sleep(wait_s)
        return [r for r in others if before[r] > 0 and int(self.store.add(f"beat/{r}", 0)) == before[r]]


def announce(message: str) -> None:
    """One line on stderr, flushed along with stdout because the process may end with os._exit right after."""
    sys.stdout.flush()
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def _wait_until(condition: Callable[[], bool], timeout_s: float, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if condition():
                return True
        except STORE_ERRORS:  # the store is gone: nobody is left to wait for
            return False
        time.sleep(interval_s)
    return False


def is_lost_peer(reason: str) -> bool:
    """Whether an error message says that a peer's connection went away (the peer failed, not this rank)."""
    lowered = reason.lower()
    return any(pattern in lowered for pattern in LOST_PEER_PATTERNS)


def stop_job(board: FailureBoard | None, rank: int, world_size: int, reason: str, *, grace_s: float = 10.0,
             exit_fn: Callable[[int], Any] = os._exit) -> NoReturn:
    """Publish `reason` as this rank's failure (unless another came first), tell stderr, and end this process.

    Rank 0 hosts the store, so it first waits up to `grace_s` for the other ranks to read the record.
    """
    own = FailureReport(rank=rank, reason=reason)
    if board is not None and is_lost_peer(reason):  # whose failure is it? a peer that died says nothing itself
        with contextlib.suppress(*STORE_ERRORS):
            dead = board.silent_ranks(world_size, exclude=rank)
            if dead:
                own = FailureReport(rank=dead[0], reason=(
                    "died without reporting an error (its heartbeat stopped: killed, out of memory, or its node was "
                    "lost)"))
    standing = own
    if board is not None:
        try:
            standing = board.publish(own)
        except STORE_ERRORS:  # rank 0 and its store are gone; the other ranks' watchdogs notice that themselves
            board = None
    if standing.rank == rank:
        announce(f"[rank {rank}] aborting the job: {reason}")
    else:
        announce(f"[rank {rank}] stopping: {standing.describe()} (then here: {reason})")
    if board is not None and rank == 0:
        _wait_until(lambda: board.count_stopped() >= world_size - 1, grace_s)
    elif board is not None:
        with contextlib.suppress(*STORE_ERRORS):
            board.count_stopped(1)
    exit_fn(FAILURE_EXIT_CODE)
    raise SystemExit(FAILURE_EXIT_CODE)  # only reached when exit_fn returns (tests)


class FailureWatchdog:
    """Daemon thread that ends this process when another rank has published a failure or the store has gone.

    Uses its own store client (`host`, `port`) so that it never shares a connection with the process groups.
    `close()` at normal shutdown (registered with atexit) stops it; rank 0 then waits up to `finish_grace_s` for the
    others to finish too, so that its exit does not look like a crash to ranks still shutting down.
    """

    def __init__(self, host: str, port: int, rank: int, world_size: int, *, poll_interval_s: float = 0.2,
                 grace_s: float = 10.0, finish_grace_s: float = 120.0,
                 exit_fn: Callable[[int], Any] = os._exit) -> None:
        self.rank, self.world_size = rank, world_size
        self.poll_interval_s, self.exit_fn = poll_interval_s, exit_fn
        self.grace_s, self.finish_grace_s = grace_s, finish_grace_s
        self.address = f"{host}:{port}"
        client = dist.TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=60))
        self.board = FailureBoard(client)
        self._stop = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"failure-watchdog-{rank}", daemon=True)

    def start(self) -> FailureWatchdog:
        self._thread.start()
        atexit.register(self.close)
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            try:
                self.board.beat(self.rank)
                report = self.board.poll()
            except STORE_ERRORS:
                if self._stop.is_set():
                    return
                announce(f"[rank {self.rank}] stopping: lost the job's control store at {self.address}; "
                         f"rank 0, which hosts it, has exited")
                self.exit_fn(FAILURE_EXIT_CODE)
                return
            if report is not None and report.rank != self.rank:
                announce(f"[rank {self.rank}] stopping: {report.describe()}")
                if self.rank == 0:  # the store host stays up until the others have read the record
                    _wait_until(lambda: self.board.count_stopped() >= self.world_size - 1, self.grace_s)
                else:
                    with contextlib.suppress(*STORE_ERRORS):
                        self.board.count_stopped(1)
                self.exit_fn(FAILURE_EXIT_CODE)
                return

    def close(self) -> None:
        """Normal shutdown: stop polling, count this rank as finished; rank 0 waits for the others first."""
        if self._closed:
            return
        self._closed = True
        if self.rank == 0:
            self.board.count_finished(1)
            _wait_until(lambda: self.board.count_finished() >= self.world_size, self.finish_grace_s)
            self._stop.set()
            self._thread.join()
        else:
            self._stop.set()
            self._thread.join()
            with contextlib.suppress(*STORE_ERRORS):
                self.board.count_finished(1)
        atexit.unregister(self.close)


def run_guarded(fn: Callable[..., T], control: Abortable, *args: Any, **kwargs: Any) -> T:
    """Call `fn(*args, **kwargs)`; if it raises, print the traceback and abort the whole job with its error.

    A clean `SystemExit` (code 0 or None) passes through; anything else, KeyboardInterrupt included, aborts.
    """
    try:
        return fn(*args, **kwargs)
    except SystemExit as exc:
        if exc.code in (None, 0):
            raise
        if debug_enabled():  # otherwise the abort line is the one line a user reads
            traceback.print_exc()
        control.abort(f"SystemExit({exc.code!r})")
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the other ranks
        if debug_enabled():
            traceback.print_exc()
        message = str(exc).strip().replace("\n", " | ")
        control.abort(f"{type(exc).__name__}: {message}" if message else type(exc).__name__)

