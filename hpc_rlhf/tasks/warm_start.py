"""A short supervised warm-up of the tiny model on the arithmetic task, so that RL starts with some reward signal.

A random model almost never answers correctly, and group estimators learn nothing from groups whose rewards are all
zero. A few hundred SFT steps (seconds on a CPU) give a policy that is right some of the time; RL then improves it.
The held-out test problems are excluded from the warm-up data.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hpc_rlhf.tasks.arithmetic import make_splits


def sft_batch(tokenizer, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded prompt + response + eos ids, labels only on the response, and the attention mask."""
    ids, labels = [], []
    for row in rows:
        prompt = tokenizer(row["input"])["input_ids"]
        response = tokenizer(row["response"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        ids.append(prompt + response)
        labels.append([-100] * len(prompt) + response)
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in ids])
    label_ids = torch.tensor([row + [-100] * (width - len(row)) for row in labels])
    return input_ids, label_ids, (input_ids != pad).long()


def progress_line(step: int, steps: int, loss: float, elapsed_s: float) -> str:
    """`warm-up step 100/500, loss 1.234, 20 s elapsed, about 80 s left` (the rate so far gives the rest)."""
    left = elapsed_s / step * (steps - step) if step else 0.0
    return f"warm-up step {step}/{steps}, loss {loss:.3f}, {elapsed_s:.0f} s elapsed, about {left:.0f} s left"


def warm_start(model_dir: str | Path, out_dir: str | Path, *, steps: int = 650, batch_size: int = 64,
               learning_rate: float = 3e-3, seed: int = 0, report: Optional[Callable[[str], None]] = None,
               report_every: int = 50) -> Path:
    """Train the model in `model_dir` for `steps` SFT steps on arithmetic problems and save it to `out_dir`.

    `report`, when given, receives a progress line every `report_every` steps and after the last one."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        rows = make_splits(n_train=0, n_test=200, n_sft=4000, seed=seed)["sft"]
        optimizer = torch.optim.AdamW(model.train().parameters(), lr=learning_rate, weight_decay=0.0)
        start = time.monotonic()
        for step in range(1, steps + 1):
            index = torch.randint(len(rows), (batch_size,), generator=generator).tolist()
            input_ids, labels, mask = sft_batch(tokenizer, [rows[i] for i in index])
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if report is not None and (step % report_every == 0 or step == steps):
                report(progress_line(step, steps, loss.item(), time.monotonic() - start))
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return Path(out_dir)
