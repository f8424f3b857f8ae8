"""`python -m hpc_rlhf.submit` without a cluster: time limits, flags merged into the config, the checks before
submitting, the submitit parameters and the script a dry run prints."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hpc_rlhf.config.loading import load_config
from hpc_rlhf.slurm.job_spec import SlurmTimeError, allocation_problems, parse_time_limit, sbatch_options, \
    time_limit_minutes
from hpc_rlhf.submit import (
    RankEntry,
    executor_parameters,
    main,
    parse_args,
    preflight,
    render_submitit_script,
    slurm_overrides,
)

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny_cpu.yaml")
PPO_70B = str(REPO / "configs" / "ppo_70b.yaml")
CPU_3NODE = ["--config", TINY, "--layout.colocate=false", "--layout.generator.gpus=1", "--layout.actor.gpus=2",
             "--train.train_batch_size=4", "--train.micro_train_batch_size=2"]


@pytest.mark.parametrize("text, seconds", [
    ("30", 30 * 60), ("5:07", 5 * 60 + 7), ("01:02:03", 3723), ("48:00:00", 48 * 3600), ("2-0", 2 * 86400),
    ("1-02", 86400 + 2 * 3600), ("1-02:03", 86400 + 2 * 3600 + 3 * 60), ("3-04:05:06", 3 * 86400 + 14706),
])
def test_time_limits_read_like_sbatch_reads_them(text, seconds):
    assert parse_time_limit(text) == seconds


@given(days=st.integers(0, 30), hours=st.integers(0, 23), minutes=st.integers(0, 59), seconds=st.integers(0, 59))
def test_day_hour_minute_second_form_round_trips(days, hours, minutes, seconds):
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if total == 0:
        return
    assert parse_time_limit(f"{days}-{hours:02d}:{minutes:02d}:{seconds:02d}") == total
    assert time_limit_minutes(f"{days}-{hours:02d}:{minutes:02d}:{seconds:02d}") == -(-total // 60)


@pytest.mark.parametrize("text", ["", "1:2:3:4", "a", "1-", "-5", "0", "00:00:00", "1.5"])
def test_bad_time_limits_name_the_key(text):
    with pytest.raises(SlurmTimeError, match="slurm.time"):
        parse_time_limit(text)


def test_a_stop_signal_that_cannot_arrive_in_time_is_refused():
    cfg = load_config(TINY, ["--slurm.time=00:05:00", "--slurm.signal_delay_s=300"]).config
    assert [p for p in allocation_problems(cfg.slurm) if "signal_delay_s=300" in p and "(300 s)" in p]
    cfg = load_config(TINY, ["--slurm.time=00:05:01", "--slurm.signal_delay_s=300"]).config
    assert allocation_problems(cfg.slurm) == []


def test_flags_fill_the_slurm_section_and_win_over_overrides(tmp_path):
    args, loaded = parse_args([*CPU_3NODE, "--slurm.nodes=2", "--nodes", "3", "--gpus-per-node", "1",
                               "--partition", "gpu", "--account", "proj", "--qos", "high", "--time", "2:00:00",
                               "--job-name", "mine", f"--train.run_dir={tmp_path / 'run'}"])
    slurm = loaded.config.slurm
    assert (slurm.nodes, slurm.gpus_per_node, slurm.partition, slurm.account, slurm.qos, slurm.time,
            slurm.job_name) == (3, 1, "gpu", "proj", "high", "2:00:00", "mine")
    assert slurm_overrides(args)[0] == "--slurm.nodes=3"
    assert loaded.sources["slurm.nodes"] == "command line"


def test_relative_run_dir_becomes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    _, loaded = parse_args([*CPU_3NODE, "--nodes", "3", "--train.run_dir=runs/x"])
    assert loaded.config.train.run_dir == str(REPO / "runs" / "x")


def test_a_layout_that_does_not_fill_the_nodes_is_refused_before_submitting(capsys):
    with pytest.raises(SystemExit) as stop:
        parse_args([*CPU_3NODE, "--nodes", "2", "--dry-run"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "slurm.nodes x slurm.gpus_per_node = 2 x 1 = 2" in err and "= 3 ranks" in err


def test_preflight_names_the_run_dir_problems(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cfg = load_config(TINY, [*CPU_3NODE[2:], "--slurm.nodes=3",
                                                f"--train.run_dir={blocker / 'run'}"]).config
    found = preflight(cfg)
    assert any(e.startswith("train.run_dir:") and "is not a directory" in e for e in found.errors)

    cfg = load_config(TINY, [*CPU_3NODE[2:], "--slurm.nodes=3", f"--train.run_dir={tmp_path}",
                                                "--actor.pretrain=/no/such/model"]).config
    found = preflight(cfg)
    assert found.errors == []
    assert any(w.startswith("actor.pretrain: /no/such/model does not exist") for w in found.warnings)
    # /tmp (tmp_path) is local to each node; a 3-node job is warned (on a shared mount this warning is absent)
    from hpc_rlhf.slurm import mount_of_path

    if mount_of_path(tmp_path).sharing == "local":
        assert any(w.startswith("train.run_dir:") and "3-node job" in w for w in found.warnings)


def test_preflight_checks_each_dataset_of_a_comma_separated_list(tmp_path):
    real = REPO / "data" / "chat_arithmetic" / "sum3" / "test.jsonl"
    cfg = load_config(TINY, [*CPU_3NODE[2:], "--slurm.nodes=3", f"--train.run_dir={tmp_path}",
                             f"--eval.data={real}, /no/such/prompts.jsonl"]).config
    found = preflight(cfg)
    missing = [w for w in found.warnings if w.startswith("eval.data:") and "does not exist" in w]
    # the missing second dataset is named on its own; the first one exists and is not reported missing
    assert missing == ["eval.data: /no/such/prompts.jsonl does not exist on this machine; every compute node must "
                       "see it"]


def test_executor_parameters_follow_the_config():
    cfg = load_config(PPO_70B, ["--slurm.partition=gpu", "--slurm.mem=480G",
                                               "--slurm.setup=[module load cuda]"]).config
    params = executor_parameters(cfg)
    assert (params["nodes"], params["ntasks_per_node"], params["gpus_per_node"], params["cpus_per_task"]) == \
        (6, 8, 8, 12)
    assert params["time"] == 48 * 60 and params["signal_delay_s"] == 600 and params["exclusive"] is True
    assert params["additional_parameters"] == {"requeue": True, "mem": "480G"}
    assert params["partition"] == "gpu" and params["setup"][0] == "module load cuda"
    assert "account" not in params and "qos" not in params
    cpu = executor_parameters(load_config(TINY).config)
    assert "gpus_per_node" not in cpu and cpu["ntasks_per_node"] == 1  # train.device cpu: no GPUs asked for


def test_dry_run_prints_the_submitit_script_and_writes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["--config", PPO_70B, "--nodes", "6", "--qos", "high", "--time", "1-00:00:00",
                 "--dry-run", f"--train.run_dir={run_dir}"])
    assert code == 0
    script = capsys.readouterr().out
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    for line in ("#SBATCH --nodes=6", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --qos=high", "#SBATCH --time=1440", "#SBATCH --signal=USR2@600", "#SBATCH --requeue",
                 "#SBATCH --open-mode=append", f"#SBATCH --output={run_dir}/submitit/%j_0_log.out"):
        assert line in lines, line
    assert sum(line.startswith("srun ") for line in lines) == 1
    assert f"-m submitit.core._submit {run_dir}/submitit" in script
    assert not run_dir.exists()
    assert script == render_submitit_script(parse_args(["--config", PPO_70B, "--nodes", "6", "--qos",
                                                        "high", "--time", "1-00:00:00",
                                                        f"--train.run_dir={run_dir}"])[1].config)


def test_print_run_dir_for_batch_scripts(tmp_path):
    result = subprocess.run([sys.executable, "-m", "hpc_rlhf.submit", "--config", "configs/tiny_cpu.yaml",
                             "--print-run-dir", "--train.run_dir=runs/elsewhere"], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{REPO / 'runs' / 'elsewhere'}\n"
    bad = subprocess.run([sys.executable, "-m", "hpc_rlhf.submit", "--config", "configs/tiny_cpu.yaml",
                          "--print-run-dir", "--train.run_dirr=x"], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "train.run_dirr" in bad.stderr and "did you mean train.run_dir" in bad.stderr


def test_submitting_without_slurm_says_where_to_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, no srun
    code = main([*CPU_3NODE, "--nodes", "3", f"--train.run_dir={tmp_path / 'run'}"])
    assert code == 2
    assert "sbatch and srun not found on PATH" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_rank_entry_pickles_by_reference():
    cfg = load_config(TINY).config
    payload = pickle.dumps(RankEntry(cfg))
    assert b"hpc_rlhf.submit" in payload and b"RankEntry" in payload
    assert pickle.loads(payload) == RankEntry(cfg)


def test_a_checkpoint_of_another_config_is_refused_before_submitting(tmp_path, capsys, monkeypatch):
    """The run dir holds a checkpoint saved under another seed: the job would fail at start-up, so submit says so now."""
    import torch

    from hpc_rlhf.run.checkpoint import ModelAndOptimizer, config_fingerprint, save_checkpoint
    from hpc_rlhf.config.loading import config_to_dict

    run_dir = tmp_path / "run"
    args = [*CPU_3NODE, "--nodes", "3", f"--train.run_dir={run_dir}"]
    saved_cfg = parse_args([*args, "--train.seed=7"])[1].config
    save_checkpoint(run_dir / "checkpoints", 4, rank=0, world_size=1, barrier=lambda: None,
                    engines={"actor": ModelAndOptimizer(torch.nn.Linear(2, 2))}, trainer_state={"next_iteration": 4},
                    config_fingerprint=config_fingerprint(config_to_dict(saved_cfg)), keep_last=1)

    same = preflight(parse_args([*args, "--train.seed=7", "--train.max_iterations=9"])[1].config)
    assert same.errors == [] and same.resume_from == run_dir / "checkpoints" / "iter_000004"  # volatile keys may change

    monkeypatch.setenv("PATH", str(tmp_path))
    assert main([*args, "--train.seed=8"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume from" in err and "iter_000004" in err
    assert "train.seed: checkpoint has 7, config has 8" in err


def test_dry_run_still_prints_but_fails_on_a_problem(tmp_path, capsys):
    code = main([*CPU_3NODE, "--nodes", "3", "--time", "1", "--slurm.signal_delay_s=90", "--dry-run",
                 f"--train.run_dir={tmp_path / 'run'}"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out.startswith("#!/bin/bash")
    assert "error (submitting would stop here): slurm.signal_delay_s=90" in captured.err


def test_a_node_range_asks_sbatch_for_it_when_the_layout_scales(tmp_path, capsys):
    scaled = [*CPU_3NODE, "--layout.scale=proportional",
              f"--train.run_dir={tmp_path / 'run'}"]
    args, loaded = parse_args([*scaled, "--nodes", "2-3"])  # generator 1 + actor 1 on 2 nodes, 1 + 2 on 3
    assert slurm_overrides(args) == ["--slurm.min_nodes=2", "--slurm.nodes=3"]
    assert (loaded.config.slurm.min_nodes, loaded.config.slurm.nodes) == (2, 3)
    assert executor_parameters(loaded.config)["nodes"] == "2-3"
    assert "#SBATCH --nodes=2-3" in render_submitit_script(loaded.config).splitlines()
    nodes = next(o for o in sbatch_options(loaded.config) if o.name == "nodes")
    assert nodes.flag() == "--nodes=2-3" and "re-planned for the ranks the job gets" in nodes.why
    with pytest.raises(SystemExit):  # on 4 nodes the 3 actor ranks would not split train_batch_size=4
        parse_args([*scaled, "--nodes", "2-4"])
    assert ("train_batch_size=4 is not a multiple of micro_train_batch_size x data-parallel ranks (actor.gpus) = "
            "2 x 3 = 6, as re-planned for 4 node(s) x 1 = 4 ranks") in capsys.readouterr().err
    # without --nodes the config's count stands, and a plain count means exactly that many nodes
    assert executor_parameters(parse_args([*scaled, "--slurm.nodes=3"])[1].config)["nodes"] == 3
    assert executor_parameters(parse_args([*scaled, "--slurm.min_nodes=2", "--nodes", "3"])[1].config)["nodes"] == 3
    with pytest.raises(SystemExit):  # a fixed layout cannot take a range
        parse_args([*CPU_3NODE, "--nodes", "2-3", "--dry-run"])
    assert "needs a layout that is re-planned for the ranks the job gets" in capsys.readouterr().err
