"""``callingest serve notifier``: consumes calls.failed and emails the customer success manager."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from callingest.pipeline import Stage
from callingest.service import run_stage_service
from callingest.settings import Settings
from callingest.topics import Topics
from services.notifier.step import step


@asynccontextmanager
async def stage(settings: Settings, db: Any, topics: Topics) -> AsyncIterator[Stage]:
    yield Stage(name="notifier", input_topic=topics.failed, step=step, retry_forever=True)


async def serve(settings: Settings) -> None:
    await run_stage_service("notifier", stage, settings)
