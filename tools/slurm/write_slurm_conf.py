"""Write slurm.conf and gres.conf for the one-machine test cluster started by tools/slurm_cluster.sh (stdlib only).

Every daemon runs as root on 127.0.0.1; node nK is one `slurmd -N nK` listening on PORT+K. The settings that matter for
the tests are commented where they are written.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path


def node_range(count: int) -> str:
    """SLURM's host-range form of n1..nCOUNT, e.g. 'n[1-3]' (or 'n1' for one node)."""
    return "n1" if count == 1 else f"n[1-{count}]"


def port_range(first: int, count: int) -> str:
    """SLURM's range form of `count` consecutive ports starting at `first`."""
    return str(first) if count == 1 else f"[{first}-{first + count - 1}]"


def slurm_conf(*, scratch: Path, hostname: str, nodes: int, gpus: int, cpus: int, mem_mb: int, port: int,
               cred_expire: int, munge_socket: Path) -> str:
    """The text of slurm.conf."""
    names = node_range(nodes)
    lines = [
        "# Written by tools/slurm/write_slurm_conf.py for the local test cluster; do not edit by hand.",
        "ClusterName=hpcrlhf",
        f"SlurmctldHost={hostname}(127.0.0.1)",
        f"SlurmctldPort={port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        # cred_expire is also how long a requeued job must wait before it may start again (SLURM default 120 s)
        f"AuthInfo=socket={munge_socket},cred_expire={cred_expire}",
        f"StateSaveLocation={scratch}/state",
        f"SlurmdSpoolDir={scratch}/spool/%n",
        f"SlurmctldPidFile={scratch}/run/slurmctld.pid",
        f"SlurmdPidFile={scratch}/run/slurmd-%n.pid",
        f"SlurmctldLogFile={scratch}/log/slurmctld.log",
        f"SlurmdLogFile={scratch}/log/slurmd-%n.log",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        # no cgroups in a container: track job processes by parent pid, bind nothing
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        # trust the CPU/memory counts written here over what slurmd detects, so that a 2-core machine can host nodes
        # shaped like GPU servers
        "SlurmdParameters=config_overrides",
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        # one line per finished job (state, exit code, restarts): survives the job record being purged
        "JobCompType=jobcomp/filetxt",
        f"JobCompLoc={scratch}/log/jobcomp.log",
        "MpiDefault=none",
        "GresTypes=gpu",
        # batch jobs may requeue themselves (`scontrol requeue`), and nodes come back by themselves after a restart
        "JobRequeue=1",
        "ReturnToService=2",
        # look at pending jobs every second, so that a requeued job starts as soon as it becomes eligible
        "SchedulerType=sched/backfill",
        "SchedulerParameters=sched_interval=1,bf_interval=1",
        # keep finished jobs visible to `scontrol show job` for 10 minutes (tests read their final state)
        "MinJobAge=600",
        # seconds between SIGTERM and SIGKILL at the time limit or on scancel
        "KillWait=10",
        "InactiveLimit=0",
        "SlurmdTimeout=120",
        (f"NodeName={names} NodeHostname={hostname} NodeAddr=127.0.0.1 Port={port_range(port + 1, nodes)} "
        f"CPUs={cpus} RealMemory={mem_mb} Gres=gpu:{gpus} State=UNKNOWN"),
        f"PartitionName=debug Nodes={names} Default=YES MaxTime=INFINITE State=UP",
    ]
    return "\n".join(lines) + "\n"


def gres_conf(*, nodes: int, gpus: int) -> str:
    """The text of gres.conf: each node's GPUs are the fake devices /dev/fakegpu0..N-1 (without File=, INVAL nodes)."""
    files = "/dev/fakegpu0" if gpus == 1 else f"/dev/fakegpu[0-{gpus - 1}]"
    return f"AutoDetect=off\nNodeName={node_range(nodes)} Name=gpu File={files}\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scratch", type=Path, required=True)
    parser.add_argument("--hostname", required=True)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--cpus", type=int, default=128)
    parser.add_argument("--mem-mb", type=int, default=6000)
    parser.add_argument("--port", type=int, default=17010)
    parser.add_argument("--cred-expire", type=int, default=120)
    parser.add_argument("--munge-socket", type=Path, required=True)
    args = parser.parse_args(argv)
    for name in ("nodes", "gpus", "cpus", "mem_mb", "cred_expire"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    etc = args.scratch / "etc"
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "slurm.conf").write_text(slurm_conf(
        scratch=args.scratch, hostname=args.hostname, nodes=args.nodes, gpus=args.gpus, cpus=args.cpus,
        mem_mb=args.mem_mb, port=args.port, cred_expire=args.cred_expire, munge_socket=args.munge_socket))
    (etc / "gres.conf").write_text(gres_conf(nodes=args.nodes, gpus=args.gpus))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
