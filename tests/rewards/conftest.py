"""Fixtures for the reward tests: a scriptable real HTTP server on 127.0.0.1, reward files, a tiny reward model."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from hpc_rlhf.builtin_models.tiny import build_tiny_tokenizer


@dataclass
class ScriptedServer:
    """A real ThreadingHTTPServer on 127.0.0.1; `requests` holds the decoded JSON bodies it received, in order."""

    url: str
    requests: list[Any] = field(default_factory=list)


Script = Callable[[Any, int], tuple]


def _make_handler(script: Script, record: list[Any], lock: threading.Lock):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            payload = json.loads(raw)
            with lock:
                index = len(record)
                record.append(payload)
            status, body, *delay = script(payload, index)
            time.sleep(delay[0] if delay else 0.0)
            if not isinstance(body, (bytes, str)):
                body = json.dumps(body)
            data = body.encode() if isinstance(body, str) else body
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeout test)

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def scripted_server():
    """Start servers with `scripted_server(script)`, where `script(request_json, request_index)` returns
    (status, body) or (status, body, delay_s); a body that is not bytes or str is sent as JSON.
    The servers are shut down after the test."""
    servers: list[ThreadingHTTPServer] = []

    def start(script: Script) -> ScriptedServer:
        record: list[Any] = []
        server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(script, record, threading.Lock()))
        server.daemon_threads = True
        server.block_on_close = False
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return ScriptedServer(url=f"http://127.0.0.1:{server.server_address[1]}/", requests=record)

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


LENGTH_REWARD_FILE = '''
def reward_func(queries, prompts, labels):
    """Reward = response length; score = 1 when the response equals the label."""
    responses = [q[len(p):] for q, p in zip(queries, prompts)]
    return {
        "rewards": [float(len(r)) for r in responses],
        "scores": [1.0 if r == l else 0.0 for r, l in zip(responses, labels)],
        "extra_logs": {"batch_size": len(queries), "response_len": [len(r) for r in responses]},
    }
'''


@pytest.fixture
def write_reward_file(tmp_path: Path) -> Callable[[str, str], Path]:
    """Write `source` to tmp_path/name and return the path."""

    def write(source: str, name: str = "my_reward.py") -> Path:
        path = tmp_path / name
        path.write_text(source)
        return path

    return write


@pytest.fixture
def length_reward_file(write_reward_file) -> Path:
    """A reward file whose rewards are response lengths and whose scores are exact-match with the label."""
    return write_reward_file(LENGTH_REWARD_FILE, "length_reward.py")


@pytest.fixture(scope="session")
def tiny_reward_model_dir(tmp_path_factory) -> Path:
    """A random-init LlamaForSequenceClassification (num_labels=1, vocab 128, pad 0) saved without a tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, pad_token_id=0, num_labels=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForSequenceClassification(config)
        # Random init leaves the head near zero; larger weights make score differences easy to see.
        torch.nn.init.normal_(model.score.weight, std=1.0)
    path = tmp_path_factory.mktemp("reward_model")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_text_reward_model_dir(tmp_path_factory) -> Path:
    """A random-init LlamaForSequenceClassification saved with the tiny character tokenizer, so it scores text."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         num_labels=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        model = LlamaForSequenceClassification(config)
        torch.nn.init.normal_(model.score.weight, std=1.0)
    path = tmp_path_factory.mktemp("text_reward_model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
