"""Full-state checkpoints for resuming a run after a time limit, a preemption or a crash.

Layout under RUN_DIR/checkpoints/:

    iter_000012/                  one complete checkpoint (named after the iteration the trainer passes)
        trainer_state.json        the trainer's own state (iteration, weight version, data position, KL controller,
                                  reward statistics, ...) plus a `checkpoint` section: config fingerprint and the
                                  fingerprinted config fields, world size, hpc_rlhf version, save time
        rng/rank_00003.pt         python `random`, numpy, torch CPU (and CUDA) generator states of global rank 3
        actor/ critic/ ...        one folder per engine: DeepSpeed `save_checkpoint(folder, tag="iter_000012")` output,
                                  or `rank_00003.pt` state dicts for plain torch objects (see `save_checkpoint`)
        COMPLETE                  the last file written; a folder without it is never used
    latest                        text file naming the newest complete checkpoint, replaced atomically

Crash safety: every rank writes into `iter_000012.tmp-<random>` (global rank 0 picks the name and writes it to
`in_progress`, which the other ranks open after a barrier: opening a file is coherent across the nodes of network
filesystems where listing a folder may be stale); after a second barrier global rank 0 writes
trainer_state.json and COMPLETE, renames the folder to `iter_000012` (an atomic rename: the checkpoint appears
whole or not at all), then replaces `latest`. A job killed at any point therefore leaves either the previous state
or the new checkpoint; temporary leftovers (`*.tmp-*`, folders without COMPLETE) are removed by global rank 0 at
the next save or resume. `latest_checkpoint` falls back to the newest complete folder when `latest` is missing or
names a folder that is not complete. The checkpoint folder must be on a filesystem every rank sees.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import random
import re
import secrets
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpc_rlhf import __version__
from hpc_rlhf.run.durable import atomic_write_bytes, fsync_dir, synced_file
from hpc_rlhf.run.universal import universal_tag

FORMAT_VERSION = 1
STATE_FILE = "trainer_state.json"
COMPLETE_FILE = "COMPLETE"
LATEST_FILE = "latest"
IN_PROGRESS_FILE = "in_progress"  # names the temporary folder of the save under way, for the other ranks
RNG_DIR = "rng"
META_KEY = "checkpoint"  # the section of trainer_state.json this module owns
TMP_MARK = ".tmp-"

_CHECKPOINT_NAME = re.compile(r"iter_(\d{6,})")
_ENGINE_NAME = re.compile(r"[A-Za-z0-9_-]+")

# Config sections and keys left out of the fingerprint: they may change between restarts of one run without
# changing its results (run length, evaluation, checkpoint cadence, logging, the SLURM allocation, memory and
# transport knobs). Everything else (model paths, layout, algorithm, batch sizes, sampling, data, seed, dtype,
# ZeRO stage) must match for a resume; a new config field is fingerprinted unless it is listed here.
VOLATILE_SECTIONS: tuple[str, ...] = ("eval", "ckpt", "logger", "slurm")
VOLATILE_KEYS: tuple[str, ...] = (
    "train.max_iterations", "train.run_dir",
    "ds.adam_offload", "ds.param_offload", "ds.overlap_comm", "ds.universal_ckpt",
    "vllm.gpu_memory_utilization", "vllm.enable_sleep", "vllm.enable_prefix_caching", "vllm.enforce_eager",
    "vllm.max_num_seqs", "vllm.weight_sync_bucket_mb",
    "reward.remote_url", "reward.remote_timeout_s", "reward.remote_max_retries", "reward.remote_backoff_s",
    "reward.remote_batch_size",
)


class IncompatibleCheckpointError(RuntimeError):
    """The checkpoint was written under a config whose fingerprinted fields differ from the current one."""

    def __init__(self, path: Path, differences: dict[str, tuple[Any, Any]], saved: str, current: str) -> None:
        self.path = path
        self.differences = differences
        if differences:
            lines = [f"  {key}: checkpoint has {old!r}, config has {new!r}"
                     for key, (old, new) in sorted(differences.items())]
            detail = "these config fields differ:\n" + "\n".join(lines)
        else:
            detail = (f"config fingerprint {current!r} differs from the checkpoint's {saved!r} "
                      "(pass the result of config_fingerprint() to see which fields differ)")
        super().__init__(f"cannot resume from {path}: {detail}\n"
                         "Start a new run (another train.run_dir) or set ckpt.load_checkpoint=false.")


class ConfigFingerprint(str):
    """A fingerprint string that also carries the fields it hashes, so a mismatch can name them."""

    fields: dict[str, Any]

    def __new__(cls, digest: str, fields: dict[str, Any]) -> ConfigFingerprint:
        obj = super().__new__(cls, digest)
        obj.fields = fields
        return obj

    def __reduce__(self) -> tuple:
        """Pickle with the fields (object collectives pickle what they send)."""
        return (ConfigFingerprint, (str(self), self.fields))


@dataclass
class ModelAndOptimizer:
    """A plain torch model with its optimizer and learning-rate scheduler, saved and restored together."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer | None = None
    lr_scheduler: Any | None = None


# ----------------------------------------------------------------------------------------------------- fingerprint
def fingerprinted_fields(config_dict: Mapping[str, Any] | Any) -> dict[str, Any]:
    """The config's leaves that must match for a resume, as {"section.key": value} (JSON types)."""
    if dataclasses.is_dataclass(config_dict) and not isinstance(config_dict, type):
        config_dict = dataclasses.asdict(config_dict)
    if not isinstance(config_dict, Mapping):
        raise TypeError(f"config_dict must be a mapping or a dataclass, got {type(config_dict).__name__}")
    flat: dict[str, Any] = {}
    _flatten(config_dict, "", flat)
    return {key: value for key, value in flat.items()
            if key.split(".", 1)[0] not in VOLATILE_SECTIONS and key not in VOLATILE_KEYS}


def _flatten(node: Mapping[str, Any], prefix: str, out: dict[str, Any]) -> None:
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            _flatten(value, dotted + ".", out)
        else:
            out[dotted] = _json_value(value, dotted)


def _json_value(value: Any, key: str) -> Any:
    """`value` as plain JSON types (tuples become lists); raises naming `key` when it has no JSON form."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as err:
        raise TypeError(f"config field {key!r} has a value of type {type(value).__name__} that is not "
                        f"JSON-serialisable: {err}") from None


def config_fingerprint(config_dict: Mapping[str, Any] | Any) -> ConfigFingerprint:
    """A short hash of `fingerprinted_fields(config_dict)`; equal hashes mean a checkpoint may be resumed."""
    fields = fingerprinted_fields(config_dict)
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return ConfigFingerprint(hashlib.sha256(canonical.encode()).hexdigest()[:16], fields)


def _differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    absent = "<absent>"
    return {key: (saved.get(key, absent), current.get(key, absent))
            for key in sorted(set(saved) | set(current)) if saved.get(key, absent) != current.get(key, absent)}


# ------------------------------------------------------------------------------------------------------------ RNG
def capture_rng_state() -> dict[str, Any]:
    """This process's python, numpy, torch CPU (and CUDA, when available) generator states, as torch-loadable types."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss),
                  float(np_gauss)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Put back what `capture_rng_state` returned; CUDA states are restored for the devices both runs have."""
    random.setstate(state["python"])
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = list(state["cuda"])[: torch.cuda.device_count()]
        for device, cuda_state in enumerate(cuda_states):
            torch.cuda.set_rng_state(cuda_state, device)


# -------------------------------------------------------------------------------------------------- file helpers
def checkpoint_name(iteration: int) -> str:
    """Folder name of the checkpoint taken at `iteration`: iter_000012."""
    return f"iter_{iteration:06d}"


def _write_durable(path: Path, data: bytes) -> None:
    """Write `data` to `path` and fsync it (files inside the temporary folder, which is renamed into place whole)."""
    with synced_file(path) as handle:
        handle.write(data)


def _replace_durable(path: Path, data: bytes) -> None:
    """Write `path` atomically: a temporary file in the same folder, fsync, os.replace, fsync the folder."""
    temporary = path.with_name(f"{path.name}{TMP_MARK}{secrets.token_hex(8)}")
    atomic_write_bytes(path, data, temporary, strict_dir_sync=False)


def _torch_save_durable(obj: Any, path: Path) -> None:
    with synced_file(path) as handle:
        torch.save(obj, handle)


def _remove(path: Path) -> None:
    """Delete a file or folder; leftovers (e.g. a folder a dying process still writes) go at the next cleanup."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def is_complete(path: Path) -> bool:
    """Whether `path` is a finished checkpoint folder (its COMPLETE marker and trainer state exist)."""
    path = Path(path)
    return (path / COMPLETE_FILE).is_file() and (path / STATE_FILE).is_file()


def _complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(iteration, folder) of every complete checkpoint under `root`, oldest iteration first."""
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _CHECKPOINT_NAME.fullmatch(entry.name)
        if match and entry.is_dir() and is_complete(entry):
            found.append((int(match.group(1)), entry))
    return sorted(found)


def complete_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """(iteration, folder) of every complete checkpoint under `root`, oldest first (iteration = the next to train)."""
    return _complete_checkpoints(Path(root))


def remove_stale(ckpt_root: str | os.PathLike, keep: Path | None = None) -> list[Path]:
    """Delete what interrupted saves left behind: temporary entries and checkpoint folders without COMPLETE.

    Call it from one rank while no save is under way (this module does, from global rank 0); returns what it removed.
    """
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    removed = []
    for entry in sorted(root.iterdir()):
        if keep is not None and entry == keep:
            continue
        temporary = TMP_MARK in entry.name or entry.name == IN_PROGRESS_FILE
        unfinished = _CHECKPOINT_NAME.fullmatch(entry.name) is not None and entry.is_dir() and not is_complete(entry)
        if temporary or unfinished:
            _remove(entry)
            removed.append(entry)
    return removed


# ---------------------------------------------------------------------------------------------------------- engines
def _engine_kind(obj: Any) -> str:
    """How an engine is saved: see `save_checkpoint` for the accepted kinds."""
    if callable(getattr(obj, "save_state", None)) and callable(getattr(obj, "load_state", None)):
        return "wrapper"
    if callable(getattr(obj, "save_checkpoint", None)) and callable(getattr(obj, "load_checkpoint", None)):
        return "deepspeed"
    if isinstance(obj, ModelAndOptimizer):
        return "model_and_optimizer"
    if callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None)):
        return "stateful"
    raise TypeError(f"cannot checkpoint an object of type {type(obj).__name__}: expected a DeepSpeed engine, an "
                    "object with save_state/load_state, a ModelAndOptimizer, or an object with "
                    "state_dict/load_state_dict")


def _check_engines(engines: Mapping[str, Any]) -> dict[str, Any]:
    """The engines this rank holds (None values dropped), in a fixed order so collective saves line up."""
    present = {}
    for name in sorted(engines):
        if not isinstance(name, str) or not _ENGINE_NAME.fullmatch(name) or name == RNG_DIR:
            raise ValueError(f"engine name {name!r} must be letters, digits, '_' or '-' and not {RNG_DIR!r}")
        if engines[name] is not None:
            _engine_kind(engines[name])
            present[name] = engines[name]
    return present


def _save_engine(obj: Any, folder: Path, tag: str, rank: int) -> None:
    kind = _engine_kind(obj)
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "wrapper":
        obj.save_state(str(folder), tag)
    elif kind == "deepspeed":
        obj.save_checkpoint(str(folder), tag=tag)
    elif kind == "model_and_optimizer":
        state = {"model": obj.model.state_dict(),
                 "optimizer": obj.optimizer.state_dict() if obj.optimizer is not None else None,
                 "lr_scheduler": obj.lr_scheduler.state_dict() if obj.lr_scheduler is not None else None}
        _torch_save_durable(state, folder / _rank_file(rank))
    else:
        _torch_save_durable({"state_dict": obj.state_dict()}, folder / _rank_file(rank))


def _load_engine(obj: Any, folder: Path, tag: str, rank: int, name: str, universal: bool = False) -> None:
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint {folder.parent} has no state for engine {name!r} (no folder {folder})")
    kind = _engine_kind(obj)
    if universal and kind in ("wrapper", "deepspeed") and (folder / universal_tag(tag)).is_dir():
        tag = universal_tag(tag)
    if kind == "wrapper":
        obj.load_state(str(folder), tag)
        return
    if kind == "deepspeed":
        loaded_path, _ = obj.load_checkpoint(str(folder), tag=tag)
        if loaded_path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint with tag {tag!r} under {folder}")
        return
    file = folder / _rank_file(rank)
    if not file.is_file():
        raise FileNotFoundError(f"engine {name!r} has no state for rank {rank}: {file} is missing")
    # Written by this run for its own objects (optimizer and scheduler states hold arbitrary Python values).
    state = torch.load(file, map_location="cpu", weights_only=False)
    if kind == "model_and_optimizer":
        obj.model.load_state_dict(state["model"])
        for part in ("optimizer", "lr_scheduler"):
            target, saved = getattr(obj, part), state[part]
            if (target is None) != (saved is None):
                raise ValueError(f"engine {name!r}: {part} is {'missing' if target is None else 'present'} in the "
                                 f"object to restore but {'present' if saved is not None else 'missing'} in {file}")
            if target is not None:
                target.load_state_dict(saved)
    else:
        obj.load_state_dict(state["state_dict"])


# ------------------------------------------------------------------------------------------------------- save / load
def save_checkpoint(ckpt_root: str | os.PathLike, iteration: int, *, rank: int, world_size: int,
                    barrier: Callable[[], None], engines: Mapping[str, Any], trainer_state: Mapping[str, Any],
                    config_fingerprint: str, keep_last: int) -> Path:
    """Save a complete checkpoint as `ckpt_root/iter_{iteration:06d}`; every rank of the world calls it.

    `engines` maps a folder name to what this rank holds of it (ranks may hold different engines; None is skipped):
    - an object with `save_state(dir, tag)` / `load_state(dir, tag)` (the training model wrappers, which scope
      DeepSpeed to their process group) or a DeepSpeed engine (`save_checkpoint(dir, tag=)` / `load_checkpoint`):
      model, optimizer and scheduler states, ZeRO shards written by each rank; the engine's collectives run inside;
    - a `ModelAndOptimizer`, or any object with `state_dict()` / `load_state_dict()` (an nn.Module, an optimizer,
      a running statistic): written per rank as `<name>/rank_00003.pt`.
    Engines are saved in sorted name order, so ranks holding several engines call their collectives in step.
    `trainer_state` must be JSON-serialisable (it comes back through JSON: tuples as lists) and may not use the key
    "checkpoint"; global rank 0's copy is written. A rank that raises inside leaves the others waiting at `barrier`:
    the job's failure handling must end them. `config_fingerprint` should be what `config_fingerprint()`
    returned, so a later mismatch can name the differing fields. Keeps the newest `keep_last` complete
    checkpoints (0 keeps all). Returns the checkpoint folder once it is complete on every rank.
    """
    rng_state = capture_rng_state()  # before anything else here could draw from a generator
    _check_save_arguments(iteration, rank, world_size, keep_last, trainer_state)
    present = _check_engines(engines)
    root = Path(ckpt_root)
    name = checkpoint_name(iteration)
    state_json = _trainer_state_json(trainer_state, iteration, name, world_size, config_fingerprint)

    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale(root)
        temporary = root / f"{name}{TMP_MARK}{secrets.token_hex(8)}"
        (temporary / RNG_DIR).mkdir(parents=True)
        _replace_durable(root / IN_PROGRESS_FILE, temporary.name.encode())
    barrier()

    temporary = root / (root / IN_PROGRESS_FILE).read_text().strip()
    if not temporary.name.startswith(name + TMP_MARK) or not temporary.is_dir():
        raise RuntimeError(f"rank {rank}: {root / IN_PROGRESS_FILE} names {temporary.name!r}, not a temporary "
                           f"folder of {name}; is another job saving into {root}?")
    _torch_save_durable(rng_state, temporary / RNG_DIR / _rank_file(rank))
    for engine_name, obj in present.items():
        _save_engine(obj, temporary / engine_name, name, rank)
    os.sync()  # engines write through their own file handles; make their files durable before COMPLETE
    barrier()

    final = root / name
    if rank == 0:
        _write_durable(temporary / STATE_FILE, state_json)
        _write_durable(temporary / COMPLETE_FILE, f"{name}\n".encode())
        fsync_dir(temporary, strict=False)
        _publish(temporary, final)
        _replace_durable(root / LATEST_FILE, f"{name}\n".encode())
        (root / IN_PROGRESS_FILE).unlink(missing_ok=True)
        _keep_newest(root, keep_last, final)
    barrier()
    return final


def _check_save_arguments(iteration: int, rank: int, world_size: int, keep_last: int,
                          trainer_state: Mapping[str, Any]) -> None:
    if not isinstance(iteration, int) or iteration < 0:
        raise ValueError(f"iteration must be an int >= 0, got {iteration!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
    if keep_last < 0:
        raise ValueError(f"keep_last must be >= 0 (0 keeps every checkpoint), got {keep_last}")
    if not isinstance(trainer_state, Mapping):
        raise TypeError(f"trainer_state must be a dict, got {type(trainer_state).__name__}")
    if META_KEY in trainer_state:
        raise ValueError(f"trainer_state may not use the key {META_KEY!r}: trainer_state.json keeps checkpoint "
                         "metadata under it")


def _trainer_state_json(trainer_state: Mapping[str, Any], iteration: int, name: str, world_size: int,
                        fingerprint: str) -> bytes:
    """trainer_state.json's bytes; checked on every rank, before any barrier, so bad state fails everywhere."""
    for key, value in trainer_state.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError) as err:
            raise TypeError(f"trainer_state[{key!r}] is not JSON-serialisable: {err}") from None
    now = time.time()
    meta = {"format_version": FORMAT_VERSION, "name": name, "iteration": iteration, "world_size": world_size,
            "config_fingerprint": str(fingerprint), "config": getattr(fingerprint, "fields", None),
            "hpc_rlhf_version": __version__, "saved_at_unix": now,
            "saved_at": datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(timespec="seconds")}
    return (json.dumps({**trainer_state, META_KEY: meta}, indent=2) + "\n").encode()


def _publish(temporary: Path, final: Path) -> None:
    """Rename the finished temporary folder to its final name, replacing a checkpoint of the same iteration."""
    aside = None
    if final.exists():
        # A resumed run that stops again before finishing an iteration saves the same iteration twice. Between
        # the two renames `final` is briefly absent and `latest_checkpoint` falls back to an older checkpoint.
        aside = final.with_name(f"{final.name}{TMP_MARK}replaced-{secrets.token_hex(8)}")
        os.rename(final, aside)
    os.rename(temporary, final)
    fsync_dir(final.parent, strict=False)
    if aside is not None:
        _remove(aside)


def _keep_newest(root: Path, keep_last: int, just_saved: Path) -> None:
    """Delete complete checkpoints beyond the newest `keep_last` (never the one just saved)."""
    if keep_last == 0:
        return
    others = [path for _, path in _complete_checkpoints(root) if path != just_saved]
    for path in others[: max(0, len(others) - (keep_last - 1))]:
        # Renamed first, so a kill halfway through the deletion leaves a temporary entry, not a broken checkpoint.
        doomed = path.with_name(f"{path.name}{TMP_MARK}delete-{secrets.token_hex(8)}")
        os.rename(path, doomed)
        _remove(doomed)


def latest_checkpoint(ckpt_root: str | os.PathLike) -> Path | None:
    """The checkpoint to resume from: the one `latest` names if complete, else the newest complete one, else None."""
    root = Path(ckpt_root)
    try:
        named = (root / LATEST_FILE).read_text().strip()
    except (OSError, UnicodeDecodeError):
        named = ""
    if _CHECKPOINT_NAME.fullmatch(named) and is_complete(root / named):
        return root / named
    complete = _complete_checkpoints(root)
    return complete[-1][1] if complete else None


def read_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    """The trainer state saved in checkpoint `path` (without loading any engine)."""
    state = _read_state_file(Path(path))
    state.pop(META_KEY, None)
    return state


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint section of `path`'s trainer_state.json: iteration, fingerprint and fields, version, time."""
    return _read_state_file(Path(path)).get(META_KEY, {})


def _read_state_file(path: Path) -> dict[str, Any]:
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE_FILE} or {STATE_FILE})")
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path / STATE_FILE} is not valid JSON: {err}") from None
    if not isinstance(state, dict):
        raise TypeError(f"{path / STATE_FILE} must hold a JSON object, not {type(state).__name__}")
    return state


def load_checkpoint(path: str | os.PathLike, *, rank: int, engines: Mapping[str, Any], config_fingerprint: str,
                    restore_rng: bool = True, universal: bool = False) -> dict[str, Any]:
    """Restore this rank's engines (and RNG states) from checkpoint `path`; returns the saved trainer state.

    Every rank calls it with the engines it holds (DeepSpeed loads are collective over the engine's group).
    `universal`: DeepSpeed engines load the universal form of their folder where `hpc_rlhf.run.universal` wrote one
    (the engines must be built with `"checkpoint": {"load_universal": true}`).
    Raises `IncompatibleCheckpointError` when `config_fingerprint` differs from the saved one, before touching any
    engine. Global rank 0 also removes leftovers of interrupted saves next to `path`.
    """
    path = Path(path)
    state = _read_state_file(path)
    meta = state.pop(META_KEY, {})
    saved_fingerprint = meta.get("config_fingerprint")
    if saved_fingerprint != str(config_fingerprint):
        current_fields = getattr(config_fingerprint, "fields", None)
        saved_fields = meta.get("config")
        differences = _differences(saved_fields, current_fields) \
            if isinstance(saved_fields, dict) and isinstance(current_fields, dict) else {}
        raise IncompatibleCheckpointError(path, differences, str(saved_fingerprint), str(config_fingerprint))
    present = _check_engines(engines)
    rng_file = path / RNG_DIR / _rank_file(rank)
    if restore_rng and not rng_file.is_file():
        raise FileNotFoundError(f"{rng_file} is missing: the checkpoint was saved by "
                                f"{meta.get('world_size', '?')} ranks and has no RNG state for rank {rank}")
    if rank == 0:
        remove_stale(path.parent, keep=path)
    tag = meta.get("name", path.name)
    for name, obj in present.items():
        _load_engine(obj, path / name, tag, rank, name, universal)
    if restore_rng:  # last, so nothing the engines draw while loading shifts the restored streams
        restore_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
    return state
