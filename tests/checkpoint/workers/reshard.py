"""One rank of a real DeepSpeed job (gloo, CPU) that saves on one number of ranks and resumes on another.

`run_leg(OUT_DIR, LEG, STAGES)` runs on every rank (tests/multiproc.py's run_ranks). Leg `first` trains a tiny Llama 2
steps and checkpoints (`hpc_rlhf.run.checkpoint.save_checkpoint`); every later leg builds a fresh engine with
`"checkpoint": {"load_universal": true}`, lets global rank 0 convert the checkpoint (`hpc_rlhf.run.universal`),
loads it (`load_checkpoint(universal=True)`), records what it loaded, trains one step and checkpoints again. Each
leg records, from rank 0, the full fp32 master weights and Adam moments gathered over the engine's partitions, right
after the save or the load.
"""

from __future__ import annotations

from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

from hpc_rlhf.run.checkpoint import config_fingerprint, latest_checkpoint, load_checkpoint, read_metadata, \
    save_checkpoint
from hpc_rlhf.run.universal import convert_checkpoint
from tests.checkpoint.workers.tiny_engine import VOCAB, build_tiny_engine

FINGERPRINT = config_fingerprint({"layout": {"scale": "proportional"}, "ds": {"universal_ckpt": True}})


def build_engine(stage: int, load_universal: bool):
    """The tiny engine with 12 samples per step on any number of ranks (2 micro-batches each)."""
    return build_tiny_engine(stage, micro_batch_size=12 // dist.get_world_size() // 2, accumulation=2,
                             checkpoint={"tag_validation": "Ignore", "load_universal": load_universal})[0]


def train_step(engine, step: int) -> None:
    """One optimizer step over the same 12 samples whatever the world size: rank r takes its contiguous share."""
    generator = torch.Generator().manual_seed(100 + step)
    batch = torch.randint(0, VOCAB, (12, 10), generator=generator)
    per_rank = 12 // dist.get_world_size()
    mine = batch[dist.get_rank() * per_rank:(dist.get_rank() + 1) * per_rank]
    for micro in mine.chunk(2):
        loss = engine(input_ids=micro, labels=micro).loss
        engine.backward(loss)
        engine.step()


def full_state(engine) -> dict:
    """fp32 master weights and Adam moments, whole, per parameter name (every rank takes part in the gathers)."""
    record = {"global_steps": engine.global_steps, "lr": engine.get_lr()}
    for name, param in engine.module.named_parameters():
        record[f"{name}:fp32"] = safe_get_full_fp32_param(param).clone()
        for moment in ("exp_avg", "exp_avg_sq"):
            record[f"{name}:{moment}"] = safe_get_full_optimizer_state(param, moment).clone()
    return record


def run_stage(out: Path, leg: str, stage: int, step: int) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    root = out / f"stage{stage}" / "checkpoints"
    engine = build_engine(stage, load_universal=leg != "first")
    record = {"world": world}
    if leg == "first":
        for done in range(step):
            train_step(engine, done)
    else:
        path = latest_checkpoint(root)
        if rank == 0:
            record["converted"] = convert_checkpoint(path, path.name)
        dist.barrier()
        saved_world = read_metadata(path)["world_size"]
        state = load_checkpoint(path, rank=rank, engines={"actor": engine}, config_fingerprint=FINGERPRINT,
                                restore_rng=rank < saved_world, universal=True)
        record["loaded_from"] = (path.name, saved_world, state)
        record["loaded"] = full_state(engine)
        train_step(engine, step - 1)
    save_checkpoint(root, step, rank=rank, world_size=world, barrier=dist.barrier, engines={"actor": engine},
                    trainer_state={"next_iteration": step}, config_fingerprint=FINGERPRINT, keep_last=0)
    record["saved"] = full_state(engine)
    if rank == 0:
        torch.save(record, out / f"{leg}_stage{stage}.pt")
    dist.barrier()


def run_leg(out: str, leg: str, step: int, stages: list[int]) -> None:
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    for stage in stages:
        run_stage(Path(out), leg, stage, step)
    dist.destroy_process_group()
