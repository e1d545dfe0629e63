"""``callingest serve validator``: consumes calls.submitted, publishes calls.validated."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from callingest.pipeline import Stage
from callingest.service import run_stage_service
from callingest.settings import Settings
from callingest.topics import Topics
from services.validator.step import step


@asynccontextmanager
async def stage(settings: Settings, db: Any, topics: Topics) -> AsyncIterator[Stage]:
    yield Stage(name="validator", input_topic=topics.submitted, step=step,
                output_topic=topics.validated, output_event="CallValidated")


async def serve(settings: Settings) -> None:
    await run_stage_service("validator", stage, settings)
