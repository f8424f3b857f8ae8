"""The generation engine interface: token ids in, sampled token ids and their log-probs out.

Every backend (`hf_engine.HFEngine`, `vllm_engine.VllmEngine`, a process-hosted one) implements `GenerationEngine`.
Engines never see text: prompts are token-id lists and responses come back as token-id lists, so a trajectory is never
re-tokenized between generation and training.

Log-prob convention (behaviour log-probs, one per response token):
    log_softmax(logits / temperature)[sampled token], taken *before* top-k / top-p truncation,
    and plain log_softmax(logits)[token] when temperature is 0 (greedy).
The trainer recomputes exactly this quantity from its own forward pass, so the difference between the two is the
generator/trainer mismatch that the off-policy corrections act on. (vLLM can only report the truncated, renormalised
distribution when top-k / top-p are active; see `vllm_engine`.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import torch

FinishReason = Literal["stop", "length"]
FINISH_REASONS: tuple[str, ...] = ("stop", "length")


class GenerationError(RuntimeError):
    """A generation engine was misused or failed; the message says which input or state is wrong."""


@dataclass(frozen=True)
class SamplingParams:
    """How to sample responses; the same fields drive every backend.

    `stop_token_ids` end a response in addition to the model's own eos token(s) (unless `ignore_eos`);
    `include_stop_token` keeps the token that ended a response (and its log-prob) at the end of `response_ids`,
    which RL wants: the policy must learn to emit eos. `seed` makes sampling reproducible: the same seed, prompts and
    weights give bitwise-identical samples on the hf backend (and per request on vLLM). `top_k <= 0` and `top_p == 1`
    switch those filters off; `temperature == 0` is greedy decoding. `suppressed_token_ids` are never sampled (a
    vision-language model's image placeholder: in a response it would make the trainer's forward expect an image);
    the log-probs reported stay those of the model's whole distribution, as the trainer recomputes them. Without
    `log_probs` the engine need not compute the sampled tokens' log-probs: each sample's `log_probs` is NaN (same
    length), and vLLM skips their per-token bookkeeping.
    """

    max_new_tokens: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    n: int = 1
    seed: int | None = None
    stop_token_ids: Sequence[int] = field(default_factory=tuple)
    include_stop_token: bool = True
    ignore_eos: bool = False
    suppressed_token_ids: Sequence[int] = field(default_factory=tuple)
    log_probs: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "suppressed_token_ids", tuple(int(t) for t in self.suppressed_token_ids))
        problems = []
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not self.temperature >= 0.0:
            problems.append(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p must lie in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int):
            problems.append(f"top_k must be an integer (<= 0 = off), got {self.top_k!r}")
        if not isinstance(self.n, int) or self.n < 1:
            problems.append(f"n must be an integer >= 1, got {self.n!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            problems.append(f"seed must be an integer or None, got {self.seed!r}")
        if any(t < 0 for t in self.stop_token_ids):
            problems.append(f"stop_token_ids must be non-negative token ids, got {list(self.stop_token_ids)}")
        if any(t < 0 for t in self.suppressed_token_ids):
            problems.append(f"suppressed_token_ids must be non-negative token ids, got "
                            f"{list(self.suppressed_token_ids)}")
        if problems:
            raise ValueError("invalid SamplingParams: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def truncates(self) -> bool:
        """Whether top-k or top-p removes part of the distribution before sampling."""
        return (self.top_k > 0 or self.top_p < 1.0) and not self.greedy

    def replace(self, **overrides: Any) -> SamplingParams:
        """A copy with some fields changed; unknown field names raise an error that names them."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s) {unknown}; known: {sorted(known)}")
        return dataclasses.replace(self, **overrides)


@dataclass
class GeneratedSample:
    """One sampled response to one prompt."""

    prompt_ids: list[int]
    response_ids: list[int]
    log_probs: list[float]  # one per response token, see the module docstring for the convention
    finish_reason: FinishReason  # "stop": eos / stop token; "length": max_new_tokens or the engine's max length

    def __post_init__(self) -> None:
        if len(self.log_probs) != len(self.response_ids):
            raise GenerationError(f"a sample has {len(self.response_ids)} response tokens but "
                                  f"{len(self.log_probs)} log-probs")
        if self.finish_reason not in FINISH_REASONS:
            raise GenerationError(f"finish_reason must be one of {FINISH_REASONS}, got {self.finish_reason!r}")


def unknown_log_probs(length: int) -> list[float]:
    """The log-probs of a sample generated without them (`SamplingParams.log_probs` false): NaN, so that any use
    shows."""
    return [float("nan")] * length


def without_log_probs(rows: list[list[GeneratedSample]]) -> list[list[GeneratedSample]]:
    """The samples with their log-probs replaced by `unknown_log_probs` (an engine that computes them anyway)."""
    for row in rows:
        for sample in row:
            sample.log_probs = unknown_log_probs(len(sample.response_ids))
    return rows


@runtime_checkable
class GenerationEngine(Protocol):
    """What the rollout stage, the agent executors and the weight plane need from a generator."""

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams,
                 images: Sequence[Sequence[bytes]] | None = None) -> list[list[GeneratedSample]]:
        """`params.n` samples per prompt, outer list in prompt order, inner list in sample order. `images` (vision-
        language models): each prompt's images as PNG bytes, () for a text prompt."""
        ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy (HF parameter name, full tensor) pairs into the model in place; returns how many were applied."""
        ...

    def sleep(self, level: int = 1) -> None:
        """Free accelerator memory between generation phases (colocated layouts)."""
        ...

    def wake_up(self) -> None:
        """Undo `sleep`; generation is refused while asleep."""
        ...

    def close(self) -> None:
        """Release the model; the engine cannot be used afterwards."""
        ...


def check_prompts(prompt_token_ids: Sequence[Sequence[int]], *, vocab_size: int | None = None) -> list[list[int]]:
    """Prompts as plain int lists; an empty prompt or an out-of-vocabulary id raises an error naming the row."""
    if isinstance(prompt_token_ids, (str, bytes)) or not isinstance(prompt_token_ids, Sequence):
        raise GenerationError("prompt_token_ids must be a list of token-id lists (engines take token ids, not text)")
    prompts = []
    for row, ids in enumerate(prompt_token_ids):
        if isinstance(ids, (str, bytes)):
            raise GenerationError(f"prompt {row} is text; engines take token ids (tokenize it first)")
        ids = [int(t) for t in ids]
        if not ids:
            raise GenerationError(f"prompt {row} has no tokens; a prompt needs at least one token")
        if vocab_size is not None and (min(ids) < 0 or max(ids) >= vocab_size):
            bad = next(t for t in ids if t < 0 or t >= vocab_size)
            raise GenerationError(f"prompt {row} holds token id {bad}, outside the model's vocabulary "
                                  f"[0, {vocab_size})")
        prompts.append(ids)
    return prompts


def check_images(images: Sequence[Sequence[bytes]] | None, num_prompts: int) -> list[tuple[bytes, ...]]:
    """Each prompt's images (PNG bytes) as a tuple, () for text prompts; a count mismatch raises an error."""
    if images is None:
        return [()] * num_prompts
    if len(images) != num_prompts:
        raise GenerationError(f"got images for {len(images)} prompts but {num_prompts} prompts")
    checked = []
    for row, row_images in enumerate(images):
        row_images = tuple(row_images or ())
        if any(not isinstance(image, bytes) for image in row_images):
            raise GenerationError(f"the images of prompt {row} must be PNG bytes")
        checked.append(row_images)
    return checked


def model_eos_token_ids(config: Any, generation_config: Any = None) -> tuple[int, ...]:
    """The model's eos id(s): the generation config's when it names some, else the model config's."""
    for source in (generation_config, config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if value is None:
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        return tuple(int(v) for v in values)
    return ()


def sample_seed(seed: int | None, prompt_index: int, sample_index: int, n: int) -> int | None:
    """A distinct, reproducible seed for sample `sample_index` of prompt `prompt_index` (None stays None)."""
    if seed is None:
        return None
    return (seed * 1_000_003 + prompt_index * n + sample_index) % (2**63 - 1)


def stop_set(params: SamplingParams, model_eos: Iterable[int]) -> frozenset[int]:
    """Token ids that end a response under `params`."""
    stops = set(params.stop_token_ids)
    if not params.ignore_eos:
        stops.update(model_eos)
    return frozenset(stops)
