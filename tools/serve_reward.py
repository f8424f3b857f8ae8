"""Serve a reward function file or a reward model over HTTP, for runs that set `reward.remote_url`.

    python tools/serve_reward.py --reward-func my_reward.py --port 8000            # POST http://127.0.0.1:8000/
    python tools/serve_reward.py --reward-func pkg.rewards:score --host 0.0.0.0 --port 8000
    python tools/serve_reward.py --reward-pretrain runs/rm_tiny/hf/reward --port 8001 --batch-size 32 --max-wait-ms 10
    curl -s localhost:8000/health

Requests are {"query": [...], "prompts": [...], "labels": [...]}; answers {"rewards", "scores", "extra_logs"}.
A reward model (a sequence-classification folder with its tokenizer, or builtin:tiny-llama/reward) scores each query
text as it is; requests arriving within --max-wait-ms of each other are scored together, up to --batch-size samples
per forward pass, on CUDA when available. With --port 0 the system picks a free port; the first line printed says which.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import torch

from hpc_rlhf.rewards.batching import BatchingScorer
from hpc_rlhf.rewards.result import RewardError
from hpc_rlhf.rewards.reward_func import RewardFunction
from hpc_rlhf.dtypes import DTYPES
from hpc_rlhf.rewards.reward_model import RewardModel
from hpc_rlhf.rewards.server import RewardServer
from hpc_rlhf.builtin_models.resolve import resolve_model_path

DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_WAIT_MS = 10.0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--reward-func",
                        help="Python file or module (optionally :function) defining "
                             "reward_func(queries, prompts, labels)")
    source.add_argument("--reward-pretrain",
                        help="reward model folder (sequence classification, num_labels=1, tokenizer beside it) "
                             "or builtin:tiny-llama/reward")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (0 = pick a free one)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 = every interface)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"reward model: most samples per forward pass (default {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--max-wait-ms", type=float, default=None,
                        help=f"reward model: how long a request waits for others to share its forward pass "
                             f"(default {DEFAULT_MAX_WAIT_MS:g})")
    parser.add_argument("--device", default=None,
                        help="reward model: torch device (default cuda when available, else cpu)")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                        help="reward model: weights dtype (default bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--log-requests", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)
    model_only = [flag for flag, value in (("--batch-size", args.batch_size), ("--max-wait-ms", args.max_wait_ms),
                                           ("--device", args.device), ("--dtype", args.dtype)) if value is not None]
    if args.reward_func and model_only:
        parser.error(f"{', '.join(model_only)} only apply to --reward-pretrain")
    return args


def load_reward_model(args: argparse.Namespace) -> BatchingScorer:
    """The reward model behind a batching scorer; a RewardError when it cannot score text queries."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if torch.device(device).type == "cuda" else "float32")
    batch_size = DEFAULT_BATCH_SIZE if args.batch_size is None else args.batch_size
    max_wait_ms = DEFAULT_MAX_WAIT_MS if args.max_wait_ms is None else args.max_wait_ms
    try:
        path = resolve_model_path(args.reward_pretrain)
    except ValueError as error:
        raise RewardError(str(error)) from None
    if not isinstance(batch_size, int) or batch_size < 1:
        raise RewardError(f"--batch-size must be >= 1, got {batch_size}")
    model = RewardModel(path, device=device, dtype=dtype, micro_batch_size=batch_size)
    if model.tokenizer is None:
        raise RewardError(f"reward model {path} has no tokenizer saved beside it; requests send text, so the "
                          f"server needs one")
    return BatchingScorer(model, batch_size=batch_size, max_wait_s=max_wait_ms / 1000.0)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.log_requests else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s")
    scorer = None
    try:
        if args.reward_func:
            server = RewardServer(RewardFunction(args.reward_func), host=args.host, port=args.port,
                                  description=args.reward_func)
        else:
            scorer = load_reward_model(args)
            server = RewardServer(scorer, host=args.host, port=args.port, thread_safe=True, stats=scorer.stats,
                                  description=f"reward model {args.reward_pretrain}")
    except (RewardError, OSError, RuntimeError) as error:  # a bad source, model folder, device or busy port
        print(f"serve_reward: {error}", file=sys.stderr)
        return 2
    print(f"serving {server.description} on {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        if scorer is not None:
            scorer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
