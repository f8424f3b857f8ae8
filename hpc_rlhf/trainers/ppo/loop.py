"""The PPO-family training loop, one schedule for every estimator, sync/async and disaggregated/colocated layouts.

The loop runs in ticks. At tick t the generators produce iteration t and every other role works on iteration
t - q, where q = rollout.async_queue (0 = synchronous). After its update the actor broadcasts weight version
i + 1, which generators use from tick i + 1 + q on, so a sample is at most q versions stale. Colocated ranks simply
hold every role and run the stages one after another; colocated and async (q = 1), a rank generates in a thread
while it trains (`overlap.py`). At the end of each tick all ranks exchange metrics and the stop flag over the
control plane, so they agree on when to checkpoint and leave.

Data moves through the rollout shards: generators commit `iter_*/generator_*.arrow`, fill stages commit column
shards (rewards, reference log-probs, values), and trainers read the completed iteration. A rank waiting for data
polls the filesystem; if a peer fails, the failure guard stops this rank with the peer's error.
"""

from __future__ import annotations

import dataclasses
import functools
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch
import torch.distributed as dist

from hpc_rlhf.algos import AdvantagesAndReturns, KLController, RunningMoments, build_kl_controller
from hpc_rlhf.config.schema import Config
from hpc_rlhf.distributed import ControlPlane, DistributedWorld, LayoutPlan, RankRoles, RoleGroups, sync_weights
from hpc_rlhf.run.metrics import MetricsLogger, wandb_settings
from hpc_rlhf.run.rank_metrics import accumulate, is_phase_time, mean_metrics, merge_metrics, timed
from hpc_rlhf.rollouts import (
    RolloutReader,
    commit_iteration,
    generator_shard_name,
    load_manifest,
    wait_for_iteration,
    wait_for_shards,
)
from hpc_rlhf.slurm.requeue import StopReason, StopRequest, combine_stop_reasons
from hpc_rlhf.trainers.checkpointing import CheckpointService
from hpc_rlhf.trainers.engines import compute_dtype
from hpc_rlhf.trainers.ppo import experience as exp
from hpc_rlhf.trainers.ppo.components import Components, build_components
from hpc_rlhf.trainers.ppo.fill_stages import fill_per_token, fill_rewards, per_token_outputs
from hpc_rlhf.trainers.ppo.overlap import BackgroundGeneration, overlap_refusal
from hpc_rlhf.trainers.ppo.partial_rollout import PartialRollouts, outcome_metrics
from hpc_rlhf.trainers.ppo.resume import RolloutCheck
from hpc_rlhf.trainers.ppo.rollout_stage import Refill, run_eval, run_generation
from hpc_rlhf.trainers.ppo.update import actor_loss_fn, critic_loss_fn, run_epochs, single_step_iteration
from hpc_rlhf.training.batching import TokenSample
from hpc_rlhf.training.models import Actor, Critic


def group_sum(group: dist.ProcessGroup, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """An all-reduce (sum) over a role group, for the estimators' global whitening and statistics."""
    def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.detach().to(device).clone()
        dist.all_reduce(out, group=group)
        return out.to(tensor.device)
    return all_reduce


def zero_filler(rollout: exp.RolloutTensors, keys: list[str], pad_id: int = 0) -> TokenSample:
    """A sample with zero tensors, run with weight 0 by a rank that has run out of samples in an epoch (one pad token
    answering one pad token where the rank has no rows at all: dynamic filtering kept too few groups)."""
    if rollout.num_samples == 0:
        token = torch.tensor([pad_id], dtype=torch.long)
        return TokenSample(prompt_ids=token, response_ids=token.clone(), action_mask=torch.zeros(1, dtype=torch.bool),
                           response_tensors={key: torch.zeros(1) for key in keys})
    zeros = torch.zeros_like(rollout.action_mask, dtype=torch.float32)
    return exp.to_token_samples(rollout, {key: zeros for key in keys})[0]


@dataclass
class TrainerState:
    """What a checkpoint must carry besides model and optimizer states."""

    next_iteration: int = 0
    weight_version: int = 0
    kl_controller: dict = field(default_factory=dict)
    reward_moments: dict = field(default_factory=dict)
    data_position: int = 0  # dynamic sampling: prompts of the stream drawn by the iterations generated so far
    generator_engines: int = 0  # of the layout that saved it (0: not recorded); a resume may have another count


class PPOTrainer:
    """Runs the tick schedule for one rank; every rank of the job constructs one and calls `run`.

    Everything the rank needs is built here, in this order: its role pieces (tokenizer, prompts, models, generation
    engine, reward source: `build_components`), the checkpoint service, the metrics logger (which starts where a
    resume will), and the algorithm's state (KL controller, reward statistics, iteration and weight version).
    """

    def __init__(self, cfg: Config, world: DistributedWorld, groups: RoleGroups, control: ControlPlane, *,
                 stop: Optional[StopRequest] = None) -> None:
        self.cfg, self.groups, self.control, self.stop = cfg, groups, control, stop
        self.stop_reason: Optional[StopReason] = None
        self.device: torch.device = world.device
        self.is_main = world.info.rank == 0
        self.roles: RankRoles = groups.roles
        self.plan: LayoutPlan = groups.plan
        self.run_dir = cfg.train.run_dir
        self.q = cfg.rollout.async_queue
        self.num_engines = len(self.plan.engines)
        self.parts: Components = build_components(cfg, groups, world.device)
        self.total = self.parts.total_iterations
        self.pad_id = self.parts.tokenizer.pad_token_id or 0
        self.checkpoint = CheckpointService(
            cfg, rank=world.info.rank, world_size=world.info.world_size, control=control,
            engines={"actor": self.parts.actor, "critic": self.parts.critic}, trainer=self,
            resume_check=RolloutCheck(cfg, self.total, self._expected_shards(), self.num_engines))
        self.logger = MetricsLogger(self.run_dir, enabled=self.is_main,
                                    use_tensorboard=cfg.logger.use_tensorboard, progress_bar=cfg.logger.progress_bar,
                                    total_steps=self.total, logging_steps=cfg.logger.logging_steps,
                                    start_step=int(self.checkpoint.resume_state().get("next_iteration", 0)),
                                    wandb=wandb_settings(cfg))
        self.kl_controller: KLController = build_kl_controller(cfg.algo.init_kl_coef, cfg.algo.kl_target,
                                                               cfg.algo.kl_horizon)
        self.reward_moments = RunningMoments()
        self._moments_iteration: Optional[int] = None
        self.state = TrainerState()
        self.partial: Optional[PartialRollouts] = None  # rollout.partial_rollout: this engine's carried responses
        if cfg.rollout.partial_rollout and self.roles.has("generator"):
            self.partial = PartialRollouts(cfg, engine_index=self.roles.generator_engine, num_engines=self.num_engines,
                                           executor=self.parts.executor, tokenizer=self.parts.tokenizer,
                                           prompts=self.parts.prompts, reward_source=self.parts.reward_source,
                                           writes=self.writes_shards)
        self.agreed_metrics: dict[str, float] = {}  # the last merged metrics, with ckpt.best_metric_key only
        self.background: Optional[BackgroundGeneration] = self._background_generation()

    # ----- roles ---------------------------------------------------------------------------------------
    def _index(self, role: str) -> int:
        """Which share of the role's shards and samples this rank takes (a sequence-parallel group shares one)."""
        return self.plan.data_share(role, self.roles.rank, self.cfg.ds.ring_attn_size)[0]

    def _size(self, role: str) -> int:
        """How many shares the role's shards and samples are split into."""
        return self.plan.data_share(role, self.roles.rank, self.cfg.ds.ring_attn_size)[1]

    @property
    def split_sequences(self) -> bool:
        """Sequence parallelism (`ds.ring_attn_size` > 1): the forward-only passes pack their micro-batches too."""
        return self.cfg.ds.ring_attn_size > 1

    def _leads_share(self, role: str) -> bool:
        """Whether this rank writes what its sequence-parallel group computed (the group's first rank does)."""
        return self.roles.role_index[role] % self.cfg.ds.ring_attn_size == 0

    def _per_share(self, metrics: dict[str, float]) -> dict[str, float]:
        """A sequence-parallel rank's `sum/` metrics divided by the group size: its group counts them once."""
        ring = self.cfg.ds.ring_attn_size
        if ring == 1:
            return metrics
        return {key: value / ring if key.startswith("sum/") else value for key, value in metrics.items()}

    @property
    def writes_shards(self) -> bool:
        """TP rank 0 of each generator engine writes that engine's shard."""
        return self.roles.has("generator") and self.roles.tp_rank == 0

    def _expected_shards(self) -> list[str]:
        return [generator_shard_name(e) for e in range(self.num_engines)]

    # ----- stages --------------------------------------------------------------------------------------
    def _generate(self, iteration: int) -> dict[str, float]:
        parts = self.parts
        if load_manifest(self.run_dir, iteration).complete:  # generated before a resume, maybe by another layout
            return {}
        result = run_generation(self.cfg, iteration=iteration, engine_index=self.roles.generator_engine,
                                num_engines=self.num_engines, writes=self.writes_shards, executor=parts.executor,
                                tokenizer=parts.tokenizer, prompts=parts.prompts, reward_source=parts.reward_source,
                                weight_version=self.state.weight_version, refill=self._refill(),
                                processor=parts.processor)
        if self.roles.role_index["generator"] == 0:  # the first generator rank completes the iteration
            expected = self._expected_shards()
            wait_for_shards(self.run_dir, iteration, expected)
            commit_iteration(self.run_dir, iteration, expected)
        metrics: dict[str, float] = {}
        if result.filtering is not None:  # every generator rank holds the same outcome
            self.state.data_position += result.filtering.prompts_drawn
            metrics = {"generate/filter_prompts_drawn": float(result.filtering.prompts_drawn),
                       "generate/filter_groups_kept": float(result.filtering.groups_kept),
                       "generate/filter_rounds": float(result.filtering.rounds),
                       "generate/filter_capped": float(result.filtering.capped),
                       "generate/data_position": float(self.state.data_position)}
        if not self.writes_shards or result.reused:
            return metrics
        return {**metrics, "sum/generate_tokens": result.response_tokens, "max/generate_s": result.seconds,
                "sum/generate_samples": result.samples, "max/generate_engine_s": result.engine_seconds,
                "max/reward_fn_s": result.reward_seconds, "max/shard_write_s": result.write_seconds}

    def _generate_partial(self, tick: int) -> dict[str, float]:
        """rollout.partial_rollout: continue the carried responses, start iteration `tick`, and complete the
        iteration trained in this tick (every engine has finished it: its budget was unlimited)."""
        outcome = self.partial.step(tick, self.state.weight_version, self.total)
        due = tick - self.q
        if self.roles.role_index["generator"] == 0 and 0 <= due < self.total and tick > self.partial.done_through \
                and not load_manifest(self.run_dir, due).complete:
            expected = self._expected_shards()
            wait_for_shards(self.run_dir, due, expected)
            commit_iteration(self.run_dir, due, expected)
        return outcome_metrics(outcome) if self.writes_shards else {}

    def _refill(self) -> Optional[Refill]:
        """Dynamic sampling's inputs for this iteration (None without rollout.dynamic_filtering)."""
        if not self.cfg.rollout.dynamic_filtering:
            return None
        return Refill(data_position=self.state.data_position, gather_missing=self._gather_missing)

    def _gather_missing(self, missing: int) -> list[int]:
        """Every engine's count of groups still missing, in engine order: a sum over the generator group, to which
        the first tensor-parallel rank of each engine contributes its engine's count."""
        counts = torch.zeros(self.num_engines, dtype=torch.long, device=self.device)
        if self.roles.tp_rank == 0:
            counts[self.roles.generator_engine] = missing
        dist.all_reduce(counts, group=self.groups.group("generator"))
        return [int(c) for c in counts.tolist()]

    def _fill(self, iteration: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        parts, cfg = self.parts, self.cfg
        if parts.reward_model is not None:
            accumulate(metrics, self._per_share(fill_rewards(cfg, iteration, self._index("reward"),
                                                             self._size("reward"), parts.reward_model,
                                                             writes=self._leads_share("reward"))))
        if parts.reference is not None:
            accumulate(metrics, self._per_share(fill_per_token(
                cfg, iteration, self._index("reference"), self._size("reference"), name="reference",
                stage="reference", column="reference_log_probs", infer=parts.reference.infer, field="log_probs",
                micro_batch_size=cfg.ref.micro_batch_size, pad_token_id=self.pad_id, packing=self.split_sequences,
                writes=self._leads_share("reference"))))
        if parts.critic is not None:
            accumulate(metrics, self._per_share(fill_per_token(
                cfg, iteration, self._index("critic"), self._size("critic"), name="critic_forward", stage="values",
                column="values", infer=parts.critic.infer, field="values",
                micro_batch_size=cfg.train.micro_train_batch_size, pad_token_id=self.pad_id,
                packing=self.split_sequences, writes=self._leads_share("critic"))))
        return metrics

    def _required_stages(self) -> list[str]:
        stages = ["rewards"] if self.cfg.reward.pretrain else []
        if self.plan.ranks_of("reference"):
            stages.append("reference")
        if self.plan.ranks_of("critic"):
            stages.append("values")
        return stages

    def _read_rollout(self, iteration: int, role: str) -> exp.RolloutTensors:
        table = RolloutReader(self.run_dir).read(iteration, rank=self._index(role), world_size=self._size(role),
                                                 require_filled=["reward", "score"])
        return exp.table_to_tensors(table)

    def _shaped(self, iteration: int, rollout: exp.RolloutTensors, group: dist.ProcessGroup, device: torch.device
                ) -> tuple[exp.RolloutTensors, exp.ShapedRewards, AdvantagesAndReturns, float]:
        """Filtered rollout, shaped rewards, advantages/returns and mean KL, identical on actor and critic ranks."""
        reduce = group_sum(group, device)
        kept = rollout.select(exp.group_filter(self.cfg, rollout))
        if self.cfg.algo.normalize_reward and self._moments_iteration != iteration:  # once per iteration per rank
            self.reward_moments.update(kept.rewards, all_reduce=reduce)
            self._moments_iteration = iteration
        shaped = exp.shape_rewards(self.cfg, kept, self.reward_moments)
        result, mean_kl = exp.advantages_and_returns(self.cfg, kept, shaped.rewards, self.kl_controller.value, reduce)
        return kept, shaped, result, mean_kl

    def _train_actor(self, iteration: int) -> dict[str, float]:
        actor, cfg = self.parts.actor, self.cfg
        times: dict[str, float] = {}
        with timed(times, "train"):
            with timed(times, "shard_read"):
                rollout = self._read_rollout(iteration, "actor")
            kept, shaped, adv, mean_kl = self._shaped(iteration, rollout, self.groups.group("actor"), actor.device)
            per_token = {"advantages": adv.advantages}
            if kept.behaviour_log_probs is not None:
                per_token["behaviour_log_probs"] = kept.behaviour_log_probs
            if kept.reference_log_probs is not None:
                per_token["reference_log_probs"] = kept.reference_log_probs
            samples = exp.to_token_samples(kept, per_token)
            # The trainer's own log-probs before the update: the PPO ratio's denominator (old policy). A single-step
            # update can read them off its own forward instead (train.skip_old_logprobs).
            with timed(times, "actor_logprob", sync=actor.device):
                skip_old = cfg.train.skip_old_logprobs and single_step_iteration(cfg, len(samples), actor)
                if not skip_old:
                    old = per_token_outputs(actor.infer, samples, cfg.train.micro_train_batch_size, "log_probs",
                                            self.pad_id, packing=self.split_sequences)
                    samples = [dataclasses.replace(s, response_tensors={**s.response_tensors, "old_log_probs": o})
                               for s, o in zip(samples, old)]
            frozen = iteration < cfg.critic.freezing_actor_steps
            with timed(times, "actor_update", sync=actor.device):
                steps = [] if frozen else run_epochs(
                    actor, cfg, samples, actor_loss_fn(cfg),
                    filler=zero_filler(rollout, [*per_token] + ([] if skip_old else ["old_log_probs"]), self.pad_id),
                    dp_size=actor.batch_ranks, pad_token_id=self.pad_id, iteration=iteration, salt=0)
        self.kl_controller.update(mean_kl, len(rollout.rewards))
        tokens = sum(s.num_tokens for s in samples)
        metrics = mean_metrics(steps, prefix="train/")
        metrics.update({
            "rollout/reward_mean": rollout.rewards.mean().item(), "rollout/score_mean": rollout.scores.mean().item(),
            "rollout/shaped_reward_mean": shaped.rewards.mean().item() if len(shaped.rewards) else 0.0,
            "rollout/kl": mean_kl, "rollout/kl_coef": float(self.kl_controller.value),
            "rollout/response_length": rollout.response_lengths().float().mean().item(),
            "rollout/kept_fraction": len(kept.rewards) / max(len(rollout.rewards), 1),
            "rollout/truncated_rate": shaped.truncated.float().mean().item() if len(shaped.truncated) else 0.0,
            "rollout/staleness": iteration - rollout.weight_versions.float().mean().item(),
            "train/optimizer_steps": float(len(steps)),
            "sum/train_tokens": float(tokens) * (0 if frozen else cfg.train.max_epochs),
            "sum/actor_logprob_tokens": float(tokens), **times,
        })
        if skip_old:  # no log-prob pass ran: no tokens, no rate
            metrics.pop("sum/actor_logprob_tokens")
        return self._per_share(metrics)

    def _train_critic(self, iteration: int) -> dict[str, float]:
        critic, cfg = self.parts.critic, self.cfg
        times: dict[str, float] = {}
        with timed(times, "shard_read"):
            rollout = self._read_rollout(iteration, "critic")
        with timed(times, "critic_train", sync=critic.device):
            kept, _, adv, _ = self._shaped(iteration, rollout, self.groups.group("critic"), critic.device)
            samples = exp.to_token_samples(kept, {"returns": adv.returns, "old_values": kept.values})
            steps = run_epochs(critic, cfg, samples, critic_loss_fn(cfg),
                               filler=zero_filler(rollout, ["returns", "old_values"], self.pad_id),
                               dp_size=critic.batch_ranks, pad_token_id=self.pad_id, iteration=iteration, salt=1)
            if not self.roles.has("actor"):
                self.kl_controller.update(exp.advantages_and_returns(cfg, kept, kept.rewards, 0.0, None)[1],
                                          len(rollout.rewards))
        metrics = mean_metrics(steps, prefix="critic/")
        metrics.update({"sum/critic_train_tokens": float(sum(s.num_tokens for s in samples) * cfg.train.max_epochs),
                        **times})
        return self._per_share(metrics)

    # ----- weights -------------------------------------------------------------------------------------
    def _sync_weights(self, version: int) -> dict[str, float]:
        """Actor -> generator weights of `version`: a local copy when colocated, else a bucketed broadcast."""
        actor = self.parts.actor
        metrics = sync_weights(actor.hf_model() if actor is not None else None, self.parts.engine,
                               dtype=compute_dtype(self.cfg), group=self.groups.weight_sync_group,
                               src=self.plan.ranks_of("actor")[0], version=version,
                               bucket_mb=self.cfg.vllm.weight_sync_bucket_mb,
                               device=actor.device if actor is not None else None)
        self.state.weight_version = version
        return metrics

    # ----- eval ----------------------------------------------------------------------------------------
    def _eval(self) -> dict[str, float]:
        if not self.roles.has("generator") or not self.parts.eval_prompts or self.roles.tp_rank != 0:
            return {}
        times: dict[str, float] = {}
        with timed(times, "eval"):  # inside the tick's iteration_s: time-to-accuracy benchmarks subtract it
            out = run_eval(self.cfg, executor=self.parts.executor, tokenizer=self.parts.tokenizer,
                           prompts=self.parts.eval_prompts, reward_source=self.parts.reward_source,
                           engine_index=self.roles.generator_engine, num_engines=self.num_engines,
                           processor=self.parts.processor)
        return {"sum/eval_count": out["count"], "sum/eval_reward": out["reward_sum"],
                "sum/eval_score": out["score_sum"], **times}

    def _write_best_candidate(self) -> None:
        """With ckpt.best_metric_key: the actor's current weights, the ones this tick's evaluation runs with, written
        as the candidate that `settle_best_candidate` keeps as RUN_DIR/hf/best if the evaluation improves."""
        actor = self.parts.actor
        if self.checkpoint.best is None or actor is None:
            return
        out = self.checkpoint.best_candidate_dir
        if actor.dp_rank == 0:
            shutil.rmtree(out, ignore_errors=True)
        actor.save_hf(out)
        if actor.dp_rank == 0:
            self.parts.tokenizer.save_pretrained(out)

    def _eval_due(self, iteration: int) -> bool:
        steps = self.cfg.eval.steps
        return bool(self.parts.eval_prompts) and steps > 0 and iteration % steps == 0

    # ----- the schedule --------------------------------------------------------------------------------
    def run(self) -> dict[str, float]:
        """Run ticks until the last iteration is trained or a stop is requested; returns the last metrics."""
        start = self.resume()
        if self.partial is not None:
            self.partial.restore(start)
        if start > 0 and (self.roles.has("generator") or self.roles.has("actor")):
            self._sync_weights(start)
        last: dict[str, float] = {}
        carried: dict[str, float] = {}  # metrics of async warm-up ticks, logged with the first trained iteration
        for tick in range(start, self.total + self.q):
            gen_it, train_it = tick, tick - self.q
            metrics: dict[str, float] = dict(carried)
            with timed(metrics, "iteration"):
                in_background = False
                if self.roles.has("generator") and (gen_it < self.total or self.partial is not None):
                    accumulate(metrics, self._wake_generator())
                    if gen_it < self.total and self._eval_due(gen_it):
                        metrics.update(self._eval())
                    in_background = self.background is not None and train_it >= start
                    if in_background:  # the update below runs meanwhile (colocated async)
                        self.background.start(functools.partial(self._generate, gen_it))
                    else:
                        accumulate(metrics, self._generate(gen_it) if self.partial is None
                                   else self._generate_partial(gen_it))
                        accumulate(metrics, self._sleep_generator())
                evaluated = self.state.next_iteration  # iterations the weights evaluated this tick have trained
                eval_tick = gen_it < self.total and self._eval_due(gen_it)
                if eval_tick:
                    self._write_best_candidate()
                if train_it >= start:
                    try:
                        self._train(train_it, metrics)
                    except BaseException:
                        if in_background:
                            self.background.join(raise_error=False)  # the training error is the one reported
                        raise
                    if in_background:  # wait_generation_s: the trainers wait for the generation thread
                        with timed(metrics, "wait_generation"):
                            accumulate(metrics, self.background.join())
                if train_it >= start and tick < self._last_generation_tick() and self._in_weight_path():
                    accumulate(metrics, self._sync_weights(train_it + 1))
                elif train_it >= start:
                    self.state.weight_version = train_it + 1
            stop = self._agree(train_it, metrics, log=train_it >= start)
            if eval_tick:
                self.checkpoint.settle_best_candidate(evaluated, self.agreed_metrics)
            if stop and train_it < start and self.stop_reason.requeue:
                # An async warm-up tick trains nothing, so there is nothing to checkpoint: stop after the next tick,
                # which trains and saves (the request stays recorded), instead of losing this tick's generation.
                stop = False
            # An async warm-up tick's counts and eval results are logged with the first trained iteration; its
            # phase times are not, so that every logged iteration_s is one tick.
            carried = {} if train_it >= start else {k: v for k, v in metrics.items() if not is_phase_time(k)}
            last = metrics
            saved = train_it >= start and self.checkpoint.due(train_it + 1, stop=stop)
            if saved:
                self.checkpoint.save(self.state.next_iteration)
            if self.partial is not None:
                self.partial.settle(tick, self.checkpoint.root, saved=saved)
            if stop:
                return {"stopped": 1.0, **last}
        if self.parts.eval_prompts and self.cfg.eval.data:
            if self._in_weight_path():
                self._sync_weights(self.total)
            self._wake_generator()
            self._write_best_candidate()
            self._agree(self.total, self._eval())
            self.checkpoint.settle_best_candidate(self.state.next_iteration, self.agreed_metrics)
        return last

    def _train(self, train_it: int, metrics: dict[str, float]) -> None:
        """The non-generating roles' work on iteration `train_it`: wait for its shards, fill, train critic and actor."""
        # wait_data_s: idle, while other ranks generate or fill
        with timed(metrics, "wait_data"):
            wait_for_iteration(self.run_dir, train_it)
        accumulate(metrics, self._fill(train_it))
        if self.parts.actor is not None or self.parts.critic is not None:
            with timed(metrics, "wait_data"):
                wait_for_iteration(self.run_dir, train_it, self._required_stages())
        if self.parts.critic is not None:
            accumulate(metrics, self._train_critic(train_it))
        if self.parts.actor is not None:
            accumulate(metrics, self._train_actor(train_it))
        self.state.next_iteration = train_it + 1

    def _background_generation(self) -> Optional[BackgroundGeneration]:
        """Colocated and async: this rank's generation runs in a thread beside its update (None: one after the
        other), unless its engine cannot (then a notice says why)."""
        if not (self.plan.colocate and self.q > 0 and self.partial is None and self.parts.engine is not None):
            return None
        refusal = overlap_refusal(self.parts.engine)
        if refusal is not None:
            if self.is_main:
                print(f"rollout.async_queue with layout.colocate: generation and update run one after the other: "
                      f"{refusal}", flush=True)
            return None
        return BackgroundGeneration(self.device)

    def _last_generation_tick(self) -> int:
        """The last tick that generates: the last iteration's, or with partial rollouts the one that trains it
        (its responses still in progress finish there, with the weights sent at the end of the tick before). Every
        rank of the weight broadcast decides the same from the config."""
        return self.total - 1 + (self.q if self.cfg.rollout.partial_rollout else 0)

    def _sleep_generator(self) -> dict[str, float]:
        """After generating, colocated ranks free the engine's memory (vllm.enable_sleep) and bring the trainers'
        optimizer states back (ds.enable_sleep)."""
        metrics: dict[str, float] = {}
        if self.plan.colocate and self.cfg.vllm.enable_sleep and self.parts.engine is not None:
            with timed(metrics, "generator_sleep"):
                self.parts.engine.sleep()
        if self._trainers_sleep():
            with timed(metrics, "trainer_reload"):
                for model in self._trained_models():
                    model.reload_states()
        return metrics

    def _wake_generator(self) -> dict[str, float]:
        """Before generating, colocated ranks move the trainers' optimizer states to host memory (ds.enable_sleep)
        and wake the engine (vllm.enable_sleep)."""
        metrics: dict[str, float] = {}
        if self._trainers_sleep():
            actor = self.parts.actor
            with timed(metrics, "trainer_offload", sync=actor.device if actor is not None else None):
                for model in self._trained_models():
                    model.offload_states()
        if self.plan.colocate and self.cfg.vllm.enable_sleep and self.parts.engine is not None:
            with timed(metrics, "generator_wake"):
                self.parts.engine.wake_up()
        return metrics

    def _trainers_sleep(self) -> bool:
        return self.plan.colocate and self.cfg.ds.enable_sleep and bool(self._trained_models())

    def _trained_models(self) -> list[Actor | Critic]:
        return [m for m in (self.parts.actor, self.parts.critic) if m is not None]

    def _in_weight_path(self) -> bool:
        return self.roles.has("generator") or self.roles.has("actor")

    def _agree(self, step: int, metrics: dict[str, float], *, log: bool = True) -> bool:
        """Exchange metrics and stop requests; rank 0 logs the merged metrics. Returns whether the job stops now."""
        request = self.stop.request() if self.stop is not None else None
        position = self.state.data_position if self.roles.has("generator") else None
        gathered = self.control.allgather_object((request, metrics, position))
        if self.control.rank == 0 and log:
            self.logger.log(step, {**merge_metrics([m for _, m, _ in gathered]), "time/end_unix_s": time.time()})
        # Every rank decides on the best model (ckpt.best_metric_key) from the same merged metrics.
        self.agreed_metrics = merge_metrics([m for _, m, _ in gathered]) if self.checkpoint.best is not None else {}
        self.stop_reason = combine_stop_reasons([r for r, _, _ in gathered])
        # The generators' data position (dynamic sampling), so that whichever rank saves the checkpoint holds it.
        self.state.data_position = max((p for _, _, p in gathered if p is not None), default=0)
        return self.stop_reason is not None

    # ----- checkpoints ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The trainer's part of a checkpoint: iteration, weight version, KL controller, reward statistics, and the
        data position of dynamic sampling."""
        self.state.kl_controller = self.kl_controller.state_dict()
        self.state.reward_moments = self.reward_moments.state_dict()
        self.state.generator_engines = self.num_engines
        return self.state.__dict__.copy()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        known = {f.name for f in dataclasses.fields(TrainerState)}
        self.state = TrainerState(**{k: v for k, v in state.items() if k in known})
        if "data_position" not in state:  # a checkpoint from before dynamic sampling: one block per iteration
            generated = min(self.state.next_iteration + self.q, self.total)
            self.state.data_position = generated * self.cfg.rollout.batch_size
        self.kl_controller.load_state_dict(self.state.kl_controller)
        self.reward_moments.load_state_dict(self.state.reward_moments)

    def resume(self) -> int:
        """Restore the latest checkpoint when there is one; returns the first iteration to train."""
        path = self.checkpoint.restore()
        if path is None:
            return 0
        if self.is_main:
            print(f"resumed from {path}", flush=True)
        return self.state.next_iteration
