"""Checkpoint hooks of the PPO loop: what is saved (engines, trainer state, RNG) and how a run resumes.

A checkpoint is taken at the end of a tick, after every rank agreed on it, so it records a consistent cut: the next
iteration to train, the weight version, the KL controller and reward statistics, and each rank's RNG. Rollout shards
of iterations not yet trained stay on disk and are reused by the resumed run instead of being generated again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from hpc_rlhf.config import Config
from hpc_rlhf.config_io import config_to_dict
from hpc_rlhf.rollouts.errors import RolloutError


class RolloutRepairError(RolloutError):
    """Rollouts a resumed run needs are missing or damaged, and generating them again would not give the same
    samples (the weights they were generated with are not the checkpoint's); the message says how to proceed."""


def original_weight_version(iteration: int, async_queue: int) -> int:
    """The weight version the schedule generates `iteration` with: at most `async_queue` versions behind."""
    return max(0, iteration - async_queue)


def resumed_weight_version(iteration: int, start: int, async_queue: int) -> int:
    """The weight version a run resumed at `start` generates `iteration` with (it holds version `start` until it
    has trained iteration `start`, which happens in the tick that generates start + async_queue)."""
    return start if iteration <= start + async_queue else iteration - async_queue


def check_rollouts(run_dir: str | Path, start: int, total: int, async_queue: int, expected_shards: list[str],
                   checkpoints: list[tuple[int, str]] = ()) -> list[str]:
    """What a run resuming at iteration `start` finds in RUN_DIR/rollouts, as lines to print; repairs what it can.

    - temp files and shards without a commit record (a writer killed halfway) are deleted;
    - committed files of iterations still to be trained are checked (size and sha256); a damaged one, or a missing
      shard, is generated again when this run would use the very weights the first generation used (the damaged
      file is set aside in rollouts/damaged/), else RolloutRepairError says why not and what to do;
    - files of iterations already trained are checked too and reported in one line (the run does not read them).
    `checkpoints` are the complete checkpoints as (next_iteration, folder name), for the advice.
    """
    from hpc_rlhf.rollouts.manifest import cleanup_uncommitted, committed_shards
    from hpc_rlhf.rollouts.paths import iteration_dir
    from hpc_rlhf.rollouts.verify import damaged_in_run, set_aside

    lines = []
    removed = cleanup_uncommitted(run_dir)
    if removed:
        names = [f"{p.parent.name}/{p.name}" for p in removed]
        lines.append(f"rollouts: removed {len(removed)} file(s) of interrupted writes ({_first(names)})")
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
            missing = [s for s in expected_shards if s not in committed_shards(run_dir, iteration) and s not in known]
        if not items and not missing:
            continue
        what = "; ".join([d.describe(run_dir) for d in items] +
                         [f"{iteration_dir(run_dir, iteration).name}/{s} is not committed" for s in missing])
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


class CheckpointHooks:
    """Saves and restores the loop's state under RUN_DIR/checkpoints; all ranks call `save` and `restore`."""

    def __init__(self, cfg: Config, world: Any, control: Any) -> None:
        from hpc_rlhf.checkpoint import config_fingerprint

        self.cfg = cfg
        self.rank = world.info.rank
        self.world_size = world.info.world_size
        self.control = control
        self.root = Path(cfg.train.run_dir) / "checkpoints"
        self.fingerprint = config_fingerprint(config_to_dict(cfg))

    def _engines(self, trainer: Any) -> dict[str, Any]:
        parts = trainer.parts
        engines = {}
        if parts.actor is not None:
            engines["actor"] = parts.actor
        if parts.critic is not None:
            engines["critic"] = parts.critic
        return engines

    def start_hint(self) -> int:
        """The iteration a resumed run will start from (for the progress bar), 0 for a fresh run."""
        from hpc_rlhf.checkpoint import latest_checkpoint

        if not self.cfg.ckpt.load_checkpoint:
            return 0
        path = latest_checkpoint(self.root)
        if path is None:
            return 0
        import json

        return int(json.loads((path / "trainer_state.json").read_text()).get("next_iteration", 0))

    def _check_rollouts(self, trainer: Any, path: Optional[Path]) -> Optional[str]:
        """Run `check_rollouts` for a resume from `path` (None: a fresh start); returns its refusal, if any."""
        import json

        from hpc_rlhf.checkpoint import complete_checkpoints

        start = 0
        if path is not None:
            start = int(json.loads((path / "trainer_state.json").read_text()).get("next_iteration", 0))
        kept = [(iteration, folder.name) for iteration, folder in complete_checkpoints(self.root)]
        try:
            lines = check_rollouts(self.cfg.train.run_dir, start, trainer.total, self.cfg.rollout.async_queue,
                                   trainer._expected_shards(), sorted(kept))
        except RolloutRepairError as error:
            return str(error)
        for line in lines:
            print(line, flush=True)
        return None

    def save(self, trainer: Any) -> Path:
        from hpc_rlhf.checkpoint import save_checkpoint

        return save_checkpoint(self.root, trainer.state.next_iteration, rank=self.rank, world_size=self.world_size,
                               barrier=self.control.barrier, engines=self._engines(trainer),
                               trainer_state=trainer.trainer_state(), config_fingerprint=self.fingerprint,
                               keep_last=self.cfg.ckpt.max_ckpt_num)

    def restore(self, trainer: Any) -> Optional[dict]:
        """Load the latest complete checkpoint into the engines; returns the trainer state, or None."""
        from hpc_rlhf.checkpoint import latest_checkpoint, load_checkpoint

        if not self.cfg.ckpt.load_checkpoint:
            return None
        path = latest_checkpoint(self.root)
        problem = None
        if self.rank == 0:  # check the rollouts the run will read before any rank reads one
            problem = self._check_rollouts(trainer, path)
        # Every rank must agree on the checkpoint (rank 0 decides; a shared filesystem may lag on others).
        path, problem = self.control.broadcast_object((str(path) if path else None, problem), src=0)
        if problem is not None:
            raise RolloutRepairError(problem)
        if path is None:
            return None
        state = load_checkpoint(Path(path), rank=self.rank, engines=self._engines(trainer),
                                config_fingerprint=self.fingerprint)
        if self.rank == 0:
            print(f"resumed from {path}", flush=True)
        return state
