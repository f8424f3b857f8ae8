"""An OpenRLHF command line -> the hpc_rlhf config that runs the same recipe (`tools/from_openrlhf.py` is the CLI).

OpenRLHF spells its flags two ways: the older flat names (`--actor_learning_rate`, `--advantage_estimator`) and the
nested groups of its current releases (`--actor.adam.lr`, `--algo.advantage.estimator`). The table in
`hpc_rlhf.config.openrlhf_flags` lists every flag we know in both spellings with the config keys it sets; a flag with a
`note` has no equivalent here and is reported, with the reason, instead of being translated; an unknown flag is
reported too. Flags left out of the command take OpenRLHF's default where it differs from hpc_rlhf's and changes what
is trained (`OPENRLHF_DEFAULTS`: `advantage_estimator gae`, `init_kl_coef 0.01`, ...). A few settings follow from
several flags together (the GPU layout, KL in the loss or in the reward, the reward source, lengths, off-policy
correction): `Flag.derived` marks those flags and the `_derive_*` functions below set their keys. Every value is
checked against the config's types and choices as it is set, so an error names the OpenRLHF flag.

    config, notes = migrate(["--pretrain", "Qwen/Qwen2.5-7B", "--advantage_estimator", "group_norm", ...])
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from hpc_rlhf.config.schema import Config
from hpc_rlhf.config.preflight import HUB_ID
from hpc_rlhf.config.loading import apply_mapping
from hpc_rlhf.data.records import FILE_SUFFIXES
from hpc_rlhf.config.openrlhf_flags import (ENTRY_TRAINERS, FLAG, FLOAT, FLOATS, INT, OPENRLHF_DEFAULTS,
                                     OPENRLHF_GPUS_PER_NODE, OTHER_ENTRIES, REQUIRED, STR, STRS, Flag, flags_for)


class MigrationError(ValueError):
    """Values that cannot be translated; each line names the OpenRLHF flag."""


@dataclass(frozen=True)
class Note:
    """An OpenRLHF flag (or a missing one) that the config cannot express, and why."""

    flag: str
    reason: str

    def __str__(self) -> str:
        return f"{self.flag}: {self.reason}"


def trainer_for_entry(entry: str) -> str:
    """train.trainer for an OpenRLHF entry module (`train_ppo_ray` or `openrlhf.cli.train_ppo_ray`)."""
    name = entry.rsplit(".", 1)[-1]
    if name in ENTRY_TRAINERS:
        return ENTRY_TRAINERS[name]
    hint = f": {OTHER_ENTRIES[name]}" if name in OTHER_ENTRIES else ""
    raise MigrationError(f"openrlhf.cli.{name}: no hpc_rlhf trainer for this entry{hint} (translated entries: "
                         f"{', '.join(ENTRY_TRAINERS)})")


class _Migration:
    """The state of one translation: the flat config being built, the flags given, notes and errors."""

    def __init__(self, entry: str):
        self.entry = entry.rsplit(".", 1)[-1]
        self.trainer = trainer_for_entry(entry)
        trainer = self.trainer
        self.config: dict[str, Any] = {"train.trainer": trainer, **OPENRLHF_DEFAULTS[trainer]}
        self.given: dict[str, Any] = {}  # canonical flag name -> converted value
        self.spelled: dict[str, str] = {}  # canonical flag name -> the spelling used on the command line
        self.origin: dict[str, str] = {}  # key -> the flag that set it (keys without one hold OpenRLHF defaults)
        self.notes: list[Note] = []
        self.errors: list[str] = []

    def flag(self, name: str) -> str:
        return f"--{self.spelled.get(name, name)}"

    def set(self, key: str, value: Any, flag: str) -> bool:
        """Set one config key, checked against the config's types and choices; False (and an error line that starts
        with the flag) when the value does not fit."""
        problems = apply_mapping(Config(), _nest({key: value}), flag, {})
        if problems:  # the loader's `key (source): problem` -> `--flag -> key: problem`
            self.errors += [problem.replace(f"{key} ({flag}): ", f"{flag} -> {key}: ", 1) for problem in problems]
            return False
        self.config[key] = value
        self.origin[key] = flag
        return True

    def note(self, flag: str, reason: str) -> None:
        self.notes.append(Note(flag, reason))


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{"a.b.c": v} -> {"a": {"b": {"c": v}}}, sections and keys in the order of the `Config` dataclasses (keys it
    does not know last, so that the loader reports them)."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return _in_field_order(nested, Config())


def _in_field_order(nested: dict[str, Any], node: Any) -> dict[str, Any]:
    if not dataclasses.is_dataclass(node):
        return nested
    names = [f.name for f in dataclasses.fields(node)]
    ordered = {name: nested[name] for name in names if name in nested}
    ordered.update((name, value) for name, value in nested.items() if name not in ordered)
    return {name: _in_field_order(value, getattr(node, name, None)) if isinstance(value, dict) else value
            for name, value in ordered.items()}


def _parse_value(flag: Flag, words: list[str]) -> Any:
    """Command-line words -> a Python value of the flag's kind (ValueError with the reason when they do not fit)."""
    if flag.kind == FLAG:
        if words:
            raise ValueError(f"takes no value, got {' '.join(words)!r}")
        return True
    if flag.kind in (FLOATS, STRS):
        if not words and flag.kind == FLOATS:
            raise ValueError("expected numbers, got none")
        return [_number(w, float) for w in words] if flag.kind == FLOATS else list(words)
    if len(words) != 1:
        raise ValueError(f"expected one value, got {len(words)}" + (f": {' '.join(words)!r}" if words else ""))
    if flag.kind == INT:
        return _number(words[0], int)
    if flag.kind == FLOAT:
        return _number(words[0], float)
    return words[0]


def _number(word: str, kind: type) -> Any:
    try:
        value = float(word)
    except ValueError:
        raise ValueError(f"expected {'an integer' if kind is int else 'a number'}, got {word!r}") from None
    if kind is int:
        if not value.is_integer():
            raise ValueError(f"expected an integer, got {word!r}")
        return int(value)
    return value


def _split_flags(argv: Sequence[str]) -> list[tuple[str, list[str]]]:
    """`--name value ...` / `--name=value` -> (name, words); words that follow no flag come as ("", words)."""
    pairs: list[tuple[str, list[str]]] = []
    for word in argv:
        if word.startswith("--") and len(word) > 2:
            name, eq, value = word[2:].partition("=")
            pairs.append((name, [value] if eq else []))
        elif pairs:
            pairs[-1][1].append(word)
        else:
            pairs.append(("", [word]))
    return pairs


def _read_flags(m: _Migration, argv: Sequence[str]) -> None:
    """Parse the command line into `m.given`; set the keys of plain flags; note unknown and untranslated flags."""
    table = flags_for(m.trainer)
    for name, words in _split_flags(argv):
        if not name:
            m.note(" ".join(words), "a value without a flag; not translated")
            continue
        flag = table.get(name)
        if flag is None:
            m.note(f"--{name}", f"unknown flag of openrlhf.cli.{m.entry} (not in the table); not translated")
            continue
        if flag.kind in (STR, INT, FLOAT) and len(words) > 1:  # a flag's one value, then stray words
            m.note(" ".join(words[1:]), f"words after --{name} {words[0]}; not translated")
            words = words[:1]
        try:
            value = _parse_value(flag, words)
        except ValueError as err:
            m.errors.append(f"--{name}: {err}")
            continue
        m.given[flag.name] = value
        m.spelled[flag.name] = name
        if flag.note:
            if not (flag.inert and words and words[0] in flag.inert):
                m.note(f"--{name}", f"no equivalent: {flag.note}")
            continue
        if flag.derived:
            continue
        try:
            converted = flag.convert(value) if flag.convert else value
        except ValueError as err:
            m.errors.append(f"--{name}: {err}")
            continue
        for key in flag.keys:
            if (m.trainer == "ppo" or not key.startswith("critic.")) and not m.set(key, converted, f"--{name}"):
                break  # one error line per flag


def _derive_precision(m: _Migration) -> None:
    dtype = m.given.get("param_dtype")
    if dtype == "bf16":
        m.set("ds.bf16", True, m.flag("param_dtype"))
    elif dtype is not None:
        m.note(m.flag("param_dtype"), f"no equivalent for {dtype}: training is bf16 (ds.bf16) or fp32")


def _derive_lengths(m: _Migration) -> None:
    """Prompt and response budgets: OpenRLHF's max_len caps their sum; hpc_rlhf budgets them separately."""
    prompt, new, total = (m.given.get(k) for k in ("prompt_max_len", "generate_max_len", "max_len"))
    if new is not None:
        m.set("rollout.generate_max_len", new, m.flag("generate_max_len"))
    if prompt is not None:
        m.set("rollout.prompt_max_len", prompt, m.flag("prompt_max_len"))
    if total is None:
        return
    if new is not None and prompt is None:
        if total <= new:
            m.errors.append(f"{m.flag('max_len')}: {total} leaves no room for a prompt next to "
                            f"{m.flag('generate_max_len')} {new}")
        else:
            m.set("rollout.prompt_max_len", total - new, m.flag("max_len"))
    elif new is None and prompt is None:
        m.note(m.flag("max_len"), "no equivalent alone: OpenRLHF lets each response fill what its prompt leaves; "
               "here rollout.prompt_max_len and rollout.generate_max_len are separate budgets (give "
               "--generate_max_len / --rollout.max_new_tokens as well)")
    elif new is None:
        m.set("rollout.generate_max_len", max(total - prompt, 1), m.flag("max_len"))


def _derive_clip_and_kl(m: _Migration) -> None:
    if "eps_clip_low_high" in m.given:
        bounds = m.given["eps_clip_low_high"]
        if len(bounds) != 2:
            m.errors.append(f"{m.flag('eps_clip_low_high')}: expected two numbers (low high), got {len(bounds)}")
        else:
            m.set("algo.eps_clip_low", bounds[0], m.flag("eps_clip_low_high"))
            m.set("algo.eps_clip_high", bounds[1], m.flag("eps_clip_low_high"))
    elif "eps_clip" in m.given:
        m.set("algo.eps_clip_low", m.given["eps_clip"], m.flag("eps_clip"))
        m.set("algo.eps_clip_high", m.given["eps_clip"], m.flag("eps_clip"))
    coef = m.given.get("init_kl_coef", m.config["algo.init_kl_coef"])
    if m.given.get("use_kl_loss") and coef > 0:  # OpenRLHF weighs the KL loss by init_kl_coef
        m.set("algo.use_kl_loss", True, m.flag("use_kl_loss"))
        m.set("algo.kl_loss_coef", coef, m.flag("init_kl_coef"))
        m.set("algo.init_kl_coef", 0.0, m.flag("use_kl_loss"))
        if "kl_target" in m.given:
            m.note(m.flag("kl_target"), "with --use_kl_loss: the adaptive controller drives the KL penalty in the "
                   "reward; the KL loss keeps algo.kl_loss_coef fixed")
    else:  # with --use_kl_loss and init_kl_coef 0 OpenRLHF computes no KL at all
        m.set("algo.init_kl_coef", coef if not m.given.get("use_kl_loss") else 0.0, m.flag("init_kl_coef"))


def _derive_correction(m: _Migration) -> None:
    """Off-policy correction: the flat `enable_vllm_is_correction` + type, or the nested level/mode/gating."""
    level = m.given.get("algo.advantage.is_correction_level")
    mode = m.given.get("algo.advantage.is_correction_mode", "mask")
    gating = m.given.get("algo.advantage.is_correction_gating", "ratio")
    kind = None
    if m.given.get("enable_vllm_is_correction"):
        kind = m.given.get("vllm_is_correction_type", "tis").replace("-", "_")
        where = m.flag("vllm_is_correction_type")
    elif level is not None and level != "off":
        where = m.flag("algo.advantage.is_correction_level")
        kind = {("token", "clip"): "tis", ("token", "mask"): "icepop", ("seq", "mask"): "seq_mask_tis"}.get(
            (level, mode))
        if kind is None:
            m.errors.append(f"{where}: {level} with --algo.advantage.is_correction_mode {mode} has no equivalent "
                            f"(token + clip, token + mask or seq + mask)")
            return
        if gating != "ratio":
            m.note(m.flag("algo.advantage.is_correction_gating"), f"no equivalent for {gating}: the correction "
                   f"gates on the importance ratio; not translated")
            return
    if kind is None:
        return
    m.set("algo.off_policy_correction", kind, where)
    bounds = m.given.get("vllm_is_truncated_threshold")
    if bounds is not None:
        if len(bounds) != 2:
            m.errors.append(f"{m.flag('vllm_is_truncated_threshold')}: expected two numbers (low high), got "
                            f"{len(bounds)}")
        else:
            m.set("algo.is_low", bounds[0], m.flag("vllm_is_truncated_threshold"))
            m.set("algo.is_high", bounds[1], m.flag("vllm_is_truncated_threshold"))
    elif "algo.is_low" not in m.config:  # OpenRLHF's default interval
        m.set("algo.is_low", 0.5, where)
        m.set("algo.is_high", 5.0, where)


def _derive_rewards(m: _Migration) -> None:
    """One reward source (OpenRLHF: the agent, else the remote URL or reward file, else the reward model) and the
    critic's weights (gae: --critic_pretrain, else the reward model, else the policy)."""
    model, url, agent = (m.given.get(k) for k in ("reward_pretrain", "remote_rm_url", "agent_func_path"))
    if agent:
        m.set("rollout.agent_func_path", agent, m.flag("agent_func_path"))
        m.note(m.flag("agent_func_path"), "OpenRLHF runs an agent until it says done; here a trajectory has at "
               "most rollout.max_turns turns (written: 1): raise it for multi-turn agents")
    elif url:
        files = [part.endswith(".py") for part in url.split(",")]
        if all(files) and len(files) == 1:
            m.set("reward.reward_func_path", url, m.flag("remote_rm_url"))
        elif any(files):
            m.errors.append(f"{m.flag('remote_rm_url')}: {url!r}: give one reward file, or HTTP URLs only")
        else:
            m.set("reward.remote_url", url, m.flag("remote_rm_url"))
    elif model:
        if "," in model:
            m.errors.append(f"{m.flag('reward_pretrain')}: {model!r}: several reward models have no equivalent; "
                            f"a run scores with one (reward.pretrain)")
        else:
            m.set("reward.pretrain", model, m.flag("reward_pretrain"))
    else:
        m.note("--reward_pretrain / --remote_rm_url", "not given: set reward.pretrain, reward.remote_url or "
               "reward.reward_func_path")
    if model and (url or agent):
        source = m.flag("agent_func_path" if agent else "remote_rm_url")
        m.note(m.flag("reward_pretrain"), f"unused: the rewards come from {source} (as in OpenRLHF)")
    critic = m.given.get("critic_pretrain")
    if m.config.get("algo.advantage_estimator") != "gae":
        if critic:
            m.note(m.flag("critic_pretrain"), f"unused: {m.config.get('algo.advantage_estimator')} has no critic")
    elif critic or (model and not url and not agent and "," not in model):
        m.set("critic.pretrain", critic or model, m.flag("critic_pretrain" if critic else "reward_pretrain"))


def _role_size(m: _Migration, role: str) -> tuple[int, int]:
    """(ranks, ranks per node) of an OpenRLHF role from --{role}_num_nodes x --{role}_num_gpus_per_node."""
    per_node = m.given.get(f"{role}_num_gpus_per_node", OPENRLHF_GPUS_PER_NODE)
    return m.given.get(f"{role}_num_nodes", 1) * per_node, per_node


def _size_flag(m: _Migration, role: str) -> Optional[str]:
    """The size flag of an OpenRLHF role given on the command line (as spelled there), or None."""
    given = [name for name in (f"{role}_num_gpus_per_node", f"{role}_num_nodes") if name in m.given]
    return m.flag(given[0]) if given else None


# the flag that puts a role on another role's ranks (disaggregated layouts)
SHARE_FLAGS = {"reference": "colocate_actor_ref", "critic": "colocate_all_models",
               "reward": "colocate_critic_reward"}


def _derive_ppo_layout(m: _Migration) -> None:
    """OpenRLHF's placement -> layout and slurm: colocated (hybrid engine) or one rank group per role."""
    present = {"critic": m.config.get("algo.advantage_estimator") == "gae",
               "reference": m.config.get("algo.init_kl_coef", 0) > 0 or m.config.get("algo.use_kl_loss", False),
               "reward": bool(m.config.get("reward.pretrain"))}
    size = {"actor": _role_size(m, "actor"), "critic": _role_size(m, "critic"), "reference": _role_size(m, "ref"),
            "reward": _role_size(m, "reward")}
    flag_role = {"critic": "critic", "reference": "ref", "reward": "reward"}  # hpc_rlhf role -> OpenRLHF's
    for role, used in present.items():
        if not used and _size_flag(m, flag_role[role]):
            m.note(_size_flag(m, flag_role[role]), f"unused: this run has no {role} (as in OpenRLHF)")
    engines, tp = m.given.get("vllm_num_engines"), m.given.get("vllm_tensor_parallel_size", 1)
    actors, actor_per_node = size["actor"]
    all_together = m.given.get("colocate_all_models", False)
    asynchronous = bool(m.given.get("async_train"))
    if engines is None:
        m.note("--vllm_num_engines", "not given: OpenRLHF then generates with the actor itself; here the generator "
               "shares the actor's GPUs in the colocated layout (layout.colocate: true)")
        all_together, asynchronous, engines = True, False, max(actors // tp, 1)
    if asynchronous:
        m.set("rollout.async_queue", m.given.get("async_queue_size", 1), m.flag("async_train"))
    elif m.given.get("async_train"):
        m.note(m.flag("async_train"), "async generation needs generator GPUs of its own: colocated, the run is "
               "synchronous")
    if m.given.get("partial_rollout") and not asynchronous:
        m.config.pop("rollout.partial_rollout", None)
        m.note(m.flag("partial_rollout"), "unused: responses continue across a weight update only in an "
               "asynchronous run (--async_train with generator GPUs of its own)")
    if all_together and not asynchronous:
        if engines * tp != actors:
            m.errors.append(f"{m.flag('vllm_num_engines')}: colocated, vllm_num_engines x vllm_tensor_parallel_size "
                            f"= {engines} x {tp} must equal the actor's {actors} GPUs")
            return
        m.set("layout.colocate", True, m.flag("colocate_all_models"))
        for role in ("generator", "actor", "critic", "reward", "reference"):
            m.set(f"layout.{role}.gpus", actors if role in ("generator", "actor") or present[role] else 0,
                  m.flag("actor_num_gpus_per_node"))
            if role in flag_role and present[role] and _size_flag(m, flag_role[role]) and size[role][0] != actors:
                m.note(_size_flag(m, flag_role[role]), f"colocated: the {role} runs on the actor's {actors} GPUs, "
                       f"not {size[role][0]}")
        m.set("layout.generator.tp", tp, m.flag("vllm_tensor_parallel_size"))
        _set_slurm(m, actors, actor_per_node)
        return
    # one rank group per role; with async + colocate_all OpenRLHF colocates the DeepSpeed models only
    shares = {"reference": "actor" if all_together or m.given.get("colocate_actor_ref") else None,
              "critic": "actor" if all_together else None,
              "reward": "actor" if all_together else "critic" if m.given.get("colocate_critic_reward") else None}
    if shares["reward"] == "critic" and not present["critic"]:
        m.note(m.flag("colocate_critic_reward"), "unused: this run has no critic")
        shares["reward"] = None
    m.set("layout.colocate", False, m.flag("colocate_all_models"))
    m.set("layout.generator.gpus", engines * tp, m.flag("vllm_num_engines"))
    m.set("layout.generator.tp", tp, m.flag("vllm_tensor_parallel_size"))
    m.set("layout.actor.gpus", actors, m.flag("actor_num_gpus_per_node"))
    per_node = [actor_per_node]
    for role in ("critic", "reward", "reference"):
        gpus, role_per_node = size[role] if present[role] else (0, 0)
        if present[role] and shares[role]:
            gpus = m.config[f"layout.{shares[role]}.gpus"]
            m.set(f"layout.{role}.share_with", shares[role], m.flag(SHARE_FLAGS[role]))
        elif present[role]:
            per_node.append(role_per_node)
        m.set(f"layout.{role}.gpus", gpus, m.flag(f"{flag_role[role]}_num_gpus_per_node"))
    world = sum(m.config[f"layout.{role}.gpus"] for role in ("generator", "actor", "critic", "reward", "reference")
                if not m.config.get(f"layout.{role}.share_with"))
    _set_slurm(m, world, max(per_node))


def _set_slurm(m: _Migration, world: int, per_node: int) -> None:
    """slurm.nodes x slurm.gpus_per_node = the job's ranks, with at most `per_node` GPUs on a node."""
    if world <= per_node:
        nodes, per_node = 1, world
    elif world % per_node:
        fitting = math.gcd(world, per_node)
        m.note("--*_num_nodes / --*_num_gpus_per_node", f"the roles add up to {world} GPUs, not a multiple of "
               f"{per_node} per node: written as {world // fitting} nodes x {fitting} GPUs (slurm.nodes, "
               f"slurm.gpus_per_node)")
        nodes, per_node = world // fitting, fitting
    else:
        nodes = world // per_node
    m.set("slurm.nodes", nodes, "--*_num_nodes")
    m.set("slurm.gpus_per_node", per_node, "--*_num_gpus_per_node")


def _derive_ppo(m: _Migration) -> None:
    _derive_lengths(m)
    _derive_clip_and_kl(m)
    _derive_correction(m)
    _derive_rewards(m)
    if m.given.get("use_dynamic_batch"):
        m.set("train.max_tokens_per_microbatch", m.given.get("train_max_tokens_per_gpu", 16192),
              m.flag("use_dynamic_batch"))
    if "async_queue_size" in m.given and not m.given.get("async_train"):
        m.note(m.flag("async_queue_size"), "unused without --async_train (as in OpenRLHF)")
    for name, needs in (("train_max_tokens_per_gpu", "use_dynamic_batch"),
                        ("vllm_is_correction_type", "enable_vllm_is_correction"),
                        ("vllm_is_truncated_threshold", "enable_vllm_is_correction")):
        if name in m.given and not m.given.get(needs) and not (needs == "enable_vllm_is_correction" and
                                                                "algo.advantage.is_correction_level" in m.given):
            m.note(m.flag(name), f"unused without --{needs} (as in OpenRLHF)")
    _derive_ppo_layout(m)
    estimator = m.config.get("algo.advantage_estimator")
    if estimator != "gae":  # no critic: drop its keys, and say so for the flags that only set them
        table = flags_for("ppo")
        for name in m.given:
            keys = table[name].keys
            if keys and not table[name].derived and all(k.startswith("critic.") or k == "algo.value_clip"
                                                        for k in keys):
                m.note(m.flag(name), f"unused: {estimator} has no critic (as in OpenRLHF)")
        for key in [key for key in m.config if key.startswith("critic.") or key == "algo.value_clip"]:
            del m.config[key]


def _derive_one_group(m: _Migration, launcher: Sequence[str]) -> None:
    """Trainers where every rank is an actor: the ranks come from the launcher (deepspeed --num_gpus/--num_nodes,
    torchrun --nproc_per_node/--nnodes); OpenRLHF's batch_inference with vLLM uses --tp_size GPUs."""
    options = dict(_split_flags(list(launcher)))
    per_node = _launcher_int(m, options, ("num_gpus", "nproc_per_node", "nproc-per-node"))
    nodes = _launcher_int(m, options, ("num_nodes", "nnodes")) or 1
    tp = m.given.get("tp_size", 1)
    if per_node is None:
        per_node = tp if "tp_size" in m.given else OPENRLHF_GPUS_PER_NODE
        if "tp_size" not in m.given:
            m.note("deepspeed --num_gpus", f"not given: deepspeed uses every GPU it sees; written as {nodes} node(s) "
                   f"x {per_node} GPUs (slurm.nodes, slurm.gpus_per_node)")
    world = nodes * per_node
    m.set("slurm.nodes", nodes, "deepspeed --num_nodes")
    m.set("slurm.gpus_per_node", per_node, "deepspeed --num_gpus")
    m.set("layout.colocate", True, "deepspeed --num_gpus")
    m.set("layout.generator.gpus", world, "deepspeed --num_gpus")
    m.set("layout.actor.gpus", world, "deepspeed --num_gpus")
    if "tp_size" in m.given:
        m.set("layout.generator.tp", tp, m.flag("tp_size"))
    if m.trainer == "rejection_sampling":
        _derive_batch_inference(m, world)
    if m.trainer in ("rm", "dpo") and "prompt_key" not in m.given:
        m.note("--prompt_key", "not given: OpenRLHF then reads whole conversations from the chosen and rejected "
               "columns; here the prompt is its own column (data.input_key, default 'input')")


def _derive_batch_inference(m: _Migration, world: int) -> None:
    task = m.given.get("eval_task")
    if task == "rm":
        model = m.config.pop("actor.pretrain", None)
        m.note(m.flag("eval_task"), "rm is the scoring step of OpenRLHF's rejection sampling; the rejection_sampling "
               "trainer generates, scores and keeps in one job: the reward model is written as reward.pretrain, "
               "set actor.pretrain to the policy of the generation step")
        if model:
            m.set("reward.pretrain", model, m.flag("pretrain"))
            m.set("layout.reward.gpus", world, m.flag("eval_task"))
    elif task not in (None, "generate", "generate_vllm"):
        m.errors.append(f"{m.flag('eval_task')}: {task!r} has no equivalent (generate, generate_vllm or rm)")
    else:
        m.note(m.flag("eval_task") if task else "--eval_task", "the generation step of OpenRLHF's rejection sampling: "
               "here the rejection_sampling trainer also scores and keeps the best response; set reward.pretrain "
               "(the rm step's --pretrain) or reward.reward_func_path")


def _launcher_int(m: _Migration, options: dict[str, list[str]], names: tuple[str, ...]) -> Optional[int]:
    for name in names:
        if name in options:
            try:
                return _number(options[name][0] if options[name] else "", int)
            except (ValueError, IndexError):
                m.errors.append(f"launcher --{name}: expected an integer, got {' '.join(options[name])!r}")
    return None


def _note_missing(m: _Migration) -> None:
    table = flags_for(m.trainer)
    for name in REQUIRED[m.trainer]:
        if name not in m.given:
            key = table[name].keys[0]
            section, field = key.split(".")
            default = getattr(getattr(Config(), section), field)
            m.note(f"--{name}", f"not given: {key} keeps hpc_rlhf's default {default!r}")


def _note_hub_datasets(m: _Migration) -> None:
    """OpenRLHF loads Hugging Face Hub datasets by name; hpc_rlhf reads local files."""
    for key in ("data.prompt_data", "data.dataset", "eval.data"):
        value = m.config.get(key) if key in m.origin else None
        if value and "/" in value and HUB_ID.match(value) and Path(value).suffix not in FILE_SUFFIXES:
            m.note(m.origin[key], f"{value!r} looks like a Hugging Face Hub dataset; hpc_rlhf reads local JSONL, "
                   f"JSON, Parquet or Arrow files (or a folder of them): save it to disk (datasets' to_json or "
                   f"save_to_disk) and point {key} there")


def migrate(argv: Sequence[str], entry: str = "train_ppo_ray", launcher: Sequence[str] = ()
            ) -> tuple[dict[str, Any], list[Note]]:
    """Translate an OpenRLHF command line (the flags after `openrlhf.cli.ENTRY`) into the hpc_rlhf config sections
    that run the same recipe, and the notes on what has no equivalent. `launcher` holds the words before the module
    (`deepspeed --num_gpus 8 --module`), which give the GPU count of the single-group trainers.

    Raises MigrationError, one line per flag, when a value cannot be converted.
    """
    m = _Migration(entry)
    _read_flags(m, argv)
    if not m.errors:
        _derive_precision(m)
        if m.trainer == "ppo":
            _derive_ppo(m)
        else:
            _derive_one_group(m, launcher)
        _note_missing(m)
        _note_hub_datasets(m)
    if m.config.get("eval.data") is None:  # no evaluation: its other settings are OpenRLHF defaults of no use
        for key in [key for key in m.config if key.startswith("eval.") and key != "eval.data"]:
            if key not in m.origin:
                del m.config[key]
    if m.errors:
        raise MigrationError("\n".join(m.errors))
    return _nest(m.config), m.notes
