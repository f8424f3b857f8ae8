"""Turn an OpenRLHF command line into an hpc_rlhf config YAML, and list what has no equivalent.

    python tools/from_openrlhf.py train_grpo.sh --out configs/my_grpo.yaml        # a shell script with the command
    python tools/from_openrlhf.py --out my_grpo.yaml -- python3 -m openrlhf.cli.train_ppo_ray --pretrain ... --bf16
    python tools/from_openrlhf.py --out sft.yaml --entry train_sft -- --pretrain ... --dataset ...   # flags only

A script may hold the command in any of OpenRLHF's forms (`python3 -m openrlhf.cli.X`, `deepspeed --module
openrlhf.cli.X`, `ray job submit ... -- python3 -m openrlhf.cli.X`, a `read -r -d '' cmd <<EOF` block), with line
continuations, comments and `VAR=value` lines whose $VAR it uses. The entry module picks the trainer (train_ppo_ray:
the PPO family; train_sft, train_rm, train_dpo, train_kto, train_prm, train_kd; batch_inference: rejection
sampling). The written config is checked with hpc_rlhf's loader; exit status 1 when it fails the checks (the
reasons are printed), 2 when the command cannot be translated. Mapping table: docs/migrating_from_openrlhf.md.
"""

from __future__ import annotations

import argparse
import codecs
import re
import shlex
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing the package

from hpc_rlhf.config.schema import ConfigError  # noqa: E402
from hpc_rlhf.config.loading import load_config  # noqa: E402
from hpc_rlhf.config.openrlhf import MigrationError, Note, migrate  # noqa: E402

MODULE = re.compile(r"openrlhf[./]cli[./](\w+?)(?:\.py)?$")
ASSIGNMENT = re.compile(r"^(?:export\s+)?([A-Za-z_]\w*)=(.*)$")
VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")
ANSI_C = re.compile(r"\$'((?:[^'\\]|\\.)*)'")  # bash $'...' strings: `--input_template $'User: {}\nAssistant: '`
SHELL_OPERATORS = set(";&|<>()")


class CommandError(ValueError):
    """The text holds no OpenRLHF command, several of them, or one this tool cannot read."""


@dataclass(frozen=True)
class OpenRLHFCommand:
    """One OpenRLHF invocation: the entry module, the words before it (launcher) and the flags after it."""

    entry: str
    launcher: list[str]
    argv: list[str]
    line: int  # 1-based line of the script where it starts (0: given on the command line)


def _shell_words(text: str) -> list[str]:
    """Words of one shell command, up to the first operator (`|`, `>`, `&&`, `;` ...); `2>&1` goes with it."""
    text = ANSI_C.sub(lambda m: shlex.quote(codecs.decode(m.group(1), "unicode_escape")), text)
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words = list(lexer)
    for i, word in enumerate(words):
        if set(word) <= SHELL_OPERATORS:
            redirected_fd = i > 0 and words[i - 1] in ("1", "2") and word.startswith(">")
            return words[:i - 1] if redirected_fd else words[:i]
    return words


def _expand(text: str, variables: dict[str, str]) -> str:
    return VARIABLE.sub(lambda m: variables.get(m.group(1) or m.group(2), m.group(0)), text)


def read_commands(text: str) -> list[OpenRLHFCommand]:
    """Every OpenRLHF command in a shell script, with the script's simple `NAME=value` variables expanded."""
    variables: dict[str, str] = {}
    commands = []
    physical = 1
    for logical in re.split(r"(?<!\\)\n", text):
        line_number, physical = physical, physical + logical.count("\n") + 1
        line = logical.replace("\\\n", " ").strip()
        if not line or line.startswith("#"):
            continue
        assignment = ASSIGNMENT.match(line)
        if assignment and "openrlhf" not in line:
            words = _shell_words(_expand(assignment.group(2), variables))
            variables[assignment.group(1)] = words[0] if words else ""
            continue
        if not re.search(r"openrlhf[./]cli[./]", line):
            continue
        words = _shell_words(_expand(line, variables))
        at = next((i for i, word in enumerate(words) if MODULE.search(word)), None)
        if at is None:
            continue
        commands.append(OpenRLHFCommand(MODULE.search(words[at]).group(1), words[:at], words[at + 1:], line_number))
    return commands


def pick_command(commands: list[OpenRLHFCommand], index: int | None, where: str) -> OpenRLHFCommand:
    if not commands:
        raise CommandError(f"{where}: no OpenRLHF command (python -m openrlhf.cli.NAME or deepspeed --module "
                           f"openrlhf.cli.NAME)")
    if index is not None:
        if not 1 <= index <= len(commands):
            raise CommandError(f"--command {index}: {where} holds {len(commands)} OpenRLHF command(s)")
        return commands[index - 1]
    if len(commands) > 1:
        listing = ", ".join(f"{i} = openrlhf.cli.{c.entry} (line {c.line})" for i, c in enumerate(commands, 1))
        raise CommandError(f"{where} holds {len(commands)} OpenRLHF commands ({listing}): pick one with --command N")
    return commands[0]


def command_from_words(words: Sequence[str], entry: str) -> OpenRLHFCommand:
    """The words after `--`: a whole command (`python -m openrlhf.cli.X ...`) or just its flags (entry from --entry)."""
    at = next((i for i, word in enumerate(words) if MODULE.search(word)), None)
    if at is None:
        return OpenRLHFCommand(entry, [], list(words), 0)
    return OpenRLHFCommand(MODULE.search(words[at]).group(1), list(words[:at]), list(words[at + 1:]), 0)


class _ConfigDumper(yaml.SafeDumper):
    """Block-style sections with lists on one line and multi-line strings double-quoted, as configs/ are written."""


_ConfigDumper.add_representer(list, lambda dumper, value: dumper.represent_sequence(
    "tag:yaml.org,2002:seq", value, flow_style=True))
_ConfigDumper.add_representer(str, lambda dumper, value: dumper.represent_scalar(
    "tag:yaml.org,2002:str", value, style='"' if "\n" in value else None))


def render_yaml(config: dict, command: OpenRLHFCommand, notes: list[Note], source: str) -> str:
    """The config as YAML, headed by where it came from and what was not translated."""
    header = [f"Translated from OpenRLHF ({source}) by tools/from_openrlhf.py: openrlhf.cli.{command.entry}.",
              "Flags the command leaves out keep OpenRLHF's defaults where they differ from hpc_rlhf's",
              "(docs/migrating_from_openrlhf.md)."]
    if notes:
        header += ["", "Notes: what has no equivalent here (not translated), or needs a look:"]
        header += [f"  {note}" for note in notes]
    comments = "".join(f"# {line}\n" if line else "#\n" for line in header)
    return comments + yaml.dump(config, Dumper=_ConfigDumper, sort_keys=False, default_flow_style=False,
                                allow_unicode=True)


def check_written(text: str, path: Path | None) -> list[str]:
    """Problems hpc_rlhf's loader finds in the config written to `path` (or in `text`, when it was printed); empty
    when it loads and passes the checks."""
    with tempfile.TemporaryDirectory() as folder:
        target = path if path is not None else Path(folder) / "config.yaml"
        if path is None:
            target.write_text(text)
        try:
            load_config(target)
        except ConfigError as err:
            lines = [line.strip().removeprefix("- ") for line in str(err).splitlines()[1:]] or [str(err)]
            return [line.replace(f" ({target})", "") for line in lines]
    return []


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    own, command_words = (words[:words.index("--")], words[words.index("--") + 1:]) if "--" in words else (words, [])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     usage="%(prog)s [SCRIPT] [--out FILE] [--command N] [--entry NAME] "
                                           "[-- OPENRLHF COMMAND OR FLAGS]")
    parser.add_argument("script", nargs="?", type=Path, help="shell script holding the OpenRLHF command")
    parser.add_argument("--out", type=Path, help="where to write the config (default: print it)")
    parser.add_argument("--command", type=int, help="which OpenRLHF command of the script (1-based), when it has "
                                                    "several")
    parser.add_argument("--entry", default="train_ppo_ray", help="the OpenRLHF entry module, for flags given "
                                                                 "without it after -- (default: train_ppo_ray)")
    args = parser.parse_args(own)
    if (args.script is None) == (not command_words):
        parser.error("give a SCRIPT or the command after --, one of the two")
    try:
        if args.script is not None:
            if not args.script.is_file():
                raise CommandError(f"{args.script} does not exist")
            text = args.script.read_text().replace("\r\n", "\n")
            command = pick_command(read_commands(text), args.command, str(args.script))
            source = f"{args.script}, line {command.line}"
        else:
            command = command_from_words(command_words, args.entry)
            source = "command line"
        config, notes = migrate(command.argv, command.entry, command.launcher)
    except (CommandError, MigrationError, ValueError) as err:
        for line in str(err).splitlines():
            print(f"from_openrlhf: error: {line}", file=sys.stderr)
        return 2
    text = render_yaml(config, command, notes, source)
    report = sys.stderr  # with the YAML on stdout, the report goes beside it
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        report = sys.stdout
        print(f"wrote {args.out} (train.trainer: {config['train']['trainer']})", file=report)
    if notes:
        print(f"notes ({len(notes)}): what has no equivalent here (not translated), or needs a look:", file=report)
        for note in notes:
            print(f"  {note}", file=report)
    problems = check_written(text, args.out)
    if problems:
        print(f"the config does not pass hpc_rlhf's checks yet ({len(problems)}); fix it before running:",
              file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
