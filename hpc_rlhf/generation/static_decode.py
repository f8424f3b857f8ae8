"""Decoding into a preallocated (static) KV cache, one step optionally replayed as a CUDA graph.

The hf backend's plain decode loop runs an eager forward per token over a cache that grows by concatenation: on a GPU
with a small model each step is hundreds of tiny kernel launches issued from Python. `StaticDecoder` keeps the same
semantics and numbers but
  * prefills exactly as the plain loop does (same forward, same dynamic cache), then copies the prompt keys/values into
    a transformers `StaticCache` sized batch x (prompt width + largest budget);
  * decodes with a step whose inputs live in fixed buffers (token ids, position ids, write index, key mask), so on
    CUDA the step is captured once per (batch bucket, cache-length bucket) and replayed; elsewhere (or when capture
    fails) the same step runs eagerly;
  * samples outside the step with `sample_next_tokens` on the step's logits of the real rows only, so the random
    stream, tokens and log-probs are those of the plain loop given the same logits.
Batches are padded up to a multiple of `batch_multiple` rows and caches to a multiple of `length_multiple` positions
so later calls reuse captured graphs; padding rows are never sampled nor returned.

Works across transformers versions that write a static cache at an explicit `cache_position` (4.x) and those that
keep a device-side write counter per layer (`cumulative_length`, 5.x): the step sets both from its write-index
buffer. Anything unexpected raises `StaticDecodeUnsupported`, and the engine then falls back to the plain loop.
"""

from __future__ import annotations

import inspect
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from hpc_rlhf.generation.engine import GeneratedSample, SamplingParams
from hpc_rlhf.generation.sampling import sample_next_tokens

logger = logging.getLogger(__name__)

MASK_KINDS = {"sdpa": "bool", "eager": "additive"}  # attention implementations that take a prepared 4D mask


class StaticDecodeUnsupported(RuntimeError):
    """This model / transformers version cannot decode into a static cache; the message says why."""


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def left_pad(prompts: Sequence[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask) [B, width] of the prompts, left-padded with `pad_token_id` (CPU tensors)."""
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids):] = 1
    return input_ids, attention_mask


class RowTracker:
    """Per-row response bookkeeping of a decode loop: appends sampled tokens until a stop token or the row's budget."""

    def __init__(self, budgets: Sequence[int], stops: frozenset[int]) -> None:
        self.budgets, self.stops = list(budgets), stops
        self.responses: list[list[int]] = [[] for _ in budgets]
        self.log_probs: list[list[float]] = [[] for _ in budgets]
        self.reasons: list[str | None] = [None] * len(budgets)

    def record(self, tokens: torch.Tensor, log_probs: torch.Tensor) -> bool:
        """Add one step's samples (rows already finished ignore theirs); True once every row has finished."""
        for row, (token, log_prob) in enumerate(zip(tokens.tolist(), log_probs.tolist())):
            if self.reasons[row] is not None:
                continue
            self.responses[row].append(token)
            self.log_probs[row].append(log_prob)
            if token in self.stops:
                self.reasons[row] = "stop"
            elif len(self.responses[row]) >= self.budgets[row]:
                self.reasons[row] = "length"
        return all(reason is not None for reason in self.reasons)

    def finished(self, device: torch.device) -> torch.Tensor:
        return torch.tensor([reason is not None for reason in self.reasons], device=device)

    def samples(self, prompts: Sequence[list[int]], include_stop_token: bool) -> list[GeneratedSample]:
        out = []
        for row, ids in enumerate(prompts):
            response, lps = self.responses[row], self.log_probs[row]
            if self.reasons[row] == "stop" and not include_stop_token:
                response, lps = response[:-1], lps[:-1]
            out.append(GeneratedSample(prompt_ids=list(ids), response_ids=response, log_probs=lps,
                                       finish_reason=self.reasons[row]))  # type: ignore[arg-type]
        return out


@dataclass
class _Slot:
    """The fixed buffers of one (batch bucket, cache length) shape, and its captured graph once there is one."""

    cache: Any
    ids: torch.Tensor  # [Bb, 1] token fed at this step
    positions: torch.Tensor  # [Bb, 1] its position id
    write_index: torch.Tensor  # 0-d, the cache slot this step writes
    key_ok: torch.Tensor  # [Bb, Lc] bool, keys each row may attend to
    graph: Any = None
    logits: torch.Tensor | None = None  # the graph's output buffer [Bb, V]
    param_ptrs: tuple[int, ...] = field(default_factory=tuple)


class StaticDecoder:
    """Generates a left-padded batch with a static KV cache; see the module docstring."""

    def __init__(self, model: torch.nn.Module, *, pad_token_id: int, use_cuda_graphs: bool = True,
                 batch_multiple: int = 8, length_multiple: int = 128, max_slots: int = 2) -> None:
        """`max_slots` bounds how many (batch, length) shapes keep a cache and a graph resident (least recently used
        shapes are dropped first): each holds batch x length keys and values of every layer in device memory."""
        self.model = model
        self.pad_token_id = pad_token_id
        self.batch_multiple, self.length_multiple, self.max_slots = batch_multiple, length_multiple, max_slots
        self.device = next(model.parameters()).device
        self.use_cuda_graphs = use_cuda_graphs and self.device.type == "cuda"
        self.graph_failure: str | None = None  # why capture failed (then every step runs eagerly)
        self.stats = {"captures": 0, "replays": 0, "eager_steps": 0}
        self._slots: OrderedDict[tuple[int, int], _Slot] = OrderedDict()
        self._mask_kind, self._cache_kw, self._pass_cache_position = self._check_model()

    # ----- setup ------------------------------------------------------------------------------------------------
    def _check_model(self) -> tuple[str, str, bool]:
        config = self.model.config
        impl = getattr(config, "_attn_implementation", None) or "eager"
        if impl not in MASK_KINDS:
            raise StaticDecodeUnsupported(f"attention implementation {impl!r} takes no prepared 4D mask "
                                          f"(supported: {sorted(MASK_KINDS)})")
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None and any(kind != "full_attention" for kind in layer_types):
            raise StaticDecodeUnsupported(f"layer types {sorted(set(layer_types))} are not all full attention")
        if getattr(config, "sliding_window", None) is not None or getattr(config, "attention_chunk_size", None):
            raise StaticDecodeUnsupported("sliding-window / chunked attention needs a different static cache")
        cache_kw = cache_keyword(self.model)
        if cache_kw is None:
            raise StaticDecodeUnsupported("the model's forward takes neither `cache` nor `past_key_values`")
        return MASK_KINDS[impl], cache_kw, "cache_position" in inspect.signature(self.model.forward).parameters

    def _new_cache(self, max_cache_len: int) -> Any:
        from transformers import StaticCache

        try:
            cache = StaticCache(config=self.model.config, max_cache_len=max_cache_len)
        except TypeError as exc:  # signatures before 4.56 also wanted the batch size, device and dtype
            raise StaticDecodeUnsupported(f"StaticCache(config=, max_cache_len=) failed: {exc}") from exc
        kinds = {type(layer).__name__ for layer in getattr(cache, "layers", [])}
        if kinds != {"StaticLayer"}:
            raise StaticDecodeUnsupported(f"StaticCache built layers {sorted(kinds) or 'none'}, expected StaticLayer")
        return cache

    def _slot(self, batch: int, cache_len: int) -> _Slot:
        key = (batch, cache_len)
        slot = self._slots.pop(key, None)
        if slot is None:
            while len(self._slots) >= self.max_slots:
                self._slots.popitem(last=False)
            device = self.device
            slot = _Slot(cache=self._new_cache(cache_len),
                         ids=torch.full((batch, 1), self.pad_token_id, dtype=torch.long, device=device),
                         positions=torch.zeros((batch, 1), dtype=torch.long, device=device),
                         write_index=torch.zeros((), dtype=torch.long, device=device),
                         key_ok=torch.zeros((batch, cache_len), dtype=torch.bool, device=device))
        self._slots[key] = slot  # most recently used last
        return slot

    def clear(self) -> None:
        """Drop every cache and captured graph (the model moved, or its memory is wanted elsewhere)."""
        self._slots.clear()

    # ----- generation -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_rows(self, prompts: Sequence[list[int]], budgets: Sequence[int], params: SamplingParams,
                      generator: torch.Generator, stops: frozenset[int]) -> list[GeneratedSample]:
        batch = len(prompts)
        input_ids, attention_mask = left_pad(prompts, self.pad_token_id)
        width = input_ids.shape[1]
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, logits_to_keep=1)
        prompt_cache, logits = output_cache(out), out.logits[:, -1, :]

        bucket = round_up(batch, self.batch_multiple)
        slot = self._slot(bucket, round_up(width + max(budgets), self.length_multiple))
        self._load_prompt(slot, prompt_cache, attention_mask, position_ids[:, -1:] + 1, batch, width)
        del prompt_cache, out
        if self.use_cuda_graphs and self.graph_failure is None and any(
                isinstance(getattr(layer, "cumulative_length", None), int) for layer in slot.cache.layers):
            self._give_up_graphs("the static cache counts written positions in a Python int, which a graph "
                                 "would freeze")
        if slot.graph is not None and slot.param_ptrs != tuple(p.data_ptr() for p in self.model.parameters()):
            slot.graph, slot.logits = None, None  # the weights moved since capture: its addresses are stale

        rows = RowTracker(budgets, stops)
        step = 0
        while True:
            tokens, token_log_probs = sample_next_tokens(logits, temperature=params.temperature, top_k=params.top_k,
                                                         top_p=params.top_p, generator=generator,
                                                         suppressed=params.suppressed_token_ids)
            if rows.record(tokens, token_log_probs):
                break
            step_ids = torch.where(rows.finished(self.device), torch.full_like(tokens, self.pad_token_id), tokens)
            slot.ids[:batch, 0].copy_(step_ids)
            if step > 0:
                slot.positions.add_(1)
            slot.write_index.fill_(width + step)
            slot.key_ok[:, width + step] = True
            logits = self._run_step(slot)[:batch]
            if step == 0:
                self._check_cache_written(slot, batch, width)
            step += 1
        return rows.samples(prompts, params.include_stop_token)

    def _load_prompt(self, slot: _Slot, prompt_cache: Any, attention_mask: torch.Tensor,
                     next_positions: torch.Tensor, batch: int, width: int) -> None:
        """Copy the prefill's keys/values into the slot's static cache (positions [0, width)) and set the buffers."""
        layers = getattr(prompt_cache, "layers", None)
        if layers is None or len(layers) != len(slot.cache.layers):
            raise StaticDecodeUnsupported("the prefill cache has no per-layer tensors matching the static cache")
        slot.cache.reset()  # zeroes what an earlier call wrote (a no-op before the first one)
        bucket = slot.ids.shape[0]
        positions = torch.arange(width, device=self.device)
        for index, layer in enumerate(layers):
            keys, values = _pad_rows(layer.keys, bucket), _pad_rows(layer.values, bucket)
            slot.cache.update(keys, values, index, {"cache_position": positions})
        slot.ids.fill_(self.pad_token_id)
        slot.positions.zero_()
        slot.positions[:batch].copy_(next_positions)
        slot.key_ok.zero_()
        slot.key_ok[:batch, :width].copy_(attention_mask.bool())
        slot.key_ok[batch:, 0] = True  # padding rows attend to one (zero) key, never to nothing

    def _step(self, slot: _Slot) -> torch.Tensor:
        """One decode forward from the slot's buffers; only ops without host synchronisation (graph-capturable)."""
        for layer in slot.cache.layers:
            counter = getattr(layer, "cumulative_length", None)
            if isinstance(counter, torch.Tensor):
                counter.copy_(slot.write_index)
        mask = slot.key_ok[:, None, None, :]
        if self._mask_kind == "additive":
            dtype = next(self.model.parameters()).dtype
            mask = torch.zeros(mask.shape, dtype=dtype, device=self.device).masked_fill(
                ~mask, torch.finfo(dtype).min)
        kwargs: dict[str, Any] = {self._cache_kw: slot.cache}
        if self._pass_cache_position:
            kwargs["cache_position"] = slot.write_index.view(1)
        out = self.model(input_ids=slot.ids, attention_mask=mask, position_ids=slot.positions, use_cache=True,
                         **kwargs)
        return out.logits[:, -1, :]

    def _run_step(self, slot: _Slot) -> torch.Tensor:
        if self.use_cuda_graphs and self.graph_failure is None:
            if slot.graph is None:
                self._capture(slot, tuple(p.data_ptr() for p in self.model.parameters()))
            if slot.graph is not None:
                slot.graph.replay()
                self.stats["replays"] += 1
                return slot.logits  # type: ignore[return-value]
        self.stats["eager_steps"] += 1
        return self._step(slot)

    def _capture(self, slot: _Slot, ptrs: tuple[int, ...]) -> None:
        """Warm the step up on a side stream, then capture it; a failure is logged once and decoding stays eager.

        The step is idempotent (it rewrites the same cache slot from the same buffers), so warm-up runs are harmless.
        """
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._step(slot)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                logits = self._step(slot)
            slot.graph, slot.logits, slot.param_ptrs = graph, logits, ptrs
            self.stats["captures"] += 1
        except Exception as exc:  # noqa: BLE001 - any capture problem means: decode eagerly
            self._give_up_graphs(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            try:
                torch.cuda.synchronize(self.device)
            except Exception:  # noqa: BLE001
                pass

    def _give_up_graphs(self, reason: str) -> None:
        self.graph_failure = reason
        logger.warning("CUDA-graph capture of the decode step failed (%s); decoding without CUDA graphs", reason)

    def _check_cache_written(self, slot: _Slot, batch: int, width: int) -> None:
        """After the first step: position `width` of the cache holds keys and `width + 1` does not (one sync per
        call), which catches a transformers version that writes the static cache somewhere else."""
        keys = slot.cache.layers[0].keys
        written = bool(keys[:batch, :, width].abs().sum() > 0)
        beyond = width + 1 < keys.shape[2] and bool(keys[:, :, width + 1].abs().sum() > 0)
        if not written or beyond:
            raise StaticDecodeUnsupported("the decode step did not write the static cache at its write index")


def cache_keyword(model: torch.nn.Module) -> str | None:
    """The forward's name for the KV cache: `cache` (transformers 5.x) or `past_key_values` (4.x), else None."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values" if "past_key_values" in params else None


def output_cache(out: Any) -> Any:
    """The cache a forward returned (`cache` in recent transformers, `past_key_values` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if tensor.shape[0] == rows:
        return tensor
    pad = tensor.new_zeros((rows - tensor.shape[0], *tensor.shape[1:]))
    return torch.cat([tensor, pad])
