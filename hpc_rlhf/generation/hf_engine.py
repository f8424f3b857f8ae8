"""The Hugging Face generation backend: batched prefill + decode with a KV cache, for CPUs and machines without vLLM.

A hand-written loop over `model(input_ids, attention_mask, position_ids, past_key_values, use_cache=True)` rather
than `model.generate`, so that
  * sampling draws from one explicit `torch.Generator` seeded from `SamplingParams.seed`: the same seed, prompts and
    weights give bitwise-identical samples (a resumed job regenerates exactly the rollouts it lost);
  * the behaviour log-prob of each sampled token comes from the very logits it was sampled from (`sampling` module).
Prompts are left-padded; each row stops on its own at a stop/eos token or at its token budget. Rows are processed
in chunks of `max_batch_size` sequences (a prompt's `n` samples are `n` rows).

On CUDA the decode runs by default through `static_decode.StaticDecoder` (a preallocated KV cache and a decode step
replayed as a CUDA graph; `cuda_graphs=False` keeps the static cache but runs the step eagerly). It gives the same
tokens and log-probs as the plain loop; if it cannot run with this model or transformers version, one warning names
the reason and the engine falls back to the plain loop.

Vision-language models: `generate(..., images=...)` takes each prompt's images as PNG bytes (its token ids already
hold the processor's image placeholder tokens); the prefill of a chunk gets the vision tensors of its rows' images
(`data.images.vision_tensors` with the engine's `image_processor`), in row order, and the decode reads them from the
KV cache. Chunks with images always take the plain loop.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from hpc_rlhf.data.images import (
    causal_lm_auto_class,
    check_plain_positions,
    is_vision_language,
    load_image_processor,
    vision_tensors,
)
from hpc_rlhf.distributed.weights import WeightSyncError, apply_named_tensor
from hpc_rlhf.generation.engine import (
    GeneratedSample,
    GenerationError,
    SamplingParams,
    check_images,
    check_prompts,
    model_eos_token_ids,
    stop_set,
    without_log_probs,
)
from hpc_rlhf.generation.sampling import sample_next_tokens
from hpc_rlhf.generation.static_decode import RowTracker, StaticDecoder, cache_keyword, left_pad, output_cache

logger = logging.getLogger(__name__)


class HFEngine:
    """A `GenerationEngine` around a Hugging Face causal LM held in this process."""

    def __init__(self, model: torch.nn.Module, *, pad_token_id: int | None = None,
                 eos_token_ids: Sequence[int] | None = None, max_batch_size: int = 64,
                 max_model_len: int | None = None, seed: int = 0, static_decode: bool | None = None,
                 cuda_graphs: bool = True, image_processor: Any = None) -> None:
        """`static_decode`: decode into a static KV cache (default: on CUDA only); `cuda_graphs`: replay its step as
        a CUDA graph (CUDA only; False = `vllm.enforce_eager`); `image_processor`: the vision-language model's, for
        prompts with images."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_model_len is not None and max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2 (one prompt token and one new token), got {max_model_len}")
        self.model = model.eval()
        self.device = next(model.parameters()).device
        config = model.config
        text_config = config.get_text_config()  # the config itself for a text model
        self.vocab_size: int = int(text_config.vocab_size)
        if eos_token_ids is None:
            eos_token_ids = model_eos_token_ids(config, getattr(model, "generation_config", None))
        self.eos_token_ids: tuple[int, ...] = tuple(int(t) for t in eos_token_ids)
        if pad_token_id is None:
            pad_token_id = (text_config.pad_token_id if text_config.pad_token_id is not None
                            else (self.eos_token_ids or (0,))[0])
        self.pad_token_id = int(pad_token_id)
        self.image_processor = image_processor
        self.max_batch_size = max_batch_size
        self.max_model_len = max_model_len
        self.seed = seed
        self._unseeded_calls = 0  # seeds calls whose params carry no seed, reproducibly per engine
        self._asleep = False
        self._closed = False
        self.static_decode = self.device.type == "cuda" if static_decode is None else static_decode
        self.cuda_graphs = cuda_graphs
        self.static_failure: str | None = None  # why static decoding was given up (then the plain loop runs)
        self._static: StaticDecoder | None = None

    @classmethod
    def from_pretrained(cls, model_path: str, *, dtype: torch.dtype = torch.float32, device: Any = "cpu",
                        attn_implementation: str = "sdpa", **kwargs: Any) -> HFEngine:
        """Load an HF model folder (config + weights) onto `device` and wrap it (a vision-language model with its
        image processor)."""
        model = causal_lm_auto_class(model_path).from_pretrained(model_path, dtype=dtype,
                                                                 attn_implementation=attn_implementation)
        if is_vision_language(model.config):
            check_plain_positions(model)
            kwargs.setdefault("image_processor", load_image_processor(model_path))
        return cls(model.to(device), **kwargs)

    @property
    def captures_graphs_on_first_use(self) -> bool:
        """Whether a generate call may capture a CUDA graph (static decode meets a new batch shape): such a call
        must not run beside other work on the device (`trainers/ppo/overlap.py`)."""
        return self.static_decode and self.cuda_graphs and self.device.type == "cuda"

    # ----- generation ---------------------------------------------------------------------------------------
    def generate(self, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams,
                 images: Sequence[Sequence[bytes]] | None = None) -> list[list[GeneratedSample]]:
        """`params.n` samples per prompt, in prompt order then sample order; `images`: each prompt's PNG images."""
        self._check_usable("generate")
        prompts = check_prompts(prompt_token_ids, vocab_size=self.vocab_size)
        images = check_images(images, len(prompts))
        if any(images) and self.image_processor is None:
            raise GenerationError("prompts with images need a vision-language model and its image processor")
        generator = torch.Generator(device=self.device)
        generator.manual_seed(self._call_seed(params.seed))
        budgets = self._token_budgets(prompts, params.max_new_tokens)
        rows = [(p, s) for p in range(len(prompts)) for s in range(params.n)]
        results: list[list[GeneratedSample | None]] = [[None] * params.n for _ in prompts]
        for start in range(0, len(rows), self.max_batch_size):
            chunk = rows[start:start + self.max_batch_size]
            samples = self._generate_rows([prompts[p] for p, _ in chunk], [budgets[p] for p, _ in chunk], params,
                                          generator, [image for p, _ in chunk for image in images[p]])
            for (p, s), sample in zip(chunk, samples):
                results[p][s] = sample
        # the sampler takes log-probs off the logits it draws from anyway: a call without them only hides them
        return results if params.log_probs else without_log_probs(results)  # type: ignore[return-value,arg-type]

    def _call_seed(self, seed: int | None) -> int:
        if seed is not None:
            return seed % (2**63 - 1)
        self._unseeded_calls += 1
        return (self.seed * 1_000_003 + self._unseeded_calls) % (2**63 - 1)

    def _token_budgets(self, prompts: Sequence[list[int]], max_new_tokens: int) -> list[int]:
        budgets = []
        for row, ids in enumerate(prompts):
            budget = max_new_tokens
            if self.max_model_len is not None:
                budget = min(budget, self.max_model_len - len(ids))
                if budget < 1:
                    raise GenerationError(f"prompt row {row} has {len(ids)} tokens, which leaves no room for a "
                                          f"response under max_model_len={self.max_model_len}")
            budgets.append(budget)
        return budgets

    def _generate_rows(self, prompts: Sequence[list[int]], budgets: Sequence[int], params: SamplingParams,
                       generator: torch.Generator, images: Sequence[bytes] = ()) -> list[GeneratedSample]:
        """One chunk of rows: through the static decoder when it is on, else (or when it fails, or the rows have
        images) the plain loop."""
        stops = stop_set(params, self.eos_token_ids)
        if images:
            vision = {key: value.to(self.device) for key, value in vision_tensors(self.image_processor, images).items()}
            return self._generate_rows_dynamic(prompts, budgets, params, generator, stops, vision)
        if self.static_decode and self.static_failure is None:
            state = generator.get_state()
            try:
                if self._static is None:
                    self._static = StaticDecoder(self.model, pad_token_id=self.pad_token_id,
                                                 use_cuda_graphs=self.cuda_graphs)
                return self._static.generate_rows(prompts, budgets, params, generator, stops)
            except Exception as exc:  # noqa: BLE001 - never lose a run to the fast path: warn once, decode plainly
                self.static_failure = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                logger.warning("static-cache decoding is off for this engine (%s); using the plain decode loop",
                               self.static_failure)
                self._static = None
                generator.set_state(state)
        return self._generate_rows_dynamic(prompts, budgets, params, generator, stops)

    @torch.no_grad()
    def _generate_rows_dynamic(self, prompts: Sequence[list[int]], budgets: Sequence[int], params: SamplingParams,
                               generator: torch.Generator, stops: frozenset[int],
                               vision: dict[str, torch.Tensor] | None = None) -> list[GeneratedSample]:
        """Prefill the left-padded batch (with the vision tensors of its images), then decode one token per step (the
        cache grows by concatenation) until every row has used its budget of new tokens or met a stop token."""
        batch = len(prompts)
        input_ids, attention_mask = left_pad(prompts, self.pad_token_id)
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, logits_to_keep=1, **(vision or {}))
        cache, logits = output_cache(out), out.logits[:, -1, :]
        next_position = position_ids[:, -1:] + 1
        cache_kw = cache_keyword(self.model) or "past_key_values"

        rows = RowTracker(budgets, stops)
        while True:
            tokens, token_log_probs = sample_next_tokens(logits, temperature=params.temperature, top_k=params.top_k,
                                                         top_p=params.top_p, generator=generator,
                                                         suppressed=params.suppressed_token_ids)
            if rows.record(tokens, token_log_probs):
                break
            finished = rows.finished(self.device)
            step_ids = torch.where(finished, torch.full_like(tokens, self.pad_token_id), tokens).unsqueeze(-1)
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((batch, 1))], dim=-1)
            out = self.model(input_ids=step_ids, attention_mask=attention_mask, position_ids=next_position,
                             use_cache=True, **{cache_kw: cache})
            cache, logits = output_cache(out), out.logits[:, -1, :]
            next_position = next_position + 1
        return rows.samples(prompts, params.include_stop_token)

    # ----- weights and memory -------------------------------------------------------------------------------
    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy (HF parameter name, tensor) pairs into the model in place; returns how many were applied.

        Names must match `model.named_parameters()` exactly (tied parameters may arrive under either name). The whole
        stream is consumed before an unknown name or a wrong shape is reported, so broadcast peers never hang.
        """
        self._check_usable("load_weights", allow_asleep=True)
        targets = dict(self.model.named_parameters(remove_duplicate=False))
        problems: list[str] = []
        applied = 0
        for name, tensor in named_tensors:
            try:
                apply_named_tensor(targets, name, tensor)
                applied += 1
            except WeightSyncError as exc:
                problems.append(str(exc))
        if problems:
            raise GenerationError("load_weights: " + "; ".join(problems))
        return applied

    def sleep(self, level: int = 1) -> None:
        """Move the weights to host memory (on an accelerator); generation is refused until `wake_up`."""
        self._check_usable("sleep", allow_asleep=True)
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level}")
        if self._static is not None:
            self._static.clear()  # its caches hold device memory and its graphs the weights' old addresses
        if self.device.type != "cpu":
            self.model.to("cpu")
            _empty_device_cache(self.device)
        self._asleep = True

    def wake_up(self) -> None:
        self._check_usable("wake_up", allow_asleep=True)
        if self._asleep and self.device.type != "cpu":
            self.model.to(self.device)
        self._asleep = False

    @property
    def asleep(self) -> bool:
        return self._asleep

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._static = None
        del self.model
        gc.collect()
        _empty_device_cache(self.device)

    def _check_usable(self, action: str, *, allow_asleep: bool = False) -> None:
        if self._closed:
            raise GenerationError(f"cannot {action}: the engine was closed")
        if self._asleep and not allow_asleep:
            raise GenerationError(f"cannot {action}: the engine is asleep; call wake_up() first")


def _empty_device_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
