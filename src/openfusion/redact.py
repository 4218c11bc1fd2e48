"""``Redactor``: keeps the configured secrets out of whatever an upstream says back.

An upstream (or a proxy in front of it) may echo what it was sent: a body that quotes the
``Authorization`` header, or the key in the masked form some providers print
(``sk-or-ca**********5678``: the key's first characters, a run of ``*``, ``.``, ``x`` or
``•``, its last characters). Its text then travels on — into error bodies, ``failed_models``,
stream error events, logs and run records. The one ``Redactor`` built from the settings is
applied where upstream text enters (``engine.policy.Caller``) and where runs are written
(``store.recorder``), and replaces:

- every configured secret value (the API keys in the environment) wherever it occurs;
- a masked form of one: a token whose visible head is a prefix of a secret and whose visible
  tail is a suffix of it, with a mask run between them and at least ``MIN_REVEALED``
  characters shown (a masked form of some other key is not touched);
- a ``Bearer <token>`` pair whose token looks like a credential (8 characters or more, a
  digit or a mask among them), whatever the key: a credential echoed back is never data.

Text without a secret, a mask run or the word ``Bearer`` passes through one substring test per
secret and a few per mask run, no regex: every string of every run record goes through here.
A whole record (``value``) is first serialised once and those tests run on the serialised text:
most records hold none of it and are returned as they are, without a walk over their strings.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from openfusion.settings import Settings

__all__ = ["REDACTED", "Redactor"]

REDACTED = "[redacted]"
MIN_SECRET_CHARS = 8
"""Shorter values (``1``, ``true``) are not secrets worth scrubbing, and would wreck text."""
MIN_REVEALED = 4
"""A masked form showing fewer characters of the key than this says nothing about it."""
SECRET_HEADER_WORDS = ("auth", "key", "token", "secret")
SECRET_ENV_SUFFIXES = ("_API_KEY", "_KEY", "_TOKEN", "_SECRET", "_PASSWORD")

_MASKED = re.compile(r"(?<![\w\-])([\w\-]*?)(\*{3,}|•{3,}|…+|\.{3,}|[xX]{3,})([\w\-]*)")
"""Each match holds a mask run: ``***``, ``...``, ``xxx`` (any case), ``…`` or ``•••``."""
_PLAIN = frozenset({int, float, bool, type(None)})
"""Values with no text in them."""
_BEARER = re.compile(r"(?i)\b(bearer)\s+(?=[^\s\"',;]*[\d*•…])[^\s\"',;]{8,}")
_FOLD = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ*.", b"abcdefghijklmnopqrstuvwxyzxx")
"""Serialised text folded for the quick tests: lower case, ``*`` and ``.`` as ``x``."""
_BULLETS = "•••".encode()
_JSON_ESCAPED = re.compile(r'["\\\x00-\x1f]')
"""What JSON writes escaped: a secret holding one of these is not found in serialised text."""


class Redactor:
    """Replaces ``secrets`` (and their masked forms, and any bearer token) by ``[redacted]``."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        unique = {s for s in secrets if len(s) >= MIN_SECRET_CHARS}
        self.secrets: tuple[str, ...] = tuple(sorted(unique, key=len, reverse=True))
        """Longest first, so a key that contains another is replaced whole."""
        self._encoded = tuple(secret.encode() for secret in self.secrets)
        self._serialised_tests = not any(_JSON_ESCAPED.search(s) for s in self.secrets)

    @classmethod
    def from_settings(cls, settings: Settings) -> Redactor:
        """The secrets of a deployment: the values of the environment variables that hold
        provider keys (``api_key_env``) or look like a credential (``*_API_KEY``, ``*_KEY``,
        ``*_TOKEN``, ``*_SECRET``, ``*_PASSWORD``), and the values of providers' extra headers
        that carry a credential (``Authorization``, ``X-Api-Key``: not ``X-Title``)."""
        names = {p.api_key_env for p in settings.providers.values() if p.api_key_env}
        names |= {n for n in settings.env if n.upper().endswith(SECRET_ENV_SUFFIXES)}
        values = [settings.env.get(name, "") for name in names]
        for provider in settings.providers.values():
            for name, value in provider.headers.items():
                if any(word in name.lower() for word in SECRET_HEADER_WORDS):
                    values.append(value)
                    values.append(value.partition(" ")[2])  # "Bearer <key>": the key alone
        return cls(values)

    def __call__(self, text: str) -> str:
        """``text`` with every secret, masked secret and bearer token replaced."""
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        lowered = text.lower()  # the regexes only where their literal part occurs: 20x faster
        if self.secrets and (
            "***" in lowered
            or "..." in lowered
            or "xxx" in lowered
            or "…" in lowered
            or "•••" in lowered
        ):
            text = _MASKED.sub(self._masked, text)
        if "bearer" in lowered:
            text = _BEARER.sub(rf"\1 {REDACTED}", text)
        return text

    def value(self, value: Any) -> Any:
        """``value`` with every string inside it (dicts, lists, tuples) redacted: ``value``
        itself when nothing in it needs redacting."""
        if self._serialised_tests and self._clean(value):
            return value
        return self._walk(value)

    def _clean(self, value: Any) -> bool:
        """True when no string in ``value`` holds a secret, a mask run or ``bearer``: the
        tests of ``__call__``, once, on ``value`` serialised (dict keys and numbers there only
        add false alarms: then the walk decides). False when it cannot be serialised."""
        try:
            text = orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)
        except TypeError:
            return False
        if any(secret in text for secret in self._encoded):
            return False
        folded = text.translate(_FOLD)  # one pass: "***", "..." and "XxX" all become "xxx"
        if b"bearer" in folded:
            return False
        if not self.secrets:
            return True
        if b"xxx" in folded:
            return False
        if b"\xe2" not in text:  # "…" and "•" start with this byte; most text has none
            return True
        return not (b"\xe2\x80\xa6" in text or _BULLETS in text)

    def _walk(self, value: Any) -> Any:
        kind = type(value)  # exact types first: an ABC check costs more than the rest here
        if kind is str:
            return self(value)
        if kind in _PLAIN:
            return value
        if kind is dict:  # numbers and None without a call: most of a run record's values
            return {k: v if type(v) in _PLAIN else self._walk(v) for k, v in value.items()}
        if kind is list or kind is tuple:
            return [v if type(v) in _PLAIN else self._walk(v) for v in value]
        if isinstance(value, str):
            return self(value)
        if isinstance(value, Mapping):
            return {k: self._walk(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._walk(v) for v in value]
        return value

    def _masked(self, match: re.Match[str]) -> str:
        head, tail = match.group(1), match.group(3)
        shown = len(head) + len(tail)
        if shown >= MIN_REVEALED:
            for secret in self.secrets:
                if shown < len(secret) and secret.startswith(head) and secret.endswith(tail):
                    return REDACTED
        return match.group(0)
