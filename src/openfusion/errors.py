"""The exception tree. Everything openfusion raises on purpose is an ``OpenFusionError``::

    OpenFusionError
    ├── ConfigError              a setting, preset, template or model id is wrong: fix the config
    │   └── MissingAPIKeyError   the env var holding a provider's key is unset (names the variable)
    ├── StoreError               the store's database failed during use (down, locked, full)
    └── ProviderError            one call to one model failed; carries reason, status, message
        ├── UpstreamError        the upstream answered with an HTTP error status
        ├── UpstreamTimeout      no (complete) answer in time
        └── InvalidResponseError the upstream answered something that is not a valid completion

Inside a fusion, a ``ProviderError`` never escapes: it becomes a ``MemberFailure`` value.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from openfusion.types import Usage


class OpenFusionError(Exception):
    """Base of every error openfusion raises on purpose."""


class ConfigError(OpenFusionError):
    """The configuration (settings, preset, template, model id) cannot be used as it is."""


class StoreError(OpenFusionError):
    """The store's database failed while in use; the message names it (never its password)."""


class MissingAPIKeyError(ConfigError):
    def __init__(self, provider: str, env_var: str) -> None:
        self.provider = provider
        self.env_var = env_var
        super().__init__(
            f"provider {provider!r} needs an API key: set the environment variable {env_var} "
            f"(e.g. `export {env_var}=...`), or use the offline preset with `--preset local`"
        )


def reason_for_status(status: int | None) -> str:
    """The failure reason recorded for an upstream HTTP status."""
    if status == 402:
        return "insufficient_credits"
    if status == 429:
        return "rate_limited"
    if status in (408, 504):
        return "timeout"
    return "upstream_error"


class ProviderError(OpenFusionError):
    """A call to a model failed: ``reason`` is a stable code, ``message`` the upstream's words."""

    reason = "upstream_error"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        reason: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.retry_after = retry_after
        """Seconds the upstream asked us to wait (``Retry-After``), if it said."""
        self.tries = 1
        """Calls made before giving up (retries and fallbacks included)."""
        self.usage: Usage | None = None
        """What the failed call consumed, when it was billed anyway (a stream cut after its
        text was sent: estimated from that text)."""
        if reason is not None:
            self.reason = reason
        self.ours = False
        """The failure is this process's, not the upstream's (our clock fired while our event
        loop lagged): it says nothing of the model's health, so it does not feed the breaker."""

    @property
    def retryable(self) -> bool:
        """Worth another try: timeouts, dropped connections, 408, 429 and 5xx."""
        if self.reason in ("timeout", "connection_error", "rate_limited"):
            return True
        return self.status is not None and (self.status in (408, 429) or self.status >= 500)


class UpstreamError(ProviderError):
    def __init__(
        self,
        message: str,
        *,
        status: int,
        reason: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(
            message,
            status=status,
            reason=reason or reason_for_status(status),
            retry_after=retry_after,
        )


class UpstreamTimeout(ProviderError):
    reason = "timeout"


class InvalidResponseError(ProviderError):
    reason = "invalid_response"
