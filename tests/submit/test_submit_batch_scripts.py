"""The shipped batch scripts: in step with their configs (tools/make_sbatch.py --check), valid bash, and carrying the
options and lines the checkpoint-restart mechanism needs, each explained by a comment."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hpc_rlhf.config.schema import SUPERVISED_TRAINERS
from hpc_rlhf.config.loading import load_config
from hpc_rlhf.slurm.batch_script import BatchScriptSpec, config_header, render_batch_script
from hpc_rlhf.slurm.job_spec import LOG_PATTERN
from hpc_rlhf.slurm.requeue import srun_wait_lines, stop_trap_lines

REPO = Path(__file__).resolve().parents[2]
MAKE_SBATCH = REPO / "tools" / "make_sbatch.py"
RECIPES = ("ppo_70b", "grpo_7b", "reinforce_baseline_1node", "colocated_8gpu")  # one script per recipe config


def load_tool_specs() -> dict[str, BatchScriptSpec]:
    """The SCRIPTS table of tools/make_sbatch.py (a script, not a package: loaded from its path)."""
    spec = importlib.util.spec_from_file_location("hpc_rlhf_make_sbatch_tool", MAKE_SBATCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {script.name: script for script in module.SCRIPTS}


SCRIPTS = load_tool_specs()


def script_text(name: str) -> str:
    return (REPO / "sbatch" / f"{name}.sh").read_text()


def baked_overrides(text: str) -> list[str]:
    """The `--key=value` lines of a script's `set -- ... "$@"` block."""
    block = re.search(r'^set -- \\\n(.*?)^  "\$@"$', text, re.S | re.M)
    return [line.strip().rstrip("\\").strip() for line in block.group(1).splitlines()] if block else []


def sbatch_options(text: str) -> dict[str, str | None]:
    options = {}
    for line in text.splitlines():
        if line.startswith("#SBATCH "):
            name, _, value = line.removeprefix("#SBATCH --").partition("=")
            options[name] = value if value else None
    return options


def test_committed_scripts_match_their_configs():
    result = subprocess.run([sys.executable, str(MAKE_SBATCH), "--check"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, f"sbatch/ is out of date:\n{result.stdout}\n{result.stderr}"


def test_check_fails_and_shows_the_difference_when_a_script_drifts(tmp_path):
    copy = tmp_path / "sbatch"
    shutil.copytree(REPO / "sbatch", copy)
    path = copy / "grpo_7b.sh"
    path.write_text(path.read_text().replace("#SBATCH --nodes=2", "#SBATCH --nodes=3"))
    (copy / "ppo_70b.sh").unlink()
    result = subprocess.run([sys.executable, str(MAKE_SBATCH), "--check", "--sbatch-dir", str(copy)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "-#SBATCH --nodes=3" in result.stdout and "+#SBATCH --nodes=2" in result.stdout
    assert "grpo_7b.sh" in result.stderr and "ppo_70b.sh" in result.stderr
    subprocess.run([sys.executable, str(MAKE_SBATCH), "--sbatch-dir", str(copy)], check=True, capture_output=True,
                   timeout=120)
    for name in SCRIPTS:  # writing brings them back
        assert (copy / f"{name}.sh").read_text() == script_text(name)


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_script_carries_the_config_allocation_and_the_requeue_mechanism(name):
    text = script_text(name)
    config_path = SCRIPTS[name].config_path
    overrides = baked_overrides(text)  # read back from the script, not from the tool's table
    assert overrides == list(SCRIPTS[name].overrides)
    cfg = load_config(REPO / config_path, overrides).config
    subprocess.run(["bash", "-n", str(REPO / "sbatch" / f"{name}.sh")], check=True, timeout=30)
    assert text.startswith("#!/bin/bash\n")

    options = sbatch_options(text)
    expected = {"job-name": cfg.slurm.job_name, "nodes": str(cfg.slurm.nodes),
                "ntasks-per-node": str(cfg.slurm.gpus_per_node), "cpus-per-task": str(cfg.slurm.cpus_per_task),
                "time": cfg.slurm.time, "requeue": None, "signal": f"B:USR1@{cfg.slurm.signal_delay_s}",
                "open-mode": "append", "output": LOG_PATTERN}
    for key, value in expected.items():
        assert options.get(key, "<absent>") == value, (key, options)
    assert options.get("gpus-per-node", "<none>") == (str(cfg.slurm.gpus_per_node) if cfg.train.device != "cpu"
                                                      else "<none>")
    assert ("exclusive" in options) == cfg.slurm.exclusive
    assert cfg.slurm.nodes * cfg.slurm.gpus_per_node == cfg.layout.world_size()

    lines = text.splitlines()
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    sbatch_lines = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    assert max(sbatch_lines) < first_command  # sbatch stops reading directives at the first command
    for i in sbatch_lines:  # every choice is explained right above it
        assert lines[i - 1].startswith("# "), lines[i - 1]

    commands = [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
    srun = [line for line in commands if line.startswith("srun ")]
    assert len(srun) == 1 and f"python -m hpc_rlhf.launch --config {config_path} \"$@\" &" in srun[0]
    assert all(line in lines for line in stop_trap_lines())
    wait_lines = srun_wait_lines(srun[0].removesuffix(" &"))
    start = lines.index(wait_lines[0])
    assert lines[start:start + len(wait_lines)] == wait_lines
    assert f'--config {config_path} --print-run-dir "$@"' in text  # the trap's RUN_DIR honours the same overrides
    assert all(line in lines for line in cfg.slurm.setup)


def test_every_trainer_has_a_script():
    """Each train.trainer has at least one generated example script, so every trainer's job is shown under SLURM."""
    trainers = {load_config(REPO / spec.config_path, spec.overrides).config.train.trainer for spec in SCRIPTS.values()}
    assert trainers == {"ppo", *SUPERVISED_TRAINERS}


def test_the_header_is_the_config_description():
    text = script_text("ppo_70b")
    header = config_header((REPO / "configs" / "ppo_70b.yaml").read_text())
    assert header and text.splitlines()[1:1 + len(header)] == [f"# {line}" if line else "#" for line in header]


def test_setup_lines_and_site_options_are_rendered(tmp_path):
    cfg = load_config(REPO / "configs" / "grpo_7b.yaml", [
        "--slurm.partition=gpu", "--slurm.account=proj42", "--slurm.qos=low", "--slurm.constraint=h100",
        "--slurm.mem=480G", "--slurm.exclusive=false",
        "--slurm.setup=[module load cuda/12.4, source /shared/venv/bin/activate]"]).config
    spec = BatchScriptSpec("custom", "configs/grpo_7b.yaml", overrides=("--train.seed=3",))
    text = render_batch_script(spec, cfg)
    options = sbatch_options(text)
    assert (options["partition"], options["account"], options["qos"], options["constraint"], options["mem"]) == \
        ("gpu", "proj42", "low", "h100", "480G")
    assert "exclusive" not in options
    lines = text.splitlines()
    assert lines.index("module load cuda/12.4") < lines.index("source /shared/venv/bin/activate") < \
        next(i for i, line in enumerate(lines) if line.startswith("srun "))
    assert baked_overrides(text) == ["--train.seed=3"]
    path = tmp_path / "custom.sh"
    path.write_text(text)
    subprocess.run(["bash", "-n", str(path)], check=True, timeout=30)


def test_every_recipe_has_its_script_and_every_script_is_generated(tmp_path):
    for name in RECIPES:  # one per recipe, from configs/<name>.yaml without overrides
        assert SCRIPTS[name].config_path == f"configs/{name}.yaml" and not SCRIPTS[name].overrides
        assert yaml.safe_load((REPO / SCRIPTS[name].config_path).read_text())["slurm"]["job_name"] == name
    assert "tiny_cpu_3node" in SCRIPTS
    assert {path.stem for path in (REPO / "sbatch").glob("*.sh")} == set(SCRIPTS)
    copy = tmp_path / "sbatch"
    shutil.copytree(REPO / "sbatch", copy)
    (copy / "handwritten.sh").write_text("#!/bin/bash\nsrun true\n")
    result = subprocess.run([sys.executable, str(MAKE_SBATCH), "--check", "--sbatch-dir", str(copy)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "not generated by this tool" in result.stderr and "handwritten.sh" in result.stderr
