"""Topic names and their creation.

Every topic name carries ``TOPIC_PREFIX`` so that several stacks (or tests)
can share one cluster. The project creates its topics itself; the broker's
auto-creation stays off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

RETRYING_STAGES = ("validator", "fetcher", "normalizer", "notifier")


@dataclass(frozen=True)
class Topics:
    """The platform's topics under one prefix."""

    prefix: str = ""
    retry_tiers: int = 4

    @property
    def submitted(self) -> str:
        return f"{self.prefix}calls.submitted"

    @property
    def validated(self) -> str:
        return f"{self.prefix}calls.validated"

    @property
    def fetched(self) -> str:
        return f"{self.prefix}recordings.fetched"

    @property
    def normalized(self) -> str:
        return f"{self.prefix}recordings.normalized"

    @property
    def failed(self) -> str:
        return f"{self.prefix}calls.failed"

    @property
    def dead_letter(self) -> str:
        return f"{self.prefix}calls.dead-letter"

    def retry(self, stage: str, tier: int) -> str:
        """The delayed-retry topic of ``stage`` for delay tier ``tier`` (0-based)."""
        return f"{self.prefix}retry.{stage}.{tier}"

    def retry_topics(self, stage: str) -> list[str]:
        return [self.retry(stage, tier) for tier in range(self.retry_tiers)]

    def all(self) -> list[str]:
        main = [self.submitted, self.validated, self.fetched, self.normalized, self.failed,
                self.dead_letter]
        return main + [t for stage in RETRYING_STAGES for t in self.retry_topics(stage)]


def topic_configs(replication_factor: int) -> dict[str, str]:
    """Per-topic configuration: min.insync.replicas 2 once there are 3 replicas or more."""
    return {"min.insync.replicas": "2"} if replication_factor >= 3 else {}


async def ensure_topics(bootstrap_servers: str, names: list[str], partitions: int = 3,
                        replication_factor: int = 1, **options: Any) -> list[str]:
    """Create the topics that do not exist yet; returns the names created. Idempotent.

    With ``replication_factor`` >= 3 the topics get ``min.insync.replicas`` = 2: with the
    producers' acks=all, an acknowledged event is on at least two brokers.
    ``options``: the clients' security options (:func:`callingest.kafka.client_options`).
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=15000,
                                **options)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [n for n in names if n not in existing]
        if not missing:
            return []
        try:
            await admin.create_topics(
                [NewTopic(n, num_partitions=partitions, replication_factor=replication_factor,
                          topic_configs=topic_configs(replication_factor))
                 for n in missing]
            )
        except TopicAlreadyExistsError:
            pass
        return missing
    finally:
        await admin.close()
