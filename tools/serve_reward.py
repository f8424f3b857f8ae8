"""Serve a reward function file over HTTP, for runs that set `reward.remote_url`.

    python tools/serve_reward.py --reward-func my_reward.py --port 8000            # POST http://127.0.0.1:8000/
    python tools/serve_reward.py --reward-func pkg.rewards:score --host 0.0.0.0 --port 8000
    curl -s localhost:8000/health

Requests are {"query": [...], "prompts": [...], "labels": [...]}; answers {"rewards", "scores", "extra_logs"}.
With --port 0 the system picks a free port; the first line printed says which.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from hpc_rlhf.rewards.result import RewardError
from hpc_rlhf.rewards.reward_func import RewardFunction
from hpc_rlhf.rewards.server import RewardServer


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reward-func", required=True,
                        help="Python file or module (optionally :function) defining "
                             "reward_func(queries, prompts, labels)")
    parser.add_argument("--port", type=int, required=True, help="port to listen on (0 = pick a free one)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 = every interface)")
    parser.add_argument("--log-requests", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.log_requests else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s")
    try:
        reward_fn = RewardFunction(args.reward_func)
    except RewardError as error:
        print(f"serve_reward: {error}", file=sys.stderr)
        return 2
    server = RewardServer(reward_fn, host=args.host, port=args.port, description=args.reward_func)
    print(f"serving {args.reward_func} on {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
