"""The one table of environment settings.

Every knob of Switchboard -- Django, gunicorn/uvicorn and the native stack -- is declared here
once, with its default and its meaning. ``settings.py``, ``infra/gunicorn.conf.py`` and
``infra/stack.py`` read values through :func:`get` and friends; the README's settings table is
generated from this list (``python app/config/env.py``) and a test keeps the two in sync, so the
documentation cannot drift from the code.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from django.core.exceptions import ImproperlyConfigured


@dataclass(frozen=True)
class Setting:
    name: str
    default: str
    component: str
    doc: str


#: The native stack's public HTTPS port; also in the default trusted origins below.
_HTTPS_PORT = "8443"

DJANGO = "django"
SERVER = "gunicorn / uvicorn"
STACK = "native stack"

#: Insecure on purpose: accepted only while DJANGO_DEBUG is on (see settings.py).
DEV_SECRET_KEY = "dev-only-insecure-secret-key-do-not-use-in-production"  # noqa: S105

SETTINGS: tuple[Setting, ...] = (
    # -- Django ---------------------------------------------------------------------------------
    Setting("DJANGO_DEBUG", "false", DJANGO, "Debug mode. Off unless asked for."),
    Setting(
        "DJANGO_SECRET_KEY",
        "",
        DJANGO,
        "Secret key. Required when DJANGO_DEBUG is off; a dev-only key is used in debug.",
    ),
    Setting(
        "DJANGO_ALLOWED_HOSTS",
        "localhost,127.0.0.1,[::1]",
        DJANGO,
        "Comma-separated host names served. Also the websocket Origin allow-list.",
    ),
    Setting(
        "DJANGO_CSRF_TRUSTED_ORIGINS",
        f"https://localhost:{_HTTPS_PORT},https://127.0.0.1:{_HTTPS_PORT}",
        DJANGO,
        "Comma-separated origins (scheme://host:port) trusted for unsafe HTTP methods.",
    ),
    Setting(
        "DJANGO_SECURE",
        "true",
        DJANGO,
        "HTTPS hardening: secure cookies, HSTS, SSL redirect. Turn off only for plain-HTTP dev.",
    ),
    Setting("DJANGO_HSTS_SECONDS", "31536000", DJANGO, "Strict-Transport-Security max-age."),
    Setting("DJANGO_LOG_LEVEL", "INFO", DJANGO, "Log level of the app loggers."),
    Setting(
        "DJANGO_STATIC_ROOT",
        "var/static",
        DJANGO,
        "Where collectstatic writes and whitenoise serves from (relative: to the repo root).",
    ),
    Setting(
        "DATABASE_URL",
        "sqlite:///var/db.sqlite3",
        DJANGO,
        "Database URL (dj-database-url). Relative SQLite paths are under the repo root.",
    ),
    Setting(
        "REDIS_URL",
        "redis://127.0.0.1:6379/0",
        DJANGO,
        "Redis for the channel layer and /readyz. `redis://` or `rediss://`, with password. "
        "`single`: the server; `cluster`: any node (a seed); `sentinel`: the master's "
        "credentials, database and TLS (its host is ignored).",
    ),
    Setting(
        "REDIS_TOPOLOGY",
        "single",
        DJANGO,
        "`single` (one server), `sentinel` (a Sentinel-managed master, followed through "
        "failovers) or `cluster` (Redis Cluster 7.0+ / Valkey, sharded pub/sub). "
        "`fanout` layer only.",
    ),
    Setting(
        "REDIS_SENTINELS",
        "",
        DJANGO,
        "`sentinel`: comma-separated `host:port` of the Sentinels (asked with REDIS_URL's "
        "password).",
    ),
    Setting(
        "REDIS_SENTINEL_MASTER",
        "switchboard",
        DJANGO,
        "`sentinel`: the master's name in the Sentinels' configuration.",
    ),
    Setting(
        "CHANNEL_PREFIX",
        "switchboard",
        DJANGO,
        "Start of every Redis channel name, followed by REDIS_URL's database number: "
        "deployments sharing one Redis with different prefixes or databases never see each "
        "other's messages (pub/sub ignores database numbers). No braces, colons or spaces.",
    ),
    Setting(
        "REDIS_SOCKET_TIMEOUT",
        "15",
        DJANGO,
        "Seconds a Redis read may take. Must exceed the layer's 5 s blocking pop "
        "(redis-py 8 defaults to 5 s, which races it).",
    ),
    Setting(
        "REDIS_MAX_CONNECTIONS",
        "1000",
        DJANGO,
        "Connection pool size per worker process (redis-py 8 defaults to 100 and then fails).",
    ),
    Setting(
        "REDIS_MAX_IDLE_CONNECTIONS",
        "8",
        DJANGO,
        "Idle Redis connections a worker keeps; what a burst opened beyond this is closed "
        "(channels-redis' own pool keeps every connection forever).",
    ),
    Setting(
        "CHANNEL_LAYER",
        "fanout",
        DJANGO,
        "`fanout` (Redis pub/sub, groups kept per process, one decode per process, counted "
        "drops: `channel_layer/`), `redis` (channels-redis), `pubsub` "
        "(channels-redis pub/sub) or `memory` (single process only: tests).",
    ),
    Setting(
        "CHANNEL_CAPACITY",
        "1000",
        DJANGO,
        "Messages a channel may queue before the layer drops (channels-redis default: 100); "
        "`fanout` counts each drop, logs it and shows it in /readyz.",
    ),
    Setting("CHANNEL_EXPIRY", "60", DJANGO, "Seconds an undelivered message lives."),
    Setting(
        "CHANNEL_GROUP_EXPIRY",
        "86400",
        DJANGO,
        "Seconds a group membership lives. Consumers renew theirs at half this period.",
    ),
    Setting(
        "WS_MAX_MESSAGE_BYTES",
        "65536",
        SERVER,
        "Largest websocket frame accepted; larger ones close the socket with 1009.",
    ),
    Setting(
        "WS_PROTOCOL",
        "lean",
        SERVER,
        "uvicorn's websocket protocol: `lean` (websockets-sansio with a lighter per-socket "
        "state, `infra/uvicorn_ws.py`) or `websockets-sansio` (uvicorn's own).",
    ),
    Setting("WS_PING_INTERVAL", "20", SERVER, "Seconds between server pings on idle websockets."),
    Setting("WS_PING_TIMEOUT", "20", SERVER, "Seconds to wait for a pong before closing."),
    Setting(
        "WS_PER_MESSAGE_DEFLATE",
        "false",
        SERVER,
        "Per-message compression (costs CPU per recipient; off by default).",
    ),
    Setting("CHAT_MAX_MESSAGE_CHARS", "4000", DJANGO, "Longest chat `message` text accepted."),
    Setting("CHAT_RATE_PER_SECOND", "10", DJANGO, "Sustained chat messages per connection."),
    Setting("CHAT_RATE_BURST", "20", DJANGO, "Burst of chat messages per connection."),
    Setting(
        "CHAT_FLOOD_CLOSE_AFTER",
        "100",
        DJANGO,
        "Frames in a row over the rate (each answered `rate_limited`) after which the "
        "connection is closed with 1008.",
    ),
    # -- connection tokens and socket authority (app/wsauth/) ----------------------------------
    Setting(
        "WS_TOKEN_KEYS",
        "",
        DJANGO,
        "Connection-token signing keys, `kid:secret,...`: the first signs, every one verifies "
        "(rotate by putting a new key first; drop the old one after `WS_TOKEN_TTL`). Empty: one "
        "key derived from `DJANGO_SECRET_KEY`.",
    ),
    Setting("WS_TOKEN_TTL", "300", DJANGO, "Seconds a connection token from /api/ws-token/ lives."),
    Setting(
        "WS_TOKEN_AUDIENCE",
        "switchboard.ws",
        DJANGO,
        "The `aud` claim tokens are issued for and must carry.",
    ),
    Setting(
        "WS_TOKEN_REFRESH_NOTICE",
        "60",
        DJANGO,
        "Seconds before a token socket's token expires that it gets `token_expiring`; a "
        "`refresh` frame with a new token keeps it open, else it closes with 4401.",
    ),
    Setting(
        "WS_TOKEN_QUERY_PARAM",
        "false",
        DJANGO,
        "Also accept the token as `?token=` (the seeds' clients). Off: URLs end up in logs.",
    ),
    Setting(
        "WS_MAX_CONNECTIONS_PER_USER",
        "20",
        DJANGO,
        "Open websockets per logged-in user, counted across replicas in Redis (0: no limit); "
        "one more is refused with `too_many_connections` and 4429.",
    ),
    Setting(
        "WS_CONNECTION_LEASE",
        "60",
        DJANGO,
        "Seconds a counted connection stays counted unless its worker renews it (every third "
        "of this): a killed worker's sockets stop counting after at most this long.",
    ),
    Setting(
        "WS_SESSION_RECHECK",
        "30",
        DJANGO,
        "Seconds between each worker's checks that its session sockets' sessions still exist "
        "and have not expired (ended ones close with 4401).",
    ),
    Setting(
        "CHAT_HISTORY_SIZE",
        "200",
        DJANGO,
        "Messages kept per room for resume (`?since=`) and `?history=`; 0 turns history off "
        "(frames then carry no `offset`/`epoch`).",
    ),
    Setting(
        "CHAT_HISTORY_TTL",
        "86400",
        DJANGO,
        "Seconds a room's message stays in its history (the room's history goes 24 h after its "
        "last message).",
    ),
    Setting(
        "CHAT_HISTORY_MAX",
        "100",
        DJANGO,
        "Largest `?history=N` a client may ask for on connect.",
    ),
    Setting(
        "PRESENCE_TTL",
        "30",
        DJANGO,
        "Seconds a chat socket stays in its room's presence without a refresh (workers refresh "
        "every third of it): how long a crashed worker's sockets are still listed.",
    ),
    Setting(
        "PRESENCE_EVENTS",
        "true",
        DJANGO,
        "Send `presence.join` / `presence.leave` to rooms (per user: first socket in, last out).",
    ),
    Setting(
        "PRESENCE_EVENTS_MAX_MEMBERS",
        "100",
        DJANGO,
        "Rooms with more sockets than this get no join/leave events (no storms in big rooms); "
        "`presence` requests still work.",
    ),
    Setting(
        "NOTIFICATIONS_REPLAY_MAX",
        "1000",
        DJANGO,
        "Stored notifications replayed on one `/ws/notifications/?since=` connect (in pages of "
        "100); past it a `replay.more` frame says where to resume.",
    ),
    Setting(
        "REPLICA_NAME",
        "",
        DJANGO,
        "Name of this replica in `sent_by`/`delivered_by` (default: the host name).",
    ),
    Setting(
        "METRICS_ENABLED",
        "true",
        DJANGO,
        "Prometheus metrics on `GET /metrics` of each replica's own port (never through nginx "
        "or any proxy). `false`: no endpoint, and nothing counted.",
    ),
    Setting(
        "LOG_FORMAT",
        "plain",
        DJANGO,
        "`plain` (one line of text per record) or `json` (one JSON object per line, with "
        "timestamp, level, logger, pid, replica and the websocket's connection id); gunicorn's "
        "and uvicorn's own logs too.",
    ),
    # -- gunicorn / uvicorn ---------------------------------------------------------------------
    Setting("PORT", "8000", SERVER, "Port one replica's gunicorn listens on."),
    Setting("BIND_HOST", "127.0.0.1", SERVER, "Address gunicorn binds; `0.0.0.0` in containers."),
    Setting("WEB_CONCURRENCY", "2", SERVER, "Uvicorn worker processes per replica."),
    Setting(
        "GRACEFUL_TIMEOUT",
        "20",
        SERVER,
        "Seconds a stopping worker gets to close its websockets (1012) and finish requests.",
    ),
    Setting(
        "FORWARDED_ALLOW_IPS",
        "127.0.0.1,::1",
        SERVER,
        "Proxies whose X-Forwarded-* headers are trusted (nginx). Nobody else's are.",
    ),
    Setting(
        "METRICS_DIR",
        "",
        SERVER,
        "Folder of one replica's metric files (prometheus_client multiprocess mode), emptied at "
        "its start. Empty: a new private folder under the system temp folder, removed at exit.",
    ),
    # -- native stack (make run) ----------------------------------------------------------------
    Setting("SWITCHBOARD_REPLICAS", "3", STACK, "App replicas (gunicorn masters) started."),
    Setting(
        "SWITCHBOARD_APP_PORT_BASE",
        "8101",
        STACK,
        "Replica i (1-based) listens on this port + i - 1.",
    ),
    Setting("SWITCHBOARD_HTTPS_PORT", _HTTPS_PORT, STACK, "nginx TLS port."),
    Setting("SWITCHBOARD_HTTP_PORT", "8080", STACK, "nginx plain-HTTP port (redirects to HTTPS)."),
    Setting("SWITCHBOARD_REDIS_PORT", "6390", STACK, "Port of the stack's own redis-server."),
    Setting(
        "SWITCHBOARD_RUN_DIR",
        ".run",
        STACK,
        "Runtime folder: certificates, generated configs, logs, pid files, Redis password.",
    ),
)

_BY_NAME = {s.name: s for s in SETTINGS}


def get(name: str, environ: Mapping[str, str] | None = None) -> str:
    """The value of a declared setting in ``environ`` (default: the process environment),
    else its declared default."""
    try:
        default = _BY_NAME[name].default
    except KeyError:
        raise ImproperlyConfigured(f"{name} is not declared in config/env.py") from None
    return (os.environ if environ is None else environ).get(name, default)


def get_bool(name: str) -> bool:
    value = get(name).strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off", ""}:
        return False
    raise ImproperlyConfigured(f"{name}={value!r} is not a boolean (true/false)")


def get_int(
    name: str, *, minimum: int | None = None, environ: Mapping[str, str] | None = None
) -> int:
    raw = get(name, environ)
    try:
        value = int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not an integer") from None
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{name}={value} is below its minimum {minimum}")
    return value


def get_float(name: str, *, minimum: float | None = None) -> float:
    raw = get(name)
    try:
        value = float(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not a number") from None
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{name}={value} is below its minimum {minimum}")
    return value


def get_list(name: str) -> list[str]:
    return [item.strip() for item in get(name).split(",") if item.strip()]


def markdown_table() -> str:
    """The README's settings table."""
    rows = ["| Variable | Default | Used by | Meaning |", "|---|---|---|---|"]
    for s in SETTINGS:
        default = f"`{s.default}`" if s.default else "(empty)"
        rows.append(f"| `{s.name}` | {default} | {s.component} | {s.doc} |")
    return "\n".join(rows)


def splice_table(readme: str, name: str, table: str) -> str:
    """``readme`` with ``table`` between its ``<!-- <name>-table:start/end -->`` markers (the
    generated tables: settings here, metrics in ``observability.metrics``)."""
    start, end = f"<!-- {name}-table:start -->", f"<!-- {name}-table:end -->"
    head, rest = readme.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{table}\n{end}{tail}"


def with_table(readme: str) -> str:
    """``readme`` with the generated settings table."""
    return splice_table(readme, "settings", markdown_table())


def write_readme_table(argv: list[str], splice: Callable[[str], str], table: str) -> None:
    """``python -m <module> --write-readme README.md`` rewrites the table; without arguments it
    prints it."""
    from pathlib import Path

    if argv[1:2] == ["--write-readme"]:
        readme = Path(argv[2])
        readme.write_text(splice(readme.read_text()))
    else:
        print(table)


if __name__ == "__main__":
    import sys

    write_readme_table(sys.argv, with_table, markdown_table())
