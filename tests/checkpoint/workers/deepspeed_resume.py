"""One rank of a real DeepSpeed job (gloo, CPU) that trains a tiny Llama, checkpoints and resumes.

`run_tasks(OUT_DIR, ["MODE:STAGE", ...])` runs on every rank (tests/multiproc.py's run_ranks, which sets RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT). `first` trains 3 steps, saves a checkpoint, trains 3 more; `resume` loads that checkpoint into a freshly built engine
(after seeding every generator differently) and trains the same 3 steps; `resume_no_rng` does the same without
restoring the generator states (a control: it must not match). Each dumps, per rank and ZeRO stage, the full
parameters (also at the save, for `first`), the optimizer and scheduler states, the losses and a few random draws
taken after training.
"""

from __future__ import annotations

import random
from pathlib import Path

import deepspeed
import numpy as np
import torch
import torch.distributed as dist

from hpc_rlhf.run.checkpoint import config_fingerprint, latest_checkpoint, load_checkpoint, save_checkpoint
from tests.checkpoint.workers.tiny_engine import VOCAB, build_tiny_engine

STEPS_BEFORE_SAVE = 3
STEPS_AFTER_SAVE = 3


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class ScopedEngine:
    """The `save_state` / `load_state` interface of the trainer's model wrappers, around a DeepSpeed engine."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def save_state(self, checkpoint_dir: str, tag: str) -> None:
        self.engine.save_checkpoint(checkpoint_dir, tag=tag)

    def load_state(self, checkpoint_dir: str, tag: str) -> dict:
        path, client_state = self.engine.load_checkpoint(checkpoint_dir, tag=tag)
        if path is None:
            raise FileNotFoundError(f"no checkpoint {tag!r} under {checkpoint_dir}")
        return client_state


def train(engine, steps: int) -> list[float]:
    """Batches drawn from python, numpy and torch generators, so the resumed run matches only if all three do."""
    losses = []
    for _ in range(steps):
        seq_len = random.randint(6, 12)
        input_ids = torch.randint(0, VOCAB, (2, seq_len))
        labels = input_ids.clone()
        labels[:, : int(np.random.randint(0, 3))] = -100
        loss = engine(input_ids=input_ids, labels=labels).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def full_parameters(engine) -> dict[str, torch.Tensor]:
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=hasattr(params[0], "ds_id")):
        return {name: p.detach().clone() for name, p in engine.module.named_parameters()}


def run_stage(mode: str, stage: int, out: Path) -> None:
    rank = dist.get_rank()
    root = out / f"stage{stage}" / "checkpoints"
    fingerprint = config_fingerprint({"layout": {"actor": {"gpus": dist.get_world_size()}},
                                      "ds": {"zero_stage": stage}, "train": {"seed": 1}})
    engine, scheduler = build_tiny_engine(stage, micro_batch_size=2)
    # ZeRO-2 goes through the raw engine, ZeRO-3 through the wrapper interface: both kinds the module accepts.
    engines = {"actor": engine if stage == 2 else ScopedEngine(engine)}
    saved_params = None
    if mode == "first":
        seed_everything(1000 + rank)
        train(engine, STEPS_BEFORE_SAVE)
        path = save_checkpoint(root, STEPS_BEFORE_SAVE, rank=rank, world_size=dist.get_world_size(),
                               barrier=dist.barrier, engines=engines,
                               trainer_state={"next_iteration": STEPS_BEFORE_SAVE, "global_step": engine.global_steps},
                               config_fingerprint=fingerprint, keep_last=2)
        assert path == root / "iter_000003", path
        saved_params = full_parameters(engine)
    else:
        seed_everything(77)  # differs from the first run: only the restored states can make the runs agree
        path = latest_checkpoint(root)
        assert path is not None, f"no checkpoint under {root}"
        state = load_checkpoint(path, rank=rank, engines=engines, config_fingerprint=fingerprint,
                                restore_rng=mode == "resume")
        assert state == {"next_iteration": STEPS_BEFORE_SAVE, "global_step": STEPS_BEFORE_SAVE}, state
    losses = train(engine, STEPS_AFTER_SAVE)
    record = {
        "params_at_save": saved_params,
        "params": full_parameters(engine),
        "optimizer": engine.optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "global_steps": engine.global_steps,
        "losses": losses,
        "draws": {"python": random.random(), "numpy": np.random.rand(3).tolist(), "torch": torch.rand(3)},
    }
    torch.save(record, out / f"{mode}_stage{stage}_rank{rank}.pt")
    dist.barrier()


def run_tasks(out: str, tasks: list[str]) -> None:
    """This rank's part of each MODE:STAGE task in turn, in a gloo world DeepSpeed sets up from the environment."""
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    for task in tasks:
        mode, stage = task.split(":")
        run_stage(mode, int(stage), Path(out))
    dist.destroy_process_group()
