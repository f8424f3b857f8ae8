"""Markdown tables and phase shares of the benchmark reports."""

import pytest

from hpc_rlhf.benchmarks.report import markdown_table, phase_shares

COLUMNS = [("model", "Model", ""), ("tokens_per_s", "Gen tok/s", ",.0f"), ("mfu", "MFU", ".1%")]


def test_markdown_table_exact_text():
    rows = [{"model": "qwen2.5-0.5b", "tokens_per_s": 123456.7, "mfu": 0.2712},
            {"model": "qwen2.5-1.5b", "tokens_per_s": 2570, "mfu": None},
            {"model": "a|b", "tokens_per_s": 1.0}]
    assert markdown_table(rows, COLUMNS) == (
        "| Model | Gen tok/s | MFU |\n"
        "| --- | ---: | ---: |\n"
        "| qwen2.5-0.5b | 123,457 | 27.1% |\n"
        "| qwen2.5-1.5b | 2,570 | - |\n"
        "| a\\|b | 1 | - |\n")


def test_markdown_table_callable_format_and_no_rows():
    rows = [{"seconds": 75.0}]
    table = markdown_table(rows, [("seconds", "Time", lambda s: f"{int(s) // 60}m {int(s) % 60:02d}s")])
    assert table == "| Time |\n| ---: |\n| 1m 15s |\n"
    assert markdown_table([], COLUMNS[:1]) == "| Model |\n| --- |\n"


def test_markdown_table_errors_name_the_column():
    with pytest.raises(ValueError, match="'tokens_per_sec'"):
        markdown_table([{"tokens_per_s": 1.0}], [("tokens_per_sec", "Tok/s", ".0f")])
    with pytest.raises(ValueError, match="row 1, column 'mfu'"):
        markdown_table([{"mfu": 0.5}, {"mfu": "high"}], [("mfu", "MFU", ".1%")])
    with pytest.raises(ValueError, match="columns"):
        markdown_table([{"a": 1}], [])


def test_phase_shares_with_remainder():
    shares = phase_shares({"generation": 6.0, "training": 3.0}, 12.0)
    assert shares == pytest.approx({"generation": 0.5, "training": 0.25, "other": 0.25})


def test_phase_shares_overlapping_phases_leave_no_negative_other():
    shares = phase_shares({"generation": 8.0, "training": 4.0}, 10.0)
    assert shares == pytest.approx({"generation": 0.8, "training": 0.4, "other": 0.0})


@pytest.mark.parametrize("phases, iteration_s, match", [
    ({"generation": 1.0}, 0.0, "iteration_s"),
    ({"generation": -1.0}, 1.0, "'generation'"),
    ({"weight_sync": float("nan")}, 1.0, "'weight_sync'"),
    ({"other": 1.0}, 2.0, "reserved"),
])
def test_phase_shares_bad_input(phases, iteration_s, match):
    with pytest.raises(ValueError, match=match):
        phase_shares(phases, iteration_s)
