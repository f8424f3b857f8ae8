"""Per-rank programs for the multi-process tests: `python workers.py SCENARIO OUT_DIR`.

Each rank finds its place from the launcher's environment (torchrun-style variables set by the tests, or mpiexec),
runs one scenario and writes what it observed to OUT_DIR/rank<r>.json (tensors to .pt files) for the test to check.
To see where a hanging scenario is stuck, set DEBUG_DUMP_S=60: every rank prints its stacks after 60 s and exits.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing

from hpc_rlhf.distributed import (
    MPIControlPlane,
    TorchControlPlane,
    broadcast_weights,
    build_role_groups,
    detect_world,
    init_distributed,
    plan_layout,
    receive_weights,
    run_guarded,
    spawn_local,
    sync_weights,
)


def write(out: Path, rank: int, record: dict) -> None:
    (out / f"rank{rank}.json").write_text(json.dumps(record))


def role(gpus: int, tp: int = 1) -> SimpleNamespace:
    return SimpleNamespace(gpus=gpus, tp=tp)


def layout(generator=(0, 1), actor=0, critic=0, reward=0, reference=0, colocate=False) -> SimpleNamespace:
    return SimpleNamespace(generator=role(*generator), actor=role(actor), critic=role(critic), reward=role(reward),
                           reference=role(reference), colocate=colocate)


# ------------------------------------------------------------------------------------------------ control plane
def control_scenario(out: Path) -> None:
    """Every collective of the torch control plane, then a clean shutdown (exit code 0 everywhere)."""
    info = detect_world()
    world = init_distributed(info, timeout_s=60)
    control = TorchControlPlane.from_world(world)
    control.barrier()
    record = {
        "info": asdict(info),
        "broadcast": control.broadcast_object({"from": control.rank, "payload": [1, 2, 3]} if control.rank == 1
                                              else None, src=1),
        "gather": control.gather_object(("rank", control.rank, control.rank ** 2), dst=2),
        "allgather": control.allgather_object(f"r{control.rank}"),
    }
    write(out, info.rank, record)
    control.barrier()
    control.close()
    world.close()


def mpi_control_scenario(out: Path) -> None:
    """MPI control plane collectives, and a gloo world bootstrapped from the MPI launcher's environment."""
    from mpi4py import MPI

    control = MPIControlPlane(MPI.COMM_WORLD)
    info = detect_world()
    world = init_distributed(info, timeout_s=60)
    total = torch.tensor([float(info.rank)])
    dist.all_reduce(total)
    control.barrier()
    record = {
        "info": asdict(info),
        "broadcast": control.broadcast_object({"from": control.rank} if control.rank == 3 else None, src=3),
        "gather": control.gather_object(control.rank * 10, dst=1),
        "allgather": control.allgather_object(control.rank + 100),
        "gloo_sum": total.item(),
    }
    write(out, info.rank, record)
    world.close()


def launch_plane_scenario(out: Path) -> None:
    """`hpc_rlhf.launch.rank_main` up to the trainer: the trainer is replaced by one that records which control plane
    the launcher built and runs a barrier and an allgather on it."""
    import hpc_rlhf.launch as launch
    from hpc_rlhf.config.schema import Config

    cfg = Config()
    cfg.train.run_dir = str(out / "run")
    cfg.train.device = "cpu"

    def trainer(cfg: Config, world, control, stop) -> dict:
        control.barrier()
        write(out, world.info.rank, {"plane": type(control).__name__, "launcher": world.info.launcher,
                                     "rank": control.rank, "world_size": control.world_size,
                                     "allgather": control.allgather_object(world.info.rank * 10)})
        control.barrier()
        return {}

    launch._run_trainer = trainer
    launch.rank_main(detect_world(), cfg)


# ------------------------------------------------------------------------------------------------ failure guard
def guard_scenario(out: Path) -> None:
    """FAIL_RANK raises after a moment while the other ranks wait in a barrier."""
    fail_rank = int(os.environ["FAIL_RANK"])
    info = detect_world()
    world = init_distributed(info, timeout_s=300)
    control = TorchControlPlane.from_world(world, poll_interval_s=0.1)

    def main() -> None:
        control.barrier()
        if info.rank == fail_rank:
            time.sleep(1.0)
            raise ValueError(f"reward shard 17 is corrupt (raised on rank {fail_rank})")
        control.barrier()  # the others wait here for a rank that never arrives
        write(out, info.rank, {"passed_barrier": True})

    run_guarded(main, control)
    control.close()


def mpi_guard_scenario(out: Path) -> None:
    """Under mpiexec: FAIL_RANK raises while the others sit in an MPI barrier."""
    fail_rank = int(os.environ["FAIL_RANK"])
    control = MPIControlPlane()

    def main() -> None:
        control.barrier()
        if control.rank == fail_rank:
            time.sleep(1.0)
            raise ValueError(f"reward shard 17 is corrupt (raised on rank {fail_rank})")
        control.barrier()
        write(out, control.rank, {"passed_barrier": True})

    run_guarded(main, control)


# ------------------------------------------------------------------------------------------------- role groups
def groups_scenario(out: Path) -> None:
    """6 ranks, 2 per node: generator 2 (TP 2), actor 2, critic 1, reference 1; an all-reduce in every group."""
    info = detect_world()
    world = init_distributed(info, timeout_s=60)
    plan = plan_layout(layout(generator=(2, 2), actor=2, critic=1, reference=1), info.world_size, 2)
    groups = build_role_groups(plan, info.rank)

    def members_sum(group: dist.ProcessGroup) -> int:
        value = torch.tensor([1 << info.rank])  # bit r set by rank r: the sum names the members
        dist.all_reduce(value, group=group)
        return int(value.item())

    record = {
        "roles": list(groups.roles.roles),
        "role_index": dict(groups.roles.role_index),
        "engine": groups.roles.generator_engine,
        "tp_rank": groups.roles.tp_rank,
        "role_masks": {name: members_sum(group) for name, group in groups.role_groups.items()},
        "tp_mask": members_sum(groups.tp_group) if groups.tp_group is not None else None,
        "sync_mask": members_sum(groups.weight_sync_group) if groups.in_weight_sync else None,
    }
    write(out, info.rank, record)
    world.close()


def sequence_groups_scenario(out: Path) -> None:
    """6 ranks, ring_attn_size 2: generator 2 (0-1), actor 2 (2-3), reward 2 (4-5) with the reference sharing them;
    an all-reduce in every sequence-parallel group."""
    info = detect_world()
    world = init_distributed(info, timeout_s=60)
    shape = layout(generator=(2, 1), actor=2, reward=2, reference=2)
    shape.reference.share_with = "reward"
    plan = plan_layout(shape, info.world_size, 6)
    groups = build_role_groups(plan, info.rank, ring_attn_size=2)

    def members_sum(group: dist.ProcessGroup) -> int:
        value = torch.tensor([1 << info.rank])
        dist.all_reduce(value, group=group)
        return int(value.item())

    record = {"sequence_masks": {name: members_sum(group) for name, group in groups.sequence_groups.items()},
              "same_reward_reference": groups.sequence_group("reference") is groups.sequence_group("reward")}
    write(out, info.rank, record)
    world.close()


# ------------------------------------------------------------------------------------------------- local spawn
def spawned_rank(info, scale: int) -> dict:
    world = init_distributed(info, timeout_s=60)
    value = torch.tensor([float(info.rank * scale)])
    dist.all_reduce(value)
    world.close()
    return {"rank": info.rank, "sum": value.item(), "env_rank": os.environ["RANK"], "launcher": info.launcher}


def spawned_failure(info) -> None:
    if info.rank == 1:
        raise RuntimeError("spawned rank 1 fails on purpose")


def spawn_scenario(out: Path) -> None:
    results = spawn_local(spawned_rank, 3, args=(10,))
    try:
        spawn_local(spawned_failure, 2)
        failure = None
    except torch.multiprocessing.ProcessRaisedException as exc:
        failure = str(exc)
    write(out, 0, {"results": results, "failure": failure})


# ---------------------------------------------------------------------------------------------- weight plane
def tiny_llama(seed: int, dtype: torch.dtype = torch.float32, *, tied: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, tie_word_embeddings=tied)
    return LlamaForCausalLM(config).to(dtype)


def check_trace_within(group: dist.ProcessGroup):
    """ZeRO-3's first-step trace check, over the actor group instead of the whole world.

    DeepSpeed 0.19's check broadcasts from world rank 0 over the world, which hangs when the engine trains on a
    subgroup (here ranks 1-2; rank 0 is the generator).
    """
    def check(ints: list[int]) -> None:
        lists: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(lists, list(ints), group=group)
        if any(other != lists[0] for other in lists):
            raise RuntimeError(f"ZeRO-3 trace differs across actor ranks: {lists}")
    return check


def weights_scenario(out: Path) -> None:
    """Rank 0 generates; ranks 1-2 train under ZeRO-3, then broadcast fp32 and bf16 weights in many small buckets."""
    import deepspeed

    from hpc_rlhf.training.deepspeed_setup import EngineConfig, engine_scope, init_engine

    bucket_mb = float(os.environ["BUCKET_MB"])
    info = detect_world()
    world = init_distributed(info, timeout_s=300)
    control = TorchControlPlane.from_world(world)
    plan = plan_layout(layout(generator=(1, 1), actor=2), info.world_size, info.world_size)
    groups = build_role_groups(plan, info.rank)
    src = plan.ranks_of("actor")[0]

    def actor() -> None:
        from deepspeed.runtime.zero import partitioned_param_coordinator

        partitioned_param_coordinator.assert_ints_same_as_other_ranks = check_trace_within(groups.group("actor"))
        engine, mpu = init_engine(tiny_llama(seed=0), EngineConfig(zero_stage=3, learning_rate=1e-2,
                                                                   micro_train_batch_size=1, train_batch_size=2),
                                  groups.group("actor"), num_training_steps=4)
        named = list(engine.module.named_parameters())
        with engine_scope(mpu):
            with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
                initial = {name: p.data.clone() for name, p in named}
            ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(info.rank))
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            manifests = [broadcast_weights(named, groups.weight_sync_group, src, bucket_mb, dtype, version)
                         for dtype, version in ((torch.float32, 3), (torch.bfloat16, 4))]
            sync = sync_weights(engine.module, None, dtype=torch.bfloat16, group=groups.weight_sync_group, src=src,
                                version=5, bucket_mb=bucket_mb)  # the sender's case of the one entry point
            with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
                trained = {name: p.data.clone() for name, p in named}
        if info.rank == src:
            torch.save({"initial": initial, "trained": trained}, out / "actor.pt")
        write(out, info.rank, {"buckets": [len(m.buckets) for m in manifests],
                               "versions": [m.version for m in manifests], "sync_metrics": sorted(sync),
                               "local_numel": sum(p.numel() for _, p in named)})

    def generator() -> None:
        from hpc_rlhf.generation import HFEngine

        model = tiny_llama(seed=1)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        version_fp32 = receive_weights(model, groups.weight_sync_group, src)
        after_fp32 = {k: v.clone() for k, v in model.state_dict().items()}
        model.to(torch.bfloat16)
        version_bf16 = receive_weights(model, groups.weight_sync_group, src)
        after_bf16 = {k: v.clone() for k, v in model.state_dict().items()}
        fresh = tiny_llama(seed=2, dtype=torch.bfloat16)  # the receiver's case: into a generation engine
        sync = sync_weights(None, HFEngine(fresh), dtype=torch.bfloat16, group=groups.weight_sync_group, src=src,
                            version=5)
        torch.save({"before": before, "fp32": after_fp32, "bf16": after_bf16, "synced": fresh.state_dict()},
                   out / "generator.pt")
        write(out, info.rank, {"versions": [version_fp32, version_bf16], "sync_metrics": sorted(sync)})

    run_guarded(generator if groups.roles.has("generator") else actor, control)
    control.barrier()
    control.close()
    world.close()


def colocated_sync_scenario(out: Path) -> None:
    """2 ranks, each holding a ZeRO-3 actor (tied embeddings) and an HF engine: the colocated case of sync_weights
    before and after one training step, and the Hugging Face save gather (gather_full_state_dict)."""
    import deepspeed

    from hpc_rlhf.distributed.weights import full_named_parameters
    from hpc_rlhf.generation import HFEngine
    from hpc_rlhf.training.deepspeed_setup import EngineConfig, engine_scope, init_engine
    from hpc_rlhf.training.models import gather_full_state_dict

    info = detect_world()
    world = init_distributed(info, timeout_s=300)
    control = TorchControlPlane.from_world(world)
    plan = plan_layout(layout(generator=(2, 1), actor=2, colocate=True), info.world_size, info.world_size)
    groups = build_role_groups(plan, info.rank)

    def main() -> None:
        from deepspeed.runtime.zero import partitioned_param_coordinator

        partitioned_param_coordinator.assert_ints_same_as_other_ranks = check_trace_within(groups.group("actor"))
        actor = tiny_llama(seed=0, tied=True)
        initial = {k: v.clone() for k, v in actor.state_dict().items()}
        engine, mpu = init_engine(actor, EngineConfig(
            zero_stage=3, learning_rate=1e-2, micro_train_batch_size=1, train_batch_size=2),
            groups.group("actor"), num_training_steps=4)
        model = engine.module
        local_numel = sum(p.numel() for p in model.parameters())
        generator = tiny_llama(seed=1, tied=True)
        hf_engine = HFEngine(generator)
        names = [name for name, _ in full_named_parameters(model)]  # partitioned here: real gathers
        before = sync_weights(model, hf_engine, dtype=torch.float32)
        synced_initial = {k: v.clone() for k, v in generator.state_dict().items()}
        with engine_scope(mpu):
            ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(info.rank))
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
        after = sync_weights(model, hf_engine, dtype=torch.float32)
        with engine_scope(mpu):
            saved = gather_full_state_dict(model, mpu)
        params = [p for _, p in model.named_parameters()]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            trained = {name: p.data.clone() for name, p in model.named_parameters(remove_duplicate=False)}
        torch.save({"initial": initial, "initial_synced": synced_initial, "synced": generator.state_dict(),
                    "trained": trained, "saved": saved}, out / f"colocated{info.rank}.pt")
        write(out, info.rank, {"local_numel": local_numel, "names": names, "metrics": sorted({**before, **after}),
                               "saved_is_none": saved is None,
                               "model_names": [n for n, _ in model.named_parameters(remove_duplicate=False)]})

    run_guarded(main, control)
    control.barrier()
    control.close()
    world.close()


SCENARIOS = {
    "control": control_scenario,
    "mpi_control": mpi_control_scenario,
    "launch_plane": launch_plane_scenario,
    "guard": guard_scenario,
    "mpi_guard": mpi_guard_scenario,
    "groups": groups_scenario,
    "sequence_groups": sequence_groups_scenario,
    "spawn": spawn_scenario,
    "weights": weights_scenario,
    "colocated_sync": colocated_sync_scenario,
}

if __name__ == "__main__":
    import faulthandler
    if os.environ.get("DEBUG_DUMP_S"):
        faulthandler.dump_traceback_later(float(os.environ["DEBUG_DUMP_S"]), exit=True)
    SCENARIOS[sys.argv[1]](Path(sys.argv[2]))
