"""Stop before the time limit, checkpoint, requeue: one mechanism for plain sbatch scripts and for submitit.

How the word to stop reaches the ranks:
- Batch scripts ask for `--signal=B:USR1@N`, so SLURM signals only the batch shell. Its trap (`stop_trap_lines`) writes
  the flag file RUN_DIR/.stop_requested, tagged with the job id and restart count. Ranks poll the flag at safe points.
  A file, not a forwarded signal, because it cannot kill a rank that has not installed its handlers yet, does not reach
  libraries that claim USR1 (NCCL), and stays there until every rank has seen it.
- submitit asks for `--signal=USR2@N`, which SLURM sends to every task directly; `StopRequest` catches it (and USR1, and
  SIGTERM from `scancel`, preemption or the time limit) and only records it.
`StopRequest.should_stop()` is what the training loop polls; the loop combines it across ranks through the control plane
(`combine_stop_reasons` decides whether the job should requeue), saves a checkpoint, and then global rank 0 calls
`requeue_self`, after which every rank exits.

`requeue_self` runs `scontrol requeue JOBID` and then `scontrol update JobId=JOBID StartTime=now+D`. SLURM holds a
requeued batch job back for AuthInfo's cred_expire (120 s by default) once it has finished, unless its begin time is
already in the future then: setting it D seconds ahead while the job is completing makes the restart take D seconds.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import NoReturn

from hpc_rlhf.run.durable import atomic_write_bytes
from hpc_rlhf.slurm.env import in_slurm_job

STOP_FLAG_NAME = ".stop_requested"
STOP_FLAG_ENV = "HPC_RLHF_STOP_FLAG"  # set by the batch scripts: where a rank that catches USR1/USR2 writes the flag
REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)  # "stop, save, and come back": batch-script and submitit signals
TERMINATE_SIGNALS = (signal.SIGTERM,)  # "stop now": scancel, preemption, the hard limit; SLURM decides what follows
DEFAULT_RESTART_DELAY_S = 10


class RequeueError(RuntimeError):
    """`scontrol requeue` could not be run or was rejected; the message carries scontrol's words."""


class RequeueRefused(RequeueError):
    """The job has been requeued as often as allowed (slurm.max_requeue) or is not a SLURM batch job."""


@dataclass(frozen=True)
class StopReason:
    """Why a rank wants to stop: the signal or flag that asked, and whether the job should come back afterwards."""

    source: str  # "SIGUSR1", "SIGUSR2", "SIGTERM" or "stop flag"
    requeue: bool


def combine_stop_reasons(reasons: Sequence[StopReason | None]) -> StopReason | None:
    """The job-wide decision from every rank's reason (None = that rank saw nothing).

    Stop if any rank was asked to. Requeue only if some rank was asked to requeue and no rank is being terminated: after
    SIGTERM (scancel, preemption, the hard limit) SLURM itself decides whether the job comes back.
    """
    seen = [reason for reason in reasons if reason is not None]
    if not seen:
        return None
    terminations = [reason for reason in seen if not reason.requeue]
    if terminations:
        return terminations[0]
    return seen[0]


def stop_flag_path(run_dir: str | os.PathLike[str]) -> Path:
    """Where the batch script's trap writes the stop flag."""
    return Path(run_dir) / STOP_FLAG_NAME


def stop_flag_tag(job_id: str, restart_count: int) -> str:
    """The flag's content: which run of which job it addresses, so that a flag left by an earlier run is ignored."""
    return f"{job_id} {restart_count}"


def write_stop_flag(run_dir: str | os.PathLike[str], job_id: str, restart_count: int) -> Path:
    """Ask every rank of this run of the job to stop (what the batch script's trap does, in Python)."""
    path = stop_flag_path(run_dir)
    _write_flag(path, stop_flag_tag(job_id, restart_count))
    return path


def _write_flag(path: Path, tag: str) -> None:
    """Replace the flag file atomically, through a temporary name of this process (folder syncs may be refused)."""
    temp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    atomic_write_bytes(path, f"{tag}\n".encode(), temp, strict_dir_sync=False)


def stop_trap_lines() -> list[str]:
    """Batch-script lines that turn USR1 into the stop flag; they must be the script's first commands.

    The trap exists from the first line on, before the run directory is known (`python -m hpc_rlhf.submit
    --print-run-dir` takes a fraction of a second, and a USR1 without a trap kills the shell): until
    `stop_flag_ready_lines` has run, a USR1 is only remembered (STOP_PENDING) and written to the flag then.
    """
    return [
        'STOP_FLAG=""',
        'STOP_PENDING=""',
        "request_stop() {",
        '  if [ -z "$STOP_FLAG" ]; then STOP_PENDING=1; return; fi',
        '  printf "%s %s\\n" "$SLURM_JOB_ID" "${SLURM_RESTART_COUNT:-0}" > "$STOP_FLAG.tmp.$$" '
        '&& mv -f "$STOP_FLAG.tmp.$$" "$STOP_FLAG"',
        "}",
        "trap request_stop USR1",
    ]


def stop_flag_ready_lines(run_dir_expr: str = '"$RUN_DIR"') -> list[str]:
    """Batch-script lines, once the run directory exists: from now on the trap writes the flag (atomically: temp file
    + mv), and a USR1 that arrived earlier is written now."""
    return [f'STOP_FLAG={run_dir_expr}/{STOP_FLAG_NAME}',
            f'export {STOP_FLAG_ENV}="$STOP_FLAG"  # a rank that catches USR1/USR2 writes the flag there too',
            'if [ -n "$STOP_PENDING" ]; then request_stop; fi']


RANK_GUARD = "bash -c 'rank_guard \"$@\"' rank"  # put before the rank's command in the srun line


def rank_guard_lines() -> list[str]:
    """Batch-script lines defining `rank_guard`, the shell every rank runs under (`srun ... RANK_GUARD python ...`).

    `scancel --signal=USR1 JOBID` (or USR2) reaches every process of the tasks; Python cannot catch it before its
    first statements run, and a rank without a handler dies of it. The guard catches it from the task's first
    millisecond and writes the stop flag (the ranks then stop at their next safe point, or the batch shell requeues
    the job if a rank died of the signal), and waits for the rank through a SIGTERM, which the rank gets itself.
    """
    return [
        "rank_guard() {",
        "  trap request_stop USR1 USR2",
        "  trap : TERM",
        '  "$@" &',
        "  local pid=$!",
        '  while true; do wait "$pid"; local status=$?; kill -0 "$pid" 2>/dev/null || return "$status"; done',
        "}",
        "export -f request_stop rank_guard",
        "export STOP_FLAG STOP_PENDING",
    ]


def srun_wait_lines(srun_command: str, restart_delay_s: int = DEFAULT_RESTART_DELAY_S) -> list[str]:
    """Batch-script lines that start srun in the background and wait for it, across the trap's interruptions.

    The shell runs a trap only between commands, and `wait` returns early when one fires, so srun must not run in the
    foreground and the wait must be repeated until srun has really exited. Then: a step whose ranks were ended by a
    signal (status > 128; a Python error exits 1 and is left alone) after a stop request is requeued from here, as
    rank 0 would have done, up to MAX_REQUEUE restarts (0 when the script does not set it). That is a USR1 or USR2 sent to the tasks in their first instant, which kills a rank that has no handler
    yet: srun exits with 138 or 140, or, when it ended the other ranks with SIGTERM first, a rank that did catch the
    signal has written this run's stop flag (`flag_from_signal`). A stop flag left when the job finished (the stop
    came after the last iteration) is removed.
    """
    job = '"$SLURM_JOB_ID"'
    return [
        f"{srun_command} &",
        "SRUN_PID=$!",
        'while true; do wait "$SRUN_PID"; STATUS=$?; kill -0 "$SRUN_PID" 2>/dev/null || break; done',
        'STOPPED=""  # asked to stop: the flag of this run exists (written by the trap or by a rank), or USR1/USR2',
        '[ "$STATUS" -eq 138 ] || [ "$STATUS" -eq 140 ] && STOPPED=1  # killed a rank (srun returns 128 + signal)',
        '[ -n "${STOP_FLAG:-}" ] && grep -qx "${SLURM_JOB_ID:-} ${SLURM_RESTART_COUNT:-0}" "$STOP_FLAG" 2>/dev/null '
        '&& STOPPED=1',
        '# a rank ended by a signal (status > 128, not a Python error) after a stop request: requeue, as rank 0 would',
        'if [ "$STATUS" -gt 128 ] && [ -n "$STOPPED" ] && [ "${SLURM_RESTART_COUNT:-0}" -lt "${MAX_REQUEUE:-0}" ]; '
        'then',
        '  echo "the step failed (exit $STATUS) after a stop request, probably a rank that was still starting: '
        'requeueing" >&2',
        "  trap '' TERM  # SLURM answers the requeue with SIGTERM",
        f"  scontrol requeue {job} && scontrol update JobId={job} StartTime=now+{restart_delay_s}",
        'elif [ "$STATUS" -eq 0 ] && [ -n "${STOP_FLAG:-}" ]; then',
        '  rm -f "$STOP_FLAG"  # the stop came after the last iteration: nothing is left to stop',
        "fi",
        'exit "$STATUS"',
    ]


def requeue_limit_lines(max_requeue: int) -> list[str]:
    """The batch-script line that lets `srun_wait_lines` requeue at most slurm.max_requeue times."""
    return [f"MAX_REQUEUE={int(max_requeue)}"]


# A stop signal that arrives while the per-rank entry is still importing, before `StopRequest.install`: recorded by
# `install_early_stop_handlers` (the entry's first statement) and handed to the StopRequest that takes over.
_EARLY_SIGNALS: list[int] = []


def _record_early(signum: int, frame: FrameType | None) -> None:
    _EARLY_SIGNALS.append(signum)
    if signum in REQUEUE_SIGNALS:
        flag_from_signal()


def flag_from_signal(environ: Mapping[str, str] | None = None) -> bool:
    """Write this run's stop flag where the batch script said (STOP_FLAG_ENV); True if written.

    A rank that catches USR1/USR2 leaves the word in the run directory, so that the batch shell still requeues the
    job when another rank, still starting, died of the same signal and srun ended the step. Errors are ignored:
    this runs in a signal handler and must never raise.
    """
    env = os.environ if environ is None else environ
    path, job_id = env.get(STOP_FLAG_ENV), env.get("SLURM_JOB_ID")
    restarts = env.get("SLURM_RESTART_COUNT", "0") or "0"
    if not path or not job_id or not restarts.isdigit():
        return False
    try:
        _write_flag(Path(path), stop_flag_tag(job_id, int(restarts)))
    except OSError:
        return False
    return True


def install_early_stop_handlers() -> None:
    """Record USR1 and USR2 from now on (main thread) until a StopRequest is installed, which adopts them; SIGTERM
    keeps (or gets back, under submitit) its default action, since a rank that has not started has nothing to save.

    Call it first thing in a rank's process: until a handler exists, USR1/USR2 kill the process.
    """
    if threading.current_thread() is threading.main_thread():
        for signum in REQUEUE_SIGNALS:
            signal.signal(signum, _record_early)
        for signum in TERMINATE_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)


class StopRequest:
    """Records stop requests (signals, the stop flag) for the training loop to poll at safe points.

    The signal handlers only store which signal arrived (and, in a batch script's job, write the stop flag for
    USR1/USR2: `flag_from_signal`): no locks, nothing that can deadlock or interrupt a collective halfway.
    `should_stop()` also looks at the stop flag of this run, at most every `flag_poll_interval_s`.
    """

    def __init__(self, run_dir: str | os.PathLike[str] | None = None, job_id: str | None = None,
                 restart_count: int = 0, flag_poll_interval_s: float = 1.0) -> None:
        self.flag_path = stop_flag_path(run_dir) if run_dir is not None else None
        self.tag = stop_flag_tag(job_id, restart_count) if job_id is not None else None
        self.flag_poll_interval_s = flag_poll_interval_s
        self._signal_received: int | None = None
        self._flag_seen = False
        self._next_flag_poll = 0.0
        self._previous: dict[int, object] = {}

    @staticmethod
    def for_slurm_job(run_dir: str | os.PathLike[str], environ: Mapping[str, str] | None = None,
                      flag_poll_interval_s: float = 1.0) -> StopRequest:
        """A StopRequest that watches the flag for this job and restart (SLURM_JOB_ID, SLURM_RESTART_COUNT)."""
        env = os.environ if environ is None else environ
        restarts = env.get("SLURM_RESTART_COUNT", "0") or "0"
        if not restarts.isdigit():
            raise ValueError(f"SLURM_RESTART_COUNT={restarts!r} is not a non-negative integer")
        return StopRequest(run_dir, env.get("SLURM_JOB_ID"), int(restarts), flag_poll_interval_s)

    def install(self) -> StopRequest:
        """Catch USR1, USR2 and SIGTERM (main thread only); earlier handlers come back with `uninstall`."""
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("StopRequest.install() must be called from the main thread, where Python runs signal "
                               "handlers")
        if self._previous:  # already installed
            return self
        for signum in REQUEUE_SIGNALS + TERMINATE_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._record)
        for signum in _EARLY_SIGNALS:  # arrived while the process was starting (install_early_stop_handlers)
            self._record(signum, None)
        _EARLY_SIGNALS.clear()
        return self

    def uninstall(self) -> None:
        """Put back the handlers that were there before `install`."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def __enter__(self) -> StopRequest:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        # keep the first "stop now" over any "stop and requeue": termination is the stronger request
        if self._signal_received is None or signum in TERMINATE_SIGNALS:
            self._signal_received = signum
        if signum in REQUEUE_SIGNALS:
            flag_from_signal()

    def clear_stale_flag(self) -> bool:
        """Delete a stop flag that addresses another job or an earlier run of this one; True if one was deleted.

        Call it on one rank (global rank 0) at start-up; a flag for the current run is kept.
        """
        if self.flag_path is None or self._flag_addresses_us():
            return False
        try:
            self.flag_path.unlink()
        except FileNotFoundError:
            return False
        return True

    def _flag_addresses_us(self) -> bool:
        if self.flag_path is None or self.tag is None:
            return False
        try:
            return self.flag_path.read_text().strip() == self.tag
        except (FileNotFoundError, NotADirectoryError):
            return False

    def request(self) -> StopReason | None:
        """The reason to stop, or None; polls the flag file (throttled) when no signal has arrived."""
        if self._signal_received is not None:
            signum = self._signal_received
            return StopReason(signal.Signals(signum).name, requeue=signum not in TERMINATE_SIGNALS)
        if not self._flag_seen and self.flag_path is not None and time.monotonic() >= self._next_flag_poll:
            self._next_flag_poll = time.monotonic() + self.flag_poll_interval_s
            self._flag_seen = self._flag_addresses_us()
        return StopReason("stop flag", requeue=True) if self._flag_seen else None

    def should_stop(self) -> bool:
        """True once this rank has been asked to stop (the loop combines it across ranks)."""
        return self.request() is not None


@dataclass(frozen=True)
class RequeueOutcome:
    """What `requeue_self` did."""

    job_id: str
    restart_count: int  # restarts before this requeue; the next run sees SLURM_RESTART_COUNT = restart_count + 1
    prompt_restart: bool  # the begin time was moved to now + restart_delay_s (else SLURM's cred_expire delay applies)
    detail: str  # scontrol's message for the begin-time update when it failed, else ""


ScontrolRunner = Callable[[list[str]], "subprocess.CompletedProcess[str]"]


def run_scontrol(args: list[str], timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run `scontrol ARGS`, capturing its output (SIGTERM stays ignored in it when it is ignored here)."""
    try:
        return subprocess.run(["scontrol", *args], check=False, capture_output=True, text=True, timeout=timeout_s)
    except FileNotFoundError:
        raise RequeueError("scontrol is not on PATH: cannot requeue the job") from None
    except subprocess.TimeoutExpired:
        raise RequeueError(f"`scontrol {' '.join(args)}` did not answer within {timeout_s:.0f}s") from None


def requeue_self(rank: int, max_requeue: int, environ: Mapping[str, str] | None = None,
                 restart_delay_s: int = DEFAULT_RESTART_DELAY_S,
                 scontrol: ScontrolRunner = run_scontrol) -> RequeueOutcome | None:
    """Requeue this SLURM job from global rank 0 (other ranks: no-op, returns None) after the checkpoint is saved.

    SLURM answers the requeue by sending SIGTERM to every process of the job, so call it last: once it returns, exit.
    SIGTERM is ignored while the two scontrol calls run so that neither this process nor scontrol dies halfway.
    Raises RequeueRefused past `max_requeue` restarts or outside a batch job, RequeueError when scontrol says no.
    """
    if rank != 0:
        return None
    env = os.environ if environ is None else environ
    job_id = env.get("SLURM_JOB_ID")
    if not job_id:
        raise RequeueRefused("SLURM_JOB_ID is not set: not inside a SLURM job, nothing to requeue "
                             "(the checkpoint is saved; run the same command again to resume)")
    restarts_text = env.get("SLURM_RESTART_COUNT", "0") or "0"
    if not restarts_text.isdigit():
        raise RequeueError(f"SLURM_RESTART_COUNT={restarts_text!r} is not a non-negative integer")
    restarts = int(restarts_text)
    if restarts >= max_requeue:
        raise RequeueRefused(f"job {job_id} has already been requeued {restarts} time(s), and slurm.max_requeue is "
                             f"{max_requeue}: not requeueing again. The checkpoint is saved; submit the job again "
                             f"(or raise --slurm.max_requeue) to continue")
    if restart_delay_s < 1:
        raise ValueError(f"restart_delay_s must be at least 1 second, got {restart_delay_s}")
    with _sigterm_ignored():
        result = scontrol(["requeue", job_id])
        if result.returncode != 0:
            raise RequeueError(f"`scontrol requeue {job_id}` failed (exit {result.returncode}): "
                               f"{(result.stderr or result.stdout).strip()} -- was the job submitted with --requeue?")
        update = scontrol(["update", f"JobId={job_id}", f"StartTime=now+{restart_delay_s}"])
    prompt = update.returncode == 0
    return RequeueOutcome(job_id=job_id, restart_count=restarts, prompt_restart=prompt,
                          detail="" if prompt else (update.stderr or update.stdout).strip())


def leave_for_requeue(rank: int, reason: StopReason | None, max_requeue: int) -> NoReturn:
    """After a stop checkpoint: rank 0 requeues the job when the stop asked for it; every rank then exits.

    SystemExit (not a return) so that submitit records no result and waits for the requeued run.
    """
    if reason is not None and reason.requeue and in_slurm_job() and rank == 0:
        requeue_self(rank, max_requeue)
    print(f"[rank {rank}] stopped after a checkpoint ({reason.source if reason else 'stop'})", flush=True)
    raise SystemExit(0)


def kill_wait_s(scontrol: ScontrolRunner = run_scontrol, default: int = 30) -> int:
    """The cluster's KillWait (seconds between SIGTERM and SIGKILL), from `scontrol show config`."""
    try:
        result = scontrol(["show", "config"])
    except RequeueError:
        return default
    for line in result.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "KillWait" and value.split() and value.split()[0].isdigit():
            return int(value.split()[0])
    return default


def requeue_promptly_and_exit(max_requeue: int, restart_delay_s: int | None = None) -> NoReturn:
    """submitit's `checkpoint` hook: requeue the way `requeue_self` does (restart in seconds), then end this process.

    submitit's own USR2 handler is in place from the moment a task has loaded its pickle until the per-rank entry
    installs its StopRequest. A USR2 then makes submitit call the callable's `checkpoint()` (global rank 0 only) and
    run `scontrol requeue` without moving the begin time, so the job would wait SLURM's 120 s requeue hold. This hook
    requeues with the begin time moved, and leaves before submitit requeues a second time. Nothing was trained yet,
    so the next run resumes from the same checkpoint. The other ranks are still starting and do not leave at once
    (submitit ignores SIGTERM then), so the job ends only after KillWait: the default delay is KillWait + 10 s.
    """
    if restart_delay_s is None:
        restart_delay_s = kill_wait_s() + DEFAULT_RESTART_DELAY_S
    try:
        outcome = requeue_self(0, max_requeue, restart_delay_s=restart_delay_s)
        print(f"stop signal during start-up: job {outcome.job_id if outcome else '?'} requeued, restarting in "
              f"{restart_delay_s} s", file=sys.stderr, flush=True)
        code = 0
    except RequeueError as error:
        print(f"stop signal during start-up, not requeued: {error}", file=sys.stderr, flush=True)
        code = 1
    os._exit(code)


class _sigterm_ignored:
    """Ignore SIGTERM inside the block (main thread only; elsewhere the disposition cannot be changed and is left)."""

    def __enter__(self) -> None:
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
