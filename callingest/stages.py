"""The stage graph, declared once.

:data:`STAGES` is the one table of the pipeline: for each stage, the topic and event it
consumes, the topic and event it produces, the call status it sets when its step succeeds,
its retry policy, the type of its resources and its port. Everything else reads it:
service start-up (:func:`callingest.service.run_stage_service`), the consumer loop
(:mod:`callingest.pipeline`), the topics that exist (:meth:`callingest.topics.Topics.all`),
rebuilding a stage's input event and restarting failed calls (:mod:`callingest.events`,
:mod:`callingest.replay`), the ``callingest`` command (``serve`` and ``replay --stage``
choices) and the dev stack (``tools/devstack.py``: services and ports).

Topic names here are base names; :class:`~callingest.topics.Topics` puts ``TOPIC_PREFIX``
in front. Resources are named as ``"module:Class"`` and imported only by the service that
opens them, so this module (read by the gateway and the CLI too) imports no stage's code.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from enum import Enum

from callingest.topics import FAILED, FETCHED, NORMALIZED, SUBMITTED, VALIDATED


class Retry(Enum):
    """What a stage does with a transient failure (both go through ``retry.<stage>.<tier>``)."""

    BOUNDED = "bounded"
    """Up to ``MAX_PROCESSING_ATTEMPTS`` tries, then the call fails with ``retryable=true``."""
    FOREVER = "forever"
    """Never exhausted: what the stage does must not be dropped (a CSM notification)."""


@dataclass(frozen=True)
class StageSpec:
    """One row of the stage graph."""

    name: str
    input_topic: str
    input_event: str
    output_topic: str | None
    output_event: str | None
    status: str | None
    """The call's status once the step succeeded; None: the stage does not move the call."""
    retry: Retry
    resources: str
    """``module:Class`` of the step's typed resources (:class:`callingest.steps.Resources`)."""
    port: int
    """Default port of its /healthz, /readyz and /metrics (``HTTP_PORT`` overrides it)."""
    in_flight_setting: str = "max_in_flight"
    """The setting that bounds its events in flight (an I/O-bound stage has its own)."""

    @property
    def terminal(self) -> bool:
        """A call this stage succeeds with is done: it sets a status and no stage consumes
        what it produces (the normalizer)."""
        return self.status is not None and not any(
            s.input_topic == self.output_topic for s in STAGES)

    def resources_type(self) -> type:
        """The class named by :attr:`resources` (imports the stage's module)."""
        module, _, name = self.resources.partition(":")
        found: type = getattr(importlib.import_module(module), name)
        return found


NO_RESOURCES = "callingest.steps:NoResources"

#: The pipeline, in the order a call goes through it; the notifier reacts to a failure.
STAGES: tuple[StageSpec, ...] = (
    StageSpec("validator", SUBMITTED, "CallSubmitted", VALIDATED, "CallValidated",
          status="validated", retry=Retry.BOUNDED, resources=NO_RESOURCES, port=8081),
    StageSpec("fetcher", VALIDATED, "CallValidated", FETCHED, "RecordingFetched",
          status="fetched", retry=Retry.BOUNDED,
          resources="services.fetcher.step:FetcherResources", port=8082,
          in_flight_setting="fetcher_max_in_flight"),
    StageSpec("normalizer", FETCHED, "RecordingFetched", NORMALIZED, "RecordingNormalized",
          status="normalized", retry=Retry.BOUNDED,
          resources="services.normalizer.step:NormalizerResources", port=8083),
    StageSpec("notifier", FAILED, "CallFailed", None, None,
          status=None, retry=Retry.FOREVER, resources=NO_RESOURCES, port=8084),
)

BY_NAME: dict[str, StageSpec] = {s.name: s for s in STAGES}

#: Where a call starts: the gateway publishes CallSubmitted with status ``received``.
SOURCE = "gateway"
SOURCE_STATUS = "received"

#: The stages that move a call forward (they set its status): what replay and retry can
#: resume from, and whose retries a client hears of (``call.retrying`` webhooks).
CALL_STAGES: tuple[str, ...] = tuple(s.name for s in STAGES if s.status is not None)

#: Every service of the platform and its default port: the gateway, the stages, webhooks.
SERVICE_PORTS: dict[str, int] = {SOURCE: 8080, **{s.name: s.port for s in STAGES},
                                 "webhooks": 8085}
SERVICES: tuple[str, ...] = tuple(SERVICE_PORTS)


def stage(name: str) -> StageSpec:
    """The stage called ``name``; ValueError if there is none."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}") from None


def upstream(name: str) -> str:
    """Who publishes the input event of stage ``name``: a stage, or the gateway."""
    topic = stage(name).input_topic
    for s in STAGES:
        if s.output_topic == topic:
            return s.name
    if topic == SUBMITTED:
        return SOURCE
    raise ValueError(f"no producer of {topic!r} in the stage graph")


def status_before(name: str) -> str:
    """The call's status while it waits for stage ``name`` (what its upstream set)."""
    producer = upstream(name)
    return SOURCE_STATUS if producer == SOURCE else str(stage(producer).status)
