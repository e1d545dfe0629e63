"""``callingest serve fetcher``: the fetcher stage of the stage graph (callingest.stages)."""

from __future__ import annotations

from callingest.secretbox import load_keyring
from callingest.service import run_stage_service
from callingest.settings import Settings
from services.fetcher.step import STAGE, step


async def serve(settings: Settings) -> None:
    load_keyring(settings)  # a missing SECRET_KEYS stops the service before it starts anything
    await run_stage_service(STAGE, step, settings)
