"""Weight plane: bucket planning, in-place loading with tied weights, a ZeRO-3 actor -> generator broadcast, and
`sync_weights`' three cases (sender, receiver, colocated) with the Hugging Face save gather on the same iterator."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hpc_rlhf.distributed.weights import (
    TensorSpec,
    WeightSyncError,
    full_named_parameters,
    load_named_tensors,
    plan_buckets,
    sync_weights,
)
from hpc_rlhf.generation import HFEngine
from hpc_rlhf.training.models import gather_full_state_dict
from tests.distributed.rank_runs import assert_ranks_succeeded


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=0, max_size=30), st.integers(1, 120), st.sampled_from([2, 4]))
def test_buckets_keep_order_and_respect_the_limit(sizes, bucket_bytes, element_size):
    specs = [TensorSpec(f"t{i}", (n,)) for i, n in enumerate(sizes)]
    buckets = plan_buckets(specs, bucket_bytes, element_size)
    assert [i for bucket in buckets for i in bucket] == list(range(len(specs)))
    for bucket in buckets:
        total = sum(sizes[i] * element_size for i in bucket)
        assert total <= bucket_bytes or len(bucket) == 1  # only a lone oversized tensor may exceed the limit
    for left, right in itertools.pairwise(buckets):  # greedy: the next tensor did not fit
        assert sum(sizes[i] * element_size for i in left) + sizes[right[0]] * element_size > bucket_bytes


def test_bucket_size_must_be_positive():
    with pytest.raises(ValueError, match="bucket size must be positive"):
        plan_buckets([TensorSpec("w", (2,))], 0, 4)


class TiedModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(5, 3)
        self.norm = torch.nn.LayerNorm(3)
        self.head = torch.nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight


def test_load_named_tensors_writes_in_place_and_covers_tied_weights():
    model = TiedModel().to(torch.bfloat16)
    embed_before = model.embed.weight
    incoming = {"embed.weight": torch.randn(5, 3, dtype=torch.float64), "norm.weight": torch.randn(3),
                "norm.bias": torch.randn(3)}
    assert load_named_tensors(model, incoming.items()) == 3
    assert model.embed.weight is embed_before  # in place, same Parameter object
    assert torch.equal(model.head.weight, incoming["embed.weight"].to(torch.bfloat16))
    assert torch.equal(model.norm.bias, incoming["norm.bias"].to(torch.bfloat16))


def test_load_named_tensors_maps_names_and_reports_problems():
    model = TiedModel()
    values = {"module.embed.weight": torch.ones(5, 3), "module.norm.weight": torch.ones(3),
              "module.norm.bias": torch.zeros(3)}
    load_named_tensors(model, values.items(), name_map=lambda n: n.removeprefix("module."))
    assert torch.equal(model.head.weight, torch.ones(5, 3))
    with pytest.raises(WeightSyncError) as err:
        load_named_tensors(model, [("embed.weight", torch.ones(5, 4)), ("extra.weight", torch.ones(1))])
    message = str(err.value)
    assert "'embed.weight' has shape (5, 4) but the generator's parameter has shape (5, 3)" in message
    assert "'extra.weight' has no parameter of that name" in message
    assert "no weights received for generator parameters ['embed.weight', 'norm.weight', 'norm.bias', " \
           "'head.weight']" in message
    with pytest.raises(WeightSyncError, match="received 'embed.weight' and 'head.weight' with different values"):
        load_named_tensors(model, [("embed.weight", torch.ones(5, 3)), ("head.weight", torch.zeros(5, 3)),
                                   ("norm.weight", torch.ones(3)), ("norm.bias", torch.ones(3))])


def test_full_named_parameters_keeps_order_dtype_and_tied_weights_once():
    model = TiedModel()
    full = list(full_named_parameters(model, torch.bfloat16))
    assert [name for name, _ in full] == ["embed.weight", "norm.weight", "norm.bias"]  # head.weight is embed.weight
    assert all(t.dtype == torch.bfloat16 for _, t in full)
    assert torch.equal(full[0][1], model.embed.weight.data.to(torch.bfloat16))
    same = dict(full_named_parameters(model))  # dtype None: the parameters themselves, not copies
    assert same["norm.bias"].data_ptr() == model.norm.bias.data_ptr()


def test_save_gather_names_tied_weights_and_buffers_on_the_writer_only():
    model = TiedModel()
    model.register_buffer("scale", torch.tensor([2.0]))
    writer = SimpleNamespace(get_data_parallel_rank=lambda: 0)
    state = gather_full_state_dict(model, writer)
    assert list(state) == ["embed.weight", "head.weight", "norm.weight", "norm.bias", "scale"]
    assert state["head.weight"] is state["embed.weight"]
    for name, value in model.state_dict().items():
        assert torch.equal(state[name], value) and state[name].data_ptr() != value.data_ptr(), name
    assert gather_full_state_dict(model, SimpleNamespace(get_data_parallel_rank=lambda: 1)) is None


def tiny_engine_model(seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=32))


def test_sync_weights_local_copy_into_an_engine():
    actor, generator = tiny_engine_model(0), tiny_engine_model(1).to(torch.bfloat16)
    metrics = sync_weights(actor, HFEngine(generator), dtype=torch.bfloat16)
    assert set(metrics) == {"max/weight_sync_s"} and metrics["max/weight_sync_s"] >= 0
    for (name, mine), (_, theirs) in zip(actor.named_parameters(), generator.named_parameters()):
        assert torch.equal(theirs, mine.to(torch.bfloat16)), name


def test_sync_weights_refuses_a_rank_without_its_pieces():
    with pytest.raises(ValueError, match="has neither"):
        sync_weights(None, None, dtype=torch.float32)
    with pytest.raises(ValueError, match="needs bucket_mb"):
        sync_weights(TiedModel(), None, dtype=torch.float32)
    with pytest.raises(ValueError, match="no weight-sync group"):
        sync_weights(None, HFEngine(tiny_engine_model(0)), dtype=torch.float32, src=3)


@pytest.mark.timeout(240)
def test_zero3_actors_broadcast_to_a_separate_generator(launch_ranks, tmp_path):
    # workers.weights_scenario: rank 0 = generator (HF model, other seed); ranks 1-2 = actor under ZeRO-3 with
    # one AdamW step, then fp32 (version 3) and bf16 (version 4) broadcasts in 10 KB buckets, then a bf16
    # sync_weights (sender on the actor ranks, receiver into an HF engine on rank 0).
    runs = launch_ranks("weights", 3, timeout_s=220, env={"BUCKET_MB": str(10_000 / 2**20)})
    assert_ranks_succeeded(runs)
    actor_record = runs[1].record(tmp_path)
    assert actor_record["local_numel"] == 0  # ZeRO-3 really partitioned the parameters away from the actor ranks
    assert actor_record["versions"] == [3, 4]
    assert actor_record["buckets"][0] > 10 and actor_record["buckets"][1] > 10  # many buckets (bf16: fewer)
    assert runs[0].record(tmp_path)["versions"] == [3, 4]
    for run in runs:
        assert run.record(tmp_path)["sync_metrics"] == ["max/weight_sync_s"]

    actor = torch.load(tmp_path / "actor.pt")
    generator = torch.load(tmp_path / "generator.pt")
    trained, initial = actor["trained"], actor["initial"]
    assert sorted(generator["fp32"]) == sorted(trained)
    assert all(not torch.equal(initial[name], trained[name]) for name in trained)  # the step moved every weight
    assert all(not torch.equal(generator["before"][name], trained[name]) for name in trained)
    for name, value in trained.items():
        assert torch.equal(generator["fp32"][name], value), name
        assert generator["bf16"][name].dtype == torch.bfloat16
        assert torch.equal(generator["bf16"][name], value.to(torch.bfloat16)), name
        assert generator["synced"][name].dtype == torch.bfloat16
        assert torch.equal(generator["synced"][name], value.to(torch.bfloat16)), name


@pytest.mark.timeout(240)
def test_colocated_sync_and_save_gather_under_zero3(launch_ranks, tmp_path):
    # workers.colocated_sync_scenario: 2 ranks, each a ZeRO-3 actor (tied embeddings) and an HF engine; sync_weights
    # before (partitioned parameters) and after one AdamW step, then gather_full_state_dict.
    runs = launch_ranks("colocated_sync", 2, timeout_s=220)
    assert_ranks_succeeded(runs)
    records = [run.record(tmp_path) for run in runs]
    assert records[0]["local_numel"] == 0
    assert [r["saved_is_none"] for r in records] == [False, True]  # only data-parallel rank 0 keeps the state
    assert "lm_head.weight" in records[0]["model_names"] and "lm_head.weight" not in records[0]["names"]
    for rank in range(2):
        out = torch.load(tmp_path / f"colocated{rank}.pt")
        initial, trained = out["initial"], out["trained"]
        assert records[rank]["metrics"] == ["max/weight_sync_s"]
        assert all(not torch.equal(initial[name], trained[name]) for name in trained)
        for name, value in trained.items():
            assert torch.equal(out["initial_synced"][name], initial[name]), name
            assert torch.equal(out["synced"][name], value), name
    writer = torch.load(tmp_path / "colocated0.pt")
    saved, trained = writer["saved"], writer["trained"]
    assert sorted(saved) == sorted(trained)  # every parameter name, tied ones included
    assert saved["lm_head.weight"] is saved["model.embed_tokens.weight"]
    for name, value in trained.items():
        assert torch.equal(saved[name], value), name
