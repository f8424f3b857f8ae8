"""Dataset mixing: the rows `datasets.interleave_datasets` selects for OpenRLHF, a composition that follows the
probabilities, and one mix for every call, process and rank with the same seed."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest

from hpc_rlhf.data import interleave_order, load_prompts, mix, mixed_records, probability_problems
from tests.multiproc import run_ranks


def write_jsonl(path: Path, prefix: str, count: int) -> Path:
    path.write_text("".join(json.dumps({"input": f"{prefix}{i}", "label": str(i)}) + "\n" for i in range(count)))
    return path


@pytest.mark.parametrize("lengths, probabilities, seed", [
    ([5, 3], [0.7, 0.3], 42),
    ([100, 7, 30], [0.2, 0.5, 0.3], 1),
    ([40, 40], [0.95, 0.05], 7),
    ([1], [1.0], 42),
])
def test_the_mix_is_the_rows_openrlhf_blends(lengths, probabilities, seed):
    """OpenRLHF's blending_datasets = interleave_datasets(probabilities, seed, stopping_strategy="all_exhausted")."""
    datasets = pytest.importorskip("datasets")
    parts = [datasets.Dataset.from_dict({"d": [d] * n, "row": list(range(n))}) for d, n in enumerate(lengths)]
    blended = datasets.interleave_datasets(parts, probabilities=probabilities, seed=seed,
                                           stopping_strategy="all_exhausted")
    assert interleave_order(lengths, probabilities, seed) == list(zip(blended["d"], blended["row"]))


SEEDS = range(20)


@pytest.mark.parametrize("lengths, probabilities", [([7000, 3000], [0.7, 0.3]), ([100, 100], [0.9, 0.1])])
def test_composition_follows_the_probabilities(lengths, probabilities):
    """The mix ends at N = max_d T_d, T_d the draw that takes dataset d's len(d)-th row: E[T_d] = len(d) / p_d. Given N,
    dataset d's share c_d / N is a binomial proportion with sd sqrt(p_d (1 - p_d) / N); the stopping rule moves it by
    the same order (at N one dataset has exactly len(d) draws, and N itself has sd sqrt(len(d) (1 - p_d)) / p_d). So
    every seed's share lies within 5 sd of p_d, and the mean over 20 seeds within 5 sd / sqrt(20)."""
    expected_n = max(n / p for n, p in zip(lengths, probabilities))
    shares = {d: [] for d in range(len(lengths))}
    for seed in SEEDS:
        order = interleave_order(lengths, probabilities, seed)
        counts = Counter(d for d, _ in order)
        for d, (n, p) in enumerate(zip(lengths, probabilities)):
            sd = math.sqrt(p * (1 - p) / expected_n)
            share = counts[d] / len(order)
            assert abs(share - p) < 5 * sd, (seed, d, share, p, sd)
            shares[d].append(share)
            # every row is used, in order, then again from the start: row r appears ceil((c_d - r) / n) times
            rows = Counter(row for source, row in order if source == d)
            assert rows == {r: -(-(counts[d] - r) // n) for r in range(n)}
        assert all(counts[d] >= n for d, n in enumerate(lengths)), "every dataset is used up at least once"
    for d, p in enumerate(probabilities):
        sd = math.sqrt(p * (1 - p) / expected_n)
        assert abs(sum(shares[d]) / len(SEEDS) - p) < 5 * sd / math.sqrt(len(SEEDS))


def test_mix_ends_when_the_last_dataset_is_used_up():
    """By hand: one dataset with probability 1 is read once in order; without probabilities the datasets follow each
    other; the last row of a mix is the last unread row of some dataset."""
    assert interleave_order([4], [1.0], 123) == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert mix([["a0", "a1"], ["b0"]], None, 5) == ["a0", "a1", "b0"]
    for seed in range(10):
        order = interleave_order([3, 5], [0.5, 0.5], seed)
        last_source, last_row = order[-1]
        assert last_row == [3, 5][last_source] - 1
        assert sum(1 for d, _ in order if d == last_source) == [3, 5][last_source]


def test_same_seed_same_mix_other_seed_other_mix():
    first = interleave_order([50, 20], [0.6, 0.4], seed=3)
    assert interleave_order([50, 20], [0.6, 0.4], seed=3) == first
    assert interleave_order([50, 20], [0.6, 0.4], seed=4) != first


@pytest.mark.parametrize("count, probabilities, message", [
    (2, [1.0], "1 probabilities for 2 dataset"),
    (2, [1.0, 0.0], "must be > 0"),
    (2, [0.5, 0.6], "must sum to 1"),
])
def test_probability_problems_are_named(count, probabilities, message):
    assert any(message in problem for problem in probability_problems(count, probabilities))
    with pytest.raises(ValueError, match=message):
        interleave_order([3] * count, probabilities, 0)
    assert probability_problems(2, [0.25, 0.75]) == [] and probability_problems(3, None) == []


def test_prompts_of_a_mix(tmp_path):
    """load_prompts over two files: comma string and list give the same mix; index numbers the mix; the datasets'
    shares follow the probabilities; max_samples caps each dataset, then the mix (OpenRLHF's max_count and select)."""
    a = write_jsonl(tmp_path / "a.jsonl", "a", 300)
    b = write_jsonl(tmp_path / "b.jsonl", "b", 100)
    mixed = load_prompts(f"{a},{b}", label_key="label", probabilities=[0.75, 0.25], seed=42)
    assert mixed == load_prompts([str(a), str(b)], label_key="label", probabilities=[0.75, 0.25], seed=42)
    order = interleave_order([300, 100], [0.75, 0.25], 42)
    assert [e.prompt for e in mixed] == [f"{'ab'[d]}{row}" for d, row in order]
    assert [e.label for e in mixed] == [str(row) for _, row in order]
    assert [e.index for e in mixed] == list(range(len(mixed)))
    share_a = sum(e.prompt.startswith("a") for e in mixed) / len(mixed)
    assert abs(share_a - 0.75) < 5 * math.sqrt(0.75 * 0.25 / 400)
    capped = load_prompts([a, b], probabilities=[0.75, 0.25], seed=42, max_samples=5)
    first_five = [f"{'ab'[d]}{row}" for d, row in interleave_order([5, 5], [0.75, 0.25], 42)[:5]]
    assert [e.prompt for e in capped] == first_five
    # without probabilities: one file after the other, max_samples over both (a prefix of the concatenation)
    assert [e.prompt for e in load_prompts(f"{b},{a}", max_samples=102)] == [f"b{i}" for i in range(100)] + ["a0", "a1"]


def test_mixed_records_stream_without_probabilities(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", "a", 3)
    rows = mixed_records([a, a], max_samples=4)
    assert not isinstance(rows, list), "the rows of unmixed datasets are streamed"
    assert [(where.row, row["input"]) for where, row in rows] == [(0, "a0"), (1, "a1"), (2, "a2"), (0, "a0")]
    with pytest.raises(ValueError, match="max_samples"):
        mixed_records(a, max_samples=0)


def prompts_on_rank(paths: list[str]) -> list[tuple[str, str | None, int]]:
    """What one rank's load_prompts returns for the mix (a module-level function, for run_ranks)."""
    return [(e.prompt, e.label, e.index)
            for e in load_prompts(paths, label_key="label", probabilities=[0.6, 0.4], seed=11)]


def test_every_rank_builds_the_same_mix(tmp_path):
    """Fresh processes (as ranks, and as a resumed job is) build exactly the mix this process builds."""
    paths = [str(write_jsonl(tmp_path / "a.jsonl", "a", 30)), str(write_jsonl(tmp_path / "b.jsonl", "b", 20))]
    here = prompts_on_rank(paths)
    assert run_ranks(prompts_on_rank, 2, paths, init_process_group=False, timeout_s=120) == [here, here]


def test_supervised_rows_mix_by_dataset_probs(tmp_path, tiny_tokenizer):
    """sft / rm / dpo / kto / kd read data.dataset through one row source: mixed by data.dataset_probs with
    train.seed; eval.data (one dataset) is never mixed."""
    from hpc_rlhf.config.loading import load_config
    from hpc_rlhf.trainers.supervised_data import load_sft_examples

    def write_sft(path: Path, prefix: str, count: int) -> Path:
        path.write_text("".join(json.dumps({"input": f"{prefix}{i}", "response": str(i)}) + "\n"
                                for i in range(count)))
        return path

    a, b = write_sft(tmp_path / "a.jsonl", "a", 12), write_sft(tmp_path / "b.jsonl", "b", 4)
    dataset = f"{a},{b}"
    cfg = load_config(None, ["--train.trainer=sft", f"--data.dataset={dataset}", "--data.dataset_probs=[0.6, 0.4]",
                             "--train.seed=3", "--eval.data="]).config
    examples, report = load_sft_examples(cfg.data.dataset, cfg, tiny_tokenizer)
    order = interleave_order([12, 4], [0.6, 0.4], 3)
    expected = [tiny_tokenizer(f"{'ab'[d]}{row}")["input_ids"] for d, row in order]
    assert [list(e.prompt_ids) for e in examples] == expected and report.rows == len(order)
    unmixed, _ = load_sft_examples(a, cfg, tiny_tokenizer)  # another path (eval.data): read as it is
    assert [list(e.prompt_ids) for e in unmixed] == [tiny_tokenizer(f"a{i}")["input_ids"] for i in range(12)]
