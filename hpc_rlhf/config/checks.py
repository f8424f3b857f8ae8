"""Cross-field rules of a `Config`: combinations that cannot run, reported before any process starts.

Each rule returns messages that name the keys involved and where their values came from, and show the arithmetic
when numbers disagree, so a user can fix the YAML without reading code. `preflight.check_machine` adds the checks
that need the machine the run starts on (device, model folders, dataset files and rows).
"""

from __future__ import annotations

import math

from hpc_rlhf.config.layout_scaling import ScaleError, scale_role_sizes
from hpc_rlhf.config.schema import (
    GROUP_ESTIMATORS,
    PAIRWISE_TRAINERS,
    ROLE_NAMES,
    SEQUENCE_PARALLEL_ROLES,
    SUPERVISED_TRAINERS,
    AlgoConfig,
    Config,
)
from hpc_rlhf.data import (
    DatasetError,
    dataset_paths,
    probability_problems,
)

# The trainers that mix the datasets of a data key by its probabilities; the others read them one after another.
MIXING_TRAINERS = {"data.prompt_data": ("ppo",), "data.dataset": ("sft", "rm", "dpo", "kto", "kd")}


PROMPT_TRAINERS = ("ppo", "rejection_sampling", "iterative_dpo")  # the trainers that sample from prompts


def value_at(cfg: Config, key: str):
    """The value of a dotted config key ("section.name"), None where the config has no such key."""
    section, name = key.split(".")
    return getattr(getattr(cfg, section, None), name, None)


def src(sources: dict[str, str], *keys: str) -> str:
    """`key (source)` for the first key that was set explicitly, else the first key (default)."""
    for key in keys:
        if key in sources:
            return f"{key} ({sources[key]})"
    return f"{keys[0]} (default)"


def check_layout(cfg: Config, sources: dict[str, str]) -> list[str]:
    """Role ranks must add up to the job (a `share_with` role adds none), `share_with` must name a role whose ranks
    can be shared, and TP groups must fit inside a node."""
    errors = []
    layout, slurm = cfg.layout, cfg.slurm
    roles = layout.roles()
    shared = [name for name, role in roles.items() if role.share_with]
    for problem in layout.share_problems():
        keys = sorted((f"layout.{name}.share_with" for name in shared if f"layout.{name}.share_with=" in problem),
                      key=problem.index)
        where = ", ".join(f"{key} from {sources.get(key, 'default')}" for key in keys)
        errors.append(f"{problem} ({where})" if where else problem)
    for name, role in roles.items():
        if role.gpus < 0:
            errors.append(f"{src(sources, f'layout.{name}.gpus')}: must be >= 0, got {role.gpus}")
        if name != "generator" and role.tp != 1:
            errors.append(f"{src(sources, f'layout.{name}.tp')}: tensor parallelism is only for the generator")
    gen = layout.generator
    if gen.tp < 1:
        errors.append(f"{src(sources, 'layout.generator.tp')}: must be >= 1, got {gen.tp}")
        return errors
    if gen.gpus < 1 or layout.actor.gpus < 1:
        errors.append(f"{src(sources, 'layout.generator.gpus', 'layout.actor.gpus')}: "
                      f"a run needs at least one generator and one actor rank "
                      f"(generator.gpus={gen.gpus}, actor.gpus={layout.actor.gpus})")
        return errors
    if gen.gpus % gen.tp:
        errors.append(f"{src(sources, 'layout.generator.tp', 'layout.generator.gpus')}: generator.gpus={gen.gpus} "
                      f"is not a multiple of generator.tp={gen.tp} ({gen.gpus} % {gen.tp} = {gen.gpus % gen.tp})")
    per_node = slurm.gpus_per_node
    if per_node % gen.tp:
        errors.append(f"{src(sources, 'layout.generator.tp', 'slurm.gpus_per_node')}: generator.tp={gen.tp} must "
                      f"divide slurm.gpus_per_node={per_node} so that no TP group spans two nodes")
    job = slurm.nodes * per_node
    present = {n: r.gpus for n, r in roles.items() if r.gpus > 0}
    if layout.scale == "proportional":
        return errors + scaled_layout_problems(cfg, sources)
    if slurm.min_nodes:
        errors.append(f"{src(sources, 'slurm.min_nodes')}: a range of node counts (min_nodes={slurm.min_nodes}) "
                      f"needs a layout that is re-planned for the ranks the job gets: set layout.scale: proportional")
    if layout.colocate:
        wrong = {n: g for n, g in present.items() if g != job}
        if wrong:
            detail = ", ".join(f"{n}.gpus={g}" for n, g in wrong.items())
            errors.append(f"{src(sources, 'layout.colocate')}: colocated roles must each span the whole job of "
                          f"slurm.nodes x slurm.gpus_per_node = {slurm.nodes} x {per_node} = {job} ranks; {detail}")
    else:
        owners = {n: g for n, g in present.items() if not roles[n].share_with}
        total = sum(owners.values())
        if total != job:
            terms = " + ".join(f"{n}.gpus={g}" for n, g in owners.items())
            sharers = [f"{n} shares the {roles[n].share_with} ranks" for n in present if n not in owners]
            sharing = f" ({', '.join(sharers)})" if sharers else ""
            errors.append(f"layout ({', '.join(sorted({sources.get(f'layout.{n}.gpus', 'default') for n in ROLE_NAMES}))})"
                          f": {terms} = {total} ranks{sharing}, but the job has slurm.nodes x slurm.gpus_per_node = "
                          f"{slurm.nodes} x {per_node} = {job}")
    return errors


def scaled_layout_problems(cfg: Config, sources: dict[str, str]) -> list[str]:
    """A proportional layout must fit every allocation the job may start on: slurm.min_nodes (or slurm.nodes) up to
    slurm.nodes nodes; checked at both ends and at the job size."""
    layout, slurm = cfg.layout, cfg.slurm
    roles = layout.roles()
    if slurm.min_nodes < 0 or slurm.min_nodes > slurm.nodes:
        return [f"{src(sources, 'slurm.min_nodes')}: must lie in [0, slurm.nodes={slurm.nodes}], "
                f"got {slurm.min_nodes}"]
    sizes = {name: (role.gpus, role.tp) for name, role in roles.items()}
    shares = {name: role.share_with for name, role in roles.items() if role.share_with}
    errors = []
    for nodes in sorted({slurm.min_nodes or slurm.nodes, slurm.nodes}):
        try:
            scale_role_sizes(sizes, shares, layout.colocate, nodes * slurm.gpus_per_node, ROLE_NAMES)
        except ScaleError as err:
            errors.append(f"{src(sources, 'layout.scale')} on {nodes} node(s) x {slurm.gpus_per_node} "
                          f"(slurm.min_nodes..slurm.nodes): {err}")
    return errors


def kl_needs_reference(algo: AlgoConfig) -> bool:
    """Whether the KL against a reference model is on: in the reward (init_kl_coef > 0) or as a loss term."""
    return algo.init_kl_coef > 0 or algo.use_kl_loss


def check_algorithm(cfg: Config, sources: dict[str, str]) -> list[str]:
    """The estimator decides which roles exist: a critic only for GAE, a reference only with KL, groups need n > 1."""
    errors = []
    algo, layout, rollout = cfg.algo, cfg.layout, cfg.rollout
    uses_critic = algo.advantage_estimator == "gae"
    if uses_critic and layout.critic.gpus == 0:
        errors.append(f"{src(sources, 'algo.advantage_estimator')}: gae (PPO) needs a critic: set layout.critic.gpus")
    if not uses_critic and (layout.critic.gpus > 0 or cfg.critic.pretrain):
        key = "layout.critic.gpus" if layout.critic.gpus > 0 else "critic.pretrain"
        errors.append(f"{src(sources, key)}: a critic is only used by PPO (algo.advantage_estimator: gae), "
                      f"not by {algo.advantage_estimator}")
    needs_ref = kl_needs_reference(algo)
    if needs_ref and layout.reference.gpus == 0:
        errors.append(f"{src(sources, 'algo.init_kl_coef', 'algo.use_kl_loss')}: KL needs a reference model: "
                      f"set layout.reference.gpus")
    if not needs_ref and layout.reference.gpus > 0:
        errors.append(f"{src(sources, 'layout.reference.gpus')}: the reference group is unused because KL is off "
                      f"(algo.init_kl_coef = 0 and algo.use_kl_loss = false)")
    if algo.advantage_estimator in GROUP_ESTIMATORS and rollout.n_samples_per_prompt < 2:
        errors.append(f"{src(sources, 'rollout.n_samples_per_prompt')}: {algo.advantage_estimator} compares samples "
                      f"of one prompt, so it needs n_samples_per_prompt >= 2 (got {rollout.n_samples_per_prompt})")
    if rollout.dynamic_filtering:
        errors += check_dynamic_filtering(cfg, sources)
    if rollout.partial_rollout:
        errors += check_partial_rollout(cfg, sources)
    if algo.advantage_estimator in GROUP_ESTIMATORS and algo.gamma != 1.0:
        errors.append(f"{src(sources, 'algo.gamma')}: {algo.advantage_estimator} uses a per-prompt baseline of "
                      f"sequence rewards, so it needs gamma = 1.0 (got {algo.gamma})")
    if algo.use_kl_loss and algo.init_kl_coef > 0:
        errors.append(f"{src(sources, 'algo.use_kl_loss', 'algo.init_kl_coef')}: choose KL in the loss "
                      f"(use_kl_loss) or in the reward (init_kl_coef > 0), not both")
    if algo.eps_clip_low <= 0 or algo.eps_clip_high <= 0:
        errors.append(f"{src(sources, 'algo.eps_clip_low', 'algo.eps_clip_high')}: clip epsilons must be > 0")
    if algo.dual_clip is not None and algo.dual_clip <= 1:
        errors.append(f"{src(sources, 'algo.dual_clip')}: must be > 1, got {algo.dual_clip}")
    if not algo.is_low < algo.is_high:
        errors.append(f"{src(sources, 'algo.is_low', 'algo.is_high')}: need is_low < is_high")
    low, high = algo.reward_clip_range if len(algo.reward_clip_range) == 2 else (1, 0)
    if not low < high:
        errors.append(f"{src(sources, 'algo.reward_clip_range')}: must be [low, high] with low < high")
    coef = algo.stop_properly_penalty_coef
    if coef is not None and (math.isnan(coef) or coef > 1):
        errors.append(f"{src(sources, 'algo.stop_properly_penalty_coef')}: must be in [0, 1] (scales the reward of "
                      f"a cut response) or < 0 (replaces it), got {coef}")
    return errors


def check_dynamic_filtering(cfg: Config, sources: dict[str, str]) -> list[str]:
    """DAPO dynamic sampling filters on the generators, right after scoring, so the scores must be known there."""
    errors = []
    rollout = cfg.rollout
    if rollout.n_samples_per_prompt < 2:
        errors.append(f"{src(sources, 'rollout.dynamic_filtering', 'rollout.n_samples_per_prompt')}: filtering keeps "
                      f"groups whose scores differ, so it needs n_samples_per_prompt >= 2")
    if cfg.reward.pretrain:
        errors.append(f"{src(sources, 'rollout.dynamic_filtering', 'reward.pretrain')}: the generators filter groups "
                      f"by score and draw replacement prompts, but a reward model scores later on its own ranks; use "
                      f"reward.reward_func_path or reward.remote_url")
    if rollout.dynamic_filtering_max_rounds < 1:
        errors.append(f"{src(sources, 'rollout.dynamic_filtering_max_rounds')}: must be >= 1 (1 = the first round "
                      f"only)")
    return errors


def check_partial_rollout(cfg: Config, sources: dict[str, str]) -> list[str]:
    """Partial rollouts continue single-turn text responses across a weight update of the async schedule."""
    errors = []
    rollout = cfg.rollout
    if rollout.async_queue < 1:
        errors.append(f"{src(sources, 'rollout.partial_rollout', 'rollout.async_queue')}: responses continue after "
                      f"a weight update, which needs asynchronous training (rollout.async_queue >= 1)")
    if rollout.agent_func_path:
        errors.append(f"{src(sources, 'rollout.partial_rollout', 'rollout.agent_func_path')}: only single-turn "
                      f"responses are continued; multi-turn agents generate whole trajectories")
    if rollout.dynamic_filtering:
        errors.append(f"{src(sources, 'rollout.partial_rollout', 'rollout.dynamic_filtering')}: dynamic sampling "
                      f"filters finished groups in rounds within one tick; use one of the two")
    if cfg.data.max_images_per_prompt > 0:
        errors.append(f"{src(sources, 'rollout.partial_rollout', 'data.max_images_per_prompt')}: prompts with "
                      f"images are not continued; set data.max_images_per_prompt = 0")
    if rollout.partial_rollout_max_new_tokens < 1:
        errors.append(f"{src(sources, 'rollout.partial_rollout_max_new_tokens')}: must be >= 1")
    return errors


def data_key(trainer: str) -> str:
    """The data key a trainer reads its training rows from."""
    return "data.prompt_data" if trainer in PROMPT_TRAINERS else "data.dataset"


def check_data(cfg: Config, sources: dict[str, str]) -> list[str]:
    """The trainer's datasets are named properly and its mixing probabilities fit them: one per dataset, each > 0,
    summing to 1, and only for a trainer that mixes."""
    trainer = cfg.train.trainer
    key = data_key(trainer)
    probabilities_key = f"{key}_probs"
    try:
        count = len(dataset_paths(value_at(cfg, key)))
    except DatasetError as err:
        return [f"{src(sources, key)}: {err}"]
    probabilities = value_at(cfg, probabilities_key)
    if probabilities is None:
        return []
    if trainer not in MIXING_TRAINERS[key]:
        return [f"{src(sources, probabilities_key)}: train.trainer {trainer} reads the datasets of {key} one after "
                f"another; mixing them is wired for {', '.join(MIXING_TRAINERS[key])} (leave it empty)"]
    return [f"{src(sources, probabilities_key, key)}: {problem}" for problem in probability_problems(count,
                                                                                                      probabilities)]


def check_rewards(cfg: Config, sources: dict[str, str]) -> list[str]:
    """Exactly one reward source, and a reward group only for a reward model."""
    reward, layout = cfg.reward, cfg.layout
    given = [k for k in ("pretrain", "reward_func_path", "remote_url") if getattr(reward, k)]
    if not given and cfg.rollout.agent_func_path:
        return []  # the agent's environment returns the rewards
    if len(given) != 1:
        keys = ", ".join(f"reward.{k}" for k in given) or "none"
        return [f"{src(sources, *(f'reward.{k}' for k in given or ['reward_func_path']))}: set exactly one of "
                f"reward.pretrain, reward.reward_func_path, reward.remote_url (set: {keys})"]
    if reward.pretrain and layout.reward.gpus == 0:
        return [f"{src(sources, 'reward.pretrain')}: a reward model needs ranks: set layout.reward.gpus"]
    if not reward.pretrain and layout.reward.gpus > 0:
        return [f"{src(sources, 'layout.reward.gpus')}: the reward group is unused because rewards come from "
                f"reward.{given[0]}"]
    return []


def planned_role_sizes(cfg: Config) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """(where, {role: (gpus, tp)}) for every allocation the job may get: the configured counts, or with
    layout.scale: proportional the counts re-planned for each node count from slurm.min_nodes (or slurm.nodes) to
    slurm.nodes (`where` says which; allocations the layout cannot fit are left to `scaled_layout_problems`)."""
    layout, slurm = cfg.layout, cfg.slurm
    sizes = {name: (role.gpus, role.tp) for name, role in layout.roles().items()}
    if layout.scale != "proportional":
        return [("", sizes)]
    shares = {name: role.share_with for name, role in layout.roles().items() if role.share_with}
    planned = []
    for nodes in range(max(1, slurm.min_nodes or slurm.nodes), slurm.nodes + 1):
        ranks = nodes * slurm.gpus_per_node
        try:
            planned.append((f", as re-planned for {nodes} node(s) x {slurm.gpus_per_node} = {ranks} ranks",
                            scale_role_sizes(sizes, shares, layout.colocate, ranks, ROLE_NAMES)))
        except ScaleError:
            continue
    return planned


def check_batches(cfg: Config, sources: dict[str, str]) -> list[str]:
    """Batch sizes must divide evenly across engines and optimizer steps."""
    errors = []
    rollout, train = cfg.rollout, cfg.train
    for key in ("rollout.batch_size", "rollout.n_samples_per_prompt", "rollout.micro_batch_size",
                "rollout.generate_max_len", "rollout.prompt_max_len", "train.train_batch_size",
                "train.micro_train_batch_size", "train.num_episodes", "train.max_epochs"):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) < 1:
            errors.append(f"{src(sources, key)}: must be >= 1")
    if errors:
        return errors
    samples = rollout.batch_size * rollout.n_samples_per_prompt
    if train.trainer == "ppo" and samples % train.train_batch_size:
        errors.append(f"{src(sources, 'train.train_batch_size')}: rollout.batch_size x n_samples_per_prompt = "
                      f"{rollout.batch_size} x {rollout.n_samples_per_prompt} = {samples} samples is not a multiple "
                      f"of train_batch_size={train.train_batch_size}")
    tp_size, ring = cfg.ds.tensor_parallel_size, cfg.ds.ring_attn_size
    split = max(tp_size, 1) * max(ring, 1)  # ranks that take the same samples: a tensor- or sequence-parallel block
    for where, sizes in planned_role_sizes(cfg):
        (generators, tp), (actors, _) = sizes["generator"], sizes["actor"]
        engines = generators // max(tp, 1)
        if engines and rollout.batch_size % engines:
            errors.append(f"{src(sources, 'rollout.batch_size')}: {rollout.batch_size} prompts do not split evenly "
                          f"over {engines} generator engines (generator.gpus / tp = {generators} / {tp}{where})")
        dp = actors // split if actors % split == 0 else 0  # the parallelism checks say why not
        per_step = train.micro_train_batch_size * dp
        if dp and train.train_batch_size % per_step:
            ranks = ("actor.gpus" if split == 1 else f"actor.gpus / ds.ring_attn_size = {actors} / {ring}"
                     if ring > 1 else f"actor.gpus / ds.tensor_parallel_size = {actors} / {tp_size}")
            errors.append(f"{src(sources, 'train.train_batch_size', 'train.micro_train_batch_size')}: "
                          f"train_batch_size={train.train_batch_size} is not a multiple of micro_train_batch_size x "
                          f"data-parallel ranks ({ranks}) = {train.micro_train_batch_size} x {dp} = {per_step}{where}")
    if rollout.temperature < 0 or not 0 < rollout.top_p <= 1:
        errors.append(f"{src(sources, 'rollout.temperature', 'rollout.top_p')}: need temperature >= 0 and "
                      f"0 < top_p <= 1")
    return errors


def check_colocated_async(cfg: Config, sources: dict[str, str]) -> list[str]:
    """Colocated async: each rank generates the next iteration in a thread while it trains on the last one
    (trainers/ppo/overlap.py), so both halves stay resident and the thread must hold no collectives."""
    errors = []
    key = "rollout.async_queue"
    if cfg.rollout.async_queue > 1:
        errors.append(f"{src(sources, key, 'layout.colocate')}: colocated, generation runs one iteration ahead at "
                      f"most (the next one is generated while the last one trains); use 1, or generators of their "
                      f"own (layout.colocate: false)")
    if cfg.vllm.enable_sleep:
        errors.append(f"{src(sources, 'vllm.enable_sleep', key)}: colocated async keeps the engine awake while the "
                      f"update runs beside it; set vllm.enable_sleep: false")
    if cfg.ds.enable_sleep:
        errors.append(f"{src(sources, 'ds.enable_sleep', key)}: colocated async keeps the optimizer states on the "
                      f"device while generation runs beside them; set ds.enable_sleep: false")
    if cfg.layout.generator.tp > 1:
        errors.append(f"{src(sources, 'layout.generator.tp', key)}: colocated async generates in a thread beside "
                      f"the update, where a tensor-parallel engine's collectives would interleave with the "
                      f"trainers'; use generator.tp: 1 or layout.colocate: false")
    if cfg.rollout.dynamic_filtering:
        errors.append(f"{src(sources, 'rollout.dynamic_filtering', key)}: dynamic filtering counts kept groups "
                      f"across generators, a collective that colocated async would run beside the trainers'; use "
                      f"layout.colocate: false")
    if cfg.rollout.partial_rollout:
        errors.append(f"{src(sources, 'rollout.partial_rollout', key)}: partial rollouts pause generators for the "
                      f"weight update, which needs generators of their own (layout.colocate: false)")
    return errors


def check_modes(cfg: Config, sources: dict[str, str]) -> list[str]:
    """Async, backends and multi-turn settings that cannot work together."""
    errors = []
    if cfg.rollout.async_queue < 0:
        errors.append(f"{src(sources, 'rollout.async_queue')}: must be >= 0")
    if cfg.rollout.async_queue > 0 and cfg.layout.colocate:
        errors += check_colocated_async(cfg, sources)
    if cfg.vllm.backend == "hf" and cfg.layout.generator.tp > 1:
        errors.append(f"{src(sources, 'layout.generator.tp', 'vllm.backend')}: the hf backend has no tensor "
                      f"parallelism; use vllm.backend: vllm or generator.tp: 1")
    if cfg.rollout.max_turns > 1 and not cfg.rollout.agent_func_path:
        errors.append(f"{src(sources, 'rollout.max_turns')}: multi-turn rollouts need rollout.agent_func_path")
    if cfg.ds.param_offload and cfg.ds.zero_stage != 3:
        errors.append(f"{src(sources, 'ds.param_offload')}: parameter offload needs ds.zero_stage: 3")
    if cfg.train.device == "cpu" and cfg.ds.bf16:
        errors.append(f"{src(sources, 'ds.bf16', 'train.device')}: bf16 training is for GPUs; leave ds.bf16 empty "
                      f"or false on train.device: cpu")
    for section in ("actor", "critic"):
        if getattr(cfg, section).compile and (cfg.ds.zero_stage == 3 or cfg.ds.ring_attn_size > 1):
            errors.append(f"{src(sources, f'{section}.compile', 'ds.zero_stage', 'ds.ring_attn_size')}: compiled "
                          f"layers are wired for ZeRO stages 0-2 without sequence parallelism")
    return errors


def check_sequence_parallel(cfg: Config, sources: dict[str, str]) -> list[str]:
    """ds.ring_attn_size: PPO only, packed micro-batches, SDPA or eager attention, and it divides the ranks of the
    actor, critic, reward model and reference."""
    ring, key = cfg.ds.ring_attn_size, src(sources, "ds.ring_attn_size")
    if ring < 1:
        return [f"{key}: must be >= 1 (1 = no sequence parallelism), got {ring}"]
    if ring == 1:
        return []
    errors = []
    if cfg.train.trainer != "ppo":
        errors.append(f"{key}: sequence parallelism is wired for train.trainer ppo, not {cfg.train.trainer}")
    if not cfg.train.packing_samples:
        errors.append(f"{key}: sequence parallelism splits packed rows; set train.packing_samples: true")
    for section in ("actor", "critic"):
        if getattr(cfg, section).attn_implementation in ("flash_attention_2", "varlen"):
            errors.append(f"{src(sources, f'{section}.attn_implementation', 'ds.ring_attn_size')}: sequence "
                          f"parallelism runs its own SDPA attention; use sdpa (or eager) with ds.ring_attn_size={ring}")
    if cfg.actor.aux_loss_coef > 0:
        errors.append(f"{src(sources, 'ds.ring_attn_size', 'actor.aux_loss_coef')}: the MoE load-balancing loss is "
                      f"not computed over a split sequence; use one or the other")
    if cfg.lora.rank > 0:
        errors.append(f"{src(sources, 'ds.ring_attn_size', 'lora.rank')}: sequence parallelism is not wired for a "
                      f"LoRA actor; use one or the other")
    for role in SEQUENCE_PARALLEL_ROLES:
        gpus = getattr(cfg.layout, role).gpus
        if gpus > 0 and gpus % ring:
            errors.append(f"{src(sources, 'ds.ring_attn_size', f'layout.{role}.gpus')}: ds.ring_attn_size={ring} "
                          f"does not divide layout.{role}.gpus={gpus} ({gpus} % {ring} = {gpus % ring})")
    return errors


def check_attention(cfg: Config, sources: dict[str, str]) -> list[str]:
    """attn_implementation varlen attends within the samples of packed rows: it needs train.packing_samples."""
    errors = []
    for section in ("actor", "critic"):
        if getattr(cfg, section).attn_implementation == "varlen" and not cfg.train.packing_samples:
            errors.append(f"{src(sources, f'{section}.attn_implementation', 'train.packing_samples')}: varlen "
                          f"attention runs on packed rows; set train.packing_samples: true (or use sdpa)")
    return errors


def check_supervised(cfg: Config, sources: dict[str, str]) -> list[str]:
    """The supervised and preference trainers: every rank is an actor, and each trainer's own settings."""
    trainer = cfg.train.trainer
    errors = check_lora(cfg, sources)
    if trainer not in SUPERVISED_TRAINERS:
        return errors
    layout, pref = cfg.layout, cfg.pref
    if not layout.colocate:
        errors.append(f"{src(sources, 'layout.colocate', 'train.trainer')}: train.trainer {trainer} runs every role "
                      f"on every rank; set layout.colocate: true")
    if layout.critic.gpus > 0:
        errors.append(f"{src(sources, 'layout.critic.gpus')}: train.trainer {trainer} has no critic")
    if cfg.data.max_len < 2:
        errors.append(f"{src(sources, 'data.max_len')}: must be >= 2 (one prompt and one response token)")
    if trainer in PAIRWISE_TRAINERS and cfg.train.max_tokens_per_microbatch is not None:
        errors.append(f"{src(sources, 'train.max_tokens_per_microbatch', 'train.trainer')}: {trainer} keeps "
                      f"compared samples in one micro-batch, so it batches by train.micro_train_batch_size only")
    if trainer in ("dpo", "iterative_dpo", "kto") and pref.beta <= 0:
        errors.append(f"{src(sources, 'pref.beta')}: must be > 0, got {pref.beta}")
    if not 0.0 <= pref.label_smoothing < 0.5:
        errors.append(f"{src(sources, 'pref.label_smoothing')}: must be in [0, 0.5), got {pref.label_smoothing}")
    if pref.loss_type == "ipo" and pref.label_smoothing > 0:
        errors.append(f"{src(sources, 'pref.label_smoothing', 'pref.loss_type')}: label smoothing (cDPO) applies "
                      f"to pref.loss_type dpo, not ipo")
    if (pref.ref_chosen_logps_key is None) != (pref.ref_rejected_logps_key is None):
        errors.append(f"{src(sources, 'pref.ref_chosen_logps_key', 'pref.ref_rejected_logps_key')}: precomputed "
                      f"reference log-probs need both columns, or neither")
    if trainer == "iterative_dpo" and pref.ref_chosen_logps_key is not None:
        errors.append(f"{src(sources, 'pref.ref_chosen_logps_key')}: iterative_dpo scores its own generated pairs "
                      f"with the reference model; precomputed columns cannot exist for them")
    if trainer == "kto":
        per_rank = cfg.train.train_batch_size // max(layout.actor.gpus, 1)
        if per_rank < 2:
            errors.append(f"{src(sources, 'train.train_batch_size')}: kto pairs each prompt with another sample's "
                          f"response, so each actor rank needs >= 2 samples per step (train_batch_size / actor.gpus "
                          f"= {cfg.train.train_batch_size} / {layout.actor.gpus} = {per_rank})")
    if trainer == "iterative_dpo":
        if pref.rounds < 1:
            errors.append(f"{src(sources, 'pref.rounds')}: must be >= 1, got {pref.rounds}")
        if cfg.rollout.n_samples_per_prompt < 2:
            errors.append(f"{src(sources, 'rollout.n_samples_per_prompt')}: iterative_dpo pairs the best and the "
                          f"worst of each prompt's responses, so it needs n_samples_per_prompt >= 2")
    if trainer == "kd":
        if not cfg.kd.teacher_pretrain:
            errors.append(f"{src(sources, 'kd.teacher_pretrain', 'train.trainer')}: knowledge distillation needs a "
                          f"teacher model")
        if not 0.0 <= cfg.kd.kd_coef <= 1.0:
            errors.append(f"{src(sources, 'kd.kd_coef')}: must be in [0, 1], got {cfg.kd.kd_coef}")
    if trainer == "prm" and len(cfg.prm.reward_tokens) != 2:
        errors.append(f"{src(sources, 'prm.reward_tokens')}: needs exactly [good, bad], got {cfg.prm.reward_tokens}")
    if trainer == "rejection_sampling" and cfg.rejection_sampling.rounds < 1:
        errors.append(f"{src(sources, 'rejection_sampling.rounds')}: must be >= 1")
    if trainer == "sft" and cfg.sft.pretrain_mode and cfg.sft.multiturn:
        errors.append(f"{src(sources, 'sft.pretrain_mode', 'sft.multiturn')}: choose pretrain_mode (plain text) or "
                      f"multiturn (chats), not both")
    if trainer == "sft" and cfg.sft.multiturn and not cfg.data.apply_chat_template:
        errors.append(f"{src(sources, 'sft.multiturn', 'data.apply_chat_template')}: multi-turn chats are rendered "
                      f"with the chat template; set data.apply_chat_template: true")
    return errors


# Trainers whose generator runs the trained policy: a LoRA actor reaches it merged (distributed/weights.py).
GENERATING_TRAINERS = ("ppo", "rejection_sampling", "iterative_dpo")
# The trainers whose trained model is the causal-LM actor (`training/models.py:Actor`), which adds the MoE
# load-balancing loss; rm, prm and kd train other heads and forwards.
AUX_LOSS_TRAINERS = ("ppo", "sft", "dpo", "iterative_dpo", "kto", "rejection_sampling")


def check_moe(cfg: Config, sources: dict[str, str]) -> list[str]:
    """actor.aux_loss_coef: >= 0, and only for the trainers that train the causal-LM actor."""
    coef = cfg.actor.aux_loss_coef
    if coef < 0:
        return [f"{src(sources, 'actor.aux_loss_coef')}: must be >= 0 (0 = off), got {coef}"]
    if coef > 0 and cfg.train.trainer not in AUX_LOSS_TRAINERS:
        return [f"{src(sources, 'actor.aux_loss_coef', 'train.trainer')}: the MoE load-balancing loss is added by "
                f"the causal-LM actor of {', '.join(AUX_LOSS_TRAINERS)}, not by train.trainer {cfg.train.trainer}; "
                f"set it to 0"]
    return []


# The trainers wired for DeepSpeed AutoTP training: their data follows the data-parallel rank (ranks / tp), so every
# rank of a tensor-parallel block trains on the same rows.
TP_TRAINERS = ("sft",)


def check_tensor_parallel(cfg: Config, sources: dict[str, str]) -> list[str]:
    """ds.tensor_parallel_size: the actor's ranks split into whole blocks inside a node, ZeRO 0-2, sft only."""
    tp, actor_gpus, per_node = cfg.ds.tensor_parallel_size, cfg.layout.actor.gpus, cfg.slurm.gpus_per_node
    if tp < 1:
        return [f"{src(sources, 'ds.tensor_parallel_size')}: must be >= 1, got {tp}"]
    if tp == 1:
        return []
    key = src(sources, "ds.tensor_parallel_size")
    errors = []
    if cfg.train.trainer not in TP_TRAINERS:
        errors.append(f"{key}: DeepSpeed AutoTP training is wired for train.trainer {', '.join(TP_TRAINERS)}, not "
                      f"{cfg.train.trainer}")
    if cfg.ds.zero_stage > 2:
        errors.append(f"{src(sources, 'ds.tensor_parallel_size', 'ds.zero_stage')}: AutoTP training needs "
                      f"ds.zero_stage <= 2, got {cfg.ds.zero_stage}")
    if actor_gpus % tp:
        errors.append(f"{key}: actor.gpus={actor_gpus} is not a multiple of ds.tensor_parallel_size={tp} "
                      f"({actor_gpus} % {tp} = {actor_gpus % tp})")
    if per_node % tp:
        errors.append(f"{src(sources, 'ds.tensor_parallel_size', 'slurm.gpus_per_node')}: {tp} must divide "
                      f"slurm.gpus_per_node={per_node} so that no tensor-parallel block spans two nodes")
    if cfg.lora.rank > 0:
        errors.append(f"{src(sources, 'ds.tensor_parallel_size', 'lora.rank')}: AutoTP shards the base model's "
                      f"linear layers, which LoRA wraps; use one or the other")
    return errors


def check_lora(cfg: Config, sources: dict[str, str]) -> list[str]:
    """LoRA sizes, QLoRA only on top of LoRA, and the trainers that take adapters."""
    errors = []
    lora = cfg.lora
    if lora.rank < 0:
        errors.append(f"{src(sources, 'lora.rank')}: must be >= 0 (0 = off), got {lora.rank}")
    if lora.rank > 0 and lora.alpha <= 0:
        errors.append(f"{src(sources, 'lora.alpha')}: must be > 0, got {lora.alpha}")
    if not 0.0 <= lora.dropout < 1.0:
        errors.append(f"{src(sources, 'lora.dropout')}: must be in [0, 1), got {lora.dropout}")
    if lora.rank > 0 and not lora.target_modules:
        errors.append(f"{src(sources, 'lora.target_modules')}: name at least one module (or all-linear)")
    if lora.load_in_4bit and lora.rank == 0:
        errors.append(f"{src(sources, 'lora.load_in_4bit', 'lora.rank')}: QLoRA trains LoRA adapters on a 4-bit "
                      f"base; set lora.rank > 0")
    if lora.rank > 0 and cfg.train.trainer == "prm":
        errors.append(f"{src(sources, 'lora.rank', 'train.trainer')}: LoRA is wired for sft, rm, dpo, kto, kd, ppo, "
                      f"rejection_sampling and iterative_dpo, not prm")
    if lora.load_in_4bit and cfg.train.trainer in GENERATING_TRAINERS:
        errors.append(f"{src(sources, 'lora.load_in_4bit', 'train.trainer')}: {cfg.train.trainer} merges the adapters "
                      f"into the base weights for its generator, which a 4-bit base cannot take; set "
                      f"lora.load_in_4bit: false")
    return errors


def check_images(cfg: Config, sources: dict[str, str]) -> list[str]:
    """Vision-language RL (data.max_images_per_prompt > 0) runs the PPO trainer without a critic, a reward model, an
    agent or packing: those read token ids only and would not see the images."""
    count = cfg.data.max_images_per_prompt
    if not count:
        return []
    key = src(sources, "data.max_images_per_prompt")
    if count < 0:
        return [f"{key}: must be >= 0 (0 = text only), got {count}"]
    unsupported = [(cfg.train.trainer != "ppo", "train.trainer must be ppo"),
                   (cfg.algo.advantage_estimator == "gae", "no critic: use a critic-free algo.advantage_estimator"),
                   (bool(cfg.reward.pretrain), "no reward model: score with reward.reward_func_path or remote_url"),
                   (bool(cfg.rollout.agent_func_path), "no multi-turn agent (rollout.agent_func_path)"),
                   (cfg.train.packing_samples, "no train.packing_samples (images stay with their rows)")]
    return [f"{key}: prompts with images need {why}" for bad, why in unsupported if bad]


def check_config(cfg: Config, sources: dict[str, str]) -> list[str]:
    """All cross-field rules; an empty list means the config can run."""
    return (check_layout(cfg, sources) + check_algorithm(cfg, sources) + check_rewards(cfg, sources)
            + check_batches(cfg, sources) + check_modes(cfg, sources) + check_sequence_parallel(cfg, sources)
            + check_supervised(cfg, sources) + check_data(cfg, sources) + check_images(cfg, sources)
            + check_moe(cfg, sources) + check_tensor_parallel(cfg, sources) + check_attention(cfg, sources))


# ----- checks against this machine: files and devices, before any model loads or any rank starts --------------------
