"""DeepSpeed's universal checkpoint: a checkpoint's ZeRO states in a form that loads into any data-parallel size.

ZeRO 1-3 save each data-parallel rank's partition of the fp32 master weights and optimizer moments
(`zero_pp_rank_3_mp_rank_00_optim_states.pt`); loading them needs the same number of ranks. `convert_checkpoint`
turns each engine folder of one of our checkpoints into DeepSpeed's universal form (`ds_to_universal`: one fp32
tensor per parameter name for the weights and each optimizer moment), written beside the original as
`ENGINE/iter_000012_universal/` through a temporary folder and a rename, once; an engine built with
`"checkpoint": {"load_universal": true}` (ds.universal_ckpt) then loads it into its own partitioning. Stage 0 keeps
whole states on every rank, so its folders need no conversion. Files the engine wrappers add beside DeepSpeed's (the
EMA) are copied along.

A large model's conversion can outlast the 30 minutes the other ranks wait for rank 0 in a collective; convert such a
checkpoint ahead of the resume, on any machine that sees the run directory, with more processes:

    python -m hpc_rlhf.run.universal RUN_DIR/checkpoints/iter_000012 --workers 8
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import secrets
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from hpc_rlhf.run.durable import fsync_dir

UNIVERSAL_SUFFIX = "_universal"
_ZERO_FILE_SUFFIX = "_optim_states.pt"  # one per data-parallel rank under ZeRO 1-3
_DEEPSPEED_PREFIXES = ("zero_pp_rank_", "mp_rank_", "bf16_zero_pp_rank_", "layer_")


def universal_tag(tag: str) -> str:
    """The tag of a checkpoint's universal form: iter_000012 -> iter_000012_universal."""
    return f"{tag}{UNIVERSAL_SUFFIX}"


def zero_partitions(tag_dir: str | os.PathLike) -> int:
    """How many data-parallel partitions a DeepSpeed checkpoint folder holds (0: no ZeRO partitions, stage 0)."""
    folder = Path(tag_dir)
    if not folder.is_dir():
        return 0
    return sum(1 for entry in folder.iterdir() if entry.name.endswith(_ZERO_FILE_SUFFIX)
               and not entry.name.startswith(("expp_", "layer_")))


def convert_engine(engine_dir: str | os.PathLike, tag: str, workers: int = 1) -> Path | None:
    """Write `engine_dir/<tag>_universal` from `engine_dir/<tag>` unless it exists; returns it (None for stage 0).

    Runs `deepspeed.checkpoint.ds_to_universal` with `workers` processes reading partitions and merging parameters
    (1: in this process, as a training rank must), its progress output swallowed.
    """
    source = Path(engine_dir) / tag
    target = Path(engine_dir) / universal_tag(tag)
    if target.is_dir():
        return target
    if zero_partitions(source) == 0:
        return None
    from deepspeed.checkpoint import ds_to_universal  # DeepSpeed loads only where a conversion is needed

    temporary = target.with_name(f"{target.name}.tmp-{secrets.token_hex(8)}")
    args = argparse.Namespace(input_folder=str(source), output_folder=str(temporary), num_extract_workers=workers,
                              num_merge_workers=workers, keep_temp_folder=False, strict=True,
                              # our saves have no universal_checkpoint_info record: DeepSpeed's own default for it
                              inject_missing_state=True)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ds_to_universal.main(args)  # its progress bars; an error still raises
        for entry in source.iterdir():  # the wrappers' own files (ema.pt), beside DeepSpeed's
            if entry.is_file() and not entry.name.startswith(_DEEPSPEED_PREFIXES):
                shutil.copy2(entry, temporary / entry.name)
        os.sync()
        os.rename(temporary, target)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    fsync_dir(target.parent, strict=False)
    return target


def convert_checkpoint(path: str | os.PathLike, tag: str, workers: int = 1,
                       announce: Callable[[str], None] | None = None) -> list[str]:
    """Convert every engine folder of checkpoint `path` whose DeepSpeed states are ZeRO-partitioned; one line per
    engine converted, for the log (`announce` gets a line as each conversion starts). Call it from one process while
    no rank loads."""
    lines = []
    for engine_dir in sorted(p for p in Path(path).iterdir() if p.is_dir()):
        partitions = zero_partitions(engine_dir / tag)
        if partitions and not (engine_dir / universal_tag(tag)).is_dir():
            if announce is not None:
                announce(f"checkpoint {Path(path).name}: converting {engine_dir.name}'s ZeRO states of {partitions} "
                         f"data-parallel rank(s) to DeepSpeed's universal form ...")
            convert_engine(engine_dir, tag, workers)
            lines.append(f"checkpoint {Path(path).name}: {engine_dir.name}'s ZeRO states of {partitions} "
                         f"data-parallel rank(s) converted to DeepSpeed's universal form "
                         f"({engine_dir.name}/{universal_tag(tag)})")
    return lines


def saved_partitions(path: str | os.PathLike, tag: str) -> dict[str, int]:
    """{engine folder: data-parallel partitions} of the ZeRO-partitioned engines of checkpoint `path`."""
    found = {}
    for engine_dir in sorted(p for p in Path(path).iterdir() if p.is_dir()):
        partitions = zero_partitions(engine_dir / tag)
        if partitions:
            found[engine_dir.name] = partitions
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """Convert one checkpoint folder ahead of a resume; bad input is one line and exit status 2."""
    parser = argparse.ArgumentParser(prog="python -m hpc_rlhf.run.universal",
                                     description="Convert a checkpoint's ZeRO states to DeepSpeed's universal form, "
                                                 "ahead of a resume with ds.universal_ckpt on another number of ranks.")
    parser.add_argument("checkpoint", type=Path, help="a checkpoint folder, e.g. RUN_DIR/checkpoints/iter_000012")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes that read the partitions and merge the parameters (default 1)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    if not args.checkpoint.is_dir():
        parser.error(f"{args.checkpoint}: no such checkpoint folder")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the conversion reads and writes files only: no device warning
    tag = args.checkpoint.name
    partitioned = saved_partitions(args.checkpoint, tag)
    if not partitioned:
        parser.error(f"{args.checkpoint}: no engine folder holds ZeRO-partitioned states of {tag!r} (ZeRO-0 "
                     f"checkpoints load on any number of ranks as they are)")
    lines = convert_checkpoint(args.checkpoint, tag, args.workers, announce=lambda line: print(line, flush=True))
    for line in lines:
        print(line)
    if not lines:
        folders = ", ".join(f"{name}/{universal_tag(tag)}" for name in partitioned)
        print(f"checkpoint {tag}: already converted ({folders})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
