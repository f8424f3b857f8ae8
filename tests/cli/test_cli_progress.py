"""The first run looks alive: the built-in model's build prints progress lines instead of minutes of silence."""

from __future__ import annotations

import os

from hpc_rlhf.tasks.warm_start import progress_line, warm_start
from hpc_rlhf.builtin_models.resolve import build_builtin
from hpc_rlhf.builtin_models.tiny import build_tiny_model


def test_progress_line_estimates_the_rest_at_the_pace_so_far():
    assert progress_line(100, 500, 1.23456, 20.0) == ("warm-up step 100/500, loss 1.235, 20 s elapsed, "
                                                      "about 80 s left")
    assert progress_line(500, 500, 0.5, 100.0).endswith("about 0 s left")


def test_warm_up_reports_every_n_steps_and_the_last(tmp_path):
    build_tiny_model(tmp_path / "model", hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                     intermediate_size=32)
    lines: list[str] = []
    warm_start(tmp_path / "model", tmp_path / "out", steps=5, batch_size=4, report=lines.append, report_every=2)
    assert [line.split(",")[0] for line in lines] == ["warm-up step 2/5", "warm-up step 4/5", "warm-up step 5/5"]
    assert all(", loss " in line and " s elapsed, about " in line for line in lines)


def test_building_a_builtin_says_so_on_stderr(tmp_path, capsys):
    build_builtin("tiny-llama", tmp_path)
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("building builtin:tiny-llama (first use only; cached in ")
    assert err[-1].startswith("built builtin:tiny-llama in ") and err[-1].endswith(" s")


def test_library_noise_is_turned_off_unless_the_user_chose(monkeypatch):
    """Per-file progress bars of transformers flood log files; DeepSpeed warns while guessing a CPU accelerator."""
    from hpc_rlhf.cli import quiet_libraries

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    quiet_libraries(cpu_only=False)
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    assert "DS_ACCELERATOR" not in os.environ
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")
    quiet_libraries(cpu_only=True)
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "0"
    assert os.environ["DS_ACCELERATOR"] == "cpu"
