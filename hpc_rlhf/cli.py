"""Command-line parsing shared by the entry points: `--config`, `--print-config`, `--debug`, `--help` and key overrides,
and `run_entry`, which turns any error that reaches an entry point into one line (the traceback only with --debug)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from hpc_rlhf.config.loading import LoadedConfig, config_to_yaml, describe_keys, load_config
from hpc_rlhf.config.schema import ConfigError
from hpc_rlhf.errors import DEBUG_ENV, UsageError, debug_enabled

DEBUG_HINT = f"--debug or {DEBUG_ENV}=1 shows the traceback"


def one_line(err: BaseException) -> str:
    """`Type: message` with the message's lines joined, as an error reads in a log line."""
    message = " | ".join(line.strip() for line in str(err).strip().splitlines() if line.strip())
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


def run_entry(prog: str, body: Callable[[], int]) -> int:
    """Run an entry point's body; an error becomes `PROG: error: ...` lines on stderr and exit status 2 (a problem
    the user can fix) or 1 (anything else). With --debug / HPC_RLHF_DEBUG=1 the exception propagates with its
    traceback instead."""
    try:
        return body()
    except UsageError as err:
        if debug_enabled():
            raise
        for line in str(err).strip().splitlines():
            print(f"{prog}: error: {line.strip()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug_enabled():
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the entry point's last word: one line instead of a traceback
        if debug_enabled():
            raise
        print(f"{prog}: error: {describe_failure(err)} ({DEBUG_HINT})", file=sys.stderr)
        return 1


def describe_failure(err: BaseException) -> str:
    """One line for an error at an entry point; a rank process that ended with an error (its own line, printed by
    the rank, came first) is described as such rather than as torch.multiprocessing's exception."""
    name = type(err).__name__
    if name in ("ProcessExitedException", "ProcessRaisedException"):
        rank = getattr(err, "error_index", None)
        code = getattr(err, "exit_code", None)
        detail = f" with exit code {code}" if code is not None else ""
        return (f"rank {rank} ended{detail}; the rank's own error is printed above" if rank is not None
                else f"a rank ended{detail}; the rank's own error is printed above")
    return one_line(err)


def quiet_libraries(*, cpu_only: bool) -> None:
    """Environment for this process and the ranks it starts: no per-file progress bars from transformers and the
    model hub (they flood log files; HF_HUB_DISABLE_PROGRESS_BARS=0 brings them back), and on the CPU DeepSpeed is
    told its accelerator instead of guessing it with a warning. Call before transformers is imported."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if cpu_only:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=description, add_help=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every config key can be overridden as --section.key=value (or --section.key value):\n"
               + "\n".join(describe_keys()),
    )
    parser.add_argument("-h", "--help", action="help", help="show this message, with every config key, and exit")
    parser.add_argument("--config", default=None, help="YAML config file (e.g. configs/tiny_cpu.yaml)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument("--debug", action="store_true",
                        help=f"show tracebacks for errors (same as {DEBUG_ENV}=1; the ranks inherit it)")
    parser.add_argument("--overwrite-run-dir", action="store_true",
                        help="when train.run_dir holds a run with a different config, move that run's files to "
                             "RUN_DIR/previous/N/ and start a new run there (nothing is deleted)")
    return parser


def parse_config_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None
                      ) -> tuple[argparse.Namespace, LoadedConfig]:
    """Parse known flags, load and validate the config; on a config error print it and exit with status 2."""
    args, rest = parser.parse_known_args(argv)
    if getattr(args, "debug", False):
        os.environ[DEBUG_ENV] = "1"  # spawned ranks and the failure guard read it from the environment
    try:
        loaded = load_config(args.config, rest)
    except ConfigError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.print_config:
        print(config_to_yaml(loaded.config), end="")
        raise SystemExit(0)
    return args, loaded
