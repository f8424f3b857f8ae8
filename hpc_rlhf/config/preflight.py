"""Checks that need the machine a run starts on: the device, model folders and names, dataset files and their rows.

The entry points run `check_machine` before any model loads (after `load_config`'s cross-field rules in `checks.py`),
so a missing file or a bad row is one line naming the key, the file and the row, not a traceback from a rank.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from hpc_rlhf.config.checks import PROMPT_TRAINERS, data_key, src, value_at
from hpc_rlhf.config.schema import Config
from hpc_rlhf.data import (
    DatasetError,
    check_prompt_rows,
    check_records,
    dataset_paths,
    interleave_order,
    probability_problems,
)
MODEL_KEYS = ("actor.pretrain", "critic.pretrain", "ref.pretrain", "reward.pretrain", "kd.teacher_pretrain")
MODEL_FILES = ("config.json", "adapter_config.json")  # a model folder (or a LoRA adapter folder) has one of these
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9_.-]+)?$")  # `name` or `org/name`
CHECK_ROWS = 10_000  # rows of each dataset read before starting: enough for the usual mistakes, cheap on big files


def model_spec_problem(spec: str) -> str | None:
    """Why a model spec cannot load (None when it can, or when it is a hub name this machine cannot check)."""
    from hpc_rlhf.builtin_models import resolve as builtin_models

    if spec.startswith(builtin_models.BUILTIN_PREFIX):
        return builtin_models.unknown_builtin(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not any((path / name).is_file() for name in MODEL_FILES):
            return f"{spec} is a folder but not a model folder (it has no {' or '.join(MODEL_FILES)})"
        return None
    if path.exists():
        return f"{spec} is a file; expected a model folder (with config.json) or a hub name like org/name"
    if spec.startswith(("/", ".", "~")) or not HUB_ID.match(spec):
        return f"{spec} does not exist (not a folder on this machine, and not a hub name like org/name)"
    return None


def check_model_paths(cfg: Config, sources: dict[str, str]) -> list[str]:
    """Every model the run will load exists: a model folder, a known `builtin:` name, or a hub-style name."""
    errors = []
    for key in MODEL_KEYS:
        if key == "kd.teacher_pretrain" and cfg.train.trainer != "kd":
            continue
        spec = value_at(cfg, key)
        problem = model_spec_problem(spec) if spec else None
        if problem:
            errors.append(f"{src(sources, key)}: {problem}")
    return errors


def model_is_moe(spec: str) -> bool | None:
    """Whether a model spec names a mixture-of-experts model (its config.json has `output_router_logits`); None when
    this machine cannot tell (a hub name, a LoRA adapter folder, an unreadable config)."""
    from hpc_rlhf.builtin_models import resolve as builtin_models

    if spec.startswith(builtin_models.BUILTIN_PREFIX):
        name = spec[len(builtin_models.BUILTIN_PREFIX):].partition("/")[0]
        return name in builtin_models.MOE_BUILTIN_MODELS
    config_file = Path(spec).expanduser() / "config.json"
    try:
        return "output_router_logits" in json.loads(config_file.read_text())
    except (OSError, ValueError):
        return None


def check_moe_model(cfg: Config, sources: dict[str, str]) -> list[str]:
    """actor.aux_loss_coef > 0 needs a mixture-of-experts actor.pretrain (checked where its config can be read)."""
    coef, spec = cfg.actor.aux_loss_coef, cfg.actor.pretrain
    if coef > 0 and model_is_moe(spec) is False:
        return [f"{src(sources, 'actor.aux_loss_coef')}: {coef} needs a mixture-of-experts actor.pretrain (a model "
                f"whose config has output_router_logits, e.g. Mixtral, Qwen3-MoE, builtin:tiny-moe); {spec} is not "
                f"one, so set actor.aux_loss_coef: 0"]
    return []


def check_data_files(cfg: Config, sources: dict[str, str], *, limit: int = CHECK_ROWS) -> list[str]:
    """The datasets the trainer reads exist and their first `limit` rows are readable (with the prompt and label
    columns for the trainers that sample prompts), so a bad file is reported before any model loads."""
    data = cfg.data
    prompts = cfg.train.trainer in PROMPT_TRAINERS
    keys = [data_key(cfg.train.trainer)] + (["eval.data"] if cfg.eval.data else [])
    errors = []
    for key in keys:
        value = value_at(cfg, key)
        try:
            lengths, complete = [], True
            for path in dataset_paths(value):
                if not prompts:
                    check_records(path, limit=limit)
                    continue
                rows, whole = check_prompt_rows(path, input_key=data.input_key, label_key=data.label_key,
                                                apply_chat_template=data.apply_chat_template, limit=limit,
                                                image_key=data.image_key, max_images=data.max_images_per_prompt)
                lengths.append(min(rows, data.max_samples) if data.max_samples else rows)
                complete = complete and whole
            if key == "data.prompt_data" and complete:
                usable = _mixed_size(lengths, data.prompt_data_probs if cfg.train.trainer == "ppo" else None,
                                     cfg.train.seed, data.max_samples)
                if usable < cfg.rollout.batch_size:
                    errors.append(f"{src(sources, key, 'rollout.batch_size')}: {value} has {usable} usable prompts, "
                                  f"fewer than rollout.batch_size={cfg.rollout.batch_size}")
        except DatasetError as err:
            errors.append(f"{src(sources, key)}: {err}")
        except OSError as err:
            errors.append(f"{src(sources, key)}: cannot read {value}: {err}")
    return errors


def _mixed_size(lengths: list[int], probabilities: list[float] | None, seed: int, max_samples: int | None) -> int:
    """Rows of the datasets' mix (hpc_rlhf.data.mixing) or concatenation, capped at max_samples."""
    mixes = probabilities and all(lengths) and not probability_problems(len(lengths), probabilities)
    size = len(interleave_order(lengths, probabilities, seed)) if mixes else sum(lengths)
    return min(size, max_samples) if max_samples else size


def check_device(cfg: Config, sources: dict[str, str], *, ranks_here: int = 1) -> list[str]:
    """train.device: cuda needs GPUs that torch can use, one per rank on this machine."""
    if cfg.train.device != "cuda":
        return []
    import torch

    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        return [f"{src(sources, 'train.device')}: cuda, but torch sees no GPU on this machine (torch "
                f"{torch.__version__}, {build}); use --train.device=cpu (or auto)"]
    count = torch.cuda.device_count()
    if ranks_here > count:
        return [f"{src(sources, 'train.device')}: cuda with {ranks_here} ranks on this machine, but torch sees "
                f"{count} GPU(s); each rank needs its own"]
    return []


def check_machine(cfg: Config, sources: dict[str, str], *, ranks_here: int = 1) -> list[str]:
    """The checks that need this machine (device, models, data files); run by the entry points before any rank
    starts, not by `load_config` (a config may be written on one machine for another)."""
    return (check_device(cfg, sources, ranks_here=ranks_here) + check_model_paths(cfg, sources)
            + check_moe_model(cfg, sources) + check_data_files(cfg, sources))
