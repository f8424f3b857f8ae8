"""Report formatting for the benchmarks: Markdown tables of result rows and each phase's share of an iteration."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

MISSING = "-"
OTHER = "other"

Format = str | Callable[[Any], str]


def _format_cell(value: Any, fmt: Format, key: str, row_index: int) -> str:
    if value is None:
        return MISSING
    try:
        text = fmt(value) if callable(fmt) else format(value, fmt)
    except (TypeError, ValueError) as error:
        raise ValueError(f"row {row_index}, column {key!r}: cannot format {value!r} with {fmt!r}: {error}") from error
    return text.replace("|", "\\|").replace("\n", " ")


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str, Format]]) -> str:
    """A GitHub Markdown table of `rows`, one column per (key, header, format).

    `format` is a format spec (",.0f", ".1%", "" for str()) or a callable value -> str. A row without the key, or
    with None, shows "-"; a key that no row has is an error (a misspelt key). Numeric columns are right-aligned.
    """
    if not columns:
        raise ValueError("columns must not be empty")
    for key, _header, _fmt in columns:
        if rows and not any(key in row for row in rows):
            raise ValueError(f"column {key!r} is in no row; row keys: {sorted({k for row in rows for k in row})}")
    header = "| " + " | ".join(header for _key, header, _fmt in columns) + " |"
    rules = []
    for key, _header, _fmt in columns:
        present = [row[key] for row in rows if row.get(key) is not None]
        rules.append("---:" if present and all(_is_number(v) for v in present) else "---")
    lines = [header, "| " + " | ".join(rules) + " |"]
    for index, row in enumerate(rows):
        cells = [_format_cell(row.get(key), fmt, key, index) for key, _header, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def phase_shares(phase_seconds: Mapping[str, float], iteration_s: float) -> dict[str, float]:
    """Each phase's fraction of the iteration time, plus "other" for the time no phase accounts for.

    Phases that overlap (asynchronous generation) may sum to more than the iteration; "other" is then 0.
    """
    if not (math.isfinite(iteration_s) and iteration_s > 0):
        raise ValueError(f"iteration_s must be a positive finite number, got {iteration_s!r}")
    if OTHER in phase_seconds:
        raise ValueError(f"phase name {OTHER!r} is reserved for the unaccounted time")
    shares = {}
    for phase, seconds in phase_seconds.items():
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"phase {phase!r}: seconds must be a non-negative finite number, got {seconds!r}")
        shares[phase] = seconds / iteration_s
    shares[OTHER] = max(0.0, 1.0 - sum(shares.values()))
    return shares
