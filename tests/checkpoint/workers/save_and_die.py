"""A one-rank job that is killed (SIGKILL) in the middle of saving a checkpoint.

Usage:
  save_and_die.py loop ROOT    resume from the latest checkpoint if any (checking it is whole), then save iterations
                               one after the other, printing "saved N", until the test kills it
  save_and_die.py phase ROOT P save iteration 1, then die at phase P of saving iteration 2:
                               engine   - this process kills itself while an engine is being written
                               external - an engine's write blocks; the test kills the process from outside
                               rename   - just before the finished temporary folder is renamed into place
                               latest   - just before `latest` is replaced
                               delete   - while keep-last deletes the previous checkpoint
The model's weights equal the iteration number, so a checker can tell which save a file came from.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch

from hpc_rlhf.run import checkpoint
from hpc_rlhf.run.checkpoint import config_fingerprint, latest_checkpoint, load_checkpoint, save_checkpoint

FINGERPRINT = config_fingerprint({"train": {"seed": 0}})
WEIGHTS = 1 << 20  # 4 MiB of float32, so that a save takes a while


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class Probe:
    """An engine whose state is requested during the save: it kills the process, or blocks until killed."""

    def __init__(self, mode: str, marker: Path) -> None:
        self.mode, self.marker = mode, marker

    def state_dict(self) -> dict:
        if self.mode == "external":
            self.marker.write_text(str(os.getpid()))
            time.sleep(120)
        die()
        return {}

    def load_state_dict(self, state: dict) -> None:
        raise AssertionError("never saved")


def save(root: Path, iteration: int, model: torch.nn.Module, extra: dict | None = None, keep_last: int = 2) -> Path:
    with torch.no_grad():
        model.weight.fill_(float(iteration))
    return save_checkpoint(root, iteration, rank=0, world_size=1, barrier=lambda: None,
                           engines={"model": model, **(extra or {})}, trainer_state={"next_iteration": iteration},
                           config_fingerprint=FINGERPRINT, keep_last=keep_last)


def loop(root: Path) -> None:
    model = torch.nn.Linear(WEIGHTS, 1, bias=False)
    start = 1
    path = latest_checkpoint(root)
    if path is not None:
        state = load_checkpoint(path, rank=0, engines={"model": model}, config_fingerprint=FINGERPRINT)
        iteration = state["next_iteration"]
        if path.name != f"iter_{iteration:06d}" or not torch.all(model.weight == float(iteration)):
            print(f"inconsistent checkpoint {path}: state {state}, weight {model.weight[0, 0].item()}", flush=True)
            sys.exit(3)
        print(f"resumed {iteration}", flush=True)
        start = iteration + 1
    for iteration in range(start, start + 100_000):
        save(root, iteration, model)
        print(f"saved {iteration}", flush=True)


def phase(root: Path, name: str) -> None:
    model = torch.nn.Linear(WEIGHTS, 1, bias=False)
    save(root, 1, model)
    extra = {}
    if name in ("engine", "external"):
        extra["probe"] = Probe(name, root.parent / "marker")  # saved after "model" (engines go in name order)
    elif name == "rename":
        real_rename = os.rename
        os.rename = lambda src, dst: die() if checkpoint._CHECKPOINT_NAME.fullmatch(Path(dst).name) \
            else real_rename(src, dst)
    elif name == "latest":
        real_replace = os.replace
        os.replace = lambda src, dst: die() if Path(dst).name == "latest" else real_replace(src, dst)
    elif name == "delete":
        real_rmtree = shutil.rmtree
        shutil.rmtree = lambda path, **kw: die() if ".tmp-delete-" in Path(path).name else real_rmtree(path, **kw)
    else:
        raise SystemExit(f"unknown phase {name!r}")
    save(root, 2, model, extra, keep_last=1 if name == "delete" else 5)
    print("the save finished although the process should have died", flush=True)
    sys.exit(4)


if __name__ == "__main__":
    if sys.argv[1] == "loop":
        loop(Path(sys.argv[2]))
    else:
        phase(Path(sys.argv[2]), sys.argv[3])
