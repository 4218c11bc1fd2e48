"""The trace viewer at ``/ui``: every recorded run, read in a browser (``viewer.py``)."""

from openfusion.server.ui.viewer import SESSION_COOKIE, UI_PREFIX, TraceViewer

__all__ = ["SESSION_COOKIE", "UI_PREFIX", "TraceViewer"]
