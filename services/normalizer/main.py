"""``callingest serve normalizer``: consumes recordings.fetched, publishes recordings.normalized."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from callingest.infra import bucket_check
from callingest.pipeline import Stage
from callingest.service import run_stage_service
from callingest.settings import Settings
from callingest.topics import Topics
from services.normalizer.step import open_resources, step


@asynccontextmanager
async def stage(settings: Settings, db: Any, topics: Topics) -> AsyncIterator[Stage]:
    async with open_resources(settings) as resources:
        yield Stage(
            name="normalizer",
            input_topic=topics.fetched,
            step=step,
            output_topic=topics.normalized,
            output_event="RecordingNormalized",
            resources=resources,
            checks=[bucket_check(resources["s3"], settings.s3_bucket)],
        )


async def serve(settings: Settings) -> None:
    await run_stage_service("normalizer", stage, settings)
