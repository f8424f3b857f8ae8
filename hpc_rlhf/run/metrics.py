"""Run metrics on global rank 0: TensorBoard scalars, RUN_DIR/metrics.jsonl, progress output and RUN_DIR/curves.png.

`MetricsLogger.log(step, {"rollout/reward_mean": 0.41, ...})` writes the scalars to TensorBoard (RUN_DIR/tensorboard),
appends one JSON line `{"step": 12, "rollout/reward_mean": 0.41, ...}` to RUN_DIR/metrics.jsonl, moves the progress
bar and, every `logging_steps` steps, prints a plain line `iter 12/60 | reward 0.41 | kl 0.002 | ...` that stays
readable in SLURM output files.

A resumed run appends to metrics.jsonl after moving the rows of the iterations it trains again (those at and after
its first step, written by the attempt that was stopped) to RUN_DIR/metrics.superseded.jsonl, so every step appears
once and nothing written is lost; `read_metrics` keeps the last value logged for each (metric, step). The TensorBoard
writer of a resumed run likewise purges the events at and after its first step. Non-finite values are written to metrics.jsonl as null (strict JSON, which
pandas, DuckDB and jq all read) and read back as NaN.

With `logger.use_wandb` the same metrics also go to Weights & Biases at the same step (`WandbSettings`, `start_wandb`):
the run's config is the W&B config, the run id is kept in RUN_DIR/wandb_run_id so that a requeued job continues the
same W&B run, and offline mode writes RUN_DIR/wandb/offline-run-* for `wandb sync` later. wandb is imported only then.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import secrets
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, TextIO

from tqdm import tqdm

from hpc_rlhf.config.schema import Config
from hpc_rlhf.errors import UsageError
from hpc_rlhf.rollouts.atomic import atomic_write_bytes

METRICS_FILE = "metrics.jsonl"
SUPERSEDED_FILE = "metrics.superseded.jsonl"
TENSORBOARD_DIR = "tensorboard"
CURVES_FILE = "curves.png"
WANDB_DIR = "wandb"  # W&B's own folder: RUN_DIR/wandb/run-<time>-<id> (offline-run-... in offline mode)
WANDB_ID_FILE = "wandb_run_id"  # the W&B run id of this run directory, read again by a resumed run

# (label, metric names): the first name present in a step's metrics is shown under the label.
BAR_KEYS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("reward", ("rollout/reward_mean",)),
    ("kl", ("rollout/kl", "train/kl")),
    ("loss", ("train/policy_loss", "train/loss")),
)
LINE_KEYS: tuple[tuple[str, tuple[str, ...]], ...] = BAR_KEYS[:1] + (
    ("score", ("rollout/score_mean",)),  # the reward function's 0/1 score: accuracy on the arithmetic task
) + BAR_KEYS[1:] + (
    ("eval_reward", ("eval/reward_mean",)),
    ("eval_acc", ("eval/accuracy",)),
    ("len", ("rollout/response_length",)),
    ("gen_tok/s", ("throughput/generate_tokens_per_s",)),
)
ALWAYS_DRAWN = frozenset({"rollout/reward_mean"})  # drawn even when constant zero: see `informative`
# Labels whose value 0 means "switched off" (KL without a KL penalty): left out of the line and the bar.
ZERO_MEANS_OFF = frozenset({"kl"})
# (panel title, metric names[, y-axis label]): a panel draws each of its metrics that has a point that is not zero
# (a constant-zero series is a switched-off term, e.g. KL without a KL penalty); a panel with none is left out.
PLOT_PANELS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("reward", ("rollout/reward_mean", "eval/reward_mean"), "mean reward"),
    ("accuracy", ("rollout/score_mean", "eval/accuracy"), "score / accuracy"),
    ("KL", ("rollout/kl", "train/kl", "train/approx_kl"), "KL (nats / token)"),
    ("response length", ("rollout/response_length",), "tokens"),
)

Series = dict[str, list[tuple[int, float]]]


# ----- pure helpers -------------------------------------------------------------------------------------------------

def format_value(value: float) -> str:
    """A metric value in at most four significant digits: 0.41, 0.002, 1235, 1.235e+04."""
    return f"{float(value):.4g}"


def pick_metrics(metrics: Mapping[str, float], keys: Sequence[tuple[str, Sequence[str]]]) -> dict[str, float]:
    """{label: value} with, for each (label, names), the value of the first name present in metrics (labels of
    ZERO_MEANS_OFF are left out when that value is 0)."""
    picked = {}
    for label, names in keys:
        present = [name for name in names if name in metrics]
        if present and not (label in ZERO_MEANS_OFF and metrics[present[0]] == 0):
            picked[label] = metrics[present[0]]
    return picked


def format_duration(seconds: float) -> str:
    """`42s`, `3m05s`, `1h02m`: a duration as a progress line shows it."""
    total = max(0, int(round(seconds)))
    if total < 60:
        return f"{total}s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def eta_seconds(done: int, start: int, total: Optional[int], elapsed_s: float) -> Optional[float]:
    """Time left at this run's pace: elapsed / iterations done since `start` x iterations left (None if unknown)."""
    if total is None or done <= start:
        return None
    return elapsed_s / (done - start) * max(total - done, 0)


def format_metrics_line(step: int, total: Optional[int], metrics: Mapping[str, float],
                        keys: Sequence[tuple[str, Sequence[str]]], *, elapsed_s: Optional[float] = None,
                        eta_s: Optional[float] = None) -> str:
    """`iter 12/60 | reward 0.41 | kl 0.002 | 35s elapsed | ETA 2m10s`: for each (label, names) the first name
    present in metrics is shown, then the time so far and the time left when given."""
    parts = [f"iter {step}/{total}" if total is not None else f"iter {step}"]
    parts += [f"{label} {format_value(value)}" for label, value in pick_metrics(metrics, keys).items()]
    if elapsed_s is not None:
        parts.append(f"{format_duration(elapsed_s)} elapsed")
    if eta_s is not None:
        parts.append(f"ETA {format_duration(eta_s)}")
    return " | ".join(parts)


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise TypeError(f"step must be an int, got {type(step).__name__} ({step!r})")
    return int(step)


def _as_float(name: Any, value: Any) -> float:
    """The metric as a Python float; anything that is not a real scalar is an error that names the metric."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"metric names must be non-empty strings, got {name!r}")
    if name == "step":
        raise ValueError("'step' is reserved for the step number in metrics.jsonl; rename that metric")
    if isinstance(value, (str, bytes)) or not hasattr(value, "__float__"):
        raise TypeError(f"metric {name!r} must be a real number, got {type(value).__name__} ({value!r})")
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError) as err:  # e.g. a tensor with more than one element
        raise TypeError(f"metric {name!r} must be a real scalar, got {type(value).__name__}: {err}") from err


def _with_prefix(prefix: str, name: str) -> str:
    """'eval' or 'eval/' + 'accuracy' -> 'eval/accuracy'; no prefix keeps the name."""
    return f"{prefix.rstrip('/')}/{name}" if prefix else name


def _json_record(step: int, values: Mapping[str, float]) -> str:
    """One metrics.jsonl line (without the newline); non-finite values become null."""
    record: dict[str, Any] = {"step": step}
    record.update({name: value if math.isfinite(value) else None for name, value in values.items()})
    return json.dumps(record, allow_nan=False)


def _parse_record(line: str, where: str) -> tuple[int, dict[str, float]]:
    """Step and values of one metrics.jsonl line; `where` (file:line) names the row in errors."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not a JSON object: {err}") from err
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    step = record.pop("step", None)
    if isinstance(step, bool) or not isinstance(step, int):
        raise ValueError(f"{where}: 'step' must be an integer, got {step!r}")
    values: dict[str, float] = {}
    for name, value in record.items():
        if value is None:
            values[name] = math.nan
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            values[name] = float(value)
        else:
            raise ValueError(f"{where}: metric {name!r} must be a number or null, got {value!r}")
    return step, values


def read_metrics(run_dir: str | Path) -> Series:
    """Every metric in RUN_DIR/metrics.jsonl as (step, value) pairs sorted by step; a step logged twice keeps its last
    value. An unfinished last line (a run stopped while writing it) is skipped; any other bad row is an error."""
    path = Path(run_dir) / METRICS_FILE
    latest: dict[str, dict[int, float]] = {}
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                step, values = _parse_record(line, f"{path}:{lineno}")
            except ValueError:
                if not line.endswith("\n"):
                    break  # only the last line can lack its newline: it is still being written or was cut off
                raise
            for name, value in values.items():
                latest.setdefault(name, {})[step] = value
    return {name: sorted(points.items()) for name, points in latest.items()}


def informative(name: str, points: Sequence[tuple[int, float]]) -> bool:
    """Whether a series is worth a line: a finite value that is not 0 (all zeros is a switched-off term such as KL
    without a penalty); the training reward is drawn whenever it has a finite value, a flat zero reward being news."""
    if name in ALWAYS_DRAWN:
        return any(math.isfinite(value) for _, value in points)
    return any(math.isfinite(value) and value != 0 for _, value in points)


def curve_panels(series: Mapping[str, Sequence[tuple[int, float]]],
                 panels: Sequence[tuple] = PLOT_PANELS) -> list[tuple[str, list[str], str]]:
    """The panels to draw, as (title, metric names, y-axis label): each panel (title, names[, y label]) keeps its
    metrics that are informative; panels left with none are dropped. The y label defaults to the title."""
    chosen = []
    for title, names, *rest in panels:
        present = [name for name in names if informative(name, series.get(name, ()))]
        if present:
            chosen.append((title, present, rest[0] if rest else title))
    return chosen


def curves_figure(series: Mapping[str, Sequence[tuple[int, float]]], chosen: Sequence[tuple[str, list[str], str]],
                  title: str):
    """A matplotlib Figure (no pyplot) with one panel per entry of `chosen`, two panels a row."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    columns = min(2, len(chosen))
    rows = math.ceil(len(chosen) / columns)
    figure = Figure(figsize=(6 * columns, 4 * rows), dpi=100, layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, (panel_title, names, ylabel) in zip(axes, chosen):
        for name in names:
            steps = [step for step, _ in series[name]]
            values = [value for _, value in series[name]]
            ax.plot(steps, values, label=name, linewidth=1.5, marker="o" if len(steps) <= 50 else None, markersize=3)
        ax.set_title(panel_title)
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    for ax in axes[len(chosen):]:
        ax.set_visible(False)  # an odd number of panels leaves the last cell empty
    figure.suptitle(title)
    return figure


def plot_curves(run_dir: str | Path, *, panels: Sequence[tuple] = PLOT_PANELS,
                out_path: Optional[str | Path] = None) -> Optional[Path]:
    """Draw the curves of RUN_DIR/metrics.jsonl against step into a PNG (default RUN_DIR/curves.png), one panel per
    entry of `panels` that has informative data (`curve_panels`), titled with the run directory's name. Returns the
    path, or None when there is nothing to draw (no metrics.jsonl or none of the metrics)."""
    run_dir = Path(run_dir)
    try:
        series = read_metrics(run_dir)
    except FileNotFoundError:
        return None
    chosen = curve_panels(series, panels)
    if not chosen:
        return None
    # The object API with no pyplot: no display, no global figure state, Agg renders the PNG.
    figure = curves_figure(series, chosen, run_dir.resolve().name)
    out = Path(out_path) if out_path is not None else run_dir / CURVES_FILE
    partial = out.with_name(out.name + ".partial")
    figure.savefig(partial, format="png", dpi=100)
    os.replace(partial, out)  # readers never see a half-written image
    return out


def _cut_unfinished_line(path: Path) -> bool:
    """Cut off an unfinished last line of metrics.jsonl left by a run that stopped while writing it, so that the next
    record starts on its own line. Returns whether a fragment was cut."""
    cut = False
    if path.exists():
        with open(path, "rb+") as handle:
            size = handle.seek(0, os.SEEK_END)
            end = size
            while end > 0:
                start = max(0, end - 65536)
                handle.seek(start)
                chunk = handle.read(end - start)
                newline = chunk.rfind(b"\n")
                if newline >= 0:
                    end = start + newline + 1
                    break
                end = start
            if end < size:
                handle.truncate(end)
                cut = True
    return cut


def supersede_rows_from(run_dir: Path, first_step: int) -> int:
    """Move the metrics.jsonl rows of steps >= `first_step` (an earlier attempt's, about to be trained again) to the
    end of metrics.superseded.jsonl, keeping the others in order. Returns how many rows moved. The rewrite is atomic:
    a crash leaves either the old or the new file."""
    path = run_dir / METRICS_FILE
    if first_step <= 0 or not path.exists():
        return 0
    kept, moved = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(keepends=True), start=1):
        if not line.strip():
            continue
        step, _ = _parse_record(line, f"{path}:{number}")
        (moved if step >= first_step else kept).append(line if line.endswith("\n") else line + "\n")
    if moved:
        with open(run_dir / SUPERSEDED_FILE, "a", encoding="utf-8") as side:
            side.writelines(moved)
            side.flush()
            os.fsync(side.fileno())
        atomic_write_bytes(path, "".join(kept).encode("utf-8"))
    return len(moved)


def _is_tty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


# ----- Weights & Biases ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WandbSettings:
    """The W&B run a MetricsLogger also logs to (the logger.wandb_* keys) and the config recorded as its W&B config."""

    project: str
    group: Optional[str] = None
    run_name: Optional[str] = None
    org: Optional[str] = None  # the W&B entity; None = the API key's default entity
    mode: str = "online"  # "offline": no network, RUN_DIR/wandb is synced later with `wandb sync`
    config: Mapping[str, Any] = field(default_factory=dict)


def wandb_settings(cfg: Config) -> Optional[WandbSettings]:
    """The W&B settings of a run config, None when logger.use_wandb is off; the run name defaults to the name of the
    run directory."""
    log = cfg.logger
    if not log.use_wandb:
        return None
    return WandbSettings(project=log.wandb_project, group=log.wandb_group or None,
                         run_name=log.wandb_run_name or Path(cfg.train.run_dir).resolve().name,
                         org=log.wandb_org or None, mode=log.wandb_mode, config=asdict(cfg))


def import_wandb() -> Any:
    """The wandb module, imported only when a run asks for it; a one-line UsageError when it is not installed."""
    try:
        import wandb
    except ImportError as err:
        raise UsageError("logger.use_wandb is on but wandb is not installed: pip install wandb "
                         "(or pip install -e \".[wandb]\"), or set logger.use_wandb=false") from err
    return wandb


def wandb_run_id(run_dir: Path) -> str:
    """The W&B run id of a run directory: the one stored in RUN_DIR/wandb_run_id, or a new one stored there, so that
    every attempt of a requeued job logs to the same W&B run."""
    path = run_dir / WANDB_ID_FILE
    stored = path.read_text(encoding="utf-8").strip() if path.exists() else ""
    if stored:
        return stored
    run_id = secrets.token_hex(4)  # 8 lowercase hex characters, as W&B's own ids
    atomic_write_bytes(path, (run_id + "\n").encode("utf-8"))
    return run_id


def start_wandb(run_dir: Path, settings: WandbSettings) -> Any:
    """Start (or, with the stored run id and resume="allow", continue) the W&B run of `run_dir`; returns the
    wandb Run. Offline mode is settings.mode "offline" or WANDB_MODE=offline (W&B reads it when mode is not given)."""
    wandb = import_wandb()
    return wandb.init(project=settings.project, entity=settings.org, group=settings.group, name=settings.run_name,
                      config=dict(settings.config), dir=str(run_dir), id=wandb_run_id(run_dir), resume="allow",
                      mode="offline" if settings.mode == "offline" else None)


# ----- the logger ---------------------------------------------------------------------------------------------------

class MetricsLogger:
    """Logs a run's metrics on global rank 0; on other ranks (enabled=False) every method does nothing and no file is
    opened. A logged step s means iteration s is done: the bar then stands at s + 1 of total_steps. With `wandb`
    settings the metrics also go to that W&B run."""

    def __init__(self, run_dir: str | Path, *, enabled: bool, use_tensorboard: bool, progress_bar: bool,
                 total_steps: Optional[int], logging_steps: int = 1, start_step: int = 0,
                 stream: Optional[TextIO] = None, clock: Callable[[], float] = time.monotonic,
                 wandb: Optional[WandbSettings] = None) -> None:
        if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int)
                                        or total_steps < 0):
            raise ValueError(f"total_steps must be None or an int >= 0, got {total_steps!r}")
        if isinstance(logging_steps, bool) or not isinstance(logging_steps, int) or logging_steps < 1:
            raise ValueError(f"logging_steps must be an int >= 1, got {logging_steps!r}")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step must be an int >= 0, got {start_step!r}")
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.total_steps = total_steps
        self.logging_steps = logging_steps
        self.start_step = start_step
        self.stream: TextIO = stream if stream is not None else sys.stderr
        self._clock = clock
        self._started = clock()  # progress lines show the time since here and the time left at this pace
        self._jsonl: Optional[TextIO] = None
        self._writer: Any = None  # torch.utils.tensorboard.SummaryWriter, imported only when used
        self._wandb: Any = None  # wandb Run, imported only when used
        self._bar: Optional[tqdm] = None
        self._closed = False
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if _cut_unfinished_line(self.run_dir / METRICS_FILE):
            self._print(f"dropped an unfinished last line of {self.run_dir / METRICS_FILE} (a run stopped while "
                        "writing it)")
        moved = supersede_rows_from(self.run_dir, start_step)
        if moved:
            self._print(f"resuming at iteration {start_step}: {moved} metrics row(s) of the stopped attempt moved "
                        f"to {self.run_dir / SUPERSEDED_FILE}")
        self._jsonl = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")
        if use_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides the previous run's events from this step on, so a resumed curve is clean.
            self._writer = SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD_DIR),
                                         purge_step=start_step if start_step > 0 else None)
        if wandb is not None:
            self._wandb = start_wandb(self.run_dir, wandb)
            if self._wandb.step > start_step:  # W&B keeps steps increasing: it drops values for steps it already has
                self._print(f"W&B run {self._wandb.id} has steps up to {self._wandb.step - 1}: it keeps the stopped "
                            f"attempt's values of iterations {start_step}..{self._wandb.step - 1} ({METRICS_FILE} "
                            "has the new ones)")
        initial = min(start_step, total_steps) if total_steps is not None else start_step
        # Without a TTY (SLURM output files) the animated bar is off; the plain text lines carry the progress.
        self._bar = tqdm(total=total_steps, initial=initial, file=self.stream, unit="it", desc="iter",
                         dynamic_ncols=True, disable=not (progress_bar and _is_tty(self.stream)))

    def log(self, step: int, metrics: Mapping[str, float], *, prefix: str = "") -> None:
        """Record `metrics` (names joined to `prefix` with '/') at `step`: TensorBoard, W&B, metrics.jsonl, progress."""
        if not self.enabled:
            return
        if self._closed:
            raise RuntimeError(f"MetricsLogger for {self.run_dir} is closed; log() must come before close()")
        step = _check_step(step)
        values = {_with_prefix(prefix, name): _as_float(name, value) for name, value in metrics.items()}
        if values:
            self._jsonl.write(_json_record(step, values) + "\n")
            self._jsonl.flush()
            if self._writer is not None:
                for name, value in values.items():
                    self._writer.add_scalar(name, value, global_step=step)
                self._writer.flush()  # steps are seconds apart: a preempted job keeps everything it logged
            if self._wandb is not None:
                self._wandb.log(values, step=step)
        self._advance(step, values)

    def _advance(self, step: int, values: Mapping[str, float]) -> None:
        """Move the bar to step + 1, show the key metrics on it, and print the text line when it is due."""
        bar = self._bar
        postfix = {label: format_value(value) for label, value in pick_metrics(values, BAR_KEYS).items()}
        if postfix:
            bar.set_postfix(postfix, refresh=False)
        done = step + 1 if self.total_steps is None else min(step + 1, self.total_steps)
        if done > bar.n:
            bar.update(done - bar.n)
        else:
            bar.refresh()
        last = self.total_steps is not None and step + 1 >= self.total_steps
        if values and (step % self.logging_steps == 0 or last):
            elapsed = self._clock() - self._started
            eta = eta_seconds(done, self.start_step, self.total_steps, elapsed)
            self._print(format_metrics_line(step, self.total_steps, values, LINE_KEYS, elapsed_s=elapsed, eta_s=eta))

    def _print(self, line: str) -> None:
        tqdm.write(line, file=self.stream)

    def close(self, *, plot: bool) -> Optional[Path]:
        """Close the bar and the files; with plot=True draw RUN_DIR/curves.png from metrics.jsonl and return its path
        (None when disabled or when no reward or KL metric was ever logged)."""
        if not self.enabled:
            return None
        if not self._closed:
            self._closed = True
            self._bar.close()
            if self._writer is not None:
                self._writer.close()
            if self._wandb is not None:
                self._wandb.finish()
            self._jsonl.close()
        if not plot:
            return None
        path = plot_curves(self.run_dir)
        if path is None:
            self._print(f"no reward or KL metrics in {self.run_dir / METRICS_FILE}: {CURVES_FILE} not written")
        else:
            self._print(f"curves: {path}")
        return path
