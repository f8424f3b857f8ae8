"""Custom reward functions: a user's Python file (or module) defining `reward_func(queries, prompts, labels)`.

The signature is OpenRLHF's: `queries` are the full prompt + response texts, `prompts` the prompt texts, `labels` the
dataset's reference answers (None where the dataset has none). The function returns rewards alone or a dict
{"rewards", "scores"?, "extra_logs"?}; `RewardFunction` checks and normalises that into a `RewardResult`.

A spec names the function in one of these forms:
    path/to/my_reward.py               the file's `reward_func`
    path/to/my_reward.py:score_fn      another function in that file
    my_package.rewards                 an importable module's `reward_func`
    my_package.rewards:score_fn        another function in that module
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from hpc_rlhf.rewards.result import RewardError, RewardResult, check_batch, empty_result, to_reward_result

DEFAULT_FUNCTION_NAME = "reward_func"


def split_spec(spec: str) -> tuple[str, str]:
    """Split "target[:function]" into (file path or module name, function name)."""
    if not isinstance(spec, str) or not spec.strip():
        raise RewardError(f"reward function spec must be a non-empty string, got {spec!r}")
    target, sep, function = spec.strip().rpartition(":")
    if sep and function.isidentifier() and target:
        return target, function
    return spec.strip(), DEFAULT_FUNCTION_NAME


def _looks_like_file(target: str) -> bool:
    """A target is a file when it ends in .py, contains a path separator, or exists on disk."""
    return target.endswith(".py") or os.sep in target or "/" in target or os.path.exists(target)


def _import_file(path: Path) -> ModuleType:
    """Import a Python file under a name unique to its absolute path, so two files called reward.py do not clash."""
    resolved = path.resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:12]
    module_name = f"hpc_rlhf_user_reward_{resolved.stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, resolved)
    if spec is None or spec.loader is None:
        raise RewardError(f"cannot import {resolved} as a Python module (is it a .py file?)")
    module = importlib.util.module_from_spec(spec)
    # Registered before running it, as importlib does, so dataclasses and pickling inside the file can find it.
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[module_name]
        raise RewardError(f"importing reward file {resolved} failed: {type(error).__name__}: {error}") from error
    return module


def load_reward_func(spec: str) -> Callable[..., Any]:
    """The function a spec names (see the module docstring), checked to accept (queries, prompts, labels)."""
    target, function_name = split_spec(spec)
    if _looks_like_file(target):
        path = Path(target).expanduser()
        if not path.is_file():
            raise RewardError(f"reward function file {target!r} does not exist (looked at {path.resolve()}, "
                              f"working directory {os.getcwd()})")
        module = _import_file(path)
        where = str(path)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as error:
            raise RewardError(f"cannot import reward module {target!r}: {error}") from error
        where = f"module {target}"

    function = getattr(module, function_name, None)
    if function is None:
        raise RewardError(f"{where} defines no {function_name!r}; a reward file must define "
                          f"`def {function_name}(queries, prompts, labels)`")
    if not callable(function):
        raise RewardError(f"{function_name!r} in {where} is not callable (type {type(function).__name__})")
    try:
        inspect.signature(function).bind([], [], [])
    except TypeError as error:
        raise RewardError(f"{function_name!r} in {where} cannot be called as {function_name}(queries, prompts, "
                          f"labels): {error}") from error
    except ValueError:
        pass  # builtins without a signature: let the call itself decide
    return function


class RewardFunction:
    """A loaded reward function, called on a batch and normalised into a `RewardResult`."""

    def __init__(self, spec: str):
        self.spec = spec
        self.function = load_reward_func(spec)
        self.name = f"reward_func {spec}"

    def __call__(self, queries: Sequence[str], prompts: Sequence[str], labels: Sequence[Any] | None = None,
                 token_ids: Sequence[Sequence[int]] | None = None) -> RewardResult:
        """Rewards for one batch; `token_ids` is accepted for a uniform interface and not passed on."""
        labels = check_batch(queries, prompts, labels, self.name)
        if not queries:
            return empty_result()
        output = self.function(list(queries), list(prompts), labels)
        return to_reward_result(output, len(queries), self.name)

    def __repr__(self) -> str:
        return f"RewardFunction({self.spec!r})"
