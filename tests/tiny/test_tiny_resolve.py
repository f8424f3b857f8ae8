"""builtin:tiny-llama resolution: plain paths pass through, the cache is built once, concurrent builders agree."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from hpc_rlhf.builtin_models.cache import CACHE_ENV, build_once, cache_root
from hpc_rlhf.builtin_models.resolve import BUILTIN_FORMAT_VERSION, resolve_model_path


@pytest.mark.parametrize("spec", ["/models/llama-3-8b", "relative/dir", "Qwen/Qwen2.5-0.5B-Instruct", ""])
def test_plain_specs_are_returned_unchanged(spec, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    assert resolve_model_path(spec) == spec
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("spec", ["builtin:huge-llama", "builtin:tiny-llama/critic", "builtin:"])
def test_unknown_builtin_names_the_known_ones(spec, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    with pytest.raises(ValueError, match="known: builtin:tiny-llama, builtin:tiny-llama/reward"):
        resolve_model_path(spec)


def test_cache_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "hpc_rlhf"


def test_builtin_is_built_once_into_the_cache_and_loads(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    policy = resolve_model_path("builtin:tiny-llama")
    reward = resolve_model_path("builtin:tiny-llama/reward")
    assert Path(policy) == tmp_path / f"tiny-llama-v{BUILTIN_FORMAT_VERSION}"
    assert Path(reward) == Path(policy) / "reward"
    assert AutoModelForCausalLM.from_pretrained(policy).config.hidden_size == 64
    assert AutoModelForSequenceClassification.from_pretrained(reward).config.num_labels == 1
    assert AutoTokenizer.from_pretrained(reward).pad_token == "<pad>"
    weights = Path(policy) / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert resolve_model_path("builtin:tiny-llama") == policy
    assert weights.stat().st_mtime_ns == stamp  # not rebuilt
    assert sorted(p.name for p in tmp_path.iterdir()) == [Path(policy).name]  # no temporary folders left


def test_build_once_under_a_thread_race_publishes_exactly_one_build(tmp_path):
    final = tmp_path / "cache" / "model"
    started = threading.Barrier(6)
    results: list[Path] = []

    def slow_build(folder: Path) -> None:
        (folder / "builder.txt").write_text(threading.current_thread().name)
        time.sleep(0.2)  # every thread is inside the build before any renames

    def worker() -> None:
        started.wait()
        results.append(build_once(final, slow_build))

    threads = [threading.Thread(target=worker, name=f"builder-{i}") for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results == [final] * 6
    assert (final / "builder.txt").read_text().startswith("builder-")
    assert [p.name for p in final.parent.iterdir()] == ["model"]


def test_build_once_failure_leaves_nothing_behind(tmp_path):
    final = tmp_path / "model"

    def broken_build(folder: Path) -> None:
        (folder / "half.bin").write_bytes(b"x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        build_once(final, broken_build)
    assert list(tmp_path.iterdir()) == []
    assert build_once(final, lambda folder: (folder / "ok").write_text("1")) == final
    assert (final / "ok").read_text() == "1"


@pytest.mark.timeout(180)
def test_processes_resolving_at_once_share_one_folder(tmp_path):
    env = {**os.environ, CACHE_ENV: str(tmp_path)}
    code = "from hpc_rlhf.builtin_models.resolve import resolve_model_path; print(resolve_model_path('builtin:tiny-llama'))"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=150)
        assert proc.returncode == 0, err
        outputs.append(out.strip().splitlines()[-1])
    expected = str(tmp_path / f"tiny-llama-v{BUILTIN_FORMAT_VERSION}")
    assert outputs == [expected] * 3
    assert [p.name for p in tmp_path.iterdir()] == [Path(expected).name]
    assert AutoModelForCausalLM.from_pretrained(expected).config.num_hidden_layers == 2
