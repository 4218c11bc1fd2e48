"""The fusion engine: panel fan-out, judge analysis, synthesis. Pure asyncio, no HTTP."""

from openfusion.engine.fusion import DEPTH_HEADER, Fusion
from openfusion.engine.result import (
    AnswerDelta,
    Done,
    FusionEvent,
    FusionResult,
    MemberEvent,
    MemberFailure,
    MemberResponse,
    StageEvent,
    ToolEvent,
)

__all__ = [
    "DEPTH_HEADER",
    "AnswerDelta",
    "Done",
    "Fusion",
    "FusionEvent",
    "FusionResult",
    "MemberEvent",
    "MemberFailure",
    "MemberResponse",
    "StageEvent",
    "ToolEvent",
]
