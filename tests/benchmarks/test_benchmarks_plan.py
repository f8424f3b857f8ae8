"""Job plans: each phase's limit is its work over its GPUs' ceilings, schedules combine them as documented, and
memory per GPU follows the ZeRO stage (numbers worked out by hand in the tests)."""

from __future__ import annotations

import pytest

from hpc_rlhf.benchmarks import flops
from hpc_rlhf.benchmarks.plan import (
    GIB,
    Hardware,
    inference_memory_gib,
    iteration_times,
    plan_job,
    role_gpus,
    training_memory_gib,
)
from hpc_rlhf.benchmarks.task import ModelShape, model_shape
from hpc_rlhf.config.loading import load_config

HW = Hardware(peak_flops=1e15, memory_bandwidth=2e12, network_bandwidth=1e10)
PPO_8 = ["--layout.colocate=false", "--layout.generator.gpus=4", "--layout.generator.tp=2", "--layout.actor.gpus=2",
         "--layout.critic.gpus=1", "--layout.reward.gpus=1", "--layout.reference.gpus=0",
         "--algo.advantage_estimator=gae", "--algo.init_kl_coef=0.0", "--reward.pretrain=/models/rm",
         "--reward.reward_func_path=null", "--rollout.batch_size=32", "--rollout.n_samples_per_prompt=2",
         "--rollout.prompt_max_len=100", "--rollout.generate_max_len=50", "--train.train_batch_size=64",
         "--train.micro_train_batch_size=2", "--ds.zero_stage=3", "--slurm.gpus_per_node=8"]


def test_memory_per_gpu_by_zero_stage():
    shape = ModelShape(1000, 16, 32, 1, 2, 1, True)  # 1000*16 + 16*16*2 + 2*16*8 + 3*16*32 + 2*16 + 16 params
    params = shape.parameter_count()
    assert params == 16000 + 512 + 256 + 1536 + 32 + 16
    # ZeRO-3: weights, gradients and Adam states all partitioned: 16 bytes / 4 GPUs.
    assert training_memory_gib(shape, 4, zero_stage=3, adam_offload=False) * GIB == pytest.approx(params * 4)
    # ZeRO-2: weights whole (2 bytes), gradients + optimizer partitioned (14 / 4).
    assert training_memory_gib(shape, 4, zero_stage=2, adam_offload=False) * GIB == pytest.approx(params * 5.5)
    # ZeRO-3 with Adam on the CPU: weights + gradients partitioned.
    assert training_memory_gib(shape, 4, zero_stage=3, adam_offload=True) * GIB == pytest.approx(params * 1)
    assert inference_memory_gib(shape, 4, zero_stage=3) * GIB == pytest.approx(params * 0.5)
    assert inference_memory_gib(shape, 4, zero_stage=2) * GIB == pytest.approx(params * 2)


def test_schedules_combine_phases():
    seconds = {"generate": 10.0, "reference": 3.0, "reward_model": 4.0, "critic_forward": 2.0,
               "critic_update": 6.0, "actor_logprob": 1.0, "actor_update": 4.0, "weight_sync": 0.5}
    # sync: 10 + max(3, 4, 2) + max(1 + 4, 6) + 0.5; async: max(10, 4 + 6 + 0.5)
    assert iteration_times(False, seconds) == {"sync": 20.5, "async": 10.5}
    assert iteration_times(True, seconds) == {"colocated": 30.5}
    # Reference on the reward model's ranks: 10 + (3 + 4) + max(1 + 4, 6) + 0.5; async: max(10, 7 + 6 + 0.5)
    assert iteration_times(False, seconds, {"reference": "reward"}) == {"sync": 23.5, "async": 13.5}


def test_plan_of_a_disaggregated_ppo_layout():
    cfg = load_config(None, PPO_8).config
    policy, value = model_shape("qwen2.5-0.5b"), model_shape("tiny")
    plan = plan_job(cfg, policy, value, HW, efficiency={"generate": 0.5, "default": 0.25})
    by_phase = {p.phase: p for p in plan.phases}
    assert set(by_phase) == {"generate", "reward_model", "critic_forward", "critic_update", "actor_logprob",
                             "actor_update", "weight_sync"}, "no KL, no reference"
    lengths = [150] * 64
    assert by_phase["actor_update"].gpus == 2
    assert by_phase["actor_update"].limit_s == pytest.approx(flops.train_flops(policy, lengths) / (2 * 1e15))
    assert by_phase["critic_update"].limit_s == pytest.approx(
        flops.train_flops(value, lengths, vocab_head=False) / 1e15)
    # Two TP2 engines with 32 sequences each, decoding over 2 GPUs' bandwidth.
    rate = flops.decode_limit_tokens_per_s(policy, 32, 100, 50, 2 * 2e12, 2 * 1e15)
    assert by_phase["generate"].limit_s == pytest.approx(32 * 50 / rate)
    assert by_phase["weight_sync"].limit_s == pytest.approx(policy.parameter_count() * 2 / 1e10)
    assert by_phase["generate"].estimate_s == pytest.approx(2 * by_phase["generate"].limit_s)
    assert by_phase["actor_update"].estimate_s == pytest.approx(4 * by_phase["actor_update"].limit_s)
    assert plan.iteration_limit_s == iteration_times(False, {p.phase: p.limit_s for p in plan.phases})
    assert plan.memory_gib["actor"] * GIB == pytest.approx(policy.parameter_count() * 16 / 2)


def test_colocated_roles_use_every_gpu_and_checkpointing_costs_a_third_more():
    cfg = load_config(None, ["--layout.colocate=true", "--layout.generator.gpus=4", "--layout.actor.gpus=4",
                             "--actor.gradient_checkpointing=true", "--train.train_batch_size=8",
                             "--slurm.gpus_per_node=4"]).config
    assert role_gpus(cfg, "actor") == role_gpus(cfg, "generator") == 4
    shape = model_shape("tiny")
    plan = plan_job(cfg, shape, None, HW)
    update = next(p for p in plan.phases if p.phase == "actor_update")
    lengths = [cfg.rollout.prompt_max_len + cfg.rollout.generate_max_len] * (cfg.rollout.batch_size *
                                                                            cfg.rollout.n_samples_per_prompt)
    assert update.limit_s == pytest.approx(flops.train_flops(shape, lengths) * 4 / 3 / (4 * 1e15))
    assert list(plan.iteration_limit_s) == ["colocated"]


def test_shared_ranks_add_up_in_the_plan_of_the_8_gpu_config():
    cfg = load_config("configs/ppo_7b_8gpu.yaml").config
    assert cfg.layout.reference.share_with == "reward"
    assert role_gpus(cfg, "reference") == role_gpus(cfg, "reward") == 1
    plan = plan_job(cfg, model_shape("qwen2.5-7b"), model_shape("qwen2.5-7b"), HW)
    seconds = {p.phase: p.limit_s for p in plan.phases}
    fill = seconds["reference"] + seconds["reward_model"]  # one GPU does both, one after the other
    assert fill > seconds["critic_forward"]
    train = max(seconds["actor_logprob"] + seconds["actor_update"], seconds["critic_update"])
    assert plan.iteration_limit_s["sync"] == pytest.approx(seconds["generate"] + fill + train + seconds["weight_sync"])
