"""``callingest serve notifier``: the notifier stage of the stage graph (callingest.stages)."""

from __future__ import annotations

from callingest.service import run_stage_service
from callingest.settings import Settings
from services.notifier.step import step


async def serve(settings: Settings) -> None:
    await run_stage_service("notifier", step, settings)
