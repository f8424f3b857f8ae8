"""The control plane of a one-rank job, for checkpoint-service tests that need no process group."""

from __future__ import annotations

from typing import Any


class OneRank:
    """The control plane of a one-rank job."""

    rank = 0
    world_size = 1

    def barrier(self) -> None:
        pass

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        return obj

    def allgather_object(self, obj: Any) -> list[Any]:
        return [obj]
