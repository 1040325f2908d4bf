"""Connection tokens: short-lived JWTs (PyJWT, HS256) that let a client without a browser open
a websocket.

Claims: ``sub`` (the user's pk), ``aud`` (``WS_TOKEN_AUDIENCE``), ``iat``, ``exp``
(``WS_TOKEN_TTL`` after issue), ``jti`` (random, for the logs), ``pwd`` (a fingerprint of the
user's password hash: a password change invalidates every token issued before it) and,
optionally, ``rooms`` (the only chat rooms it may join). The header's ``kid`` names the key of
``WS_TOKEN_KEYS`` that signed it, so a new signing key can be put first while tokens signed by
the old one stay valid until they expire.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import time
import uuid
from dataclasses import dataclass
from typing import Any

import jwt
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import ImproperlyConfigured

ALGORITHM = "HS256"
#: The subprotocol a token client offers first and the server selects.
SUBPROTOCOL = "switchboard.v1"
#: The second subprotocol carries the token: ``token.<jwt>`` (a JWT is valid token syntax).
TOKEN_SUBPROTOCOL_PREFIX = "token."  # noqa: S105 (a prefix, not a secret)
#: The kid of the key derived from DJANGO_SECRET_KEY when WS_TOKEN_KEYS is empty.
DERIVED_KID = "secret-key"
#: Shortest signing secret accepted (HS256 wants at least its 256-bit output).
MIN_SECRET_BYTES = 32


class TokenRejected(Exception):
    """A token that does not authenticate; ``reason`` is logged and shown (never the token)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Keyring:
    signing_kid: str
    secrets: dict[str, bytes]


@functools.cache
def _parse_keyring(raw: str, secret_key: str) -> Keyring:
    if not raw.strip():
        derived = hmac.new(secret_key.encode(), b"switchboard.wsauth.token", "sha256").digest()
        return Keyring(DERIVED_KID, {DERIVED_KID: derived})
    keys: dict[str, bytes] = {}
    order: list[str] = []
    for item in raw.split(","):
        kid, sep, secret = item.strip().partition(":")
        if not sep or not kid or not secret:
            raise ImproperlyConfigured("WS_TOKEN_KEYS must be `kid:secret,...`")
        if len(secret.encode()) < MIN_SECRET_BYTES:
            raise ImproperlyConfigured(
                f"WS_TOKEN_KEYS: the secret of {kid!r} is shorter than {MIN_SECRET_BYTES} bytes"
            )
        if kid in keys:
            raise ImproperlyConfigured(f"WS_TOKEN_KEYS names {kid!r} twice")
        keys[kid] = secret.encode()
        order.append(kid)
    return Keyring(order[0], keys)


def keyring() -> Keyring:
    return _parse_keyring(settings.WS_TOKEN_KEYS, settings.SECRET_KEY)


def password_fingerprint(user: Any) -> str:
    """Changes whenever the user's password does (a hash of Django's session auth hash, which
    is itself an HMAC of the password hash: the token reveals neither)."""
    return hashlib.sha256(user.get_session_auth_hash().encode()).hexdigest()[:16]


def issue(user: Any, rooms: list[str] | None = None) -> tuple[str, int]:
    """A new token for ``user`` and its lifetime in seconds."""
    ring = keyring()
    now = int(time.time())
    ttl = settings.WS_TOKEN_TTL
    claims: dict[str, Any] = {
        "sub": str(user.pk),
        "aud": settings.WS_TOKEN_AUDIENCE,
        "iat": now,
        "exp": now + ttl,
        "jti": uuid.uuid4().hex,
        "pwd": password_fingerprint(user),
    }
    if rooms:
        claims["rooms"] = sorted(set(rooms))
    token = jwt.encode(
        claims,
        ring.secrets[ring.signing_kid],
        algorithm=ALGORITHM,
        headers={"kid": ring.signing_kid},
    )
    return token, ttl


def verify(token: str) -> dict[str, Any]:
    """The claims of a valid token (signature, kid, audience, expiry); else TokenRejected."""
    ring = keyring()
    try:
        kid = jwt.get_unverified_header(token).get("kid")
    except jwt.InvalidTokenError:
        raise TokenRejected("malformed", "The token is not a JWT.") from None
    secret = ring.secrets.get(kid) if isinstance(kid, str) else None
    if secret is None:
        raise TokenRejected("unknown_key", "The token was signed with a key this server retired.")
    try:
        return jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            audience=settings.WS_TOKEN_AUDIENCE,
            options={"require": ["sub", "aud", "iat", "exp", "jti", "pwd"]},
        )
    except jwt.ExpiredSignatureError:
        raise TokenRejected("expired", "The token has expired; get a new one.") from None
    except jwt.InvalidAudienceError:
        raise TokenRejected("wrong_audience", "The token is not for this service.") from None
    except jwt.InvalidSignatureError:
        raise TokenRejected("bad_signature", "The token's signature is not valid.") from None
    except jwt.InvalidTokenError as exc:
        raise TokenRejected(
            "malformed", f"The token is not valid ({type(exc).__name__})."
        ) from None


def user_for(claims: dict[str, Any]) -> Any:
    """The active user a verified token names (synchronous: the ORM); else TokenRejected."""
    try:
        user = get_user_model()._default_manager.get(pk=claims["sub"])
    except (get_user_model().DoesNotExist, ValueError, TypeError):
        raise TokenRejected("unknown_user", "The token's user does not exist.") from None
    if not user.is_active:
        raise TokenRejected("inactive_user", "The token's user is deactivated.")
    if not hmac.compare_digest(str(claims.get("pwd")), password_fingerprint(user)):
        raise TokenRejected("password_changed", "The password changed after the token was issued.")
    return user


def from_subprotocols(offered: list[str]) -> str | None:
    """The token a client offered as ``token.<jwt>`` among its subprotocols, if any."""
    for protocol in offered:
        if protocol.startswith(TOKEN_SUBPROTOCOL_PREFIX):
            return protocol[len(TOKEN_SUBPROTOCOL_PREFIX) :]
    return None
