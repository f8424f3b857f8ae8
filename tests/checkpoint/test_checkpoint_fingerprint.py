"""Config fingerprint: which fields it covers, and the error that names the differing fields on resume."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hpc_rlhf.run.checkpoint import (
    VOLATILE_KEYS,
    VOLATILE_SECTIONS,
    IncompatibleCheckpointError,
    config_fingerprint,
    fingerprinted_fields,
    load_checkpoint,
    save_checkpoint,
)
from hpc_rlhf.config.schema import Config
from hpc_rlhf.config.loading import config_to_dict

DEFAULT = config_to_dict(Config())


def _leaves(node: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


ALL_KEYS = sorted(_leaves(DEFAULT))
VOLATILE = [k for k in ALL_KEYS if k.split(".")[0] in VOLATILE_SECTIONS or k in VOLATILE_KEYS]
MATCHING = [k for k in ALL_KEYS if k not in VOLATILE]


def _changed(value: Any) -> Any:
    """A different value of the same kind."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "_other"
    if isinstance(value, list):
        return [*value, 1]
    if value is None:
        return "set"
    raise AssertionError(f"no change rule for {value!r}")


def _with(config: dict, key: str, value: Any) -> dict:
    config = copy.deepcopy(config)
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
    return config


def test_documented_fields_are_in_or_out() -> None:
    fields = fingerprinted_fields(DEFAULT)
    for key in ("actor.pretrain", "critic.pretrain", "layout.actor.gpus", "layout.generator.tp", "layout.colocate",
                "algo.advantage_estimator", "algo.init_kl_coef", "rollout.batch_size", "train.train_batch_size",
                "train.micro_train_batch_size", "train.seed", "ds.zero_stage", "data.prompt_data"):
        assert key in fields, key
    for key in ("train.max_iterations", "train.run_dir", "ckpt.save_steps", "logger.logging_steps", "slurm.time",
                "eval.steps", "vllm.gpu_memory_utilization"):
        assert key not in fields, key
    assert set(fields) == set(MATCHING)
    assert all(key in ALL_KEYS for key in VOLATILE_KEYS), "a volatile key names no config field"


def test_dataclass_and_dict_give_the_same_fingerprint() -> None:
    assert config_fingerprint(Config()) == config_fingerprint(DEFAULT)
    assert len(config_fingerprint(DEFAULT)) == 16


@settings(max_examples=40, deadline=None)
@given(key=st.sampled_from(VOLATILE))
def test_volatile_fields_do_not_change_the_fingerprint(key: str) -> None:
    value = _leaves(DEFAULT)[key]
    assert config_fingerprint(_with(DEFAULT, key, _changed(value))) == config_fingerprint(DEFAULT)


@settings(max_examples=60, deadline=None)
@given(key=st.sampled_from(MATCHING))
def test_every_other_field_changes_the_fingerprint(key: str) -> None:
    value = _leaves(DEFAULT)[key]
    changed = config_fingerprint(_with(DEFAULT, key, _changed(value)))
    assert changed != config_fingerprint(DEFAULT)
    original = fingerprinted_fields(DEFAULT)
    assert {k for k, v in changed.fields.items() if original[k] != v} == {key}


def test_fingerprint_survives_pickling_with_its_fields() -> None:
    """Ranks may pass the fingerprint around with pickle-based object collectives."""
    fingerprint = config_fingerprint(DEFAULT)
    copied = pickle.loads(pickle.dumps(fingerprint))
    assert copied == fingerprint and copied.fields == fingerprint.fields


def test_value_without_json_form_is_named() -> None:
    with pytest.raises(TypeError, match="'train.seed'"):
        config_fingerprint({"train": {"seed": object()}})


def _save(root: Path, fingerprint: str, module: torch.nn.Module) -> Path:
    return save_checkpoint(root, 2, rank=0, world_size=1, barrier=lambda: None, engines={"actor": module},
                           trainer_state={"next_iteration": 2}, config_fingerprint=fingerprint, keep_last=1)


def test_changed_layout_names_the_field_with_both_values(tmp_path: Path) -> None:
    old = _with(_with(DEFAULT, "layout.actor.gpus", 2), "layout.colocate", False)
    new = _with(_with(old, "layout.actor.gpus", 4), "train.max_iterations", 500)  # the second change is allowed
    path = _save(tmp_path, config_fingerprint(old), torch.nn.Linear(2, 2))
    untouched = torch.nn.Linear(2, 2)
    before = untouched.weight.detach().clone()
    with pytest.raises(IncompatibleCheckpointError) as info:
        load_checkpoint(path, rank=0, engines={"actor": untouched}, config_fingerprint=config_fingerprint(new))
    assert info.value.differences == {"layout.actor.gpus": (2, 4)}
    assert "layout.actor.gpus: checkpoint has 2, config has 4" in str(info.value)
    assert str(path) in str(info.value)
    assert torch.equal(untouched.weight, before), "nothing may be loaded from an incompatible checkpoint"


def test_added_and_removed_fields_are_named(tmp_path: Path) -> None:
    path = _save(tmp_path, config_fingerprint({"algo": {"gamma": 1.0, "old_knob": 3}}), torch.nn.Linear(1, 1))
    with pytest.raises(IncompatibleCheckpointError) as info:
        load_checkpoint(path, rank=0, engines={}, config_fingerprint=config_fingerprint({"algo": {"gamma": 1.0,
                                                                                               "new_knob": 1}}))
    assert info.value.differences == {"algo.old_knob": (3, "<absent>"), "algo.new_knob": ("<absent>", 1)}


def test_plain_string_fingerprint_still_refuses_a_mismatch(tmp_path: Path) -> None:
    path = _save(tmp_path, "aaaaaaaaaaaaaaaa", torch.nn.Linear(1, 1))
    with pytest.raises(IncompatibleCheckpointError, match="bbbbbbbbbbbbbbbb"):
        load_checkpoint(path, rank=0, engines={}, config_fingerprint="bbbbbbbbbbbbbbbb")
    assert load_checkpoint(path, rank=0, engines={}, config_fingerprint="aaaaaaaaaaaaaaaa",
                           restore_rng=False) == {"next_iteration": 2}
