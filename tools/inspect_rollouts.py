#!/usr/bin/env python
"""Print a summary of a run's rollout shards: iterations, samples, mean reward/score, lengths, weight versions.

    python tools/inspect_rollouts.py RUN_DIR [--iteration N] [--json] [--no-verify]

Reads only committed shards (with their column shards applied); incomplete iterations are shown too and
marked as such. The shards are plain Arrow IPC files: pandas (`pd.read_feather`), pyarrow and DuckDB
read them directly for anything this summary does not show.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

try:
    import hpc_rlhf  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpc_rlhf.rollouts import RolloutError, summarize_run  # noqa: E402
from hpc_rlhf.rollouts.summary import IterationSummary  # noqa: E402

_COLUMNS = [
    ("iter", lambda s: str(s.iteration)),
    ("complete", lambda s: "yes" if s.complete else "no"),
    ("shards", lambda s: str(s.shards)),
    ("samples", lambda s: str(s.samples)),
    ("groups", lambda s: str(s.groups)),
    ("rewarded", lambda s: str(s.rewards_filled)),
    ("mean_reward", lambda s: _number(s.mean_reward)),
    ("mean_score", lambda s: _number(s.mean_score)),
    ("prompt_len mean/max", lambda s: f"{_number(s.mean_prompt_length, 1)}/{_number(s.max_prompt_length)}"),
    ("response_len mean/max", lambda s: f"{_number(s.mean_response_length, 1)}/{_number(s.max_response_length)}"),
    ("policy_tokens", lambda s: str(s.policy_tokens)),
    ("weight_versions", lambda s: _versions(s.weight_versions)),
]


def _number(value: float | int | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.{digits}f}"


def _versions(versions: list[int]) -> str:
    if not versions:
        return "-"
    return str(versions[0]) if len(versions) == 1 else f"{versions[0]}..{versions[-1]} ({len(versions)})"


def format_table(summaries: list[IterationSummary]) -> str:
    """A fixed-width text table, one line per iteration."""
    rows = [[header for header, _ in _COLUMNS]] + [[cell(s) for _, cell in _COLUMNS] for s in summaries]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="the run folder (holding rollouts/)")
    parser.add_argument("--iteration", type=int, default=None, help="summarize only this iteration")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    parser.add_argument("--no-verify", action="store_true", help="skip sha256 checks of the shard files")
    args = parser.parse_args(argv)

    if not (args.run_dir / "rollouts").is_dir():
        print(f"error: {args.run_dir / 'rollouts'} does not exist", file=sys.stderr)
        return 2
    try:
        summaries = summarize_run(args.run_dir, iteration=args.iteration, verify_checksum=not args.no_verify)
    except RolloutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([s.to_json_dict() for s in summaries], indent=1))
    else:
        print(format_table(summaries) if summaries else f"no iterations under {args.run_dir / 'rollouts'}")
        total = sum(s.samples for s in summaries)
        print(f"{len(summaries)} iteration(s), {total} sample(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
