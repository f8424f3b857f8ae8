"""Weights & Biases beside TensorBoard: offline runs under RUN_DIR/wandb, read back from W&B's own .wandb files (records
of wandb.proto's Record in W&B's block log format), and one W&B run per run directory across resumes."""

from __future__ import annotations

import json
import struct
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from hpc_rlhf.config.schema import Config
from hpc_rlhf.errors import UsageError
from hpc_rlhf.run.metrics import WANDB_DIR, WANDB_ID_FILE, WandbSettings, import_wandb, wandb_settings

SETTINGS = WandbSettings(project="hpc_rlhf-tests", group="metrics", run_name="offline-test", mode="offline",
                         config={"algo": {"advantage_estimator": "group_norm"}, "actor": {"learning_rate": 1e-6}})
BLOCK = 32 * 1024  # W&B's .wandb file: a 7-byte header, then LevelDB-log records in 32 KiB blocks
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


@pytest.fixture
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The real wandb package, with no network, no console capture and its user files under tmp_path."""
    wandb = pytest.importorskip("wandb", reason="wandb is not installed (pip install -e '.[test]' installs it)")
    for name, value in {"WANDB_SILENT": "true", "WANDB_CONSOLE": "off", "WANDB_DISABLE_GIT": "true",
                        "WANDB_CONFIG_DIR": tmp_path / "wandb_config", "WANDB_CACHE_DIR": tmp_path / "wandb_cache",
                        "WANDB_DATA_DIR": tmp_path / "wandb_data"}.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    wandb.teardown()  # W&B reads the environment once per process setup: each test starts a fresh one
    yield wandb
    wandb.teardown()


def _close(logger: Any, wandb: Any) -> None:
    """Close the logger (which finishes its W&B run), then end W&B's service process, as the end of a job does: W&B
    writes the rest of the .wandb file when its service stops, which `finish()` does not wait for."""
    logger.close(plot=False)
    wandb.teardown()


def _records(path: Path) -> list[Any]:
    """Every Record in a .wandb file, parsed with wandb's own protobuf classes."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B data file"
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a record header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _offline_runs(run_dir: Path) -> list[Path]:
    """The .wandb files of RUN_DIR/wandb/offline-run-*, oldest first."""
    return sorted((run_dir / WANDB_DIR).glob("offline-run-*/run-*.wandb"))


def _run_record(records: list[Any]) -> Any:
    return next(record.run for record in records if record.WhichOneof("record_type") == "run")


def _history(records: list[Any]) -> dict[int, dict[str, Any]]:
    """{step: {metric: value}} of the history records, without W&B's own `_` keys."""
    rows = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            rows[record.history.step.num] = {key: value for key, value in items.items() if not key.startswith("_")}
    return rows


def test_offline_run_records_the_logged_history_and_config(tmp_path, make_logger, offline_wandb):
    logger = make_logger(total_steps=3, wandb=SETTINGS)
    for step in range(3):
        logger.log(step, {"rollout/reward_mean": 0.25 * step, "train/policy_loss": 1.0 / (step + 1)})
    logger.log(2, {"accuracy": 0.625}, prefix="eval")
    _close(logger, offline_wandb)

    run_id = (tmp_path / WANDB_ID_FILE).read_text().strip()
    [path] = _offline_runs(tmp_path)
    assert path.name == f"run-{run_id}.wandb"
    records = _records(path)
    run = _run_record(records)
    assert (run.run_id, run.project, run.run_group, run.display_name) == (run_id, "hpc_rlhf-tests", "metrics",
                                                                           "offline-test")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["algo"] == {"advantage_estimator": "group_norm"} and config["actor"] == {"learning_rate": 1e-6}
    assert _history(records) == {
        0: {"rollout/reward_mean": 0.0, "train/policy_loss": 1.0},
        1: {"rollout/reward_mean": 0.25, "train/policy_loss": 0.5},
        2: {"rollout/reward_mean": 0.5, "train/policy_loss": pytest.approx(1.0 / 3.0), "eval/accuracy": 0.625},
    }
    assert any(record.WhichOneof("record_type") == "exit" for record in records), "close() must finish the W&B run"


def test_a_resumed_logger_continues_the_same_run(tmp_path, make_logger, offline_wandb, monkeypatch):
    first = make_logger(total_steps=4, wandb=SETTINGS)
    for step in range(3):
        first.log(step, {"rollout/kl": float(step)})
    _close(first, offline_wandb)
    # The requeued job is a new process (a fresh W&B setup); WANDB_MODE=offline alone makes its online-configured run
    # offline, as on a compute node without network.
    monkeypatch.setenv("WANDB_MODE", "offline")
    second = make_logger(total_steps=4, start_step=2, wandb=replace(SETTINGS, mode="online"))
    for step in range(2, 4):
        second.log(step, {"rollout/kl": 10.0 + step})
    _close(second, offline_wandb)

    run_id = (tmp_path / WANDB_ID_FILE).read_text().strip()
    older, newer = _offline_runs(tmp_path)
    assert older.name == newer.name == f"run-{run_id}.wandb"  # two attempts, one W&B run: `wandb sync` joins them
    assert _run_record(_records(newer)).run_id == run_id
    assert _history(_records(older)) == {0: {"rollout/kl": 0.0}, 1: {"rollout/kl": 1.0}, 2: {"rollout/kl": 2.0}}
    assert _history(_records(newer)) == {2: {"rollout/kl": 12.0}, 3: {"rollout/kl": 13.0}}


def test_other_ranks_start_no_wandb_run(tmp_path, make_logger):
    logger = make_logger(enabled=False, wandb=SETTINGS)
    logger.log(0, {"rollout/kl": 1.0})
    logger.close(plot=False)
    assert not (tmp_path / WANDB_DIR).exists() and not (tmp_path / WANDB_ID_FILE).exists()


def test_settings_come_from_the_logger_section(tmp_path):
    cfg = Config()
    assert wandb_settings(cfg) is None  # off by default, as OpenRLHF without --use_wandb
    cfg.train.run_dir = str(tmp_path / "grpo_math")
    cfg.logger.use_wandb, cfg.logger.wandb_group, cfg.logger.wandb_mode = True, "sweep-1", "offline"
    settings = wandb_settings(cfg)
    assert (settings.project, settings.group, settings.run_name, settings.org, settings.mode) == (
        "hpc_rlhf", "sweep-1", "grpo_math", None, "offline")
    assert settings.config["logger"]["use_wandb"] is True and settings.config["train"]["run_dir"] == cfg.train.run_dir
    cfg.logger.wandb_run_name, cfg.logger.wandb_org = "named", "my-team"
    assert (wandb_settings(cfg).run_name, wandb_settings(cfg).org) == ("named", "my-team")


def test_missing_wandb_is_a_one_line_usage_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    with pytest.raises(UsageError) as raised:
        import_wandb()
    message = str(raised.value)
    assert "\n" not in message and "logger.use_wandb" in message and "pip install wandb" in message
