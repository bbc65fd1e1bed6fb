"""Fair sharing of a tier's async tasks between API keys (pure, no I/O).

Each owner (an API key's digest) has its own first-in-first-out queue, and the owners take turns: one
task from each owner with work waiting, round and round. So a key that submits a 100-task batch gets
every other turn while another key has work, instead of making it wait for all 100.
"""

from __future__ import annotations

import collections
from typing import Generic, TypeVar

T = TypeVar("T")


class FairQueue(Generic[T]):
    """Per-owner FIFO queues served round-robin."""

    def __init__(self) -> None:
        self._queues: dict[str, collections.deque[T]] = {}
        self._turns: collections.deque[str] = collections.deque()  # owners with work, next turn first
        self._size = 0

    def push(self, owner: str, item: T) -> None:
        queue = self._queues.get(owner)
        if queue is None:
            queue = self._queues[owner] = collections.deque()
            self._turns.append(owner)
        queue.append(item)
        self._size += 1

    def pop(self) -> T | None:
        """The next owner's oldest item; that owner goes to the back of the turns."""
        if not self._turns:
            return None
        owner = self._turns.popleft()
        queue = self._queues[owner]
        item = queue.popleft()
        if queue:
            self._turns.append(owner)
        else:
            del self._queues[owner]
        self._size -= 1
        return item

    def __len__(self) -> int:
        return self._size

    def waiting(self, owner: str) -> int:
        queue = self._queues.get(owner)
        return len(queue) if queue else 0
