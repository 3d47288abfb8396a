"""Credentials out of every text posmine writes: one pattern for URLs' user info, applied to
messages, log records, manifests and summaries. Imports nothing of posmine, so the config
loader and the storage layer share it."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

# The user info of a URL: `user@`, or `user:password@` where the password may hold any of
# `/ @ :` and percent-escapes as typed (an AWS secret key often holds `/`); it runs to the last
# `@` of the URL. A path holding `@` after a `host:port` loses that much too: over-redaction
# only shortens a message, a leak cannot be taken back.
_USERINFO = re.compile(r"(?<=//)(?:[^/:@\s'\"]*:[^\s'\"]*@|[^/\s'\"]*@)")


def redact(url: str) -> str:
    """`url` (or any text holding URLs) without `user:password@` parts, for messages and logs."""
    return _USERINFO.sub("", url)


def redact_all(obj: Any) -> Any:
    """`obj` (nested dicts, lists, strings) with every string redacted: what any output holds."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, Mapping):
        return {k: redact_all(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact_all(v) for v in obj]
    return obj


class RedactingFilter(logging.Filter):
    """A logging filter that redacts credentials in URLs from every record it passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "@" in text:
            record.msg, record.args = redact(text), None
        return True


def has_credentials(url: str) -> bool:
    """True when `url` carries a `user[:password]@` part."""
    return redact(url) != url
