"""Best-case iteration time and GPU memory of a job's layout, before running it (or to extrapolate a measured run).

    python tools/plan_job.py --config configs/ppo_70b.yaml --policy-shape llama3.1-70b --value-shape llama3.1-8b \
        --peak-tflops 790 --bandwidth-tbs 3.0 --network-gbs 50
    python tools/plan_job.py ... --efficiency generate=0.35 actor_update=0.4 default=0.5   # measured fractions

Each phase's limit is its FLOPs (forwards, updates) or bytes (decoding, weight broadcast) over the ceilings of the
GPUs doing it; `--efficiency` divides limits by the fraction of its limit each phase reached in a measured run (e.g.
the per-phase "% of limit" column of tools/bench_e2e.py), which turns the limits into an estimate. Shapes are those of
hpc_rlhf.benchmarks.task.MODEL_SHAPES; --set overrides config keys as on the training command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpc_rlhf.benchmarks.plan import Hardware, plan_job  # noqa: E402
from hpc_rlhf.benchmarks.report import markdown_table  # noqa: E402
from hpc_rlhf.benchmarks.task import MODEL_SHAPES  # noqa: E402
from hpc_rlhf.config.schema import ConfigError  # noqa: E402
from hpc_rlhf.config.loading import load_config  # noqa: E402

PROG = "plan_job.py"


class PlanError(Exception):
    """A bad argument, reported as one line."""


def parse_efficiency(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise PlanError(f"--efficiency {item!r}: expected PHASE=FRACTION (e.g. generate=0.4)")
        try:
            fraction = float(value)
        except ValueError:
            raise PlanError(f"--efficiency {item!r}: {value!r} is not a number") from None
        if not 0 < fraction <= 1:
            raise PlanError(f"--efficiency {item!r}: the fraction must be in (0, 1]")
        out[name] = fraction
    return out


def shape(flag: str, name: str):
    """The model shape called `name`, or a PlanError naming the flag and the known shapes."""
    if name not in MODEL_SHAPES:
        raise PlanError(f"{flag} {name!r} is not a known shape; known: {', '.join(sorted(MODEL_SHAPES))}")
    return MODEL_SHAPES[name]


def main(argv: list[str] | None = None) -> int:
    """Print the plan; a bad argument is one line on stderr and exit status 2."""
    try:
        return plan(argv)
    except (PlanError, ConfigError) as err:
        message = " | ".join(line.strip() for line in str(err).splitlines() if line.strip())
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2


def plan(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--policy-shape", required=True, help="shape of actor, reference and generator")
    p.add_argument("--value-shape", help="shape of critic and reward model (default: the policy's)")
    p.add_argument("--peak-tflops", type=float, required=True, help="bf16 matmul TFLOP/s of one GPU")
    p.add_argument("--bandwidth-tbs", type=float, required=True, help="memory bandwidth of one GPU, TB/s")
    p.add_argument("--network-gbs", type=float, default=50.0, help="inter-node bandwidth per GPU, GB/s")
    p.add_argument("--efficiency", nargs="*", default=[], metavar="PHASE=FRACTION")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = p.parse_args(argv)

    cfg = load_config(args.config, [f"--{item}" for item in args.set]).config
    policy = shape("--policy-shape", args.policy_shape)
    value = shape("--value-shape", args.value_shape) if args.value_shape else policy
    hw = Hardware(args.peak_tflops * 1e12, args.bandwidth_tbs * 1e12, args.network_gbs * 1e9)
    plan = plan_job(cfg, policy, value, hw, parse_efficiency(args.efficiency) or None)
    rows = [{"phase": ph.phase, "role": ph.role, "gpus": ph.gpus, "work": ph.work, "limit": ph.limit_s,
             "estimate": ph.estimate_s} for ph in plan.phases]
    columns = [("phase", "phase", ""), ("role", "role", ""), ("gpus", "GPUs", "d"), ("work", "work", ""),
               ("limit", "limit s", ".2f")]
    if any(r["estimate"] is not None for r in rows):
        columns.append(("estimate", "estimate s", ".2f"))
    print(markdown_table(rows, columns))
    print("iteration limit: " + ", ".join(f"{k} {v:.1f} s" for k, v in plan.iteration_limit_s.items()))
    if plan.iteration_estimate_s:
        print("iteration estimate: " + ", ".join(f"{k} {v:.1f} s" for k, v in plan.iteration_estimate_s.items()))
    print("memory per GPU (weights, gradients, optimizer; no activations or KV cache): " + ", ".join(
        f"{role} {gib:.1f} GiB" for role, gib in plan.memory_gib.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
