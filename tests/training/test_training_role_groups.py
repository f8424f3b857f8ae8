"""DeepSpeed engines on a role subgroup (ranks 1-2 of 3) behave exactly like on a 2-rank world.

Both runs (see distributed_worker.run_roles) train a ZeRO-3 actor and a ZeRO-2 critic in turn, save and
resume the actor, take a dynamic-batching ZeRO-2 step and run a ZeRO-3 reference.
"""

from __future__ import annotations

import math

import pytest
import torch

from hpc_rlhf.training.batching import make_micro_batches

pytestmark = pytest.mark.timeout(600)


def assert_metrics_close(got: list[dict[str, float]], want: list[dict[str, float]], what: str) -> None:
    assert len(got) == len(want), what
    for step, (g, w) in enumerate(zip(got, want)):
        assert g == pytest.approx(w, rel=1e-6, abs=1e-7), f"{what}, step {step}"


def assert_states_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name, expected in want.items():
        torch.testing.assert_close(got[name], expected, atol=0, rtol=0, msg=name)


def test_subgroup_training_equals_world_training(subgroup_run, world_run):
    _, sub = subgroup_run
    _, world = world_run
    for dp_rank in range(2):
        for key in ("actor_metrics", "critic_metrics"):
            assert_metrics_close(sub[dp_rank][key], world[dp_rank][key], key)
        assert sub[dp_rank]["resumed_metrics"] == pytest.approx(world[dp_rank]["resumed_metrics"], rel=1e-6)
        for stage, metrics in world[dp_rank]["dyn_metrics"].items():
            assert sub[dp_rank]["dyn_metrics"][stage] == pytest.approx(metrics, rel=1e-6, abs=1e-7), stage
    for key in ("actor_state", "critic_state", "resumed_state"):
        assert_states_equal(sub[0][key], world[0][key])


def test_rank_outside_the_group_is_not_blocked(subgroup_run):
    _, results = subgroup_run
    # Rank 0 wrote its marker and went on to the final barrier while ranks 1-2 were still training.
    assert all(r["idle_ranks_done_before_trainers"] for r in results)


def test_actor_and_critic_train_on_the_same_ranks(worker, subgroup_run):
    _, results = subgroup_run
    initial = worker.tiny_llama(0).state_dict()
    for result in results:
        for metrics in result["actor_metrics"] + result["critic_metrics"]:
            assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])
        assert all(math.isfinite(m["entropy"]) and m["entropy"] > 0 for m in result["actor_metrics"])
        # Warmup of 1 step, then cosine over the 2 remaining steps down to 10% of 1e-2.
        assert [m["lr"] for m in result["actor_metrics"]] == pytest.approx([1e-2, 1e-2, 5.5e-3])
    # Metrics are group means: both ranks report the same numbers.
    assert_metrics_close(results[0]["actor_metrics"], results[1]["actor_metrics"], "dp rank 0 vs 1")
    actor, critic = results[0]["actor_state"], results[0]["critic_state"]
    assert not torch.equal(actor["model.layers.0.mlp.up_proj.weight"], initial["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(critic["model.layers.0.mlp.up_proj.weight"], initial["model.layers.0.mlp.up_proj.weight"])
    assert critic["score.weight"].shape == (1, 64)


def test_resume_repeats_the_last_step_exactly(subgroup_run):
    _, results = subgroup_run
    for result in results:
        assert result["resumed_metrics"] == result["actor_metrics"][-1]
    assert_states_equal(results[0]["resumed_state"], results[0]["actor_state"])


def test_zero3_reference_log_probs_match_a_plain_forward(worker, subgroup_run):
    _, results = subgroup_run
    model = worker.tiny_llama(0).eval()
    for dp_rank, result in enumerate(results):
        samples = worker.make_samples(77 + dp_rank, 3 + 3 * dp_rank, max_len=10)
        batches = make_micro_batches(samples, micro_batch_size=3)
        assert len(result["ref_log_probs"]) == len(batches)  # fillers were dropped
        for log_probs, indices in zip(result["ref_log_probs"], result["ref_sample_indices"]):
            for row, index in enumerate(indices.tolist()):
                sample = samples[index]
                sequence = torch.cat([sample.prompt_ids, sample.response_ids]).unsqueeze(0)
                with torch.no_grad():
                    log_p = torch.log_softmax(model(input_ids=sequence).logits[0].double(), dim=-1)
                start, n = sample.prompt_ids.numel(), sample.response_ids.numel()
                want = log_p[torch.arange(start - 1, start - 1 + n), sample.response_ids]
                torch.testing.assert_close(log_probs[row, :n].double(), want, atol=1e-5, rtol=0)


def test_hf_checkpoints_reload_with_from_pretrained(subgroup_run):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    work_dir, results = subgroup_run
    actor = AutoModelForCausalLM.from_pretrained(work_dir / "actor_hf")
    assert_states_equal({k: v for k, v in actor.state_dict().items() if k in results[0]["actor_state"]},
                        results[0]["actor_state"])
    critic = AutoModelForSequenceClassification.from_pretrained(work_dir / "critic_hf")
    assert critic.config.num_labels == 1
    assert_states_equal({k: v for k, v in critic.state_dict().items() if k in results[0]["critic_state"]},
                        results[0]["critic_state"])


@pytest.mark.slow
def test_offload_and_bf16_train_like_the_plain_engine(tmp_path, tiny_model_dir, run_offload_world):
    """CPU Adam (compiled on first use, ~45 s) with optimizer / parameter offload, and bf16, on a 1-rank world."""
    (result,) = run_offload_world(tmp_path, tiny_model_dir)
    plain = result["plain"]["metrics"]
    assert result["plain"]["optimizer"] == "AdamW"
    for name in ("adam_offload", "param_offload"):
        assert result[name]["optimizer"] == "DeepSpeedCPUAdam"
        for got, want in zip(result[name]["metrics"], plain, strict=True):
            assert got == pytest.approx(want, rel=1e-4, abs=1e-6), name
    for got, want in zip(result["bf16"]["metrics"], plain, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], abs=2e-2)
