"""Errors a user can fix reach them as one line, before any model loads, with tracebacks only behind --debug."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hpc_rlhf.cli import UsageError, describe_failure, run_entry
from hpc_rlhf.config.preflight import check_machine, model_spec_problem
from hpc_rlhf.config.loading import load_config

REPO = Path(__file__).resolve().parents[2]
TINY = "configs/tiny_cpu.yaml"


def run(args: list[str], tmp_path: Path, *, env: dict | None = None, module: str = "hpc_rlhf.train",
        timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` in the repository, with an empty model cache of its own (to see whether it was used)."""
    full_env = dict(os.environ, HPC_RLHF_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    full_env.pop("HPC_RLHF_DEBUG", None)
    full_env.update(env or {})
    command = [sys.executable, "-m", module, *args] if module else [sys.executable, *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=full_env)


def assert_one_line(result: subprocess.CompletedProcess, prog: str, *fragments: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def test_a_model_path_that_does_not_exist(tmp_path):
    run_dir = tmp_path / "run"
    result = run(["--config", TINY, f"--train.run_dir={run_dir}", "--actor.pretrain=/no/such/model"], tmp_path)
    assert_one_line(result, "python -m hpc_rlhf.train", "actor.pretrain (command line)", "/no/such/model",
                    "does not exist")
    assert not run_dir.exists()  # nothing written for a run that never started
    assert not (tmp_path / "cache").exists()  # and no model was built


def test_a_missing_and_a_malformed_dataset_are_reported_before_any_model_loads(tmp_path):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"input": "1+1=", "label": "2"}\n{"input": "2+2=", "label": "4"\n')
    result = run(["--config", TINY, f"--train.run_dir={tmp_path / 'run'}", f"--data.prompt_data={bad}"], tmp_path)
    assert_one_line(result, "python -m hpc_rlhf.train", "data.prompt_data (command line)",
                    f"row 1 (line 2) of {bad} is not valid JSON")
    assert not (tmp_path / "cache").exists()

    missing = tmp_path / "nope.jsonl"
    result = run(["--config", TINY, f"--train.run_dir={tmp_path / 'run'}", f"--eval.data={missing}"], tmp_path)
    assert_one_line(result, "python -m hpc_rlhf.train", "eval.data (command line)", f"dataset {missing} does not exist")
    assert not (tmp_path / "cache").exists()


def test_machine_checks_name_each_problem(monkeypatch):
    """The checks themselves, without a process: keys, sources and the dataset rows."""
    loaded = load_config(REPO / TINY, ["--actor.pretrain=builtin:tiny-lama", "--data.input_key=question",
                                       "--rollout.batch_size=8"])
    monkeypatch.chdir(REPO)
    problems = check_machine(loaded.config, loaded.sources)
    assert problems[0].startswith("actor.pretrain (command line): unknown built-in model 'builtin:tiny-lama'")
    assert problems[1].startswith("data.prompt_data (")
    assert "key 'question' is missing in row 0 (line 1) of data/arithmetic/train.jsonl" in problems[1]
    assert len(problems) == 3 and problems[2].startswith("eval.data (")
    assert model_spec_problem("Qwen/Qwen2.5-0.5B") is None  # a hub name: not checkable offline, so let through
    assert model_spec_problem(str(REPO)) == f"{REPO} is a folder but not a model folder (it has no config.json or " \
                                            "adapter_config.json)"
    # a path that no run creates (runs/tiny_cpu/hf/actor exists once the README's first command has run)
    assert "not a hub name" in model_spec_problem("runs/no_such_run/hf/actor/")
    few = load_config(REPO / TINY, ["--data.max_samples=4"])
    assert check_machine(few.config, few.sources) == [
        f"data.prompt_data ({REPO / TINY}): data/arithmetic/train.jsonl has 4 usable prompts, fewer than "
        f"rollout.batch_size={few.config.rollout.batch_size}"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_one_line_and_touches_no_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    result = run(["--config", TINY, f"--train.run_dir={run_dir}", "--train.device=cuda"], tmp_path)
    assert_one_line(result, "python -m hpc_rlhf.train", "train.device (command line): cuda, but torch sees no GPU",
                    "--train.device=cpu")
    assert not run_dir.exists()


def test_debug_shows_the_traceback(tmp_path):
    args = ["--config", TINY, f"--train.run_dir={tmp_path / 'run'}", "--actor.pretrain=/no/such/model"]
    for extra, env in ((["--debug"], {}), ([], {"HPC_RLHF_DEBUG": "1"})):
        result = run([*args, *extra], tmp_path, env=env)
        assert result.returncode == 1
        assert "Traceback (most recent call last)" in result.stderr
        assert "UsageError: actor.pretrain (command line): /no/such/model does not exist" in result.stderr


def test_launch_entry_is_one_line_too(tmp_path):
    result = run(["--config", TINY, f"--train.run_dir={tmp_path / 'run'}", "--data.prompt_data=/no/data.jsonl"],
                 tmp_path, module="hpc_rlhf.launch")
    assert_one_line(result, "python -m hpc_rlhf.launch", "dataset /no/data.jsonl does not exist")


def test_plan_job_with_an_unknown_shape(tmp_path):
    args = ["tools/plan_job.py", "--config", "configs/ppo_70b.yaml", "--policy-shape", "llama-70b",
            "--peak-tflops", "990", "--bandwidth-tbs", "3.35"]
    result = run(args, tmp_path, module="")
    line = assert_one_line(result, "plan_job.py", "--policy-shape 'llama-70b'", "llama3.1-70b")
    assert "known:" in line
    result = run([*args[:4], "llama3.1-70b", *args[5:], "--value-shape", "x"], tmp_path, module="")
    assert_one_line(result, "plan_job.py", "--value-shape 'x'")
    result = run(["tools/plan_job.py", "--config", "configs/nope.yaml", *args[3:]], tmp_path, module="")
    assert_one_line(result, "plan_job.py", "config file configs/nope.yaml does not exist")


def test_run_entry_turns_errors_into_one_line(capsys, monkeypatch):
    monkeypatch.delenv("HPC_RLHF_DEBUG", raising=False)

    def fail(err):
        def body():
            raise err
        return body

    assert run_entry("prog", fail(UsageError("a.b (command line): first\nc.d (x.yaml): second"))) == 2
    assert capsys.readouterr().err == "prog: error: a.b (command line): first\nprog: error: c.d (x.yaml): second\n"
    assert run_entry("prog", fail(RuntimeError("boom\nmore"))) == 1
    assert capsys.readouterr().err == ("prog: error: RuntimeError: boom | more (--debug or HPC_RLHF_DEBUG=1 shows "
                                       "the traceback)\n")
    monkeypatch.setenv("HPC_RLHF_DEBUG", "1")
    with pytest.raises(RuntimeError):
        run_entry("prog", fail(RuntimeError("boom")))


def test_a_rank_process_that_failed_is_described_as_such():
    """spawn_local raises torch's exceptions when a rank process ends badly; the rank printed its own reason."""
    from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

    exited = ProcessExitedException("process 1 terminated with exit code 1", error_index=1, error_pid=4321,
                                    exit_code=1)
    assert describe_failure(exited) == "rank 1 ended with exit code 1; the rank's own error is printed above"
    raised = ProcessRaisedException("Traceback ...\nValueError: x", error_index=0, error_pid=4321)
    assert describe_failure(raised) == "rank 0 ended; the rank's own error is printed above"


def test_an_error_inside_a_rank_is_one_line_and_its_traceback_needs_debug(tmp_path):
    """A failure only the rank can see (a reward function that raises) ends the job with the rank's one abort line;
    --debug adds the rank's traceback."""
    reward = tmp_path / "bad_reward.py"
    reward.write_text("def reward_func(queries, prompts, labels, **kw):\n"
                      "    raise ValueError('label row 3 is not a number')\n")
    args = ["--config", TINY, f"--reward.reward_func_path={reward}", "--train.max_iterations=1",
            "--rollout.batch_size=2", "--rollout.n_samples_per_prompt=2", "--train.train_batch_size=4",
            "--train.micro_train_batch_size=4", "--eval.data=", "--actor.pretrain=builtin:tiny-llama"]
    quiet = run([*args, f"--train.run_dir={tmp_path / 'quiet'}"], tmp_path, timeout=300)
    assert quiet.returncode != 0
    assert "aborting the job: ValueError: label row 3 is not a number" in quiet.stderr + quiet.stdout
    assert "Traceback" not in quiet.stderr + quiet.stdout
    loud = run([*args, f"--train.run_dir={tmp_path / 'loud'}", "--debug"], tmp_path, timeout=300)
    assert loud.returncode != 0 and "Traceback" in loud.stderr + loud.stdout
