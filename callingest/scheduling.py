"""Fair scheduling across networks in the consumer loop (no I/O).

:class:`FairQueue` holds the events read ahead, queued per network; a free slot goes to
the waiting network with the fewest events in flight, and no network may hold more than
:func:`network_share` of the slots (see docs/architecture.md, "Isolation between networks").
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from callingest import avro


@dataclass
class Queued:
    """An event read ahead and waiting for a slot."""

    tp: TopicPartition
    record: ConsumerRecord
    network: str


def network_share(max_in_flight: int) -> int:
    """The most slots one network may hold: all but a quarter (a newly arriving network
    always finds free slots at once), at least one."""
    return max(1, max_in_flight - max_in_flight // 4)


def network_of(record: ConsumerRecord) -> str:
    """The network an event belongs to, for scheduling ('' when it cannot be decoded)."""
    try:
        return str(avro.decode(record.value)[1].get("network_id", ""))
    except (avro.UndecodableMessage, AttributeError, TypeError):
        return ""


class FairQueue:
    """Events waiting for a slot, per network, and the slots each network holds."""

    def __init__(self, max_in_flight: int) -> None:
        self.share = network_share(max_in_flight)
        self.queued = 0
        self._queues: dict[str, deque[Queued]] = {}
        self._running: dict[str, int] = {}
        self._last_served: dict[str, int] = {}
        self._served = 0

    def push(self, tp: TopicPartition, record: ConsumerRecord) -> None:
        network = network_of(record)
        self._queues.setdefault(network, deque()).append(Queued(tp, record, network))
        self.queued += 1

    def _pick(self) -> str | None:
        """The waiting network with the fewest events in flight (below its share); ties go
        to the one served longest ago."""
        best: str | None = None
        best_key: tuple[int, int] | None = None
        for network in self._queues:
            running = self._running.get(network, 0)
            if running >= self.share:
                continue
            key = (running, self._last_served.get(network, -1))
            if best_key is None or key < best_key:
                best, best_key = network, key
        return best

    def pop(self) -> Queued | None:
        """The next event to start (its network now holds one more slot), or None if every
        waiting network is at its share."""
        network = self._pick()
        if network is None:
            return None
        queue = self._queues[network]
        item = queue.popleft()
        if not queue:
            del self._queues[network]
        self.queued -= 1
        self._served += 1
        self._last_served[network] = self._served
        self._running[network] = self._running.get(network, 0) + 1
        return item

    def finished(self, network: str) -> None:
        """An event of ``network`` left its slot."""
        left = self._running.get(network, 1) - 1
        if left:
            self._running[network] = left
        else:
            self._running.pop(network, None)
            if network not in self._queues:
                self._last_served.pop(network, None)

    def forget(self, partitions: set[TopicPartition]) -> None:
        """Drop queued (not started) events of ``partitions``: their next owner reads them."""
        for network, queue in list(self._queues.items()):
            kept = deque(item for item in queue if item.tp not in partitions)
            self.queued -= len(queue) - len(kept)
            if kept:
                self._queues[network] = kept
            else:
                del self._queues[network]
