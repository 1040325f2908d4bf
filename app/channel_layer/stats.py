"""The channel layer's counters: one set per worker process, shown in ``/readyz``.

Every message the layer could not hand to a consumer is counted here by reason (``dropped``,
``undeliverable``, ``lost``), as are publish failures, lost subscription connections, error
replies and topology changes, so that nothing is lost without a trace.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class LayerStats:
    """Counters of one worker process (all its event loops). ``dropped`` should stay 0."""

    published: int = 0
    publish_failures: int = 0
    received: int = 0  # pub/sub messages read from Redis
    delivered: int = 0  # messages put into a consumer's mailbox
    dropped: int = 0  # messages pushed out of a full mailbox (that consumer was too slow)
    undeliverable: int = 0  # messages for a channel that is gone (its consumer disconnected)
    reconnects: int = 0  # times a subscription connection was lost
    lost: int = 0  # messages that never arrived (a gap in a publisher's sequence numbers)
    redis_errors: int = 0  # error replies on a subscription connection (each one logged)
    rehomed: int = 0  # subscriptions moved to another node (failover, slot migration)
    redirects: int = 0  # publishes answered MOVED / ASK, sent again to the slot's new owner

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


#: Process-wide counters (``/readyz`` shows them).
STATS = LayerStats()


def stats() -> dict[str, int]:
    """This process's layer counters (:class:`LayerStats`) as a dict."""
    return STATS.as_dict()
