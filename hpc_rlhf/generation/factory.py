"""Build the generation engine of one generator rank: `hf` (any machine) or `vllm` (GPUs), placed in-process or in
a child process depending on the job's shape.

Placement of a vllm engine (see `vllm_engine` for why):
  * no torch.distributed world (or a world of one process), tp == 1: in this process;
  * `shared_world=True` (every rank of the world builds an engine now, as in the colocated layout): in this process,
    under vLLM's "external_launcher" executor, whose TP groups are consecutive blocks of `tp` world ranks;
  * otherwise (disaggregated layout), or with `child_process` and tp > 1: a child process per TP rank, whose
    private world of `tp` processes is rendezvoused over `tp_group` (TP rank 0 picks a free local port; a TP group
    never spans nodes).
The hf backend runs in this process (it never touches torch.distributed). With `child_process` and tp == 1 either
backend is built in a child process exactly as it would be in a process of its own (no world: vLLM's default
executor on the first visible GPU), by calling this function there.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from hpc_rlhf.dtypes import torch_dtype
from hpc_rlhf.generation.engine import GenerationEngine, GenerationError
from hpc_rlhf.generation.hosted import EngineSpec, ProcessHostedEngine

BACKENDS = ("hf", "vllm")
VLLM_FACTORY = "hpc_rlhf.generation.vllm_engine:VllmEngine"
HOSTED_FACTORY = "hpc_rlhf.generation.factory:make_engine"  # what a child process calls to build a tp=1 engine


def dtype_name(value: str | torch.dtype) -> str:
    """The name vLLM expects ('bfloat16', 'float16', 'float32')."""
    return str(torch_dtype(value)).removeprefix("torch.")


def make_engine(backend: str, model_path: str, *, dtype: str | torch.dtype = "float32",
                device: str | torch.device = "cpu", tp: int = 1, gpu_memory_utilization: float = 0.85,
                enable_sleep: bool = False, enable_prefix_caching: bool = True, enforce_eager: bool = False,
                max_num_seqs: int = 256, seed_per_request: bool = False, micro_batch_size: int = 64,
                max_model_len: int | None = None, seed: int = 0, pad_token_id: int | None = None,
                shared_world: bool = False, tp_group: dist.ProcessGroup | None = None,
                child_process: bool = False) -> GenerationEngine:
    """The generation engine for `backend`.

    hf: `micro_batch_size` sequences per forward pass, `pad_token_id` pads prompts (default: the model's);
    on CUDA it decodes with CUDA graphs unless `enforce_eager`.
    vllm: `gpu_memory_utilization`, `enable_sleep`, `enable_prefix_caching`, `enforce_eager`, `max_num_seqs`
    go to `vllm.LLM`; `seed_per_request` seeds each request instead of each call (`VllmEngine`); `shared_world`,
    `tp_group` and `child_process` choose the placement (module docstring).
    """
    if backend not in BACKENDS:
        raise ValueError(f"vllm.backend must be one of {BACKENDS}, got {backend!r}")
    if tp < 1:
        raise ValueError(f"layout.generator.tp must be >= 1, got {tp}")
    device = torch.device(device)
    if backend == "hf" and tp != 1:
        raise ValueError(f"the hf backend has no tensor parallelism (layout.generator.tp={tp}); "
                         f"use tp=1 or the vllm backend")
    vllm_kwargs: dict[str, Any] = {
        "dtype": dtype_name(dtype), "tp": tp, "gpu_memory_utilization": gpu_memory_utilization,
        "enable_sleep": enable_sleep, "enable_prefix_caching": enable_prefix_caching, "enforce_eager": enforce_eager,
        "max_num_seqs": max_num_seqs, "max_model_len": max_model_len, "seed": seed,
        "seed_per_request": seed_per_request}
    if child_process and tp == 1:  # the child calls this function with the same arguments, in a world of its own
        return ProcessHostedEngine(EngineSpec(factory=HOSTED_FACTORY, kwargs={
            "backend": backend, "model_path": model_path, "device": str(device), "micro_batch_size": micro_batch_size,
            "pad_token_id": pad_token_id, **vllm_kwargs}))
    if backend == "hf":
        from hpc_rlhf.generation.hf_engine import HFEngine

        return HFEngine.from_pretrained(model_path, dtype=torch_dtype(dtype), device=device,
                                        pad_token_id=pad_token_id, max_batch_size=micro_batch_size,
                                        max_model_len=max_model_len, seed=seed, cuda_graphs=not enforce_eager)

    placement = "child_process" if child_process else vllm_placement(tp=tp, shared_world=shared_world)
    if placement == "standalone":
        from hpc_rlhf.generation.vllm_engine import VllmEngine

        if device.type == "cuda" and (device.index or 0) != 0:
            # vLLM's in-process executor always takes the first visible GPU, whatever the current device is.
            raise GenerationError(f"an in-process vllm engine runs on the first visible GPU, but this rank's device "
                                  f"is {device}; make its GPU the only visible one (CUDA_VISIBLE_DEVICES, or SLURM's "
                                  f"--gpus-per-task / --gpu-bind)")
        return VllmEngine(model_path, **vllm_kwargs)
    local_rank = device.index if device.type == "cuda" and device.index is not None else 0
    if placement == "shared_world":
        from hpc_rlhf.generation.vllm_engine import EXTERNAL_LAUNCHER, VllmEngine, prepare_external_launcher_env

        prepare_external_launcher_env(dist.get_rank(), local_rank)
        return VllmEngine(model_path, executor_backend=EXTERNAL_LAUNCHER, **vllm_kwargs)
    tp_rank, port = engine_rendezvous(tp, tp_group, device)
    env = {"RANK": str(tp_rank), "WORLD_SIZE": str(tp), "LOCAL_RANK": str(local_rank),
           "LOCAL_WORLD_SIZE": str(tp), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    spec = EngineSpec(factory=VLLM_FACTORY, kwargs={"model_path": model_path, "executor_backend": "external_launcher",
                                                    **vllm_kwargs}, env=env)
    return ProcessHostedEngine(spec)


def vllm_placement(*, tp: int, shared_world: bool) -> str:
    """'standalone', 'shared_world' or 'child_process' for a vllm engine in the current torch.distributed state."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if shared_world:
        if world % tp != 0:
            raise GenerationError(f"shared_world: the world of {world} ranks is not a whole number of TP groups "
                                  f"of {tp}")
        return "shared_world" if world > 1 or tp > 1 else "standalone"
    if world == 1:
        if tp > 1:
            raise GenerationError(f"tp={tp} needs one process per TP rank: launch {tp} ranks (torchrun/srun) "
                                  f"and build the engine on each")
        return "standalone"
    return "child_process"


def engine_rendezvous(tp: int, tp_group: dist.ProcessGroup | None,
                      device: torch.device) -> tuple[int, int]:
    """(this rank's TP rank, the port of the engine's private world), agreed over `tp_group`."""
    from hpc_rlhf.distributed.world import free_port

    if tp == 1:
        return 0, free_port()
    if tp_group is None:
        raise GenerationError(f"tp={tp} in a child process needs tp_group (the engine's TP ranks) to agree on a port")
    if dist.get_world_size(tp_group) != tp:
        raise GenerationError(f"tp_group has {dist.get_world_size(tp_group)} ranks but tp={tp}")
    tp_rank = dist.get_rank(tp_group)
    box: list[Any] = [free_port() if tp_rank == 0 else None]
    dist.broadcast_object_list(box, src=dist.get_global_rank(tp_group, 0), group=tp_group,
                               device=device if device.type == "cuda" else None)
    return tp_rank, int(box[0])
