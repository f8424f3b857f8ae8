"""Command-line parsing shared by the entry points: `--config`, `--print-config`, `--help` and key overrides."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from hpc_rlhf.config_io import LoadedConfig, config_to_yaml, describe_keys, load_config
from hpc_rlhf.config import ConfigError


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
    return parser


def parse_config_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None
                      ) -> tuple[argparse.Namespace, LoadedConfig]:
    """Parse known flags, load and validate the config; on a config error print it and exit with status 2."""
    args, rest = parser.parse_known_args(argv)
    try:
        loaded = load_config(args.config, rest)
    except ConfigError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.print_config:
        print(config_to_yaml(loaded.config), end="")
        raise SystemExit(0)
    return args, loaded
