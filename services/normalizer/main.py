"""``callingest serve normalizer``: the normalizer stage of the stage graph (callingest.stages)."""

from __future__ import annotations

from callingest.service import run_stage_service
from callingest.settings import Settings
from services.normalizer.step import STAGE, step


async def serve(settings: Settings) -> None:
    await run_stage_service(STAGE, step, settings)
