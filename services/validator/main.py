"""``callingest serve validator``: the validator stage of the stage graph (callingest.stages)."""

from __future__ import annotations

from callingest.service import run_stage_service
from callingest.settings import Settings
from services.validator.step import step


async def serve(settings: Settings) -> None:
    await run_stage_service("validator", step, settings)
