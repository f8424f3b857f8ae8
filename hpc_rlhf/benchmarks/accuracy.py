"""Time to accuracy: held-out accuracy against training seconds, for hpc_rlhf runs and peer runs alike.

The figure that counts on a real model is how many seconds of training it takes to reach an accuracy on held-out
prompts. Evaluation is not training: its seconds are left out of the clock in both systems, and so is start-up
(model loading, engine building), which is reported on its own. A curve is a list of `CurvePoint`s in the order
they were measured; everything here is a pure function of such lists or of metrics.jsonl rows.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence


@dataclass(frozen=True)
class CurvePoint:
    """Held-out accuracy after `iteration` trained iterations, reached after `train_s` seconds of training."""

    iteration: int
    train_s: float
    accuracy: float


def training_seconds(row: Mapping[str, Any]) -> float:
    """Training seconds of one metrics row: its tick (`time/iteration_s`) less the evaluation run inside it."""
    return max(0.0, float(row.get("time/iteration_s", 0.0)) - float(row.get("time/eval_s", 0.0)))


def curve_from_metrics(rows: Iterable[Mapping[str, Any]]) -> list[CurvePoint]:
    """The eval points of an hpc_rlhf run from its metrics.jsonl rows.

    Row `step = s` is iteration s; its `time/iteration_s` holds the whole tick, including an evaluation run at the
    start of that tick (`time/eval_s`), which measured the weights after s trained iterations. So the training
    seconds behind an eval at step s are the tick times of steps < s less their eval seconds. The row logged after
    the last iteration (step = total) carries only the final evaluation.
    """
    points: list[CurvePoint] = []
    train_s = 0.0
    for row in sorted(rows, key=lambda r: r["step"]):
        step = int(row["step"])
        if "eval/accuracy" in row:
            points.append(CurvePoint(iteration=step, train_s=train_s, accuracy=float(row["eval/accuracy"])))
        train_s += training_seconds(row)
    return points


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl file (blank lines skipped; a later row for the same step replaces an earlier one,
    as after a resumed run that retrained an iteration)."""
    by_step: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not a JSON line ({error.msg})") from None
        if "step" not in row:
            raise ValueError(f"{path}:{number}: no 'step' field")
        by_step[int(row["step"])] = {**by_step.get(int(row["step"]), {}), **row}
    return [by_step[step] for step in sorted(by_step)]


def seconds_to_reach(curve: Sequence[CurvePoint], threshold: float) -> float | None:
    """Training seconds at the first eval point whose accuracy is at least `threshold` (None if never reached).

    Points are taken at eval times only, so the figure is an upper bound by at most one eval interval."""
    for point in curve:
        if point.accuracy >= threshold:
            return point.train_s
    return None


def interpolate_accuracy(curve: Sequence[CurvePoint], train_s: float) -> float | None:
    """Accuracy at `train_s` training seconds, linear between eval points (None outside the measured span)."""
    if not curve or train_s < curve[0].train_s or train_s > curve[-1].train_s:
        return None
    for left, right in zip(curve, curve[1:]):
        if left.train_s <= train_s <= right.train_s:
            span = right.train_s - left.train_s
            if span == 0:
                return right.accuracy
            return left.accuracy + (right.accuracy - left.accuracy) * (train_s - left.train_s) / span
    return curve[-1].accuracy


@dataclass(frozen=True)
class RunSummary:
    """What a time-to-accuracy table shows for one run."""

    name: str
    iterations: int
    train_s: float
    median_iteration_s: float
    start_accuracy: float
    final_accuracy: float
    best_accuracy: float
    seconds_to: dict[str, float | None]


def upper_median(values: Sequence[float]) -> float:
    """The middle value (the upper one of the two middles for an even count); NaN for no values."""
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else float("nan")


def summarize(name: str, curve: Sequence[CurvePoint], iteration_seconds: Sequence[float],
              thresholds: Sequence[float] = (0.5, 0.8)) -> RunSummary:
    """Summary of one run: start/final/best accuracy, the seconds to each threshold and the median iteration."""
    if not curve:
        raise ValueError(f"{name}: no eval points (was eval.data set and eval.steps > 0?)")
    return RunSummary(name=name, iterations=curve[-1].iteration, train_s=curve[-1].train_s,
                      median_iteration_s=upper_median(iteration_seconds), start_accuracy=curve[0].accuracy,
                      final_accuracy=curve[-1].accuracy, best_accuracy=max(p.accuracy for p in curve),
                      seconds_to={f"{t:g}": seconds_to_reach(curve, t) for t in thresholds})


def ratio_line(ours: RunSummary, peer: RunSummary, threshold: str) -> str:
    """`peer seconds / our seconds` to a threshold, in words (a ratio > 1 means we got there sooner). Where only one
    run got there, the other's whole training time bounds the ratio."""
    a, b = ours.seconds_to.get(threshold), peer.seconds_to.get(threshold)
    if a is None and b is None:
        return f"accuracy {threshold}: reached by neither"
    if a is None:
        bound = f" (more than {ours.train_s / b:.2f}x slower)" if 0 < b <= ours.train_s else ""
        return f"accuracy {threshold}: {peer.name} in {b:.0f} s, {ours.name} not within its {ours.train_s:.0f} s{bound}"
    if b is None:
        bound = f" (more than {peer.train_s / a:.2f}x faster)" if 0 < a <= peer.train_s else ""
        return f"accuracy {threshold}: {ours.name} in {a:.0f} s, {peer.name} not within its {peer.train_s:.0f} s{bound}"
    return (f"accuracy {threshold}: {ours.name} {a:.0f} s, {peer.name} {b:.0f} s "
            f"({b / a:.2f}x {'faster' if b >= a else 'slower'})" if a > 0 else
            f"accuracy {threshold}: {ours.name} from the start, {peer.name} {b:.0f} s")


def accuracy_at(curve: Sequence[CurvePoint], iterations: Sequence[int]) -> list[float | None]:
    """The held-out accuracy measured after each of `iterations` (None where the run did not evaluate there): the
    per-iteration view, which takes the systems' speed out of the comparison."""
    by_iteration = {p.iteration: p.accuracy for p in curve}
    return [by_iteration.get(i) for i in iterations]


@dataclass(frozen=True)
class PhaseSpeed:
    """Iteration time and completion throughput over iterations [first, last) of one run."""

    first: int
    last: int
    median_iteration_s: float
    completion_length: float  # mean completion tokens per sample
    completion_tokens_per_s: float  # completion tokens over training seconds (generation and update together)


def phase_speed(iteration_seconds: Sequence[float], completion_tokens: Sequence[float], samples_per_iteration: int,
                first: int, last: int) -> PhaseSpeed:
    """The speed of iterations [first, last); `completion_tokens[i]` is iteration i's total over its samples. The
    span is cut to the iterations the run has."""
    last = min(last, len(iteration_seconds), len(completion_tokens))
    if not 0 <= first < last:
        raise ValueError(f"no iterations in [{first}, {last})")
    seconds, tokens = iteration_seconds[first:last], completion_tokens[first:last]
    return PhaseSpeed(first=first, last=last, median_iteration_s=upper_median(seconds),
                      completion_length=sum(tokens) / (len(tokens) * samples_per_iteration),
                      completion_tokens_per_s=sum(tokens) / sum(seconds))


PHASES = {"iteration": "time/iteration_s", "generate": "time/generate_s", "update": "time/actor_update_s",
          "response_len": "rollout/response_length"}


def phase_means(rows: Iterable[Mapping[str, Any]], span: int = 10) -> list[tuple[int, dict[str, float]]]:
    """Per block of `span` iterations of an hpc_rlhf run's metrics rows: (first iteration, the mean of each of PHASES
    over the block's rows that have it). The tick's evaluation seconds are taken out of `iteration`, as the curve does;
    the row after the last iteration (final evaluation only) is left out."""
    blocks: dict[int, dict[str, list[float]]] = {}
    for row in rows:
        if "time/generate_s" not in row:
            continue
        block = blocks.setdefault(int(row["step"]) // span * span, {name: [] for name in PHASES})
        for name, key in PHASES.items():
            if row.get(key) is not None:
                block[name].append(training_seconds(row) if name == "iteration" else float(row[key]))
    return [(first, {name: sum(v) / len(v) for name, v in values.items() if v})
            for first, values in sorted(blocks.items())]


def plot_curves(curves: Mapping[str, Sequence[CurvePoint]], path: str | Path, *, title: str) -> Path:
    """Held-out accuracy against training seconds, one line per run, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, curve in curves.items():
        ax.plot([p.train_s for p in curve], [p.accuracy for p in curve], marker="o", markersize=3, label=name)
    for level in (0.5, 0.8):
        ax.axhline(level, color="grey", linewidth=0.6, linestyle=":")
    ax.set_xlabel("training seconds (evaluation and start-up excluded)")
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def curve_to_json(curve: Sequence[CurvePoint]) -> list[dict[str, Any]]:
    return [asdict(p) for p in curve]


def curve_from_json(items: Iterable[Mapping[str, Any]]) -> list[CurvePoint]:
    return [CurvePoint(iteration=int(i["iteration"]), train_s=float(i["train_s"]), accuracy=float(i["accuracy"]))
            for i in items]
