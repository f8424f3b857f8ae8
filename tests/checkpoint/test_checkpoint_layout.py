"""Checkpoint folder layout, `latest` pointer and its fallback, keep-last-K, stale leftovers, argument errors."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from hpc_rlhf import __version__
from hpc_rlhf.run.checkpoint import (
    config_fingerprint,
    is_complete,
    latest_checkpoint,
    load_checkpoint,
    read_metadata,
    read_trainer_state,
    save_checkpoint,
)

FINGERPRINT = config_fingerprint({"layout": {"actor": {"gpus": 1}}, "train": {"seed": 3}})


def _save(root: Path, iteration: int, *, keep_last: int = 0, engines: dict | None = None,
          state: dict | None = None) -> Path:
    return save_checkpoint(root, iteration, rank=0, world_size=1, barrier=lambda: None, engines=engines or {},
                           trainer_state=state if state is not None else {"next_iteration": iteration},
                           config_fingerprint=FINGERPRINT, keep_last=keep_last)


def _names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_save_writes_the_documented_layout(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    linear = torch.nn.Linear(3, 2)
    state = {"next_iteration": 12, "weight_version": 12, "kl_controller": {"value": 0.05}, "betas": (0.9, 0.95)}
    path = _save(root, 12, engines={"value_head": linear}, state=state)

    assert path == root / "iter_000012"
    assert _names(root) == ["iter_000012", "latest"]
    assert (root / "latest").read_text() == "iter_000012\n"
    assert _names(path) == ["COMPLETE", "rng", "trainer_state.json", "value_head"]
    assert _names(path / "rng") == ["rank_00000.pt"]
    saved = torch.load(path / "value_head" / "rank_00000.pt", weights_only=True)["state_dict"]
    assert torch.equal(saved["weight"], linear.weight) and torch.equal(saved["bias"], linear.bias)

    on_disk = json.loads((path / "trainer_state.json").read_text())
    assert on_disk["next_iteration"] == 12 and on_disk["kl_controller"] == {"value": 0.05}
    meta = on_disk["checkpoint"]
    assert meta["iteration"] == 12 and meta["name"] == "iter_000012" and meta["world_size"] == 1
    assert meta["config_fingerprint"] == FINGERPRINT
    assert meta["config"] == {"layout.actor.gpus": 1, "train.seed": 3}
    assert meta["hpc_rlhf_version"] == __version__
    assert read_metadata(path) == meta
    # JSON round trip: what comes back is the trainer's state without the checkpoint section, tuples as lists.
    assert read_trainer_state(path) == {**state, "betas": [0.9, 0.95]}


def test_load_restores_plain_module_and_returns_trainer_state(tmp_path: Path) -> None:
    torch.manual_seed(0)
    saved_module = torch.nn.Linear(4, 4)
    path = _save(tmp_path, 5, engines={"policy": saved_module, "absent_here": None}, state={"next_iteration": 5})
    fresh = torch.nn.Linear(4, 4)
    assert not torch.equal(fresh.weight, saved_module.weight)
    state = load_checkpoint(path, rank=0, engines={"policy": fresh}, config_fingerprint=FINGERPRINT)
    assert state == {"next_iteration": 5}
    assert torch.equal(fresh.weight, saved_module.weight) and torch.equal(fresh.bias, saved_module.bias)
    assert not (path / "absent_here").exists()


def test_two_ranks_write_their_own_files_and_rank0_the_json(tmp_path: Path) -> None:
    """Two ranks as threads sharing one barrier: the temporary folder is found through `in_progress`."""
    barrier = threading.Barrier(2, timeout=30)
    modules = [torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)]
    with torch.no_grad():
        modules[0].weight.fill_(1.0)
        modules[1].weight.fill_(2.0)
    results: dict[int, object] = {}

    def rank_main(rank: int) -> None:
        try:
            results[rank] = save_checkpoint(tmp_path, 7, rank=rank, world_size=2, barrier=barrier.wait,
                                            engines={"critic": modules[rank]},
                                            trainer_state={"next_iteration": 7, "written_by": rank},
                                            config_fingerprint=FINGERPRINT, keep_last=1)
        except Exception as err:  # reported below; a failing rank must not leave the other one waiting
            barrier.abort()
            results[rank] = err

    threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results == {0: tmp_path / "iter_000007", 1: tmp_path / "iter_000007"}
    path = tmp_path / "iter_000007"
    assert _names(path / "rng") == ["rank_00000.pt", "rank_00001.pt"]
    assert _names(path / "critic") == ["rank_00000.pt", "rank_00001.pt"]
    assert read_trainer_state(path)["written_by"] == 0
    assert _names(tmp_path) == ["iter_000007", "latest"]
    restored = torch.nn.Linear(2, 2)
    load_checkpoint(path, rank=1, engines={"critic": restored}, config_fingerprint=FINGERPRINT, restore_rng=False)
    assert torch.equal(restored.weight, torch.full((2, 2), 2.0))


def test_keep_last_deletes_only_older_complete_checkpoints(tmp_path: Path) -> None:
    for iteration in range(1, 6):
        _save(tmp_path, iteration, keep_last=2)
    assert _names(tmp_path) == ["iter_000004", "iter_000005", "latest"]
    assert latest_checkpoint(tmp_path) == tmp_path / "iter_000005"


def test_keep_last_zero_keeps_everything(tmp_path: Path) -> None:
    for iteration in (2, 4, 6):
        _save(tmp_path, iteration, keep_last=0)
    assert _names(tmp_path) == ["iter_000002", "iter_000004", "iter_000006", "latest"]


def test_keep_last_never_deletes_the_checkpoint_just_saved(tmp_path: Path) -> None:
    """After a manual rollback the new checkpoint may be older than those on disk; it still stays."""
    for iteration in (5, 6):
        _save(tmp_path, iteration, keep_last=2)
    _save(tmp_path, 3, keep_last=2)
    assert _names(tmp_path) == ["iter_000003", "iter_000006", "latest"]
    assert latest_checkpoint(tmp_path) == tmp_path / "iter_000003"


def test_saving_the_same_iteration_again_replaces_it(tmp_path: Path) -> None:
    _save(tmp_path, 4, state={"next_iteration": 4, "attempt": 1})
    _save(tmp_path, 4, state={"next_iteration": 4, "attempt": 2})
    assert _names(tmp_path) == ["iter_000004", "latest"]
    assert read_trainer_state(tmp_path / "iter_000004")["attempt"] == 2


def _break_pointer_missing(root: Path) -> None:
    (root / "latest").unlink()


def _break_pointer_garbage(root: Path) -> None:
    (root / "latest").write_bytes(b"\xff\xfe not a name")


def _break_pointer_to_missing_folder(root: Path) -> None:
    (root / "latest").write_text("iter_000099\n")


def _break_pointer_outside_root(root: Path) -> None:
    (root / "latest").write_text("../iter_000003\n")


def _break_pointer_to_incomplete(root: Path) -> None:
    """`latest` names the newest folder, but its COMPLETE marker is gone."""
    (root / "iter_000003" / "COMPLETE").unlink()


@pytest.mark.parametrize("break_pointer", [_break_pointer_missing, _break_pointer_garbage,
                                           _break_pointer_to_missing_folder, _break_pointer_outside_root])
def test_broken_latest_falls_back_to_newest_complete(tmp_path: Path, break_pointer) -> None:
    for iteration in (1, 2, 3):
        _save(tmp_path, iteration)
    (tmp_path / "iter_000010").mkdir()  # newer, but never completed
    break_pointer(tmp_path)
    assert latest_checkpoint(tmp_path) == tmp_path / "iter_000003"


def test_latest_naming_an_incomplete_folder_falls_back(tmp_path: Path) -> None:
    for iteration in (1, 2, 3):
        _save(tmp_path, iteration)
    _break_pointer_to_incomplete(tmp_path)
    assert not is_complete(tmp_path / "iter_000003")
    assert latest_checkpoint(tmp_path) == tmp_path / "iter_000002"


def test_latest_follows_the_pointer_when_it_is_valid(tmp_path: Path) -> None:
    for iteration in (1, 2):
        _save(tmp_path, iteration)
    (tmp_path / "latest").write_text("iter_000001\n")  # e.g. a user rolling back by hand
    assert latest_checkpoint(tmp_path) == tmp_path / "iter_000001"


def test_no_checkpoint_gives_none(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / "iter_000001").mkdir()
    (tmp_path / "iter_000002.tmp-0123456789abcdef").mkdir()
    assert latest_checkpoint(tmp_path) is None


def _leave_stale_entries(root: Path) -> list[str]:
    (root / "iter_000009.tmp-0123456789abcdef" / "rng").mkdir(parents=True)
    (root / "iter_000008").mkdir()  # renamed but never completed
    (root / "iter_000008" / "trainer_state.json").write_text("{}")
    (root / "latest.tmp-feedfacefeedface").write_text("iter_000009")
    (root / "in_progress").write_text("iter_000009.tmp-0123456789abcdef")
    return ["in_progress", "iter_000008", "iter_000009.tmp-0123456789abcdef", "latest.tmp-feedfacefeedface"]


def test_next_save_removes_leftovers_of_killed_saves(tmp_path: Path) -> None:
    _save(tmp_path, 1)
    _leave_stale_entries(tmp_path)
    _save(tmp_path, 2)
    assert _names(tmp_path) == ["iter_000001", "iter_000002", "latest"]


def test_resume_removes_leftovers_of_killed_saves(tmp_path: Path) -> None:
    _save(tmp_path, 1)
    stale = _leave_stale_entries(tmp_path)
    path = latest_checkpoint(tmp_path)
    assert path == tmp_path / "iter_000001"
    assert set(stale) <= set(_names(tmp_path))  # finding the checkpoint changes nothing
    load_checkpoint(path, rank=1, engines={}, config_fingerprint=FINGERPRINT, restore_rng=False)
    assert set(stale) <= set(_names(tmp_path))  # only global rank 0 cleans up
    load_checkpoint(path, rank=0, engines={}, config_fingerprint=FINGERPRINT, restore_rng=False)
    assert _names(tmp_path) == ["iter_000001", "latest"]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"iteration": -1}, "iteration must be an int >= 0"),
    ({"rank": 2}, "rank must lie in [0, world_size=1)"),
    ({"keep_last": -1}, "keep_last must be >= 0"),
    ({"trainer_state": {"checkpoint": 1}}, "may not use the key 'checkpoint'"),
    ({"trainer_state": {"ok": 1, "moments": torch.zeros(2)}}, "trainer_state['moments'] is not JSON-serialisable"),
    ({"engines": {"../actor": torch.nn.Linear(1, 1)}}, "engine name '../actor'"),
    ({"engines": {"rng": torch.nn.Linear(1, 1)}}, "engine name 'rng'"),
    ({"engines": {"actor": object()}}, "cannot checkpoint an object of type object"),
])
def test_bad_save_arguments_fail_before_writing(tmp_path: Path, kwargs: dict, message: str) -> None:
    arguments = {"iteration": 1, "rank": 0, "world_size": 1, "barrier": lambda: None, "engines": {},
                 "trainer_state": {}, "config_fingerprint": FINGERPRINT, "keep_last": 1, **kwargs}
    iteration = arguments.pop("iteration")
    with pytest.raises((ValueError, TypeError)) as info:
        save_checkpoint(tmp_path / "checkpoints", iteration, **arguments)
    assert message in str(info.value)
    assert not (tmp_path / "checkpoints").exists()


def test_load_errors_name_what_is_missing(tmp_path: Path) -> None:
    path = _save(tmp_path, 3, engines={"actor": torch.nn.Linear(2, 2)})
    with pytest.raises(FileNotFoundError, match="no state for engine 'critic'"):
        load_checkpoint(path, rank=0, engines={"critic": torch.nn.Linear(2, 2)}, config_fingerprint=FINGERPRINT)
    with pytest.raises(FileNotFoundError, match="rank_00001.pt is missing"):
        load_checkpoint(path, rank=1, engines={}, config_fingerprint=FINGERPRINT)
    (path / "COMPLETE").unlink()
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_checkpoint(path, rank=0, engines={}, config_fingerprint=FINGERPRINT)
