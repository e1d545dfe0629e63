"""What a step is: ``async def step(event, ctx: StageContext[R]) -> StepResult``.

A stage's step gets its typed resources (``R``, a :class:`Resources` subclass named in the
stage graph, :mod:`callingest.stages`) through its context; :class:`Stage` binds a row of
the graph to its step and its open resources for the consumer loop
(:class:`callingest.pipeline.StageRunner`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from pymongo.asynchronous.database import AsyncDatabase

from callingest.infra import Check
from callingest.settings import Settings
from callingest.stages import StageSpec
from callingest.topics import Topics


class Resources:
    """What a stage's step uses besides the settings and the database, open for the life
    of the service (clients, pools, guards). Subclasses are dataclasses."""

    @classmethod
    @asynccontextmanager
    async def open(cls, settings: Settings) -> AsyncIterator[Any]:
        """Open the resources for ``settings``; closed when the block ends."""
        yield cls()

    def checks(self, settings: Settings) -> list[Check]:
        """Infrastructure of the stage's own to verify before it starts (the bucket, ...)."""
        return []


@dataclass
class NoResources(Resources):
    """The resources of a step that needs none (the validator, the notifier)."""


R = TypeVar("R", bound=Resources)


@dataclass
class StepResult:
    """What a step produced: the next event (if any) and the fields to set on the call (the
    status a success sets is the stage graph's)."""

    next_event: dict[str, Any] | None = None
    call_update: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageContext(Generic[R]):
    """What a step may use: settings, the database, the topics, the call as stored (or None),
    the number of failed tries so far, the stage's resources, and whether the event's retry
    deadline has passed (:func:`callingest.retry_tiers.past_deadline`)."""

    settings: Settings
    db: AsyncDatabase[dict[str, Any]]
    topics: Topics
    call: dict[str, Any] | None
    retry: int
    resources: R
    past_deadline: bool = False


Step = Callable[[dict[str, Any], StageContext[R]], Awaitable[StepResult]]


@dataclass
class Stage(Generic[R]):
    """A row of the stage graph bound to its step and its open resources."""

    spec: StageSpec
    step: Step[R]
    resources: R

    @property
    def name(self) -> str:
        return self.spec.name
