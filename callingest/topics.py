"""Topic names and their creation.

Every topic name carries ``TOPIC_PREFIX`` so that several stacks (or tests)
can share one cluster. The project creates its topics itself; the broker's
auto-creation stays off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SUBMITTED = "calls.submitted"
VALIDATED = "calls.validated"
FETCHED = "recordings.fetched"
NORMALIZED = "recordings.normalized"
FAILED = "calls.failed"
DEAD_LETTER = "calls.dead-letter"
"""Base names (before ``TOPIC_PREFIX``); which stage reads and writes each: callingest.stages."""


@dataclass(frozen=True)
class Topics:
    """The platform's topics under one prefix."""

    prefix: str = ""
    retry_tiers: int = 4

    @property
    def submitted(self) -> str:
        return self.name(SUBMITTED)

    @property
    def validated(self) -> str:
        return self.name(VALIDATED)

    @property
    def fetched(self) -> str:
        return self.name(FETCHED)

    @property
    def normalized(self) -> str:
        return self.name(NORMALIZED)

    @property
    def failed(self) -> str:
        return self.name(FAILED)

    @property
    def dead_letter(self) -> str:
        return self.name(DEAD_LETTER)

    def name(self, base: str) -> str:
        """The topic of base name ``base`` under this prefix."""
        return f"{self.prefix}{base}"

    def retry(self, stage: str, tier: int) -> str:
        """The delayed-retry topic of ``stage`` for delay tier ``tier`` (0-based)."""
        return f"{self.prefix}retry.{stage}.{tier}"

    def retry_topics(self, stage: str) -> list[str]:
        return [self.retry(stage, tier) for tier in range(self.retry_tiers)]

    def all(self) -> list[str]:
        """Every topic of the platform: the stage graph's, the dead letters, every stage's
        retry tiers."""
        from callingest.stages import STAGES  # the graph imports this module's base names

        main = [self.name(base) for base in dict.fromkeys(
            t for s in STAGES for t in (s.input_topic, s.output_topic) if t is not None)]
        return [*main, self.dead_letter,
                *(t for s in STAGES for t in self.retry_topics(s.name))]


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
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # the stage graph reads the names
    from aiokafka.errors import TopicAlreadyExistsError  # (CLI, devstack) without a client

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
