"""How a PPO-family run resumes: the rollouts on disk are checked (and repaired where that gives the same samples).

A checkpoint is taken at the end of a tick, after every rank agreed on it, so it records a consistent cut: the next
iteration to train, the weight version, the KL controller and reward statistics, and each rank's RNG. Rollout shards
of iterations not yet trained stay on disk and are reused by the resumed run instead of being generated again.

A run may resume with another number of generator engines (`layout.scale: proportional` on another allocation).
An iteration the old layout completed is read as it is (readers partition an iteration's committed rows, whatever
shards hold them, and its MANIFEST.json names the shards it was completed with); the committed shards of an
iteration the old layout left incomplete split the prompts the old way, so they are set aside and the iteration is
generated again by the new engines, with the weights the first generation would have used.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

from hpc_rlhf.run.checkpoint import complete_checkpoints, read_trainer_state
from hpc_rlhf.config.schema import Config
from hpc_rlhf.rollouts.errors import RolloutError
from hpc_rlhf.rollouts.manifest import cleanup_uncommitted, committed_shards, iterations_started, load_manifest
from hpc_rlhf.rollouts.paths import iteration_dir
from hpc_rlhf.rollouts.verify import DamagedFile, damaged_in_run, set_aside
from hpc_rlhf.trainers.checkpointing import CHECKPOINTS_DIR, ResumeRefused
from hpc_rlhf.trainers.ppo.partial_rollout import carried_shards


class RolloutRepairError(RolloutError, ResumeRefused):
    """Rollouts a resumed run needs are missing or damaged, and generating them again would not give the same
    samples (the weights they were generated with are not the checkpoint's); the message says how to proceed."""


def original_weight_version(iteration: int, async_queue: int) -> int:
    """The weight version the schedule generates `iteration` with: at most `async_queue` versions behind."""
    return max(0, iteration - async_queue)


def resumed_weight_version(iteration: int, start: int, async_queue: int) -> int:
    """The weight version a run resumed at `start` generates `iteration` with (it holds version `start` until it
    has trained iteration `start`, which happens in the tick that generates start + async_queue)."""
    return start if iteration <= start + async_queue else iteration - async_queue


def set_aside_replanned(run_dir: str | Path, start: int, async_queue: int, engines: int, saved_engines: int
                        ) -> list[str]:
    """Set aside the committed shards of iterations from `start` on that the checkpoint's layout of `saved_engines`
    generator engines left incomplete (this run has `engines`); they are generated again. Lines to print."""
    if saved_engines in (0, engines):
        return []
    lines = []
    for iteration in iterations_started(run_dir):
        manifest = load_manifest(run_dir, iteration)
        if iteration < start or manifest.complete or not manifest.shards:
            continue
        was, now = original_weight_version(iteration, async_queue), resumed_weight_version(iteration, start,
                                                                                         async_queue)
        if was != now:
            raise RolloutRepairError(
                f"rollouts of iteration {iteration} are incomplete and were split over {saved_engines} generator "
                f"engines; this run has {engines} and would generate them with weight version {now}, not {was}: "
                f"resume on {saved_engines} engines' worth of ranks, or start the run again")
        directory = iteration_dir(run_dir, iteration)
        problem = f"was written by a layout of {saved_engines} generator engines"
        items = [DamagedFile(directory / record.file, record, problem) for record in manifest.shards]
        target = set_aside(run_dir, iteration, items)
        lines.append(f"rollouts: iteration {iteration} was left incomplete by {saved_engines} generator engines "
                     f"({len(items)} shard(s) committed); moved to {Path(target).relative_to(Path(run_dir))}/ and "
                     f"generated again by this run's {engines}")
    return lines


def check_rollouts(run_dir: str | Path, start: int, total: int, async_queue: int, expected_shards: list[str],
                   checkpoints: list[tuple[int, str]] = (), regenerate_from: Optional[int] = None,
                   saved_engines: int = 0, carried: Optional[dict[int, set[str]]] = None) -> list[str]:
    """What a run resuming at iteration `start` finds in RUN_DIR/rollouts, as lines to print; repairs what it can.

    - temp files and shards without a commit record (a writer killed halfway) are deleted;
    - committed files of iterations still to be trained are checked (size and sha256); a damaged one, or a missing
      shard, is generated again when this run would use the very weights the first generation used (the damaged
      file is set aside in rollouts/damaged/), else RolloutRepairError says why not and what to do;
    - files of iterations already trained are checked too and reported in one line (the run does not read them);
    - with `saved_engines` (the checkpoint's generator engine count) other than len(expected_shards), incomplete
      iterations are set aside (`set_aside_replanned`); a complete one is checked against the shards it names.
    `checkpoints` are the complete checkpoints as (next_iteration, folder name), for the advice.
    With partial rollouts, `carried` names the shards whose responses were still in progress at the checkpoint
    (iteration -> shard names, from RUN_DIR/rollouts/partial/): they are not missing, the resumed run finishes them.
    With dynamic sampling (`regenerate_from` set) the prompts of an iteration depend on the data position the
    checkpoint holds, which counts the iterations generated before it was taken: rollouts of later iterations
    (`regenerate_from` on) are deleted and generated again from that position (the same weights and seeds, so the
    same rows), and an earlier iteration that is damaged cannot be generated again.
    """
    lines = []
    removed = cleanup_uncommitted(run_dir)
    if removed:
        names = [f"{p.parent.name}/{p.name}" for p in removed]
        lines.append(f"rollouts: removed {len(removed)} file(s) of interrupted writes ({_first(names)})")
    if regenerate_from is not None:
        later = [it for it in iterations_started(run_dir) if it >= regenerate_from]
        for iteration in later:
            shutil.rmtree(iteration_dir(run_dir, iteration))
        if later:
            lines.append(f"rollouts: iterations {later[0]}..{later[-1]} were generated after the checkpoint; with "
                         f"rollout.dynamic_filtering they are generated again from the checkpoint's data position")
    lines += set_aside_replanned(run_dir, start, async_queue, len(expected_shards), saved_engines)
    damaged = damaged_in_run(run_dir)
    trained = [item for it, items in damaged.items() if it < start for item in items]
    if trained:
        lines.append(f"rollouts: {len(trained)} file(s) of iterations already trained do not match their commit "
                     f"records ({_first([d.describe(run_dir) for d in trained])}); this run does not read them; "
                     f"`python tools/inspect_rollouts.py {run_dir}` lists them")
    for iteration in range(start, total):
        items = damaged.get(iteration, [])
        missing = []
        if start > 0 and iteration < start + async_queue:  # generated before the checkpoint was taken: needed
            known = {d.record.shard for d in items}
            manifest = load_manifest(run_dir, iteration)
            wanted = manifest.expected_shards if manifest.complete and manifest.expected_shards else expected_shards
            in_progress = (carried or {}).get(iteration, set())
            missing = [s for s in wanted if s not in committed_shards(run_dir, iteration) and s not in known
                       and s not in in_progress]
        if not items and not missing:
            continue
        what = "; ".join([d.describe(run_dir) for d in items] +
                         [f"{iteration_dir(run_dir, iteration).name}/{s} is not committed" for s in missing])
        if regenerate_from is not None and iteration < regenerate_from:
            raise RolloutRepairError(
                f"rollouts of iteration {iteration} are damaged or missing ({what}); with rollout.dynamic_filtering "
                f"its prompts depend on a data position the checkpoint does not hold, so it cannot be generated "
                f"again: restore the files from a copy, resume from an earlier checkpoint, or start the run again")
        was, now = original_weight_version(iteration, async_queue), resumed_weight_version(iteration, start,
                                                                                         async_queue)
        if was != now:
            usable = [name for next_it, name in checkpoints if next_it <= iteration - async_queue]
            latest = Path(run_dir) / "checkpoints" / "latest"
            advice = (f"resume from checkpoint {usable[-1]} instead: `echo {usable[-1]} > {latest}`, then submit "
                      "the job again" if usable else
                      "no kept checkpoint is old enough to generate it again; restore the files from a copy or start "
                      "the run again")
            raise RolloutRepairError(
                f"rollouts of iteration {iteration} are damaged or missing ({what}); they were generated with weight "
                f"version {was} (rollout.async_queue={async_queue}), this run resumes with version {now}, so "
                f"generating them again would not give the same samples: {advice}")
        if items:
            target = set_aside(run_dir, iteration, items)
            lines.append(f"rollouts: {what}: moved to {Path(target).relative_to(Path(run_dir))}/; iteration "
                         f"{iteration} is generated again with weight version {now}, as the first time")
    return lines


def _first(items: list[str], shown: int = 3) -> str:
    return "; ".join(items[:shown]) + ("; ..." if len(items) > shown else "")


class RolloutCheck:
    """The PPO family's resume check (`CheckpointService`'s resume_check): `check_rollouts` for the iteration the
    checkpoint resumes at (0 on a fresh start), printing what it repaired; RolloutRepairError when it cannot."""

    def __init__(self, cfg: Config, total: int, expected_shards: list[str], engines: int = 0) -> None:
        self.run_dir = cfg.train.run_dir
        self.partial_rollout = cfg.rollout.partial_rollout
        self.engines = engines
        self.async_queue = cfg.rollout.async_queue
        self.dynamic_filtering = cfg.rollout.dynamic_filtering
        self.total = total
        self.expected_shards = expected_shards

    def __call__(self, path: Optional[Path]) -> None:
        state = read_trainer_state(path) if path is not None else {}
        start = int(state.get("next_iteration", 0))
        root = Path(self.run_dir) / CHECKPOINTS_DIR
        kept = sorted((iteration, folder.name) for iteration, folder in complete_checkpoints(root))
        # A checkpoint taken after training iteration start - 1 follows the generation of start + async_queue - 1.
        regenerate_from = (start + self.async_queue if path is not None else 0) if self.dynamic_filtering else None
        saved_engines = int(state.get("generator_engines", 0))
        carried = None
        if self.partial_rollout and start > 0:
            if saved_engines not in (0, self.engines):
                raise RolloutRepairError(
                    f"rollout.partial_rollout: the checkpoint's {saved_engines} generator engines left responses in "
                    f"progress that this run's {self.engines} cannot continue; resume on the same number of engines")
            carried = carried_shards(self.run_dir, start + self.async_queue - 1, self.engines)
        for line in check_rollouts(self.run_dir, start, self.total, self.async_queue, self.expected_shards, kept,
                                   regenerate_from, saved_engines=saved_engines, carried=carried):
            print(line, flush=True)
