"""Stopping the tiny 3-node job at random moments on a real SLURM cluster, and checking what it ends with.

The building blocks of tools/torture_slurm.py and of the tests in tests/slurm: submit `sbatch/tiny_cpu_3node.sh`
with small settings, interrupt it (USR1 to the batch shell or to the tasks, USR2 to the tasks, scancel, SIGKILL of
one rank or all of them) at a time drawn from a seed, bring it back the way a user would (SLURM requeues by itself;
after a kill or a cancel the same command is submitted again), and compare the end with an uninterrupted run: actor
weights bit for bit, the sha256 of every iteration's rollouts, shards generated twice, files left behind, and how
long each stop took to come back.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hpc_rlhf.slurm.local_cluster import FINISHED_STATES, REPO_ROOT, LocalCluster

# tiny rollouts, hf generation on the CPU, no TensorBoard or plots: an iteration takes well under a second
TINY_ARGS = (
    "--actor.pretrain=builtin:tiny-llama-arith", "--vllm.backend=hf", "--train.device=cpu",
    "--rollout.batch_size=2", "--rollout.n_samples_per_prompt=2", "--rollout.generate_max_len=4",
    "--rollout.micro_batch_size=8", "--train.train_batch_size=4", "--train.micro_train_batch_size=2",
    "--eval.data=", "--ds.zero_stage=2", "--actor.learning_rate=1e-4",
    "--logger.use_tensorboard=false", "--logger.plot=false", "--logger.progress_bar=false",
    "--ckpt.save_hf_model=true", "--actor.lr_warmup_ratio=0", "--actor.attn_implementation=eager",
    "--critic.attn_implementation=eager",
)
THREE_NODE_LAYOUT = ("--layout.colocate=false", "--layout.generator.gpus=1", "--layout.actor.gpus=2",
                     "--slurm.nodes=3", "--slurm.gpus_per_node=1", "--slurm.cpus_per_task=1")
SAMPLES_PER_ITERATION = 2 * 2  # rollout.batch_size x n_samples_per_prompt
STOPS = ("usr1_batch", "usr1_tasks", "usr2_tasks", "cancel", "kill_rank", "kill_all")
REQUEUING_STOPS = ("usr1_batch", "usr1_tasks", "usr2_tasks")  # the job comes back by itself


def job_args(run_dir: Path, iterations: int, async_queue: int, save_steps: int) -> list[str]:
    """Overrides of the tiny job (after sbatch/tiny_cpu_3node.sh's own)."""
    return [*TINY_ARGS, f"--train.max_iterations={iterations}", f"--rollout.async_queue={async_queue}",
            f"--ckpt.save_steps={save_steps}", f"--train.run_dir={run_dir}"]


def run_reference(run_dir: Path, iterations: int, async_queue: int, save_steps: int, log: Path,
                  timeout_s: float = 900) -> None:
    """The same job uninterrupted, on this machine (`python -m hpc_rlhf.train`, one process per rank)."""
    command = [sys.executable, "-m", "hpc_rlhf.train", "--config", "configs/tiny_cpu.yaml", *THREE_NODE_LAYOUT,
               *job_args(run_dir, iterations, async_queue, save_steps)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with log.open("w") as out:
        result = subprocess.run(command, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, env=env,
                                timeout=timeout_s, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"the reference run failed ({result.returncode}); see {log}")


def submit_tiny(cluster: LocalCluster, run_dir: Path, log: Path, args: Sequence[str]) -> str:
    """`sbatch sbatch/tiny_cpu_3node.sh ARGS` with its output in `log`; returns the job id."""
    return cluster.sbatch(f"--output={log}", "sbatch/tiny_cpu_3node.sh", *args)


def wait_running(cluster: LocalCluster, job_id: str, timeout_s: float = 120, restarts: int = 0) -> float:
    """Poll fast until the job (its run number `restarts`) is RUNNING; returns the monotonic time it was seen."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        record = cluster.job(job_id)
        if record.get("JobState") == "RUNNING" and int(record.get("Restarts", "0")) >= restarts:
            return time.monotonic()
        if record.get("JobState") in FINISHED_STATES:
            raise AssertionError(f"job {job_id} ended before it ran: {record}")
        time.sleep(0.01)
    raise AssertionError(f"job {job_id} did not start within {timeout_s}s\n{cluster.log_tails()}")


def task_pids(job_id: str) -> dict[int, int]:
    """{SLURM_PROCID: pid} of the job's Python task processes (found through /proc/PID/environ and exe; the rank
    guard's shell is left out)."""
    wanted = f"SLURM_JOB_ID={job_id}".encode()
    python = os.path.realpath(sys.executable)
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            executable = os.path.realpath(proc / "exe")
        except OSError:
            continue
        if wanted in environ and any(e.startswith(b"SLURM_STEP_ID=") for e in environ) and executable == python:
            procid = next((e.split(b"=", 1)[1] for e in environ if e.startswith(b"SLURM_PROCID=")), b"")
            if procid.isdigit():
                found[int(procid)] = int(proc.name)
    return found


def wait_for_tasks(job_id: str, count: int, timeout_s: float = 120) -> float:
    """Poll fast until `count` task processes of the job exist; returns the monotonic time."""
    deadline = time.monotonic() + timeout_s
    while len(task_pids(job_id)) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"the {count} tasks of job {job_id} did not start within {timeout_s}s")
        time.sleep(0.01)
    return time.monotonic()


def wait_for_batch_shell(job_id: str, timeout_s: float = 120) -> float:
    """Poll fast until the job's batch shell process exists (SLURM says RUNNING a moment before); returns the time."""
    wanted = f"SLURM_JOB_ID={job_id}".encode()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                command = (proc / "cmdline").read_bytes()
                if b"slurm_script" in command and wanted in (proc / "environ").read_bytes().split(b"\0"):
                    return time.monotonic()
            except OSError:
                continue
        time.sleep(0.005)
    raise AssertionError(f"the batch shell of job {job_id} did not start within {timeout_s}s")


def send_stop(cluster: LocalCluster, job_id: str, stop: str, kill_rank: int = 2) -> str:
    """Interrupt the job the way `stop` names (see STOPS); returns what scancel said, or which pids were killed."""
    if stop in ("usr1_batch", "usr1_tasks", "usr2_tasks", "cancel"):
        command = {"usr1_batch": ["--signal=USR1", "--batch"], "usr1_tasks": ["--signal=USR1"],
                   "usr2_tasks": ["--signal=USR2"], "cancel": []}[stop]
        result = cluster.run("scancel", *command, job_id, check=False)
        return f"scancel {' '.join(command)} {job_id}: exit {result.returncode} {result.stdout}{result.stderr}".strip()
    if stop in ("kill_rank", "kill_all"):
        killed = []
        for procid, pid in task_pids(job_id).items():
            if stop == "kill_all" or procid == kill_rank:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(procid)
        return f"SIGKILL to ranks {sorted(killed)}"
    raise ValueError(f"unknown stop {stop!r}; one of {STOPS}")


class ShardWatch:
    """Notes the first commit record seen of every shard while the job runs; a shard whose final record differs
    was generated (committed) twice."""

    def __init__(self, run_dir: Path, interval_s: float = 0.1) -> None:
        self.run_dir, self.interval_s = run_dir, interval_s
        self.first: dict[str, tuple[float, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ShardWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.scan()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.scan()

    def records(self) -> dict[str, tuple[float, int]]:
        found = {}
        for path in sorted((self.run_dir / "rollouts").glob("iter_*/*.commit.json")):
            with contextlib.suppress(OSError, ValueError, KeyError):
                body = json.loads(path.read_text())
                found[f"{path.parent.name}/{path.name}"] = (float(body["created_unix"]), int(body["pid"]))
        return found

    def scan(self) -> None:
        for name, stamp in self.records().items():
            self.first.setdefault(name, stamp)

    def twice(self) -> list[str]:
        final = self.records()
        return sorted(name for name, stamp in final.items() if self.first.get(name, stamp) != stamp)


def leftovers(run_dir: Path) -> list[str]:
    """Files a finished job should not leave: temp files of shards or checkpoints, and the stop flag."""
    found = [p for p in (run_dir / "rollouts").rglob("*") if ".tmp." in p.name]
    found += [p for p in (run_dir / "checkpoints").glob("*") if "tmp" in p.name]
    found += list(run_dir.glob(".stop_requested*"))
    return sorted(str(p.relative_to(run_dir)) for p in found)


def compare_runs(run_dir: Path, reference: Path, iterations: int) -> list[str]:
    """Where the run differs from the reference: actor tensors (bitwise) and each iteration's rollout sha256."""
    import torch
    from safetensors.torch import load_file

    def weights(folder: Path) -> dict:
        tensors: dict = {}
        for path in sorted((folder / "hf" / "actor").glob("*.safetensors")):
            tensors.update(load_file(path))
        return tensors

    differences = []
    got, want = weights(run_dir), weights(reference)
    if not want or got.keys() != want.keys():
        differences.append(f"actor tensors: {sorted(got)[:3]}... vs {sorted(want)[:3]}...")
    else:
        differences += [f"actor tensor {name}" for name in want if not torch.equal(got[name], want[name])]
    for iteration in range(iterations):
        record = Path("rollouts") / f"iter_{iteration:06d}" / "generator_0000.commit.json"
        try:
            same = json.loads((run_dir / record).read_text())["sha256"] == \
                json.loads((reference / record).read_text())["sha256"]
        except (OSError, ValueError, KeyError) as error:
            differences.append(f"{record}: {error}")
            continue
        if not same:
            differences.append(f"{record}: sha256 differs")
    return differences


@dataclass
class Interruption:
    """One stop: what, when (seconds after the run started), and how long until the job ran again."""

    stop: str
    after_s: float
    restart_s: float | None = None  # from the stop to RUNNING again (requeued or resubmitted)
    state: str = ""
    detail: str = ""  # what scancel said, or which ranks were killed


@dataclass
class TortureReport:
    seed: int
    interruptions: list[Interruption] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)
    generated_twice: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    metric_steps_ok: bool = True
    repeated_rows: int = 0  # metrics.jsonl rows of iterations trained again after a kill (the last one counts)
    jobs: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.differences or self.generated_twice or self.leftovers) and self.metric_steps_ok

    def lines(self) -> list[str]:
        out = [f"seed {self.seed}: {'OK' if self.ok else 'FAILED'} (jobs {' '.join(self.jobs)})"]
        for item in self.interruptions:
            latency = "-" if item.restart_s is None else f"{item.restart_s:.1f}s"
            out.append(f"  {item.stop:<11} at {item.after_s:5.2f}s  -> {item.state:<10} running again after {latency}"
                       f"  ({item.detail})")
        out.append(f"  bitwise equal to the uninterrupted run: {'yes' if not self.differences else 'NO'}"
                   + "".join(f"\n    {d}" for d in self.differences[:10]))
        out.append(f"  shards generated twice: {len(self.generated_twice)} {self.generated_twice[:5]}")
        out.append(f"  files left behind: {len(self.leftovers)} {self.leftovers[:5]}")
        out.append(f"  metrics.jsonl: every iteration logged: {'yes' if self.metric_steps_ok else 'NO'}"
                   f" ({self.repeated_rows} row(s) of iterations trained again after a kill)")
        return out


def metric_steps(run_dir: Path) -> list[int]:
    """The step of every metrics.jsonl row, in file order (a resumed run appends; `read_metrics` keeps the last)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [row["step"] for row in rows]


def torture(cluster: LocalCluster, workdir: Path, *, seed: int, stops: int, iterations: int, async_queue: int = 1,
            save_steps: int = 2, kinds: Iterable[str] = STOPS, max_delay_s: float = 20.0,
            timeout_s: float = 900, reference: Path | None = None, anchor: str = "start") -> TortureReport:
    """Run the tiny job, interrupting it `stops` times at random moments drawn from `seed`; report the end.

    A stop comes `delay` seconds after the run started (anchor "start": start-up included) or after it logged its
    first iteration (anchor "training")."""
    if anchor not in ("start", "training"):
        raise ValueError(f"anchor must be 'start' or 'training', got {anchor!r}")
    rng = random.Random(seed)
    kinds = tuple(kinds)
    run_dir, report = workdir / "run", TortureReport(seed=seed)
    if reference is None:
        reference = workdir / "reference"
        run_reference(reference, iterations, async_queue, save_steps, workdir / "reference.log")
    args = job_args(run_dir, iterations, async_queue, save_steps)
    plan = [(rng.choice(kinds), rng.uniform(0.0, max_delay_s)) for _ in range(stops)]
    deadline = time.monotonic() + timeout_s
    with ShardWatch(run_dir) as watch:
        job_id = submit_tiny(cluster, run_dir, workdir / "job_%j.out", args)
        report.jobs.append(job_id)
        restarts = 0
        for stop, delay in plan:
            started = wait_running(cluster, job_id, restarts=restarts)
            if anchor == "training":  # count from this run's first logged iteration instead of its start
                started = _wait_for_new_row(cluster, job_id, run_dir, deadline) or started
            time.sleep(max(0.0, delay - (time.monotonic() - started)))
            state = cluster.job(job_id).get("JobState", "")
            if state != "RUNNING":  # finished before the stop was due
                break
            detail = send_stop(cluster, job_id, stop)
            sent = time.monotonic()
            item = Interruption(stop, sent - started, detail=detail)
            report.interruptions.append(item)
            job_id, restarts, item.state = _come_back(cluster, job_id, restarts, run_dir, workdir, args, deadline)
            if job_id not in report.jobs:
                report.jobs.append(job_id)
            if item.state == "COMPLETED":
                break
            with contextlib.suppress(AssertionError):
                item.restart_s = wait_running(cluster, job_id, restarts=restarts) - sent
        cluster.wait_for_state(job_id, {"COMPLETED"}, timeout_s=max(10.0, deadline - time.monotonic()),
                               min_restarts=restarts, log=workdir / f"job_{job_id}.out")
    report.differences = compare_runs(run_dir, reference, iterations)
    report.generated_twice = watch.twice()
    report.leftovers = leftovers(run_dir)
    steps = metric_steps(run_dir)
    report.metric_steps_ok = sorted(set(steps)) == list(range(iterations))
    report.repeated_rows = len(steps) - len(set(steps))
    return report


def _metric_rows(run_dir: Path) -> int:
    try:
        return sum(1 for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip())
    except OSError:
        return 0


def _wait_for_new_row(cluster: LocalCluster, job_id: str, run_dir: Path, deadline: float) -> float | None:
    """Wait until metrics.jsonl gets a row (the running run trained an iteration); None if the job left RUNNING."""
    rows = _metric_rows(run_dir)
    while time.monotonic() < deadline:
        if _metric_rows(run_dir) > rows:
            return time.monotonic()
        if cluster.job(job_id).get("JobState") != "RUNNING":
            return None
        time.sleep(0.05)
    return None


def _come_back(cluster: LocalCluster, job_id: str, restarts: int, run_dir: Path, workdir: Path,
               args: Sequence[str], deadline: float) -> tuple[str, int, str]:
    """After a stop: wait until SLURM requeued the job (same id, one more restart) or it ended (then submit the same
    command again, as a user would). Returns the job to follow, its restart count and what became of the old run."""
    while time.monotonic() < deadline:
        record = cluster.job(job_id)
        state, count = record.get("JobState", ""), int(record.get("Restarts", "0"))
        if count > restarts:
            return job_id, count, "requeued"
        if state == "COMPLETED":
            return job_id, restarts, state
        if state in FINISHED_STATES:
            new_id = submit_tiny(cluster, run_dir, workdir / "job_%j.out", args)
            return new_id, 0, state
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} neither came back nor ended\n{cluster.log_tails()}")
