"""openfusion: a self-hostable fusion gateway for large language models.

>>> import asyncio
>>> from openfusion import Fusion
>>> result = asyncio.run(Fusion.from_preset("local").run("Who wrote Pride and Prejudice?"))
"""

from openfusion.engine import (
    AnswerDelta,
    Done,
    Fusion,
    FusionCallEvent,
    FusionEvent,
    FusionResult,
    MemberEvent,
    MemberFailure,
    MemberResponse,
    RunOptions,
    StageEvent,
    ToolEvent,
)
from openfusion.errors import (
    ConfigError,
    InvalidResponseError,
    MissingAPIKeyError,
    OpenFusionError,
    ProviderError,
    UpstreamError,
    UpstreamTimeout,
)
from openfusion.presets import PanelSlot, Preset, list_presets, load_preset
from openfusion.providers import ModelRef, Provider, ProviderRegistry
from openfusion.settings import Settings
from openfusion.types import (
    Chunk,
    Completion,
    CompletionRequest,
    Message,
    Reasoning,
    ToolSpec,
    Usage,
)

__version__ = "0.1.0"

__all__ = [
    "AnswerDelta",
    "Chunk",
    "Completion",
    "CompletionRequest",
    "ConfigError",
    "Done",
    "Fusion",
    "FusionCallEvent",
    "FusionEvent",
    "FusionResult",
    "InvalidResponseError",
    "MemberEvent",
    "MemberFailure",
    "MemberResponse",
    "Message",
    "MissingAPIKeyError",
    "ModelRef",
    "OpenFusionError",
    "PanelSlot",
    "Preset",
    "Provider",
    "ProviderError",
    "ProviderRegistry",
    "Reasoning",
    "RunOptions",
    "Settings",
    "StageEvent",
    "ToolEvent",
    "ToolSpec",
    "UpstreamError",
    "UpstreamTimeout",
    "Usage",
    "list_presets",
    "load_preset",
]
