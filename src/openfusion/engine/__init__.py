"""The fusion engine: panel fan-out, judge analysis, synthesis, the caller tier. Pure asyncio,
no HTTP."""

from openfusion.engine.fusion import Fusion
from openfusion.engine.options import RunOptions
from openfusion.engine.result import (
    AnswerDelta,
    Done,
    FusionCallEvent,
    FusionEvent,
    FusionResult,
    MemberEvent,
    MemberFailure,
    MemberResponse,
    StageEvent,
    ToolEvent,
)
from openfusion.engine.run import DEPTH_HEADER

__all__ = [
    "DEPTH_HEADER",
    "AnswerDelta",
    "Done",
    "Fusion",
    "FusionCallEvent",
    "FusionEvent",
    "FusionResult",
    "MemberEvent",
    "MemberFailure",
    "MemberResponse",
    "RunOptions",
    "StageEvent",
    "ToolEvent",
]
