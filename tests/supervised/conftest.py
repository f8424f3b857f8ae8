"""Fixtures for the supervised and preference trainer tests: tiny models, tiny datasets, configs, in-process runs,
and independent (float64, plain transformers) measurements of saved models."""

from __future__ import annotations

import contextlib
import importlib.util
import json
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def torch_threads(count: int):
    """Run the block with `count` intra-op threads: the tiny models are fastest single-threaded on a shared CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def single_thread():
    with torch_threads(1):
        yield


def _load_tool(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"supervised_tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def data_tool() -> Any:
    """tools/make_preference_data.py as a module."""
    return _load_tool("make_preference_data")


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    """The tiny random policy (+ reward/ beside it) and a copy warmed up on arithmetic (KD teacher, sampling)."""
    from hpc_rlhf.tasks.warm_start import warm_start
    from hpc_rlhf.builtin_models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("models")
    with torch_threads(1):
        tiny = build_tiny_model(root / "tiny", seed=0)
        arith = warm_start(tiny, root / "arith", steps=150, seed=0)
    return {"tiny": tiny, "reward": tiny / "reward", "arith": arith}


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, data_tool) -> Path:
    """The datasets of tools/make_preference_data.py (smaller train files) plus data/arithmetic's sft rows."""
    out = tmp_path_factory.mktemp("data")
    for name, rows in data_tool.build(0, n_train=1000, n_test=200).items():
        data_tool.write_jsonl(out / f"{name}.jsonl", rows)
    return out


@pytest.fixture
def make_config(models, data_dir, tmp_path) -> Callable[..., Any]:
    """make_config(name, overrides...) -> Config: configs/<name>_tiny.yaml pointed at the test's models, data and a
    fresh run dir; `**overrides` are `section__key=value` pairs."""
    from hpc_rlhf.config.loading import load_config

    def make(name: str, *extra: str, run_dir: Optional[Path] = None, **overrides: Any) -> Any:
        text = (REPO / "configs" / f"{name}_tiny.yaml").read_text()
        text = text.replace("data/arithmetic_supervised/", f"{data_dir}/")
        text = text.replace("data/arithmetic/", f"{REPO / 'data' / 'arithmetic'}/")
        text = text.replace("builtin:tiny-llama-arith", str(models["arith"]))
        text = text.replace("builtin:tiny-llama", str(models["tiny"]))
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        run = run_dir or tmp_path / "run"
        args = [f"--train.run_dir={run}", "--logger.progress_bar=false", "--logger.plot=false", *extra]
        args += [f"--{key.replace('__', '.')}={value}" for key, value in overrides.items()]
        return load_config(path, args).config

    return make


@contextlib.contextmanager
def single_rank_world():
    """A one-process gloo world with its role groups' plumbing, torn down afterwards."""
    from hpc_rlhf.distributed import TorchControlPlane, WorldInfo, free_port, init_distributed

    info = WorldInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, node_rank=0, master_addr="127.0.0.1",
                     master_port=free_port(), launcher="local")
    world = init_distributed(info, backend="gloo")
    control = TorchControlPlane.from_world(world, watch=False)
    try:
        yield world, control
    finally:
        control.close()
        world.close()


def run_trainer(cfg: Any, should_stop: Optional[Callable[[], bool]] = None, stop: Any = None) -> dict[str, float]:
    """Run cfg's trainer on a one-rank world in this process (as `python -m hpc_rlhf.train` would)."""
    from hpc_rlhf.distributed import build_role_groups, plan_layout
    from hpc_rlhf.trainers.registry import trainer_entry

    with single_rank_world() as (world, control):
        groups = build_role_groups(plan_layout(cfg.layout, 1, 1), 0)
        torch.manual_seed(cfg.train.seed)
        # The supervised entries also take a bare `should_stop` (a stop that is not requeued).
        return trainer_entry(cfg.train.trainer)(cfg, world, groups, control, stop=stop, should_stop=should_stop)


def run_cli(config: Path, run_dir: Path, ranks: int, *overrides: str, timeout_s: float = 200) -> None:
    """`python -m hpc_rlhf.train` with `ranks` local gloo processes (one node); fails the test with the log tail."""
    import os
    import subprocess
    import sys

    command = [sys.executable, "-m", "hpc_rlhf.train", "--config", str(config), f"--train.run_dir={run_dir}",
               "--logger.progress_bar=false", "--logger.plot=false", "--logger.use_tensorboard=false",
               f"--layout.actor.gpus={ranks}", f"--layout.generator.gpus={ranks}", f"--slurm.gpus_per_node={ranks}",
               *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited with {done.returncode}:\n{done.stderr[-4000:]}")


@pytest.fixture
def cli() -> Callable[..., None]:
    """cli(config_path, run_dir, ranks, *overrides): a real multi-process run through the entry point."""
    return run_cli


@pytest.fixture
def train() -> Callable[..., dict[str, float]]:
    """train(cfg, should_stop=None) -> last metrics: one in-process run of cfg's trainer."""
    return run_trainer


def metric(run_dir: Path, name: str) -> list[tuple[int, float]]:
    """(step, value) points of one metric of a run."""
    from hpc_rlhf.run.metrics import read_metrics

    return read_metrics(run_dir).get(name, [])


@pytest.fixture
def series() -> Callable[[Path, str], list[tuple[int, float]]]:
    return metric


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture
def rows() -> Callable[[Path], list[dict]]:
    return read_jsonl


# ----- independent measurements of saved models (plain transformers, float64) -------------------------------------
def _encode(tokenizer: Any, prompt: str, response: str) -> tuple[list[int], int]:
    """Ids of prompt (with bos) + response + eos, and the prompt length, the layout the trainers use."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    response_ids = tokenizer(response + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    return prompt_ids + response_ids, len(prompt_ids)


@torch.no_grad()
def response_log_prob(model: Any, tokenizer: Any, prompt: str, response: str) -> float:
    """log p(response + eos | prompt) in float64."""
    ids, prompt_len = _encode(tokenizer, prompt, response)
    logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    log_probs = torch.log_softmax(logits[:-1], dim=-1)
    targets = torch.tensor(ids[1:])
    return float(log_probs[torch.arange(len(ids) - 1), targets][prompt_len - 1:].sum())


def load_causal_lm(path: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(path)).eval(), AutoTokenizer.from_pretrained(str(path))


def preference_accuracy(path: Path, pairs: list[dict]) -> float:
    """Fraction of pairs where the causal LM at `path` gives the chosen response the higher log-likelihood."""
    model, tokenizer = load_causal_lm(path)
    wins = [response_log_prob(model, tokenizer, p["input"], p["chosen"])
            > response_log_prob(model, tokenizer, p["input"], p["rejected"]) for p in pairs]
    return sum(wins) / len(pairs)


def mean_nll(path: Path, rows: list[dict]) -> float:
    """Token-mean NLL of the responses (+ eos) of {input, response} rows under the causal LM at `path`."""
    model, tokenizer = load_causal_lm(path)
    total = tokens = 0.0
    for row in rows:
        total -= response_log_prob(model, tokenizer, row["input"], row["response"])
        tokens += len(_encode(tokenizer, row["input"], row["response"])[0]) - len(tokenizer(row["input"])["input_ids"])
    return total / tokens


@pytest.fixture
def measure() -> Any:
    """Independent measurements: preference_accuracy(path, pairs), mean_nll(path, rows), response_log_prob(...)."""
    class Measure:
        pass

    out = Measure()
    out.preference_accuracy = preference_accuracy
    out.mean_nll = mean_nll
    out.response_log_prob = response_log_prob
    out.load_causal_lm = load_causal_lm
    out.encode = _encode
    return out
