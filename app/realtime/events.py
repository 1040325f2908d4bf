"""Internal events (what views, signals and other services send through the channel layer):
the fields a handler relies on, checked once at the consumer's boundary.

A consumer declares, per event type it handles, an :class:`EventSchema`; ``GroupMemberConsumer``
drops an event that does not match it, or that has no handler, instead of letting the handler
raise (logged at most once per type and problem every :data:`LOG_EVERY_SECONDS`, with a count):
a malformed event is sent to a whole group, and one ``KeyError`` per member would close every
socket in the room -- and one log line per member would flood the log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("switchboard.ws")

#: One warning per event type and problem this often at most (a room of 1,000 members gets
#: 1,000 copies of one bad event), saying how many were dropped since the last one.
LOG_EVERY_SECONDS = 10.0
#: Distinct (type, problem) pairs remembered for that.
KINDS_KEPT = 256


@dataclass(frozen=True)
class EventSchema:
    """Fields an internal event must (``required``) or may (``optional``) carry, with their
    types."""

    required: Mapping[str, type | tuple[type, ...]]
    optional: Mapping[str, type | tuple[type, ...]] = field(default_factory=dict)

    def problem(self, event: Mapping[str, Any]) -> str | None:
        """What is wrong with ``event`` (a short text that names no value), or ``None``."""
        for name, kind in self.required.items():
            if name not in event:
                return f"no {name!r}"
            if not isinstance(event[name], kind):
                return f"{name!r} is a {type(event[name]).__name__}"
        for name, kind in self.optional.items():
            if name in event and not isinstance(event[name], kind):
                return f"{name!r} is a {type(event[name]).__name__}"
        return None


class DroppedEvents:
    """Counts dropped internal events and logs them without flooding the log."""

    def __init__(self) -> None:
        self.total = 0
        self._unlogged: dict[tuple[str, str], int] = {}
        self._logged_at: dict[tuple[str, str], float] = {}

    def drop(self, kind: str, problem: str) -> None:
        self.total += 1
        key = (kind, problem)
        if key not in self._logged_at and len(self._logged_at) >= KINDS_KEPT:
            # Bounded: a sender of endless new types cannot grow these.
            self._logged_at.clear()
            self._unlogged.clear()
        self._unlogged[key] = self._unlogged.get(key, 0) + 1
        now = time.monotonic()
        if now - self._logged_at.get(key, -LOG_EVERY_SECONDS) >= LOG_EVERY_SECONDS:
            logger.warning(
                "dropped %d internal %r event(s): %s; the sender must be fixed",
                self._unlogged.pop(key),
                kind,
                problem,
            )
            self._logged_at[key] = now


#: This process's count of dropped internal events.
DROPPED_EVENTS = DroppedEvents()
