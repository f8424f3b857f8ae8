"""Engine placement in a real 2-process gloo world: the engine's TP ranks agree on a private port, and each rank
hosts its vllm engine in a child process whose world is the engine's own (a file-based stand-in for `vllm` records
what the child saw; vLLM itself needs a GPU)."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch.distributed as dist

from hpc_rlhf.generation import GenerationError, ProcessHostedEngine, SamplingParams, make_engine
from hpc_rlhf.generation.factory import engine_rendezvous, vllm_placement
from tests.multiproc import run_ranks

FAKE_VLLM = '''
"""A stand-in for vllm whose generate() answers with what the engine process saw in its environment."""
import os
from dataclasses import dataclass

__version__ = "0.24.0"


class SamplingParams:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


def TokensPrompt(**kwargs):
    return dict(kwargs)


@dataclass
class _FlatLogprobs:  # vLLM's FlatLogprobs (flat_logprobs=True): one entry per position, the sampled token's
    start_indices: list
    end_indices: list
    token_ids: list
    logprobs: list

    def __len__(self):
        return len(self.start_indices)


@dataclass
class _Completion:
    token_ids: list
    logprobs: _FlatLogprobs
    finish_reason: str


@dataclass
class _Output:
    prompt_token_ids: list
    outputs: list


def flat_zeros(tokens):
    return _FlatLogprobs(list(range(len(tokens))), list(range(1, len(tokens) + 1)), list(tokens), [0.0] * len(tokens))


class LLM:
    def __init__(self, **kwargs):
        assert kwargs["distributed_executor_backend"] == "external_launcher", kwargs
        assert kwargs["tensor_parallel_size"] == 2, kwargs
        self.kwargs = kwargs

    def generate(self, inputs, sampling_params=None, use_tqdm=True):
        env = os.environ
        seen = [int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["MASTER_PORT"]), int(env["LOCAL_RANK"]),
                int(env["VLLM_ENABLE_V1_MULTIPROCESSING"]), os.getpid()]
        return [_Output(list(item["prompt_token_ids"]),
                        [_Completion(seen, flat_zeros(seen), "length")]) for item in inputs]
'''


def host_tp2_engine(fake_root: str) -> dict:
    """One rank of the job: place a tp=2 vllm engine (the stand-in on `fake_root`) and generate once."""
    sys.path.insert(0, fake_root)  # this rank's engine process is spawned with this path, so it imports the stand-in
    world = dist.group.WORLD
    out = {"job_port": int(os.environ["MASTER_PORT"])}
    out["placement"] = vllm_placement(tp=2, shared_world=False)
    out["shared"] = vllm_placement(tp=2, shared_world=True)
    try:
        vllm_placement(tp=3, shared_world=True)
    except GenerationError as exc:
        out["odd_tp_error"] = str(exc)
    try:
        engine_rendezvous(2, None, None)
    except GenerationError as exc:
        out["no_group_error"] = str(exc)
    engine = make_engine("vllm", "/models/policy", dtype="bfloat16", device="cpu", tp=2, tp_group=world,
                         max_model_len=32)
    out["hosted"] = isinstance(engine, ProcessHostedEngine)
    sample = engine.generate([[5, 6]], SamplingParams(max_new_tokens=4))[0][0]
    out["child_saw"] = sample.response_ids
    out["parent_rank_env"] = os.environ["RANK"]
    out["parent_pid"] = os.getpid()
    engine.close()
    dist.barrier()
    return out


@pytest.mark.timeout(180)
def test_two_ranks_host_one_tp2_engine_in_child_processes(tmp_path: Path):
    fake_root = tmp_path / "fake"
    (fake_root / "vllm").mkdir(parents=True)
    (fake_root / "vllm" / "__init__.py").write_text(textwrap.dedent(FAKE_VLLM))
    results = run_ranks(host_tp2_engine, 2, str(fake_root), timeout_s=150)

    for rank, res in enumerate(results):
        assert res["placement"] == "child_process" and res["shared"] == "shared_world" and res["hosted"]
        assert "not a whole number of TP groups of 3" in res["odd_tp_error"]
        assert "needs tp_group" in res["no_group_error"]
        child_rank, child_world, child_port, child_local_rank, multiprocessing, child_pid = res["child_saw"]
        assert (child_rank, child_world, child_local_rank, multiprocessing) == (rank, 2, 0, 0)
        assert child_port != res["job_port"]  # the engine's private world, not the job's
        assert child_pid != res["parent_pid"] and res["parent_rank_env"] == str(rank)
    assert results[0]["child_saw"][2] == results[1]["child_saw"][2]  # both TP ranks joined one private world


FAKE_VLLM_STANDALONE = FAKE_VLLM.replace(
    """        assert kwargs["distributed_executor_backend"] == "external_launcher", kwargs
        assert kwargs["tensor_parallel_size"] == 2, kwargs
""", """        assert "distributed_executor_backend" not in kwargs, kwargs  # vLLM's default (uni) executor
        assert kwargs["tensor_parallel_size"] == 1, kwargs
        import torch.distributed as dist
        assert not dist.is_initialized()  # the child is not in its parent's world
""").replace("""        seen = [int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["MASTER_PORT"]), int(env["LOCAL_RANK"]),
                int(env["VLLM_ENABLE_V1_MULTIPROCESSING"]), os.getpid()]""",
             """        seen = [int(env["VLLM_ENABLE_V1_MULTIPROCESSING"]), os.getpid()]""")


def host_tp1_engine_on_request(fake_root: str) -> dict:
    """One rank of a job with its world: `child_process` hosts even a tp=1 engine, built there as a standalone one."""
    sys.path.insert(0, fake_root)
    engine = make_engine("vllm", "/models/policy", dtype="bfloat16", device="cpu", max_model_len=32,
                         shared_world=True, child_process=True)
    sample = engine.generate([[5, 6]], SamplingParams(max_new_tokens=2))[0][0]
    engine.close()
    return {"hosted": isinstance(engine, ProcessHostedEngine), "child_saw": sample.response_ids,
            "parent_pid": os.getpid()}


@pytest.mark.timeout(180)
def test_child_process_hosts_a_tp1_vllm_engine_built_as_a_standalone_one(tmp_path: Path):
    fake_root = tmp_path / "fake"
    (fake_root / "vllm").mkdir(parents=True)
    (fake_root / "vllm" / "__init__.py").write_text(textwrap.dedent(FAKE_VLLM_STANDALONE))
    (result,) = run_ranks(host_tp1_engine_on_request, 1, str(fake_root), timeout_s=150)
    multiprocessing, child_pid = result["child_saw"]
    assert result["hosted"] and multiprocessing == 0 and child_pid != result["parent_pid"]
