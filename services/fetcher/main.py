"""``callingest serve fetcher``: consumes calls.validated, publishes recordings.fetched."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from callingest.infra import bucket_check
from callingest.pipeline import Stage
from callingest.secretbox import load_keyring
from callingest.service import run_stage_service
from callingest.settings import Settings
from callingest.topics import Topics
from services.fetcher.step import STAGE, open_resources, step


@asynccontextmanager
async def stage(settings: Settings, db: Any, topics: Topics) -> AsyncIterator[Stage]:
    async with open_resources(settings) as resources:
        yield Stage(
            name=STAGE,
            input_topic=topics.validated,
            step=step,
            output_topic=topics.fetched,
            output_event="RecordingFetched",
            resources=resources,
            max_in_flight=settings.fetcher_max_in_flight,
            checks=[bucket_check(resources["s3"], settings.s3_bucket)],
        )


async def serve(settings: Settings) -> None:
    load_keyring(settings)  # a missing SECRET_KEYS stops the service before it starts anything
    await run_stage_service(STAGE, stage, settings)
