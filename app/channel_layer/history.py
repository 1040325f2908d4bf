"""Group history: a bounded Redis stream per group, appended and published in one atomic step.

A message sent with :meth:`~channel_layer.layer.FanoutChannelLayer.group_send_recorded` gets a
position in its group: ``offset`` (+1 per message) and ``epoch`` (changes whenever the group's
history was lost or may have been: Redis emptied or restarted, the history expired, a replica
promoted in a failover). One Lua script (:data:`APPEND`)
numbers the message, stores it in the group's stream and publishes it, so an offset can never be
published out of order or skipped unseen; the stored copy is exactly what was published.

Both keys share the group channel's hash tag (``{<group>}``): on a Redis Cluster the stream, its
metadata and the channel live in one slot, on the shard that publishes the message.

The stream is bounded by length (``size``, exact ``MAXLEN``) and by age (``ttl``, ``MINID`` on
the stream's time-based ids); its keys expire ``ttl`` after the last message. :data:`READ` serves
a resume (every message after an offset) or the last N, with the group's current epoch and
offset, in one atomic read.

The script edits the message as MessagePack (Redis's ``cmsgpack``), so recording needs the
layer's default serializer, ``msgpack`` without encryption.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

#: The server's replication id. It changes when a replica is promoted (Sentinel or Cluster
#: failover) or a server restarts: a history written under another id may have lost its last
#: appends (replication is asynchronous), so it counts as lost -- a new epoch -- rather than
#: hand out offsets that clients have already seen for other messages.
_WRITER = """
local writer = string.match(redis.call('INFO', 'replication'), 'master_replid:(%w+)')
"""

#: KEYS[1] stream, KEYS[2] metadata (epoch, offset, writer). ARGV[1] channel, ARGV[2] the
#: layer's header (publisher token and sequence number), ARGV[3] the message (MessagePack),
#: ARGV[4] size, ARGV[5] ttl in ms, ARGV[6] a fresh epoch (used when the group has none),
#: ARGV[7] PUBLISH or SPUBLISH. Answers {offset, epoch, receivers}.
APPEND = (
    _WRITER
    + """
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if not epoch or redis.call('HGET', KEYS[2], 'writer') ~= writer then
  epoch = ARGV[6]
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'epoch', epoch, 'offset', 0, 'writer', writer)
end
local offset = redis.call('HINCRBY', KEYS[2], 'offset', 1)
local message = cmsgpack.unpack(ARGV[3])
message['offset'] = offset
message['epoch'] = epoch
local payload = cmsgpack.pack(message)
local ttl = tonumber(ARGV[5])
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[4], '*', 'o', offset, 'p', payload)
redis.call('XTRIM', KEYS[1], 'MINID', now_ms - ttl)
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
local receivers = redis.call(ARGV[7], ARGV[1], ARGV[2] .. payload)
return {offset, epoch, receivers}
"""
)

#: KEYS as APPEND. ARGV[1] "since" or "last", ARGV[2] the offset or the count, ARGV[3] ttl in ms.
#: Answers {epoch or "", latest offset, entries newest first}.
READ = (
    _WRITER
    + """
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if not epoch or redis.call('HGET', KEYS[2], 'writer') ~= writer then
  return {'', 0, {}}
end
local offset = tonumber(redis.call('HGET', KEYS[2], 'offset'))
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('XTRIM', KEYS[1], 'MINID', now_ms - tonumber(ARGV[3]))
local count = tonumber(ARGV[2])
if ARGV[1] == 'since' then
  count = offset - count
end
if count <= 0 then
  return {epoch, offset, {}}
end
return {epoch, offset, redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', count)}
"""
)


@dataclass(frozen=True)
class Script:
    """A Lua script and its SHA1 (``EVALSHA`` first, ``EVAL`` when the server lacks it)."""

    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())  # noqa: S324


APPEND_SCRIPT = Script(APPEND)
READ_SCRIPT = Script(READ)


@dataclass(frozen=True)
class Position:
    """Where a recorded message stands in its group's history."""

    offset: int
    epoch: str


@dataclass(frozen=True)
class HistoryPage:
    """What :data:`READ` found: the group's epoch (``""`` when it has no history) and latest
    offset, and the messages asked for that are still kept, oldest first."""

    epoch: str
    offset: int
    messages: list[dict[str, Any]]

    def covers(self, since: int) -> bool:
        """Whether ``messages`` are *every* message after ``since`` (none aged or trimmed out)."""
        wanted = self.offset - since
        if wanted <= 0:
            return True
        return len(self.messages) == wanted and self.messages[0].get("offset") == since + 1


def parse_entries(entries: list[Any], deserialize: Any) -> list[dict[str, Any]]:
    """XREVRANGE entries (newest first, fields ``o`` and ``p``) -> messages, oldest first."""
    messages = []
    for _id, fields in reversed(entries):
        values = dict(zip(fields[::2], fields[1::2], strict=True))
        messages.append(deserialize(values[b"p"]))
    return messages
