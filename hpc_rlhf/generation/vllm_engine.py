"""The vLLM generation backend: one offline `vllm.LLM` per generator tensor-parallel group, driven by token ids.

Written against vLLM's offline API as of 0.24 (the oldest release supported: `MIN_VLLM_VERSION`), checked against the
sources of 0.24 and 0.26 and run with 0.26 on an H100; `vllm` is imported only when an engine is built, so this module
imports without it.

What the adapter does with vLLM:
  * builds `vllm.LLM(model, tensor_parallel_size=tp, seed, dtype, enable_prefix_caching, enable_sleep_mode,
    logprobs_mode="processed_logprobs", distributed_executor_backend=...)` with the engine core in this process
    (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, see `prepare_vllm_env`), so that weight updates reach the model by reference.
    vLLM re-seeds this process's global torch/numpy/random generators with `seed` while it builds the engine;
  * generates from `TokensPrompt(prompt_token_ids=...)`, one request per (prompt, sample) with `n=1`, `logprobs=0`
    (only the sampled token's log-prob; none at all for a call without `SamplingParams.log_probs`: vLLM's per-step
    log-prob bookkeeping is ~20% of a 135M model's generation time), `flat_logprobs=True` (each request's log-probs in
    a few flat lists instead of a dict and a `Logprob` object per token: a constant number of Python objects per
    request) and `detokenize=False`. The n requests of one prompt share its KV blocks through prefix caching. Seeds:
    by default the call's `SamplingParams.seed` seeds this process's CUDA generators just before `llm.generate`, and
    the requests carry none, so vLLM draws the whole batch with one noise kernel per step (the engine core runs in
    this process, so its sampler uses these generators; every TP rank seeds alike). With `seed_per_request` each
    request gets its own seed derived from `SamplingParams.seed` instead: its draw then does not depend on the rest of
    the batch, but vLLM's sampler handles seeded requests one by one, one small kernel per request and decoded token;
  * loads new weights in place with `llm.apply_model(lambda model: model.load_weights(weights))`, then drops the
    prefix cache unless sleeping already did (its KV blocks were computed by the old weights);
  * sleeps with `llm.sleep(level)` and wakes with `llm.wake_up(tags)`: only the weights are woken for a weight update
    while asleep, and the KV cache comes back on `wake_up()`.

Images (vision-language models). A prompt with images is sent as `TokensPrompt(prompt_token_ids=...,
multi_modal_data={"image": [PIL images]})` (vLLM's documented multimodal input). vLLM's processor expands each
image placeholder into the image's patch tokens itself, so every run of consecutive placeholder tokens of our
(already expanded) prompt ids is collapsed to one first (`collapse_image_tokens`); the samples keep the expanded
ids, which the trainer reads. Not yet run on a GPU: the request is unit-tested without vLLM only.

Executor backends. vLLM's "external_launcher" runs one TP rank per process, inside an already initialised
torch.distributed world. It takes *that whole world* as its own: consecutive blocks of `tp` world ranks become its TP
groups, and it creates process groups and all-reduces KV-cache sizes over every world rank. So it is used in-process
only when every rank of the job builds an engine at the same moment (the colocated layout, `shared_world=True`).
Otherwise (the disaggregated layout) each TP rank hosts its engine in a child process whose private world holds just
that engine's TP ranks (see `hosted.py` and `factory.make_engine`). With tp=1 and a world of one process the default
"uni" executor is used in-process; it adopts an already initialised default process group (as a colocated trainer
leaves it) without needing MASTER_ADDR/MASTER_PORT, and places the model on cuda:0 of the visible devices.

Log-probs. "processed_logprobs" returns log_softmax(logits / temperature) of the sampled token, and plain log_softmax
for greedy requests, which is the convention of `engine`. When top-k or top-p is active vLLM reports the log-prob
under the truncated, renormalised distribution instead (its only post-temperature mode); the engine warns once.
"""

from __future__ import annotations

import gc
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from hpc_rlhf.data.images import collapse_image_tokens, decode_png
from hpc_rlhf.generation.engine import (
    GeneratedSample,
    GenerationError,
    SamplingParams,
    check_images,
    check_prompts,
    sample_seed,
    unknown_log_probs,
)

MIN_VLLM_VERSION = (0, 24, 0)
EXTERNAL_LAUNCHER = "external_launcher"
LOGPROBS_MODE = "processed_logprobs"
FINISH_REASON_MAP = {"stop": "stop", "length": "length"}


class VllmVersionError(GenerationError):
    """The installed vLLM is older than the oldest supported release."""


def parse_version(text: str) -> tuple[int, int, int]:
    """(major, minor, patch) from a version string such as '0.24.0', '0.25.1+cu130' or '0.26.0rc1.dev5+g1a2b'."""
    match = re.match(r"^\s*v?(\d+)\.(\d+)(?:\.(\d+))?", str(text))
    if not match:
        raise VllmVersionError(f"cannot read a version number from vllm.__version__={text!r}")
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


def check_vllm_version(vllm: Any) -> tuple[int, int, int]:
    """The installed version, or a clear error when it predates `MIN_VLLM_VERSION`."""
    version = parse_version(getattr(vllm, "__version__", ""))
    if version < MIN_VLLM_VERSION:
        wanted = ".".join(map(str, MIN_VLLM_VERSION))
        raise VllmVersionError(f"vllm {getattr(vllm, '__version__', '?')} is installed but the vllm backend needs "
                               f"vllm>={wanted} (offline LLM with logprobs_mode, sleep tags and apply_model); "
                               f"install a newer vllm or use vllm.backend=hf")
    return version


def import_vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise GenerationError("vllm.backend=vllm but vllm is not importable here; install the 'vllm' extra "
                              "or use vllm.backend=hf") from exc
    return vllm


def llm_kwargs(model_path: str, *, dtype: str, tp: int, gpu_memory_utilization: float, enable_sleep: bool,
               enable_prefix_caching: bool, enforce_eager: bool, max_num_seqs: int, max_model_len: int | None,
               seed: int, executor_backend: str | None) -> dict[str, Any]:
    """Keyword arguments of `vllm.LLM` for one generator engine."""
    kwargs: dict[str, Any] = {
        "model": model_path, "tensor_parallel_size": tp, "dtype": dtype, "seed": seed,
        "gpu_memory_utilization": gpu_memory_utilization, "enable_sleep_mode": enable_sleep,
        "enable_prefix_caching": enable_prefix_caching, "enforce_eager": enforce_eager, "max_num_seqs": max_num_seqs,
        "logprobs_mode": LOGPROBS_MODE,
    }
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len
    if executor_backend is not None:
        kwargs["distributed_executor_backend"] = executor_backend
    return kwargs


def request_sampling_params(vllm: Any, params: SamplingParams, prompts: Sequence[Sequence[int]],
                            max_model_len: int | None, *, seed_per_request: bool = False) -> list[Any]:
    """One `vllm.SamplingParams` per (prompt, sample), prompt-major, each with n=1 (and its own seed when
    `seed_per_request`).

    A request's `max_tokens` is cut to what fits under `max_model_len`; a prompt that already fills it is an error.
    """
    requests = []
    log_prob_fields = {"logprobs": 0, "flat_logprobs": True} if params.log_probs else {"logprobs": None}
    for p, ids in enumerate(prompts):
        max_tokens = params.max_new_tokens
        if max_model_len is not None:
            max_tokens = min(max_tokens, max_model_len - len(ids))
            if max_tokens < 1:
                raise GenerationError(f"prompt row {p} has {len(ids)} tokens, which leaves no room for a response "
                                      f"under max_model_len={max_model_len}")
        # vLLM adds a logit bias before sampling; -100 keeps a suppressed token out of any draw
        suppressed = {"logit_bias": {t: -100.0 for t in params.suppressed_token_ids}} if params.suppressed_token_ids \
            else {}
        for s in range(params.n):
            requests.append(vllm.SamplingParams(
                n=1, max_tokens=max_tokens, temperature=params.temperature, top_p=params.top_p,
                top_k=max(params.top_k, 0),
                seed=sample_seed(params.seed, p, s, params.n) if seed_per_request else None,
                stop_token_ids=list(params.stop_token_ids), ignore_eos=params.ignore_eos, detokenize=False,
                **log_prob_fields, **suppressed))
    return requests


def request_prompts(vllm: Any, prompts: Sequence[list[int]], images: Sequence[Sequence[bytes]], n: int,
                    image_token_id: int | None) -> list[Any]:
    """One `vllm.TokensPrompt` per (prompt, sample), prompt-major; a prompt with images carries them as
    `multi_modal_data={"image": [...]}` and its image placeholder runs collapsed."""
    inputs = []
    for ids, row_images in zip(prompts, images):
        if row_images:
            if image_token_id is None:
                raise GenerationError("prompts with images need a vision-language model (its config names no image "
                                      "token)")
            prompt = vllm.TokensPrompt(prompt_token_ids=collapse_image_tokens(ids, image_token_id),
                                       multi_modal_data={"image": decode_png(row_images)})
        else:
            prompt = vllm.TokensPrompt(prompt_token_ids=ids)
        inputs.extend(prompt for _ in range(n))
    return inputs


def sampled_log_probs(completion: Any, row: str) -> list[float]:
    """The log-prob vLLM reported for each sampled token of one completion, out of the `FlatLogprobs` the requests
    ask for: position p's entries are `token_ids/logprobs[start_indices[p]:end_indices[p]]`, the sampled token first
    (vLLM's sampler puts it there)."""
    token_ids = list(completion.token_ids)
    flat = completion.logprobs
    if flat is None or len(flat) != len(token_ids):
        got = None if flat is None else len(flat)
        raise GenerationError(f"{row}: vLLM returned {got} log-prob positions for {len(token_ids)} tokens "
                              f"(logprobs=0 was requested)")
    starts, ends, ids = flat.start_indices, flat.end_indices, flat.token_ids
    firsts = [ids[start] if end > start else None for start, end in zip(starts, ends)]
    if firsts != token_ids:
        position = next(p for p, (got, token) in enumerate(zip(firsts, token_ids)) if got != token)
        raise GenerationError(f"{row}: vLLM returned no log-prob for sampled token {token_ids[position]} at "
                              f"position {position}")
    values = flat.logprobs
    return [float(values[start]) for start in starts]


def to_generated_samples(outputs: Sequence[Any], prompts: Sequence[list[int]], params: SamplingParams,
                         image_token_id: int | None = None) -> list[list[GeneratedSample]]:
    """vLLM `RequestOutput`s (one per request of `request_sampling_params`, same order) -> samples per prompt.

    A vision prompt's output may report its ids expanded or as sent (placeholders collapsed); both are accepted."""
    expected = len(prompts) * params.n
    if len(outputs) != expected:
        raise GenerationError(f"vLLM returned {len(outputs)} outputs for {expected} requests")
    results: list[list[GeneratedSample]] = []
    for p, ids in enumerate(prompts):
        samples = []
        for s in range(params.n):
            output = outputs[p * params.n + s]
            row = f"prompt {p} sample {s}"
            reported = list(output.prompt_token_ids)
            if reported != ids and not (image_token_id is not None
                                        and reported == collapse_image_tokens(ids, image_token_id)):
                raise GenerationError(f"{row}: vLLM output belongs to another prompt (outputs out of order)")
            if len(output.outputs) != 1:
                raise GenerationError(f"{row}: expected one completion per request, got {len(output.outputs)}")
            completion = output.outputs[0]
            reason = FINISH_REASON_MAP.get(completion.finish_reason)
            if reason is None:
                raise GenerationError(f"{row}: vLLM finished the request with reason {completion.finish_reason!r}")
            response = [int(t) for t in completion.token_ids]
            log_probs = sampled_log_probs(completion, row) if params.log_probs else unknown_log_probs(len(response))
            if reason == "stop" and not params.include_stop_token and response:
                response, log_probs = response[:-1], log_probs[:-1]
            samples.append(GeneratedSample(prompt_ids=list(ids), response_ids=response, log_probs=log_probs,
                                           finish_reason=reason))
        results.append(samples)
    return results


def prepare_vllm_env(environ: dict | None = None) -> None:
    """Environment vLLM reads when an engine is built; set before `vllm.LLM` so that it takes effect.

    VLLM_ENABLE_V1_MULTIPROCESSING=0 keeps the engine core in this process, so weight updates pass tensors by
    reference. VLLM_USE_FLASHINFER_SAMPLER defaults to 0 here: the adapter always asks for processed log-probs,
    which FlashInfer's sampler never serves, and the sampler of vLLM's V2 model runner (used for dense models such
    as Llama by default in 0.26) imports flashinfer at start-up unless this is 0, which fails where flashinfer is
    not installed. A value set by the user is kept.
    """
    environ = os.environ if environ is None else environ
    environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    prefer_torch_sampler(environ)


def prefer_torch_sampler(environ: dict | None = None) -> None:
    """VLLM_USE_FLASHINFER_SAMPLER=0 unless the user set it: vLLM samples with PyTorch, and needs no flashinfer."""
    environ = os.environ if environ is None else environ
    environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")


def prepare_external_launcher_env(rank: int, local_rank: int, environ: dict | None = None) -> None:
    """Set RANK / LOCAL_RANK, which vLLM's external launcher reads from the environment.

    A LOCAL_RANK that names another device than this engine's is refused: vLLM would place the model there.
    """
    environ = os.environ if environ is None else environ
    if "LOCAL_RANK" in environ and int(environ["LOCAL_RANK"]) != local_rank:
        raise GenerationError(f"LOCAL_RANK={environ['LOCAL_RANK']} but this engine's device is cuda:{local_rank}; "
                              f"vLLM's external launcher puts the model on cuda:LOCAL_RANK")
    environ["RANK"] = str(rank)
    environ["LOCAL_RANK"] = str(local_rank)


class VllmEngine:
    """A `GenerationEngine` around one in-process `vllm.LLM` (this process is one TP rank of the engine)."""

    def __init__(self, model_path: str, *, dtype: str = "bfloat16", tp: int = 1, gpu_memory_utilization: float = 0.85,
                 enable_sleep: bool = False, enable_prefix_caching: bool = True, enforce_eager: bool = False,
                 max_num_seqs: int = 256, max_model_len: int | None = None, seed: int = 0,
                 seed_per_request: bool = False, executor_backend: str | None = None, vllm_module: Any = None,
                 image_token_id: int | None = None) -> None:
        """`image_token_id`: the image placeholder of a vision-language model (default: read from its config);
        `seed_per_request`: seed each request rather than each call (module docstring)."""
        self.vllm = vllm_module if vllm_module is not None else import_vllm()
        self.version = check_vllm_version(self.vllm)
        if tp > 1 and executor_backend != EXTERNAL_LAUNCHER:
            raise GenerationError(f"tp={tp} needs one process per TP rank under the '{EXTERNAL_LAUNCHER}' executor "
                                  f"(build the engine through make_engine inside a distributed job)")
        prepare_vllm_env()
        self.enable_sleep = enable_sleep
        self.seed_per_request = seed_per_request
        self.llm = self.vllm.LLM(**llm_kwargs(
            model_path, dtype=dtype, tp=tp, gpu_memory_utilization=gpu_memory_utilization, enable_sleep=enable_sleep,
            enable_prefix_caching=enable_prefix_caching, enforce_eager=enforce_eager, max_num_seqs=max_num_seqs,
            max_model_len=max_model_len, seed=seed, executor_backend=executor_backend))
        self.max_model_len = self._engine_max_model_len(max_model_len)
        self.model_path = model_path
        self._image_token_id = image_token_id
        self._sleeping_tags: set[str] = set()
        self._warned_truncation = False
        self._closed = False

    def _engine_max_model_len(self, requested: int | None) -> int | None:
        config = (getattr(self.llm, "model_config", None)
                  or getattr(getattr(self.llm, "llm_engine", None), "model_config", None))
        value = getattr(config, "max_model_len", None)
        return int(value) if isinstance(value, int) else requested

    # ----- generation ---------------------------------------------------------------------------------------
    def generate(self, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams,
                 images: Sequence[Sequence[bytes]] | None = None) -> list[list[GeneratedSample]]:
        """`params.n` samples per prompt, in prompt order then sample order; `images`: each prompt's PNG images."""
        self._check_usable("generate")
        prompts = check_prompts(prompt_token_ids)
        images = check_images(images, len(prompts))
        if params.truncates and not self._warned_truncation:
            warnings.warn("vLLM reports behaviour log-probs under the top-k/top-p truncated distribution; the "
                          "trainer recomputes untruncated ones, so their difference includes the truncation",
                          stacklevel=2)
            self._warned_truncation = True
        requests = request_sampling_params(self.vllm, params, prompts, self.max_model_len,
                                           seed_per_request=self.seed_per_request)
        image_token = self._image_token() if any(images) else None
        inputs = request_prompts(self.vllm, prompts, images, params.n, image_token)
        if not self.seed_per_request and params.seed is not None:
            torch.cuda.manual_seed_all(params.seed)  # what vLLM's sampler draws from for unseeded requests
        outputs = self.llm.generate(inputs, sampling_params=requests, use_tqdm=False)
        return to_generated_samples(outputs, prompts, params, image_token)

    def _image_token(self) -> int | None:
        """The image placeholder id (read from the model's config on first use)."""
        if self._image_token_id is None:
            self._image_token_id = _config_image_token_id(self.model_path)
        return self._image_token_id

    # ----- weights and memory -------------------------------------------------------------------------------
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load (HF name, full tensor) pairs in place through the model's own `load_weights` (it shards for TP)."""
        self._check_usable("load_weights", allow_asleep=True)
        if "weights" in self._sleeping_tags:
            self.llm.wake_up(tags=["weights"])
            self._sleeping_tags.discard("weights")
        tracker = _NameTracker(named_tensors)
        try:
            self.llm.apply_model(lambda model: model.load_weights(iter(tracker)))
        except Exception as exc:
            tracker.drain()  # consume the rest so that broadcast peers are not left waiting
            raise GenerationError(f"vLLM could not load weight {tracker.last_name!r} "
                                  f"({tracker.count} received): {exc}") from exc
        # Cached KV blocks were computed by the old weights. Sleeping already dropped them with the KV cache.
        if "kv_cache" not in self._sleeping_tags and self.llm.reset_prefix_cache() is False:
            raise GenerationError("vLLM refused to reset its prefix cache after a weight update (requests still "
                                  "running?); cached prompts would use stale keys and values")
        return tracker.count

    def sleep(self, level: int = 1) -> None:
        """Level 1 offloads weights to host memory and drops the KV cache; level 2 drops both (a full weight
        update must follow before generating)."""
        self._check_usable("sleep", allow_asleep=True)
        if not self.enable_sleep:
            raise GenerationError("sleep() needs an engine built with enable_sleep=True (vllm.enable_sleep)")
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level}")
        if self._sleeping_tags:
            return
        self.llm.sleep(level=level)
        self._sleeping_tags = {"weights", "kv_cache"}

    def wake_up(self) -> None:
        self._check_usable("wake_up", allow_asleep=True)
        if self._sleeping_tags:
            self.llm.wake_up(tags=sorted(self._sleeping_tags))
            self._sleeping_tags = set()

    @property
    def asleep(self) -> bool:
        return bool(self._sleeping_tags)

    def close(self) -> None:
        """Drop the engine and collect it.

        vLLM's own `shutdown()` is not used: it destroys the default torch.distributed process group, which a
        colocated trainer owns. Dropping the `LLM` alone does not return its device memory (vLLM 0.26 keeps
        references to it), so an engine with sleep mode first discards weights and KV cache with a level-2 sleep.
        vLLM also freezes the objects it builds at start-up (`gc.freeze`); they are unfrozen before collecting.
        """
        if self._closed:
            return
        self._closed = True
        if self.enable_sleep and not self._sleeping_tags:
            self.llm.sleep(level=2)
        del self.llm
        gc.unfreeze()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _check_usable(self, action: str, *, allow_asleep: bool = False) -> None:
        if self._closed:
            raise GenerationError(f"cannot {action}: the engine was closed")
        if self._sleeping_tags and not allow_asleep:
            raise GenerationError(f"cannot {action}: the engine is asleep; call wake_up() first")


def _config_image_token_id(model_path: str) -> int | None:
    """The image placeholder id of a vision-language model folder, None for a text model (or an unreadable config)."""
    from hpc_rlhf.data.images import image_token_id

    try:
        from transformers import AutoConfig

        return image_token_id(AutoConfig.from_pretrained(model_path))
    except (OSError, ValueError):
        return None


class _NameTracker:
    """Wraps a (name, tensor) stream, remembering the last name handed out and how many pairs passed."""

    def __init__(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self._source = iter(named_tensors)
        self.last_name: str | None = None
        self.count = 0

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in self._source:
            self.last_name = name
            self.count += 1
            yield name, tensor

    def drain(self) -> None:
        for _ in self._source:
            pass
